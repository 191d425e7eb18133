"""NodeClaims in the provisioner's pure parts: the kind of an object and of an instance, the pool body
and the kwok node for a NodeClaim, metav1-shaped conditions, phases, and the --node-api flag."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from provisioner import machine_fields as mf
from provisioner.cloud.azure import agent_pool_body, instance_from_pool, is_managed_pool
from provisioner.cloud.base import (
    Instance,
    InstanceState,
    InvalidRequest,
    NotFound,
    name_conflict,
    other_owner,
)
from provisioner.cloud.kwok import instance_from_node, node_manifest
from provisioner.cmd import parse_args
from provisioner.lifecycle import conditions as cond
from provisioner.lifecycle.kinds import MACHINE, NODECLAIM, kind_of, parse_kinds
from provisioner.metrics import phase_of

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def nodeclaim(name: str = "ws0123456ab", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodeClaim",
        "metadata": {
            "name": name,
            "labels": {
                "karpenter.sh/nodepool": "kaito",
                "kaito.sh/workspace": "w",
                "kaito.sh/workspacenamespace": "ns",
            },
            "annotations": {
                "karpenter.sh/do-not-disrupt": "true",
                "kaito.sh/node-image-family": "AzureLinux",
            },
        },
        "spec": {
            "requirements": [
                {"key": "karpenter.sh/nodepool", "operator": "In", "values": ["kaito"]},
                {
                    "key": "node.kubernetes.io/instance-type",
                    "operator": "In",
                    "values": ["Standard_NC12s_v3"],
                },
            ],
            "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
            "resources": {"requests": {"storage": "120Gi"}},
            "nodeClassRef": {"group": "kaito.sh", "kind": "KaitoNodeClass", "name": "default"},
        },
        "status": status,
    }


def test_kind_of_objects_and_of_instances() -> None:
    nc = nodeclaim()
    assert mf.request_kind(nc) == "NodeClaim" and kind_of(nc) is NODECLAIM
    # Items of a LIST carry no kind: the apiVersion says it.
    assert mf.request_kind({"apiVersion": "karpenter.sh/v1"}) == "NodeClaim"
    assert mf.request_kind({"apiVersion": "karpenter.sh/v1alpha5", "kind": "Machine"}) == "Machine"
    assert kind_of({}) is MACHINE
    assert mf.owner_kind({"karpenter.sh/nodepool": "kaito"}) == "NodeClaim"
    assert mf.owner_kind({"karpenter.sh/provisioner-name": "default"}) == "Machine"


def test_pool_body_for_a_nodeclaim_carries_the_nodepool_label() -> None:
    body = agent_pool_body(nodeclaim(), now=NOW)
    props = body["properties"]
    assert props["nodeLabels"] == {
        "karpenter.sh/nodepool": "kaito",
        "kaito.sh/workspace": "w",
        "kaito.sh/workspacenamespace": "ns",
        "kaito.sh/machine-type": "gpu",
        "kaito.sh/creation-timestamp": "2025-01-02T03-04-05Z",
    }
    assert (props["vmSize"], props["osDiskSizeGB"], props["osSKU"]) == (
        "Standard_NC12s_v3",
        120,
        "AzureLinux",
    )
    assert props["nodeTaints"] == ["sku=gpu:NoSchedule"]
    pool = {"name": "ws0123456ab", "properties": {**props, "provisioningState": "Succeeded"}}
    assert is_managed_pool(props["nodeLabels"])
    instance = instance_from_pool(pool)
    assert (instance.owner_kind, instance.state) == ("NodeClaim", InstanceState.RUNNING)
    machine_labels = {**props["nodeLabels"], "karpenter.sh/provisioner-name": "default"}
    del machine_labels["karpenter.sh/nodepool"]
    assert (
        instance_from_pool({**pool, "properties": {**props, "nodeLabels": machine_labels}}).owner_kind
        == "Machine"
    )
    # Neither a nodepool nor a provisioner-name label: not ours, whatever else it carries.
    bare = {k: v for k, v in props["nodeLabels"].items() if k != "karpenter.sh/nodepool"}
    assert not is_managed_pool(bare)


def test_kwok_node_for_a_nodeclaim() -> None:
    node = node_manifest(nodeclaim(), 2, now=NOW)
    labels = node["metadata"]["labels"]
    assert labels["karpenter.sh/nodepool"] == "kaito" and "karpenter.sh/provisioner-name" not in labels
    assert instance_from_node(node).owner_kind == "NodeClaim"


def instance(owner: str) -> Instance:
    return Instance(
        "ws0123456ab", "", "Standard_NC12s_v3", {}, (), {}, InstanceState.RUNNING, owner_kind=owner
    )


def test_an_instance_of_the_other_kind_is_neither_adopted_nor_deleted() -> None:
    conflict = name_conflict(instance("Machine"), nodeclaim())
    assert isinstance(conflict, InvalidRequest) and conflict.code == "NameConflict"
    assert "already exists for a Machine" in conflict.message and not conflict.retryable
    assert name_conflict(instance("NodeClaim"), nodeclaim()) is None
    gone = other_owner(instance("Machine"), "NodeClaim")
    assert isinstance(gone, NotFound) and gone.code == "OwnedByOtherKind"
    assert other_owner(instance("Machine"), "Machine") is None
    assert other_owner(instance("Machine"), None) is None  # no owner given: no check


def test_nodeclaim_conditions_are_metav1_shaped() -> None:
    conds = cond.set_condition([], "Launched", cond.TRUE, "Launched", "", now=NOW)
    conds = cond.summarize_ready(conds, now=NOW, living=NODECLAIM.living)
    ready = cond.get(conds, "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("Unknown", "Registering")
    full = cond.as_metav1(cond.ordered(conds, NODECLAIM.living), generation=3)
    assert [c["type"] for c in full] == ["Launched", "Ready"]
    for c in full:
        assert c["reason"] and isinstance(c["message"], str)
        assert c["observedGeneration"] == 3
    assert cond.as_metav1([{"type": "X", "status": "True"}], 1)[0]["reason"] == "True"


def test_phase_of_a_nodeclaim() -> None:
    assert phase_of(nodeclaim()) == "Launching"
    launched = [{"type": "Launched", "status": "True"}]
    assert phase_of(nodeclaim(conditions=launched)) == "Registering"
    assert (
        phase_of(nodeclaim(conditions=[*launched, {"type": "Registered", "status": "True"}]))
        == "Initializing"
    )
    assert phase_of(nodeclaim(conditions=[{"type": "Launched", "status": "False"}])) == "Failed"
    assert phase_of(nodeclaim(conditions=[{"type": "Ready", "status": "True"}])) == "Ready"


def test_node_api_flag() -> None:
    assert [k.flag for k in parse_args(["--cloud", "kwok"], env={}).kinds] == ["machine"]
    args = parse_args(["--cloud", "kwok", "--node-api", "nodeclaim,machine"], env={})
    assert [k.flag for k in args.kinds] == ["nodeclaim", "machine"]
    assert [k.flag for k in parse_args(["--cloud", "kwok"], env={"KAITO_NODE_API": "nodeclaim"}).kinds] == [
        "nodeclaim"
    ]
    assert [k.flag for k in parse_kinds("machine, machine")] == ["machine"]
    with pytest.raises(ValueError, match="machine, nodeclaim"):
        parse_kinds("nodepool")
    with pytest.raises(SystemExit):
        parse_args(["--cloud", "kwok", "--node-api", ""], env={})
