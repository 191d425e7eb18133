"""Node selection order and the Machine encoding (deterministic names, readiness, failure reasons)."""

from __future__ import annotations

from typing import Any

from kaito.machine import MachineEncoding, RequestPhase, machine_name
from kaito.workspace import nodes as nd


def node(
    name: str, *, ready: bool = True, itype: str = "Standard_NC6s_v3", gpus: int = 1, **labels: str
) -> Any:
    return {
        "metadata": {
            "name": name,
            "labels": {"apps": "phi-3", "node.kubernetes.io/instance-type": itype, **labels},
        },
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "allocatable": {"nvidia.com/gpu": str(gpus)},
        },
    }


SEL = {"apps": "phi-3"}


def names(nodes: list[Any]) -> list[str]:
    return [nd.node_name(n) for n in nodes]


def test_qualification_rules() -> None:
    ns = [
        node("a-notready", ready=False),
        node("b-wrongtype", itype="Standard_D4"),
        node("c-ok"),
        node("d-otherlabels", apps="other"),
        {**node("e-deleting"), "metadata": {**node("e-deleting")["metadata"], "deletionTimestamp": "x"}},
    ]
    assert names(nd.qualifying_nodes(ns, SEL, "Standard_NC6s_v3")) == ["c-ok"]
    # A preferred node skips the instance-type check (upstream v0.3.2+), not the label or Ready check.
    assert names(
        nd.qualifying_nodes(ns, SEL, "Standard_NC6s_v3", preferred=["b-wrongtype", "a-notready"])
    ) == [
        "b-wrongtype",
        "c-ok",
    ]
    q = nd.qualify(ns[0], SEL, "Standard_NC6s_v3", [])
    assert not q.usable and q.why == "not Ready"


def test_selection_order_is_stable() -> None:
    ns = [
        node("z-plain"),
        node("y-provisioned", **{"kaito.sh/machine-type": "gpu"}),
        node("x-current"),
        node("w-pref"),
    ]
    order = nd.qualifying_nodes(ns, SEL, "Standard_NC6s_v3", preferred=["w-pref"], current=["x-current"])
    assert names(order) == ["w-pref", "x-current", "y-provisioned", "z-plain"]
    assert names(
        nd.select_nodes(list(reversed(ns)), SEL, "Standard_NC6s_v3", 2, ["w-pref"], ["x-current"])
    ) == [
        "w-pref",
        "x-current",
    ]
    assert nd.node_gpus(node("g", gpus=4)) == 4


def test_machine_names_are_deterministic_and_distinct() -> None:
    a = machine_name("ns", "ws", 0)
    assert a == machine_name("ns", "ws", 0)
    assert a.startswith("ws") and len(a) == 11
    assert (
        len({a, machine_name("ns", "ws", 1), machine_name("ns2", "ws", 0), machine_name("ns", "ws2", 0)}) == 4
    )


def test_machine_manifest_matches_upstream() -> None:
    enc = MachineEncoding()
    m = enc.build(
        namespace="ns",
        workspace="ws",
        slot=0,
        instance_type="Standard_NC6s_v3",
        match_labels=SEL,
        storage="80Gi",
    )
    labels = m["metadata"]["labels"]
    assert labels["kaito.sh/workspace"] == "ws" and labels["kaito.sh/workspacenamespace"] == "ns"
    assert labels["apps"] == "phi-3" and labels["karpenter.sh/provisioner-name"] == "default"
    reqs = {r["key"]: r["values"] for r in m["spec"]["requirements"]}
    assert reqs["node.kubernetes.io/instance-type"] == ["Standard_NC6s_v3"]
    assert reqs["kaito.sh/machine-type"] == ["gpu"]
    assert m["spec"]["taints"] == [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}]
    assert m["spec"]["resources"]["requests"]["storage"] == "80Gi"
    assert m["spec"]["machineTemplateRef"]["name"] == m["metadata"]["name"]
    assert enc.belongs_to(m, "ns", "ws") and not enc.belongs_to(m, "ns", "other")
    assert "ownerReferences" not in m["metadata"]  # cluster-scoped: labels + finalizer instead


def with_conditions(*conds: dict[str, Any], node_name: str | None = None) -> Any:
    m = MachineEncoding().build(
        namespace="ns",
        workspace="ws",
        slot=0,
        instance_type="Standard_NC6s_v3",
        match_labels=SEL,
        storage="0",
    )
    m["status"] = {"conditions": list(conds)}
    if node_name:
        m["status"]["nodeName"] = node_name
    return m


def test_machine_observation() -> None:
    enc = MachineEncoding()
    assert enc.observe(with_conditions()).phase == RequestPhase.PENDING
    ready = enc.observe(with_conditions({"type": "Ready", "status": "True"}, node_name="n1"))
    assert ready.phase == RequestPhase.READY and ready.node_name == "n1"
    quota = enc.observe(
        with_conditions(
            {"type": "MachineLaunched", "status": "False", "reason": "QuotaExceeded", "message": "no"}
        )
    )
    assert (quota.phase, quota.reason, quota.message) == (RequestPhase.FAILED, "QuotaExceeded", "no")
    retrying = enc.observe(
        with_conditions({"type": "MachineLaunched", "status": "False", "reason": "OperationInProgress"})
    )
    assert retrying.phase == RequestPhase.PENDING
    launched = enc.observe(
        with_conditions(
            {"type": "MachineLaunched", "status": "True"}, {"type": "MachineRegistered", "status": "Unknown"}
        )
    )
    assert launched.phase == RequestPhase.PENDING and "MachineRegistered" in launched.message
    deleting = with_conditions()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert enc.observe(deleting).phase == RequestPhase.DELETING


def test_nodes_provisioned_for_another_workspace_are_skipped() -> None:
    mine = node("mine", **{"kaito.sh/workspace": "a", "kaito.sh/workspacenamespace": "ns"})
    theirs = node("theirs", **{"kaito.sh/workspace": "b", "kaito.sh/workspacenamespace": "ns"})
    shared = node("shared")
    got = nd.qualifying_nodes([mine, theirs, shared], SEL, "Standard_NC6s_v3", owner=("ns", "a"))
    assert names(got) == ["mine", "shared"]
    q = nd.qualify(theirs, SEL, "Standard_NC6s_v3", [], ("ns", "a"))
    assert not q.usable and q.why == "provisioned for workspace ns/b"
    # Naming it in preferredNodes is an explicit choice that wins.
    assert "theirs" in names(nd.qualifying_nodes([theirs], SEL, "x", preferred=["theirs"], owner=("ns", "a")))


def test_cpu_node_without_gpu_capacity_qualifies() -> None:
    # A bring-your-own CPU node: labelled with a CPU instance type, no nvidia.com/gpu at all.
    cpu_node = node("cpu-1", itype="Standard_D4s_v3")
    cpu_node["status"]["allocatable"] = {"cpu": "4", "memory": "16Gi"}
    ns = [cpu_node, node("gpu-1"), node("cpu-2-notready", itype="Standard_D4s_v3", ready=False, gpus=0)]
    assert names(nd.qualifying_nodes(ns, SEL, "Standard_D4s_v3")) == ["cpu-1"]
    assert nd.node_gpus(cpu_node) == 0
    q = nd.qualify(ns[1], SEL, "Standard_D4s_v3", [])
    assert not q.usable and q.why == "instance type is not Standard_D4s_v3"
