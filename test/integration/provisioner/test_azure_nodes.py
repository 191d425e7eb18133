"""The Azure provider end to end with Nodes: fake ARM + the AKS node simulator + the real kube-apiserver.

Shows what the lifecycle reconcilers will do on AKS: create the pool, find its Node through
``Instance.node_selector``, read the Node's ``azure:///`` providerID, then get/delete by that providerID.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient, CoreV1Api

from provisioner.cloud.azure import AzureCloudProvider, AzureConfig, AzureProviderID
from provisioner.cloud.base import InstanceState, NotFound
from test.fake_arm import FakeArm, FakeArmServer, StaticTokenCredential
from test.fake_arm.nodes import AksNodeSimulator

SUB, RG, CLUSTER, NODE_RG = "sub-1", "kaito-rg", "kaito-aks", "MC_kaito-rg_kaito-aks_eastus"


def machine(name: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"kaito.sh/workspace": "w", "kaito.sh/workspacenamespace": "ns"},
        },
        "spec": {
            "requirements": [
                {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["Standard_NC12s_v3"]}
            ],
            "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
            "resources": {"requests": {"storage": "100Gi"}},
        },
    }


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


@pytest.fixture
async def setup(api_client: ApiClient) -> AsyncIterator[tuple[FakeArm, AzureCloudProvider, CoreV1Api]]:
    # A unique cluster name gives a unique node-name suffix, so sessions sharing the apiserver never collide.
    cluster = f"{CLUSTER}-{secrets.token_hex(3)}"
    simulator = AksNodeSimulator(
        api_client, lambda sku: 2, subscription_id=SUB, node_resource_group=NODE_RG, cluster_name=cluster
    )
    async with FakeArmServer(FakeArm(polls=1, hooks=[simulator])) as server:
        config = AzureConfig(
            subscription_id=SUB,
            resource_group=RG,
            cluster_name=cluster,
            arm_endpoint=server.endpoint,
            ca_file=str(server.ca_file),
            polling_interval=0.0,
        )
        cloud = await AzureCloudProvider.open(config, StaticTokenCredential())
        try:
            yield server.arm, cloud, CoreV1Api(api_client)
        finally:
            await cloud.close()
            assert server.arm.hook_errors == []


async def test_pool_node_is_found_by_selector_and_provider_id(
    setup: tuple[FakeArm, AzureCloudProvider, CoreV1Api],
) -> None:
    _, cloud, core = setup
    name = "az" + secrets.token_hex(4)
    instance = await cloud.create(machine(name))
    assert instance.state is InstanceState.RUNNING

    selector = instance.label_selector()
    assert selector == f"agentpool={name},kubernetes.azure.com/agentpool={name}"
    nodes = (await core.list_node(label_selector=selector)).items
    assert len(nodes) == 1
    node = nodes[0]
    assert node.metadata.name.startswith(f"aks-{name}-")
    assert node.metadata.labels["kaito.sh/workspace"] == "w"
    assert node.status.allocatable["nvidia.com/gpu"] == "2"
    provider_id = node.spec.provider_id
    parsed = AzureProviderID.parse(provider_id)
    assert parsed.pool_name == name
    assert parsed.resource_group == NODE_RG.lower()

    got = await cloud.get(provider_id)
    assert got.name == name and got.provider_id == provider_id

    await cloud.delete(provider_id)
    with pytest.raises(NotFound):
        await cloud.get(provider_id)

    async def node_gone() -> bool:
        return not (await core.list_node(label_selector=selector)).items

    await eventually(node_gone)
