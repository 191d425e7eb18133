"""The CRDs the install manifests need, on the shared local apiserver."""

from __future__ import annotations

from pathlib import Path

import pytest

from hack.localcluster import LocalCluster
from test.integration.install.helpers import CONFIG, crd_files, prometheus_operator_crds, tools_dir

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Build helm/kubeconform (hack/build-tools.sh, minutes when the cache is cold) at collection time,
    where no per-test timeout applies, instead of inside whichever test happens to need them first."""
    if any(HERE in Path(str(item.path)).resolve().parents for item in items):
        tools_dir()


@pytest.fixture(scope="module")
def crds_and_namespace(control_plane: LocalCluster) -> LocalCluster:
    """Workspace, Machine, ServiceMonitor and PrometheusRule CRDs plus the kaito-system Namespace, applied for real.

    Server-side apply under a shared field manager: idempotent and safe beside other suites that apply
    the same CRDs. A server dry-run of namespaced objects needs their Namespace to exist.
    """
    for path in (*crd_files(), *prometheus_operator_crds()):
        control_plane.kubectl(
            "apply", "--server-side", "--force-conflicts", "--field-manager=kaito-crds", "-f", str(path)
        )
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/workspaces.kaito.sh",
        "crd/machines.karpenter.sh",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    )
    control_plane.kubectl(
        "apply", "--server-side", "--field-manager=kaito-install", "-k", str(CONFIG / "namespace")
    )
    return control_plane
