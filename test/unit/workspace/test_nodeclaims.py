"""The NodeClaim encoding (upstream Kaito v0.4.2+ shape), its readiness and failure reasons, the
NodeClaimReady condition and the --node-api flag."""

from __future__ import annotations

from typing import Any

import pytest

from kaito.api.nodeclaim import NodeClaim
from kaito.cmd import parse_args
from kaito.machine import NodeClaimEncoding, RequestPhase, encoding_for, machine_name, nodeclaim_name
from kaito.workspace import status as st

SEL = {"apps": "phi-3"}


def build(enc: NodeClaimEncoding | None = None, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "namespace": "ns",
        "workspace": "ws",
        "slot": 0,
        "instance_type": "Standard_NC6s_v3",
        "match_labels": SEL,
        "storage": "80Gi",
    }
    args.update(kw)
    return (enc or NodeClaimEncoding()).build(**args)


def test_names_are_deterministic_upstream_shaped_and_not_the_machine_names() -> None:
    a = nodeclaim_name("ns", "ws", 0)
    assert a == nodeclaim_name("ns", "ws", 0) == NodeClaimEncoding().name_for("ns", "ws", 0)
    assert a.startswith("ws") and len(a) == 11  # an AKS agent pool name: <= 12, lowercase, letter first
    assert len({a, nodeclaim_name("ns", "ws", 1), nodeclaim_name("ns2", "ws", 0)}) == 3
    # A workspace moving from Machines to NodeClaims never asks for the same agent pool twice.
    assert a != machine_name("ns", "ws", 0)


def test_manifest_matches_upstream() -> None:
    nc = build()
    meta, spec = nc["metadata"], nc["spec"]
    assert (nc["apiVersion"], nc["kind"]) == ("karpenter.sh/v1", "NodeClaim")
    assert meta["labels"] == {
        "apps": "phi-3",
        "karpenter.sh/nodepool": "kaito",
        "kaito.sh/workspace": "ws",
        "kaito.sh/workspacenamespace": "ns",
        "kaito.sh/node-slot": "0",
    }
    assert meta["annotations"] == {
        "karpenter.sh/do-not-disrupt": "true",
        "kaito.sh/node-image-family": "Ubuntu",
    }
    assert "ownerReferences" not in meta and "namespace" not in meta  # cluster-scoped
    reqs = {r["key"]: (r["operator"], r["values"]) for r in spec["requirements"]}
    assert reqs == {
        "karpenter.sh/nodepool": ("In", ["kaito"]),
        "node.kubernetes.io/instance-type": ("In", ["Standard_NC6s_v3"]),
        "kubernetes.io/os": ("In", ["linux"]),
        "karpenter.azure.com/sku-name": ("In", ["Standard_NC6s_v3"]),
    }
    assert spec["taints"] == [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}]
    assert spec["resources"] == {"requests": {"storage": "80Gi"}}
    assert spec["nodeClassRef"] == {"group": "kaito.sh", "kind": "KaitoNodeClass", "name": "default"}
    # The object is valid against the API type the CRD is generated from.
    assert NodeClaim.model_validate(nc).spec.instance_type() == "Standard_NC6s_v3"
    enc = NodeClaimEncoding()
    assert enc.belongs_to(nc, "ns", "ws") and not enc.belongs_to(nc, "ns", "other")


def test_the_azure_sku_requirement_only_on_azure() -> None:
    nc = build(NodeClaimEncoding(cloud_provider="aws"))
    assert "karpenter.azure.com/sku-name" not in {r["key"] for r in nc["spec"]["requirements"]}
    assert build(storage="")["spec"]["resources"]["requests"]["storage"] == "0"


def with_conditions(*conds: dict[str, Any], node_name: str | None = None) -> Any:
    nc = build()
    nc["status"] = {"conditions": list(conds)}
    if node_name:
        nc["status"]["nodeName"] = node_name
    return nc


def test_readiness_and_typed_failures_from_nodeclaim_conditions() -> None:
    enc = NodeClaimEncoding()
    assert enc.observe(with_conditions()).phase == RequestPhase.PENDING
    ready = enc.observe(with_conditions({"type": "Ready", "status": "True"}, node_name="n1"))
    assert (ready.phase, ready.node_name, ready.instance_type) == (
        RequestPhase.READY,
        "n1",
        "Standard_NC6s_v3",
    )
    quota = enc.observe(
        with_conditions({"type": "Launched", "status": "False", "reason": "QuotaExceeded", "message": "no"})
    )
    assert (quota.phase, quota.reason, quota.message) == (RequestPhase.FAILED, "QuotaExceeded", "no")
    # The Machine condition names mean nothing on a NodeClaim.
    machine_style = enc.observe(
        with_conditions({"type": "MachineLaunched", "status": "False", "reason": "QuotaExceeded"})
    )
    assert machine_style.phase == RequestPhase.PENDING
    in_progress = enc.observe(
        with_conditions({"type": "Launched", "status": "False", "reason": "OperationInProgress"})
    )
    assert in_progress.phase == RequestPhase.PENDING
    registering = enc.observe(
        with_conditions(
            {"type": "Launched", "status": "True", "reason": "Launched", "message": ""},
            {"type": "Registered", "status": "Unknown", "reason": "NodeNotFound", "message": "waiting"},
        )
    )
    assert registering.phase == RequestPhase.PENDING
    assert registering.message == "waiting for Registered: waiting"
    deleting = with_conditions()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    got = enc.observe(deleting)
    assert (got.phase, got.message) == (RequestPhase.DELETING, "nodeClaim is being deleted")


def test_encoding_for_the_flag_values() -> None:
    assert encoding_for("machine").resource.plural == "machines"
    nc = encoding_for("nodeclaim", cloud_provider=None)
    assert (nc.resource.group, nc.resource.version, nc.resource.plural) == (
        "karpenter.sh",
        "v1",
        "nodeclaims",
    )
    with pytest.raises(ValueError, match="machine, nodeclaim"):
        encoding_for("nodepool")


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


@pytest.mark.parametrize(
    ("outcome", "status", "reason", "message"),
    [
        (
            st.StepOutcome(st.Phase.PENDING, "Provisioning", "creating 1 nodeClaims"),
            "Unknown",
            "CreateNodeClaimPending",
            "creating 1 nodeClaims",
        ),
        (
            st.StepOutcome(st.Phase.FAILED, "QuotaExceeded", "no quota"),
            "False",
            "checkNodeClaimStatusFailed",
            "no quota",
        ),
        (
            st.StepOutcome(st.Phase.READY),
            "True",
            "installNodePluginsSuccess",
            "nodeClaim plugins have been installed successfully",
        ),
    ],
)
def test_nodeclaim_ready_condition_with_upstream_reasons(
    outcome: st.StepOutcome, status: str, reason: str, message: str
) -> None:
    obs = st.Observation(generation=1, resource=outcome, machines=True, request_kind="NodeClaim")
    s = st.desired_status(None, obs)
    got = cond(s, "NodeClaimReady")
    assert (got["status"], got["reason"], got["message"]) == (status, reason, message)
    assert "MachineReady" not in {c["type"] for c in s["conditions"]}
    if outcome.phase == st.Phase.PENDING:
        assert cond(s, "ResourceReady")["reason"] == "CreateNodeClaimPending"


def test_node_api_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAITO_NODE_API", raising=False)
    assert parse_args([]).node_api == "machine"  # the seed's era stays the default
    assert parse_args(["--node-api", "nodeclaim"]).node_api == "nodeclaim"
    monkeypatch.setenv("KAITO_NODE_API", "nodeclaim")
    assert parse_args([]).node_api == "nodeclaim"
    with pytest.raises(SystemExit):
        parse_args(["--node-api", "nodepool"])
