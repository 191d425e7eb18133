"""Node checks for registration/initialization, the phase metric, and the entry point's flags."""

from __future__ import annotations

from typing import Any

import pytest

from provisioner import metrics
from provisioner.cmd import parse_args
from provisioner.lifecycle import nodes as nd
from provisioner.lifecycle.reconciler import machine_for_node, node_indexers
from provisioner.machine_fields import Taint


def node(
    *,
    ready: bool = True,
    taints: list[dict[str, str]] | None = None,
    gpus: str | None = "2",
    pool: str = "ws1",
) -> dict[str, Any]:
    alloc = {"cpu": "32"}
    if gpus is not None:
        alloc["nvidia.com/gpu"] = gpus
    return {
        "metadata": {
            "name": f"aks-{pool}-123-vmss000000",
            "labels": {"agentpool": pool, "kubernetes.azure.com/agentpool": pool},
        },
        "spec": {"providerID": "kwok://n", "taints": taints or []},
        "status": {
            "allocatable": alloc,
            "capacity": alloc,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def machine(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "ws1"}, "spec": spec}


def test_initialized_when_ready_untainted_and_gpus_allocatable() -> None:
    assert nd.initialization_blocker(node(), machine(), expected_gpus=2) is None


@pytest.mark.parametrize(
    ("n", "m", "reason"),
    [
        (node(ready=False), machine(), "NodeNotReady"),
        (
            node(taints=[{"key": "gpu-driver", "effect": "NoSchedule"}]),
            machine(startupTaints=[{"key": "gpu-driver", "effect": "NoSchedule"}]),
            "StartupTaintsExist",
        ),
        (
            node(taints=[{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]),
            machine(),
            "KnownEphemeralTaintsExist",
        ),
        (node(gpus=None), machine(), "ResourceNotRegistered"),
        (node(gpus="0"), machine(), "ResourceNotRegistered"),
        (node(), machine(resources={"requests": {"example.com/fpga": "1"}}), "ResourceNotRegistered"),
    ],
)
def test_initialization_blockers(n: dict[str, Any], m: dict[str, Any], reason: str) -> None:
    blocker = nd.initialization_blocker(n, m, expected_gpus=2)
    assert blocker is not None and blocker[0] == reason
    assert nd.node_name(n) in blocker[1]


def test_storage_request_and_cpu_sku_do_not_block() -> None:
    m = machine(resources={"requests": {"storage": "120Gi"}})
    assert nd.initialization_blocker(node(gpus=None), m, expected_gpus=0) is None


def test_merged_taints_adds_only_missing_ones() -> None:
    existing = [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}]
    assert nd.merged_taints(existing, [Taint("sku", "NoSchedule", "gpu")]) is None
    merged = nd.merged_taints(existing, [Taint("boot", "NoExecute")])
    assert merged == [*existing, {"key": "boot", "effect": "NoExecute"}]


def test_node_maps_to_machine_only_when_both_pool_labels_agree() -> None:
    assert machine_for_node(node(pool="ws1")) == ["ws1"]
    odd = node(pool="ws1")
    odd["metadata"]["labels"]["agentpool"] = "other"
    assert machine_for_node(odd) == []
    idx = node_indexers()
    assert idx["agentpool"](node()) == ["ws1"]
    assert idx["provider-id"](node()) == ["kwok://n"]


def test_phase_of() -> None:
    def m(*conds: tuple[str, str], deleting: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": "x"}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {"metadata": meta, "status": {"conditions": [{"type": t, "status": s} for t, s in conds]}}

    assert metrics.phase_of(m()) == "Launching"
    assert metrics.phase_of(m(("MachineLaunched", "False"))) == "Failed"
    assert metrics.phase_of(m(("MachineLaunched", "True"))) == "Registering"
    assert metrics.phase_of(m(("MachineLaunched", "True"), ("MachineRegistered", "True"))) == "Initializing"
    assert metrics.phase_of(m(("Ready", "True"))) == "Ready"
    assert metrics.phase_of(m(("Ready", "True"), deleting=True)) == "Terminating"


def test_phase_gauge_counts_tracked_machines() -> None:
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("kaito_machine_phase", {"phase": "Failed"}) or 0
    machines = [
        {
            "metadata": {"name": "a"},
            "status": {"conditions": [{"type": "MachineLaunched", "status": "False"}]},
        }
    ]
    handle = metrics.track_machines(lambda: machines)
    assert REGISTRY.get_sample_value("kaito_machine_phase", {"phase": "Failed"}) == before + 1
    del handle  # reporting stops with the handle
    assert REGISTRY.get_sample_value("kaito_machine_phase", {"phase": "Failed"}) == before


def test_unfinished_machines_are_timed_from_when_they_left_ready_or_were_created() -> None:
    """The gauges behind the stuck-Machine alerts: one series per unfinished Machine, none for the rest."""
    from prometheus_client import REGISTRY

    created, lost_ready, deleted = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"

    def m(name: str, *conds: tuple[str, str, str | None], deleting: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "creationTimestamp": created}
        if deleting:
            meta["deletionTimestamp"] = deleted
        cs = [{"type": t, "status": s, **({"lastTransitionTime": at} if at else {})} for t, s, at in conds]
        return {"metadata": meta, "status": {"conditions": cs}}

    machines = [
        m("launching"),
        m("failed", ("MachineLaunched", "False", lost_ready)),
        m("node-lost", ("MachineLaunched", "True", None), ("Ready", "False", lost_ready)),
        m("ready", ("Ready", "True", lost_ready)),
        m("deleting", ("Ready", "True", lost_ready), deleting=True),
    ]
    handle = metrics.track_machines(lambda: machines)

    def provisioning(name: str) -> float | None:
        return REGISTRY.get_sample_value(
            "kaito_machine_provisioning_since_timestamp_seconds", {"machine": name}
        )

    def deleting(name: str) -> float | None:
        return REGISTRY.get_sample_value("kaito_machine_deleting_since_timestamp_seconds", {"machine": name})

    assert provisioning("launching") == 1767225600.0  # never Ready: since its creation
    assert provisioning("failed") == 1767225600.0  # a launch failure is not a Ready transition
    assert provisioning("node-lost") == 1767312000.0  # since its Ready condition turned False
    assert provisioning("ready") is None and provisioning("deleting") is None
    assert deleting("deleting") == 1767398400.0
    assert all(deleting(n) is None for n in ("launching", "failed", "node-lost", "ready"))
    del handle
    assert provisioning("launching") is None and deleting("deleting") is None


def test_flags_defaults_and_environment() -> None:
    args = parse_args(["--cloud", "kwok"], env={})
    assert (args.leader_elect, args.metrics_port, args.probe_port, args.registration_timeout) == (
        True,
        8080,
        8081,
        900.0,
    )
    env = {"CLOUD_PROVIDER": "azure", "LEADER_ELECT": "false", "METRICS_PORT": "9090", "POD_NAMESPACE": "gp"}
    args = parse_args([], env=env)
    assert (args.cloud, args.leader_elect, args.metrics_port, args.leader_election_namespace) == (
        "azure",
        False,
        9090,
        "gp",
    )
    assert parse_args(["--cloud", "kwok", "--leader-elect"], env=env).leader_elect is True


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--cloud", "gcp"],
        ["--cloud", "kwok", "--workers", "0"],
        ["--cloud", "kwok", "--registration-timeout", "0"],
    ],
)
def test_bad_flags_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv, env={})
    assert e.value.code == 2
