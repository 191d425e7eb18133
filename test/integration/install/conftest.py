"""The CRDs the install manifests need, on the shared local apiserver."""

from __future__ import annotations

import pytest

from hack.localcluster import LocalCluster
from test.integration.install.helpers import CONFIG, crd_files, servicemonitor_crd


@pytest.fixture(scope="module")
def crds_and_namespace(control_plane: LocalCluster) -> LocalCluster:
    """Workspace, Machine and ServiceMonitor CRDs plus the kaito-system Namespace, applied for real.

    Server-side apply under a shared field manager: idempotent and safe beside other suites that apply
    the same CRDs. A server dry-run of namespaced objects needs their Namespace to exist.
    """
    for path in (*crd_files(), servicemonitor_crd()):
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
    )
    control_plane.kubectl(
        "apply", "--server-side", "--field-manager=kaito-install", "-k", str(CONFIG / "namespace")
    )
    return control_plane
