"""The Machine CRD on the full local cluster, and the provisioner as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hack.localcluster import LocalCluster
from test.e2e.provisioner.helpers import REPO, ProvisionerProcess, start_provisioner

MACHINE_CRD = REPO / "config" / "crd" / "karpenter.sh_machines.yaml"


@pytest.fixture(scope="session")
def machine_crd(full_cluster: LocalCluster) -> LocalCluster:
    """Install the Machine CRD (server-side apply: idempotent, safe beside other packages doing the same)."""
    full_cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=kaito-crds", "-f", str(MACHINE_CRD)
    )
    full_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/machines.karpenter.sh")
    return full_cluster


@pytest.fixture
def provisioner(machine_crd: LocalCluster, namespace: str, tmp_path: Path) -> Iterator[ProvisionerProcess]:
    """The provisioner process for one test, leader-elected on a Lease in the test's namespace
    (SIGTERMed afterwards; ``KAITO_SHOW_PROVISIONER_LOG=1`` prints its log)."""
    p = start_provisioner(
        machine_crd, tmp_path / "provisioner.log", "--kwok-node-delay", "1", lease_namespace=namespace
    )
    try:
        yield p
    finally:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
            try:
                p.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
        if os.environ.get("KAITO_SHOW_PROVISIONER_LOG"):
            print(p.log_tail(200))
