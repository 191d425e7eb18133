"""The Azure provider end to end with Nodes: fake ARM + the AKS node simulator + the real kube-apiserver.

Shows what the lifecycle reconcilers will do on AKS: create the pool, find its Node through
``Instance.node_selector``, read the Node's ``azure:///`` providerID, then get/delete by that providerID.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient, CoreV1Api

from provisioner.cloud.azure import AzureCloudProvider, AzureConfig, AzureProviderID
from provisioner.cloud.base import InstanceState, NotFound
from test.fake_arm import FakeArm, FakeArmServer, StaticTokenCredential
from test.fake_arm.nodes import AksNodeSimulator
from test.waiting import eventually

SUB, RG, CLUSTER = "sub-1", "kaito-rg", "kaito-aks"
REPO_ROOT = str(Path(__file__).resolve().parents[3])


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


@pytest.fixture
async def setup(api_client: ApiClient) -> AsyncIterator[tuple[FakeArm, AzureCloudProvider, CoreV1Api]]:
    # A unique cluster name gives a unique node-name suffix, so sessions sharing the apiserver never collide.
    cluster = f"{CLUSTER}-{secrets.token_hex(3)}"
    simulator = AksNodeSimulator(api_client, lambda sku: 2, location="eastus")
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
    assert parsed.resource_group == f"mc_{RG}_{cloud.config.cluster_name}_eastus".lower()
    assert parsed.subscription_id == SUB

    got = await cloud.get(provider_id)
    assert got.name == name and got.provider_id == provider_id

    await cloud.delete(provider_id)
    with pytest.raises(NotFound):
        await cloud.get(provider_id)

    async def node_gone() -> bool:
        return not (await core.list_node(label_selector=selector)).items

    await eventually(node_gone, 15, "the node to be deleted", interval=0.05)


async def test_standalone_fake_arm_demo_path(api_client: ApiClient, cluster: Any, tmp_path: Path) -> None:
    """``python -m test.fake_arm --kubeconfig`` + the provider configured purely from environment variables."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "test.fake_arm",
        "--port",
        "0",
        "--polls",
        "1",
        "--retry-after",
        "0",
        "--token",
        "demo-token",
        "--kubeconfig",
        str(cluster.kubeconfig),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert proc.stdout is not None
        announced: dict[str, str] = {}
        async with asyncio.timeout(30):
            while "ARM_CA_FILE" not in announced:
                line = (await proc.stdout.readline()).decode()
                assert line, "fake ARM exited before announcing its endpoint"
                key, sep, value = line.strip().partition("=")
                if sep:
                    announced[key] = value
        token_file = tmp_path / "token"
        token_file.write_text("demo-token")
        name = "dm" + secrets.token_hex(4)
        config = AzureConfig.from_env(
            {
                "ARM_SUBSCRIPTION_ID": SUB,
                "ARM_RESOURCE_GROUP": RG,
                "AZURE_CLUSTER_NAME": f"demo-{name}",
                "ARM_ENDPOINT": announced["ARM_ENDPOINT"],
                "ARM_CA_FILE": announced["ARM_CA_FILE"],
                "ARM_TOKEN_FILE": str(token_file),
                "ARM_POLLING_INTERVAL": "0",
            }
        )
        cloud = await AzureCloudProvider.open(config)
        try:
            instance = await cloud.create(machine(name))
            core = CoreV1Api(api_client)

            async def node_registered() -> bool:
                return bool((await core.list_node(label_selector=instance.label_selector())).items)

            await eventually(node_registered, 15, "the node to register", interval=0.05)
            node = (await core.list_node(label_selector=instance.label_selector())).items[0]
            assert AzureProviderID.parse(node.spec.provider_id).pool_name == name
            await cloud.delete(name)

            async def node_gone() -> bool:
                return not await node_registered()

            await eventually(node_gone, 15, "the node to be deleted", interval=0.05)
        finally:
            await cloud.close()
    finally:
        proc.terminate()
        await proc.wait()
