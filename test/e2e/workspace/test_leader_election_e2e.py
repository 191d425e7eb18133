"""Two controller replicas with leader election: one reconciles, the standby takes over after kill -9,
and no workspace ever gets a second Machine."""

from __future__ import annotations

import signal
from pathlib import Path

import yaml

from hack.localcluster import LocalCluster
from kaito.machine import machine_name
from test.e2e.workspace.conftest import SAMPLES, Operator
from test.e2e.workspace.test_inference_e2e import kget, machines_of, wait_condition
from test.waiting import eventually

FAST_LEASE = [
    "--leader-elect",
    "--leader-election-lease-duration",
    "4",
    "--leader-election-renew-deadline",
    "3",
    "--leader-election-retry-period",
    "0.5",
]


def apply(op: Operator, name: str) -> None:
    doc = yaml.safe_load((SAMPLES / "kaito_workspace_phi_3.yaml").read_text())
    doc["metadata"]["name"] = name
    op.cluster.kubectl("apply", "-n", op.namespace, "-f", "-", input=yaml.safe_dump(doc))


async def test_standby_takes_over_without_duplicates(
    crds: LocalCluster, namespace: str, tmp_path: Path
) -> None:
    # No webhook here: the apiserver would call one fixed replica, and this test kills replicas.
    op = Operator(crds, namespace, tmp_path, webhook=False)
    lease = ["--leader-election-namespace", namespace, *FAST_LEASE]
    try:
        a = op.start_controller(*lease, "--leader-election-identity", "replica-a")
        b = op.start_controller(*lease, "--leader-election-identity", "replica-b")
        op.start_provisioner()
        for p in op.procs:
            await op.ready(p)
        apply(op, "first")
        await wait_condition(op, "first", "WorkspaceReady", "True")
        holder = kget(op, "lease", "kaito-workspace", "-n", namespace)["spec"]["holderIdentity"]
        leader, standby = (a, b) if holder == "replica-a" else (b, a)
        leader.stop(signal.SIGKILL)

        apply(op, "second")
        await wait_condition(op, "second", "WorkspaceReady", "True", timeout=60)
        new_holder = kget(op, "lease", "kaito-workspace", "-n", namespace)["spec"]["holderIdentity"]
        assert new_holder != holder and standby.alive()
        for name in ("first", "second"):
            assert [m["metadata"]["name"] for m in machines_of(op, name)] == [
                machine_name(namespace, name, 0)
            ]

        async def standby_counts() -> bool:
            return 'kaito_workspace_count{state="Ready"} 2.0' in standby.metrics()

        await eventually(standby_counts, 20, "the new leader to count two Ready workspaces")
        crds.kubectl("delete", "workspaces", "--all", "-n", namespace, "--timeout=60s", timeout=90)
        assert machines_of(op, "first") == [] and machines_of(op, "second") == []
    finally:
        crds.kubectl("delete", "workspaces", "--all", "-n", namespace, "--wait=false", check=False)
        op.stop_all()
