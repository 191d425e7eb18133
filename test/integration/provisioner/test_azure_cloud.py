"""The Azure provider through the real async azure-mgmt-containerservice SDK against the fake ARM server.

No kube-apiserver is involved: everything here is the provider <-> ARM conversation over HTTPS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from provisioner.cloud.azure import AzureCloudProvider, AzureConfig
from provisioner.cloud.base import (
    AuthFailed,
    CapacityUnavailable,
    CloudError,
    Conflict,
    InstanceState,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    SkuUnavailable,
)
from provisioner.cloud.metrics import CloudMetrics, InstrumentedCloudProvider
from test.fake_arm import (
    ALLOCATION_FAILED,
    ANOTHER_OPERATION_IN_PROGRESS,
    CONFLICT,
    IN_PROGRESS_CREATE_MESSAGE,
    QUOTA_EXCEEDED,
    QUOTA_OPERATION_NOT_ALLOWED,
    SKU_NOT_AVAILABLE,
    ZONAL_ALLOCATION_FAILED,
    ArmError,
    FakeArm,
    FakeArmServer,
    StaticTokenCredential,
)

SUB, RG, CLUSTER = "00000000-0000-0000-0000-000000000001", "kaito-rg", "kaito-aks"
POOL_PATH = (
    f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ContainerService/managedClusters/{CLUSTER}"
    "/agentPools/{name}"
)


def machine(
    name: str = "ws1a2b3c4d5", sku: str = "Standard_NC12s_v3", storage: str = "120Gi"
) -> dict[str, Any]:
    return {
        "apiVersion": "karpenter.sh/v1alpha5",
        "kind": "Machine",
        "metadata": {
            "name": name,
            "creationTimestamp": "2025-03-04T05:06:07Z",
            "labels": {
                "karpenter.sh/provisioner-name": "default",
                "kaito.sh/workspace": "falcon",
                "kaito.sh/workspacenamespace": "default",
                "apps": "falcon-7b",
            },
        },
        "spec": {
            "machineTemplateRef": {"name": name},
            "requirements": [
                {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": [sku]},
                {"key": "karpenter.sh/provisioner-name", "operator": "In", "values": ["default"]},
                {"key": "kaito.sh/machine-type", "operator": "In", "values": ["gpu"]},
                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
            ],
            "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
            "resources": {"requests": {"storage": storage}},
        },
    }


@pytest.fixture
async def arm() -> AsyncIterator[FakeArmServer]:
    async with FakeArmServer(FakeArm(polls=2, retry_after=0, token="test-token")) as server:
        yield server


def config_for(server: FakeArmServer, **overrides: Any) -> AzureConfig:
    values: dict[str, Any] = {
        "subscription_id": SUB,
        "resource_group": RG,
        "cluster_name": CLUSTER,
        "arm_endpoint": server.endpoint,
        "ca_file": str(server.ca_file),
        "polling_interval": 0.0,
        "operation_timeout": 30.0,
    }
    values.update(overrides)
    return AzureConfig(**values)


@pytest.fixture
async def cloud(arm: FakeArmServer) -> AsyncIterator[AzureCloudProvider]:
    provider = await AzureCloudProvider.open(config_for(arm), StaticTokenCredential("test-token"))
    try:
        yield provider
    finally:
        await provider.close()


async def test_create_sends_upstream_put_body_and_polls_the_operation(
    arm: FakeArmServer, cloud: AzureCloudProvider
) -> None:
    instance = await cloud.create(machine())

    puts = arm.arm.requests_for("PUT", "ws1a2b3c4d5")
    assert len(puts) == 1
    assert puts[0].path == POOL_PATH.format(name="ws1a2b3c4d5")
    assert puts[0].query["api-version"]
    assert puts[0].has_bearer
    assert puts[0].body == {
        "properties": {
            "type": "VirtualMachineScaleSets",
            "osType": "Linux",
            "osSKU": "Ubuntu",
            "count": 1,
            "vmSize": "Standard_NC12s_v3",
            "osDiskSizeGB": 120,
            "nodeLabels": {
                "karpenter.sh/provisioner-name": "default",
                "kaito.sh/workspace": "falcon",
                "kaito.sh/workspacenamespace": "default",
                "apps": "falcon-7b",
                "kaito.sh/machine-type": "gpu",
                "kaito.sh/creation-timestamp": "2025-03-04T05-06-07Z",
            },
            "nodeTaints": ["sku=gpu:NoSchedule"],
        }
    }
    # The SDK followed Azure-AsyncOperation through InProgress (2 polls) to Succeeded.
    op_polls = [r for r in arm.arm.requests if "/operations/" in r.path]
    assert len(op_polls) == 3
    assert instance.state is InstanceState.RUNNING
    assert instance.name == instance.machine_name == "ws1a2b3c4d5"
    assert instance.instance_type == "Standard_NC12s_v3"
    assert instance.labels["kaito.sh/machine-type"] == "gpu"
    assert instance.node_selector == {
        "agentpool": "ws1a2b3c4d5",
        "kubernetes.azure.com/agentpool": "ws1a2b3c4d5",
    }
    assert instance.image_id.startswith("AKSUbuntu")
    stored = arm.arm.pools[(SUB.lower(), RG.lower(), CLUSTER.lower(), "ws1a2b3c4d5")]
    assert stored["properties"]["provisioningState"] == "Succeeded"


async def test_disk_size_conversion_reaches_the_wire(arm: FakeArmServer, cloud: AzureCloudProvider) -> None:
    await cloud.create(machine("decimal", storage="100G"))
    await cloud.create(machine("tebi", storage="1Ti"))
    assert arm.arm.requests_for("PUT", "decimal")[0].body["properties"]["osDiskSizeGB"] == 94
    assert arm.arm.requests_for("PUT", "tebi")[0].body["properties"]["osDiskSizeGB"] == 1024


async def test_create_again_adopts_without_a_second_put(
    arm: FakeArmServer, cloud: AzureCloudProvider
) -> None:
    first = await cloud.create(machine())
    second = await cloud.create(machine())
    assert len(arm.arm.requests_for("PUT")) == 1
    assert second.state is InstanceState.RUNNING
    assert second.name == first.name


async def test_create_while_pool_is_still_creating_is_a_conflict_without_put(
    arm: FakeArmServer, cloud: AzureCloudProvider
) -> None:
    arm.arm.add_pool(SUB, RG, CLUSTER, "ws1a2b3c4d5", {"vmSize": "Standard_NC12s_v3"}, state="Creating")
    with pytest.raises(Conflict) as e:
        await cloud.create(machine())
    assert e.value.reason == "OperationInProgress"
    assert e.value.backoff <= 60
    assert arm.arm.requests_for("PUT") == []


async def test_in_progress_put_answer_is_a_conflict(arm: FakeArmServer, cloud: AzureCloudProvider) -> None:
    # A restarted provisioner racing its own earlier PUT gets AKS's 409 OperationNotAllowed.
    for err in (ANOTHER_OPERATION_IN_PROGRESS, CONFLICT):
        arm.arm.inject("put", err, pool="ws1a2b3c4d5")
        with pytest.raises(Conflict, match="in progress"):
            await cloud.create(machine())
    assert "in progress create node pool operation" in IN_PROGRESS_CREATE_MESSAGE


async def test_pool_of_another_vm_size_is_not_silently_updated(
    arm: FakeArmServer, cloud: AzureCloudProvider
) -> None:
    arm.arm.add_pool(SUB, RG, CLUSTER, "ws1a2b3c4d5", {"vmSize": "Standard_D4s_v3"})
    with pytest.raises(InvalidRequest, match="Standard_D4s_v3"):
        await cloud.create(machine())
    assert arm.arm.requests_for("PUT") == []


@pytest.mark.parametrize("error", [QUOTA_EXCEEDED, QUOTA_OPERATION_NOT_ALLOWED])
async def test_quota_rejection_is_quota_exceeded(
    arm: FakeArmServer, cloud: AzureCloudProvider, error: Any
) -> None:
    arm.arm.inject("put", error)
    with pytest.raises(QuotaExceeded) as e:
        await cloud.create(machine())
    assert e.value.reason == "QuotaExceeded"
    assert e.value.backoff >= 60
    assert "quota increase" in e.value.message
    assert "Cores quota" in e.value.message  # ARM's own text is kept for the user


async def test_failed_operation_surfaces_quota_then_a_retry_recreates(
    arm: FakeArmServer, cloud: AzureCloudProvider
) -> None:
    arm.arm.inject("operation", QUOTA_EXCEEDED, pool="ws1a2b3c4d5")
    with pytest.raises(QuotaExceeded):
        await cloud.create(machine())
    failed = await cloud.get("ws1a2b3c4d5")
    assert failed.state is InstanceState.FAILED
    # The pool remembers why (properties.status.provisioningError), classified like the call error.
    assert isinstance(failed.failure, QuotaExceeded)
    assert "quota increase" in failed.failure.message
    # Once quota is granted, the next create PUTs the Failed pool again and succeeds.
    instance = await cloud.create(machine())
    assert instance.state is InstanceState.RUNNING
    assert instance.failure is None
    assert len(arm.arm.requests_for("PUT")) == 2


async def test_capacity_errors_become_capacity_unavailable(
    arm: FakeArmServer, cloud: AzureCloudProvider
) -> None:
    arm.arm.inject("operation", ALLOCATION_FAILED)  # wrapped in ReconcileVMSSAgentPoolFailed, as AKS does
    with pytest.raises(CapacityUnavailable) as e:
        await cloud.create(machine("alloc"))
    assert e.value.reason == "InsufficientCapacity"
    assert "capacity" in e.value.message
    arm.arm.inject("put", ZONAL_ALLOCATION_FAILED)
    with pytest.raises(CapacityUnavailable):
        await cloud.create(machine("zonal"))


async def test_sku_not_available(arm: FakeArmServer, cloud: AzureCloudProvider) -> None:
    arm.arm.inject("put", SKU_NOT_AVAILABLE)
    with pytest.raises(SkuUnavailable) as e:
        await cloud.create(machine(sku="Standard_NC96ads_A100_v4"))
    assert "another instance type" in e.value.message
    assert "Standard_NC96ads_A100_v4" in e.value.message


async def test_invalid_machine_sends_nothing(arm: FakeArmServer, cloud: AzureCloudProvider) -> None:
    with pytest.raises(InvalidRequest) as e:
        await cloud.create(machine(name="ws-bad-name"))
    assert not e.value.retryable
    with pytest.raises(InvalidRequest, match="more than 0"):
        await cloud.create(machine(storage="0"))
    assert arm.arm.requests == []


async def test_delete_then_get_is_not_found(arm: FakeArmServer, cloud: AzureCloudProvider) -> None:
    await cloud.create(machine())
    await cloud.delete("ws1a2b3c4d5")
    assert len(arm.arm.requests_for("DELETE", "ws1a2b3c4d5")) == 1
    with pytest.raises(NotFound) as e:
        await cloud.get("ws1a2b3c4d5")
    assert e.value.reason == "NotFound"
    with pytest.raises(NotFound):
        await cloud.delete("ws1a2b3c4d5")


async def test_delete_of_a_pool_already_deleting_sends_no_second_delete(
    arm: FakeArmServer, cloud: AzureCloudProvider
) -> None:
    arm.arm.add_pool(SUB, RG, CLUSTER, "ws1a2b3c4d5", {"vmSize": "Standard_NC12s_v3"}, state="Deleting")
    await cloud.delete("ws1a2b3c4d5")
    assert arm.arm.requests_for("DELETE") == []
    assert (await cloud.get("ws1a2b3c4d5")).state is InstanceState.DELETING


async def test_get_and_delete_by_provider_id(arm: FakeArmServer, cloud: AzureCloudProvider) -> None:
    await cloud.create(machine("gpu0"))
    pid = (
        f"azure:///subscriptions/{SUB}/resourceGroups/mc_{RG}_{CLUSTER}_eastus/providers/Microsoft.Compute/"
        "virtualMachineScaleSets/aks-gpu0-12345678-vmss/virtualMachines/0"
    )
    got = await cloud.get(pid)
    assert got.name == "gpu0"
    assert got.provider_id == pid
    await cloud.delete(pid)
    with pytest.raises(NotFound):
        await cloud.get(pid)


async def test_list_returns_only_our_pools_across_pages(
    arm: FakeArmServer, cloud: AzureCloudProvider
) -> None:
    arm.arm.page_size = 1  # forces the SDK pager through nextLink
    arm.arm.add_pool(SUB, RG, CLUSTER, "nodepool1", {"vmSize": "Standard_D2s_v3", "mode": "System"})
    arm.arm.add_pool(
        SUB,
        RG,
        CLUSTER,
        "usergpu",
        {"vmSize": "Standard_NC6s_v3", "nodeLabels": {"kaito.sh/workspace": "mine"}},
    )
    arm.arm.add_pool(SUB, RG, "othercluster", "wsother", {"vmSize": "Standard_NC6s_v3"})
    await cloud.create(machine("wsa"))
    await cloud.create(machine("wsb", sku="Standard_NC24ads_A100_v4"))

    listed = await cloud.list()

    assert sorted(i.name for i in listed) == ["wsa", "wsb"]
    assert {i.name: i.instance_type for i in listed}["wsb"] == "Standard_NC24ads_A100_v4"
    assert all(i.created_at is not None for i in listed)
    list_calls = [r for r in arm.arm.requests_for("GET") if r.path.endswith("/agentPools")]
    assert len(list_calls) >= 4  # one page per pool in this cluster


async def test_operation_outlasting_the_timeout_is_a_conflict_then_adopted(arm: FakeArmServer) -> None:
    arm.arm.polls = 10**9  # ARM never finishes on its own
    provider = await AzureCloudProvider.open(
        config_for(arm, operation_timeout=0.3), StaticTokenCredential("test-token")
    )
    try:
        with pytest.raises(Conflict, match="still in progress"):
            await provider.create(machine())
        await arm.arm.finish_operations()
        instance = await provider.create(machine())
        assert instance.state is InstanceState.RUNNING
        assert len(arm.arm.requests_for("PUT")) == 1
    finally:
        await provider.close()


async def test_wrong_token_is_auth_failed(arm: FakeArmServer) -> None:
    provider = await AzureCloudProvider.open(config_for(arm), StaticTokenCredential("stolen"))
    try:
        with pytest.raises(AuthFailed) as e:
            await provider.get("ws1a2b3c4d5")
        assert "Contributor" in e.value.message
        assert "stolen" not in e.value.message
    finally:
        await provider.close()


async def test_metrics_wrap_every_call(arm: FakeArmServer, cloud: AzureCloudProvider) -> None:
    registry = CollectorRegistry()
    instrumented = InstrumentedCloudProvider(cloud, CloudMetrics(registry))
    assert instrumented.name == "azure"

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    await instrumented.create(machine())
    arm.arm.inject("put", QUOTA_EXCEEDED)
    with pytest.raises(QuotaExceeded):
        await instrumented.create(machine("wsquota"))
    with pytest.raises(NotFound):
        await instrumented.get("nosuchpool")
    await instrumented.list()

    assert value("kaito_cloud_request_duration_seconds_count", provider="azure", operation="create") == 2
    assert value("kaito_cloud_request_duration_seconds_count", provider="azure", operation="list") == 1
    assert (
        value(
            "kaito_cloud_request_errors_total", provider="azure", operation="create", reason="QuotaExceeded"
        )
        == 1
    )
    assert (
        value("kaito_cloud_request_errors_total", provider="azure", operation="get", reason="NotFound") == 1
    )
    assert (
        value("kaito_cloud_request_errors_total", provider="azure", operation="list", reason="NotFound") == 0
    )


@pytest.mark.parametrize("protocol", ["async", "location"])
async def test_both_polling_protocols(arm: FakeArmServer, cloud: AzureCloudProvider, protocol: str) -> None:
    arm.arm.lro_headers = protocol
    instance = await cloud.create(machine())
    assert instance.state is InstanceState.RUNNING
    marker = "/operations/" if protocol == "async" else "/operationresults/"
    assert any(marker in r.path for r in arm.arm.requests)
    await cloud.delete("ws1a2b3c4d5")
    with pytest.raises(NotFound):
        await cloud.get("ws1a2b3c4d5")
    # A failed operation is classified the same way whichever protocol reported it.
    arm.arm.inject("operation", QUOTA_EXCEEDED)
    with pytest.raises(QuotaExceeded):
        await cloud.create(machine("wsquota"))
    arm.arm.inject("operation", ALLOCATION_FAILED)
    with pytest.raises(CapacityUnavailable):
        await cloud.create(machine("wsalloc"))


async def test_token_file_credential_from_config(arm: FakeArmServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("test-token\n")
    # No credential passed: open() builds it from the config, as the provisioner's entry point does.
    provider = await AzureCloudProvider.open(config_for(arm, token_file=str(token_file)))
    try:
        await provider.create(machine())
        assert (await provider.get("ws1a2b3c4d5")).state is InstanceState.RUNNING
    finally:
        await provider.close()


async def test_server_errors_are_retried_then_classified(arm: FakeArmServer) -> None:
    arm.arm.inject("get", ArmError(500, "InternalServerError", "try again"), times=1)
    retrying = await AzureCloudProvider.open(
        config_for(arm, max_retries=2), StaticTokenCredential("test-token")
    )
    try:
        with pytest.raises(NotFound):  # the retry got through to the real answer
            await retrying.get("ws1a2b3c4d5")
    finally:
        await retrying.close()
    assert len(arm.arm.requests_for("GET", "ws1a2b3c4d5")) == 2

    arm.arm.inject("get", ArmError(503, "ServiceUnavailable", "busy"), times=1)
    strict = await AzureCloudProvider.open(
        config_for(arm, max_retries=0), StaticTokenCredential("test-token")
    )
    try:
        with pytest.raises(CloudError) as e:
            await strict.get("ws1a2b3c4d5")
        assert type(e.value) is CloudError
        assert e.value.retryable and "503" in e.value.message
    finally:
        await strict.close()


async def test_short_timeout_launch_reports_failure_through_get(arm: FakeArmServer) -> None:
    """The non-blocking launch pattern: PUT, hand back quickly, learn the outcome from get()."""
    arm.arm.polls = 10**9
    arm.arm.inject("operation", ALLOCATION_FAILED, pool="ws1a2b3c4d5")
    provider = await AzureCloudProvider.open(
        config_for(arm, operation_timeout=0.2), StaticTokenCredential("test-token")
    )
    try:
        with pytest.raises(Conflict):
            await provider.create(machine())
        assert (await provider.get("ws1a2b3c4d5")).state is InstanceState.PENDING
        await arm.arm.finish_operations()  # ARM gives up on the allocation
        failed = await provider.get("ws1a2b3c4d5")
        assert failed.state is InstanceState.FAILED
        assert isinstance(failed.failure, CapacityUnavailable)
        assert failed.failure.backoff >= 60
    finally:
        await provider.close()
