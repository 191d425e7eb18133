"""Pure parts of the kwok provider: node names, the Node manifest, Node -> Instance, error mapping."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from provisioner.cloud.base import (
    AuthFailed,
    CloudError,
    Conflict,
    InstanceState,
    InvalidRequest,
    NotFound,
)
from provisioner.cloud.kwok import (
    classify_kube_error,
    instance_from_node,
    machine_name_from_ref,
    node_manifest,
    node_name_for,
    provider_id_for,
)
from provisioner.machine_fields import Taint


def machine(
    name: str = "ws1", sku: str = "Standard_NC12s_v3", storage: str | None = "120Gi"
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": "2025-01-02T03:04:05Z",
            "labels": {"kaito.sh/workspace": "w", "agentpool": "spoofed"},
        },
        "spec": {
            "requirements": [{"key": "node.kubernetes.io/instance-type", "operator": "In", "values": [sku]}],
            "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
            "startupTaints": [{"key": "boot", "effect": "NoSchedule"}],
            "resources": {"requests": {"storage": storage} if storage else {}},
        },
    }


def test_node_names_look_like_aks_and_round_trip() -> None:
    node = node_name_for("ws1a2b3c4d5")
    assert node.startswith("aks-ws1a2b3c4d5-") and node.endswith("-vmss000000")
    assert node == node_name_for("ws1a2b3c4d5")  # stable across restarts
    assert node != node_name_for("ws1a2b3c4d6")
    assert provider_id_for(node) == f"kwok://{node}"
    assert machine_name_from_ref(provider_id_for(node)) == "ws1a2b3c4d5"
    assert machine_name_from_ref("ws1a2b3c4d5") == "ws1a2b3c4d5"
    with pytest.raises(InvalidRequest):
        machine_name_from_ref("kwok://some-other-node")


def test_node_manifest() -> None:
    node = node_manifest(machine(), 2)
    meta = node["metadata"]
    assert meta["name"] == node_name_for("ws1")
    assert meta["annotations"]["kwok.x-k8s.io/node"] == "fake"
    labels = meta["labels"]
    assert labels["node.kubernetes.io/instance-type"] == "Standard_NC12s_v3"
    assert labels["agentpool"] == labels["kubernetes.azure.com/agentpool"] == "ws1"  # not the Machine's spoof
    assert labels["kaito.sh/machine-type"] == "gpu"
    assert labels["kaito.sh/workspace"] == "w"
    assert labels["karpenter.sh/provisioner-name"] == "default"
    assert labels["kaito.sh/creation-timestamp"] == "2025-01-02T03-04-05Z"
    assert labels["accelerator"] == "nvidia"
    assert node["spec"]["providerID"] == f"kwok://{meta['name']}"
    # startup taints are the lifecycle's business, not the cloud's
    assert node["spec"]["taints"] == [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}]
    status = node["status"]
    assert status["capacity"]["nvidia.com/gpu"] == status["allocatable"]["nvidia.com/gpu"] == "2"
    assert status["capacity"]["ephemeral-storage"] == "120Gi"


def test_node_manifest_without_gpus() -> None:
    node = node_manifest(machine(sku="Standard_D4s_v3", storage=None), 0)
    assert "nvidia.com/gpu" not in node["status"]["capacity"]
    assert "ephemeral-storage" not in node["status"]["capacity"]
    assert node["metadata"]["labels"]["kaito.sh/machine-type"] == "cpu"
    assert "accelerator" not in node["metadata"]["labels"]


def test_node_manifest_rejects_machines_without_instance_type() -> None:
    m = machine()
    m["spec"]["requirements"] = []
    with pytest.raises(InvalidRequest, match="instance type"):
        node_manifest(m, 1)


def test_instance_from_node() -> None:
    node = node_manifest(machine(), 1)
    node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    inst = instance_from_node(node)
    assert inst.name == inst.machine_name == "ws1"
    assert inst.state is InstanceState.RUNNING
    assert inst.detail == "Ready"
    assert inst.provider_id == node["spec"]["providerID"]
    assert inst.taints == (Taint("sku", "NoSchedule", "gpu"),)
    assert inst.capacity["nvidia.com/gpu"] == "1"
    assert inst.created_at is not None
    node["metadata"]["deletionTimestamp"] = "2025-01-02T03:04:05Z"
    assert instance_from_node(node).state is InstanceState.DELETING


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ApiException(status=404, reason="Not Found"), NotFound),
        (ApiException(status=409, reason="Conflict"), Conflict),
        (ApiException(status=403, reason="Forbidden"), AuthFailed),
        (ApiException(status=422, reason="Unprocessable Entity"), InvalidRequest),
        (ApiException(status=500, reason="Internal Server Error"), CloudError),
        (ConnectionResetError("reset"), CloudError),
    ],
)
def test_classify_kube_error(exc: BaseException, kind: type[CloudError]) -> None:
    err = classify_kube_error(exc, operation="create", node="n1")
    assert type(err) is kind
    assert "n1" in err.message


def test_cpu_sku_capacity_comes_from_the_catalog() -> None:
    from provisioner.cmd import gpu_count, node_capacity

    assert gpu_count("Standard_D4s_v3") == 0
    assert node_capacity("Standard_D4s_v3") == {"cpu": "4", "memory": "16Gi"}
    assert node_capacity("m5.2xlarge") == {"cpu": "8", "memory": "32Gi"}
    assert node_capacity("Standard_NC6s_v3") == {}  # GPU SKUs keep the base capacity
    assert node_capacity("Standard_Unknown") == {}
    node = node_manifest(
        machine(sku="Standard_D4s_v3"),
        0,
        base_capacity={"cpu": "32", "pods": "110", **node_capacity("Standard_D4s_v3")},
    )
    assert node["status"]["allocatable"] == {
        "cpu": "4",
        "memory": "16Gi",
        "pods": "110",
        "ephemeral-storage": "120Gi",
    }
