"""The kwok provider against the real kube-apiserver of the shared control plane.

Nodes are cluster-scoped, so every test uses fresh Machine names (and therefore fresh Node names).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from bench.fault_proxy import FaultProxy
from hack.localcluster import LocalCluster
from provisioner.cloud.base import InstanceState, InvalidRequest, NotFound, SkuUnavailable
from provisioner.cloud.kwok import KwokCloudProvider, node_name_for

GPUS = {"Standard_NC12s_v3": 2, "Standard_NC24ads_A100_v4": 1, "Standard_D4s_v3": 0}


def gpu_count(sku: str) -> int:
    return GPUS[sku]


def fresh_name() -> str:
    return "kw" + secrets.token_hex(4)


def machine(name: str, sku: str = "Standard_NC12s_v3", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "karpenter.sh/v1alpha5",
        "kind": "Machine",
        "metadata": {
            "name": name,
            "labels": {
                "karpenter.sh/provisioner-name": "default",
                "kaito.sh/workspace": "falcon",
                "kaito.sh/workspacenamespace": "default",
                **labels,
            },
        },
        "spec": {
            "requirements": [{"key": "node.kubernetes.io/instance-type", "operator": "In", "values": [sku]}],
            "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
            "resources": {"requests": {"storage": "120Gi"}},
        },
    }


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Wait until ``check()`` is true, polling briefly, failing at the deadline."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


async def node_exists(core: CoreV1Api, name: str) -> bool:
    try:
        await core.read_node(name)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


@pytest.fixture
async def core(api_client: ApiClient) -> AsyncIterator[CoreV1Api]:
    yield CoreV1Api(api_client)


@pytest.fixture
async def names(core: CoreV1Api) -> AsyncIterator[list[str]]:
    """Machine names a test uses; their Nodes are deleted afterwards."""
    used: list[str] = []
    yield used
    for name in used:
        try:
            await core.delete_node(node_name_for(name))
        except ApiException as e:
            if e.status != 404:
                raise


def provider(api_client: ApiClient, delay: float = 0.0) -> KwokCloudProvider:
    return KwokCloudProvider(api_client, gpu_count, delay=delay)


async def test_create_returns_at_once_and_the_node_appears_later(
    api_client: ApiClient, core: CoreV1Api, names: list[str]
) -> None:
    name = fresh_name()
    names.append(name)
    cloud = provider(api_client, delay=1.0)
    try:
        instance = await cloud.create(machine(name, apps="falcon-7b"))
        node_name = node_name_for(name)
        assert instance.state is InstanceState.PENDING
        assert instance.provider_id == f"kwok://{node_name}"
        assert instance.node_selector == {"agentpool": name, "kubernetes.azure.com/agentpool": name}
        assert not await node_exists(core, node_name)  # create did not wait for the delay
        assert cloud.pending() == [name]

        await eventually(lambda: node_exists(core, node_name))
        node = await core.read_node(node_name)
        assert node.metadata.annotations["kwok.x-k8s.io/node"] == "fake"
        labels = node.metadata.labels
        assert labels["node.kubernetes.io/instance-type"] == "Standard_NC12s_v3"
        assert labels["agentpool"] == labels["kubernetes.azure.com/agentpool"] == name
        assert labels["kaito.sh/machine-type"] == "gpu"
        assert labels["kaito.sh/workspace"] == "falcon"
        assert labels["apps"] == "falcon-7b"
        assert node.spec.provider_id == f"kwok://{node_name}"
        # The apiserver's TaintNodesByCondition admission adds node.kubernetes.io/not-ready until kwok takes over.
        assert ("sku", "gpu", "NoSchedule") in [(t.key, t.value, t.effect) for t in node.spec.taints]
        assert node.status.capacity["nvidia.com/gpu"] == "2"
        assert node.status.allocatable["nvidia.com/gpu"] == "2"

        got = await cloud.get(name)
        assert got.state is InstanceState.RUNNING
        assert got.capacity["nvidia.com/gpu"] == "2"
        assert (await cloud.get(f"kwok://{node_name}")).name == name
        await eventually(lambda: _no_pending(cloud))
    finally:
        await cloud.close()


async def _no_pending(cloud: KwokCloudProvider) -> bool:
    return not cloud.pending()


async def test_create_is_idempotent(api_client: ApiClient, core: CoreV1Api, names: list[str]) -> None:
    name = fresh_name()
    names.append(name)
    cloud = provider(api_client, delay=0.5)
    try:
        first = await cloud.create(machine(name))
        second = await cloud.create(machine(name))
        assert first.state is second.state is InstanceState.PENDING
        assert cloud.pending() == [name]
        await eventually(lambda: node_exists(core, node_name_for(name)))
        third = await cloud.create(machine(name))
        assert third.state is InstanceState.RUNNING
        assert third.provider_id == first.provider_id
        with pytest.raises(InvalidRequest, match="Standard_NC24ads_A100_v4"):
            await cloud.create(machine(name, sku="Standard_NC24ads_A100_v4"))
    finally:
        await cloud.close()


async def test_cpu_sku_has_no_gpu_capacity(api_client: ApiClient, core: CoreV1Api, names: list[str]) -> None:
    name = fresh_name()
    names.append(name)
    # The provisioner's own catalog lookups (provisioner/cmd.py): the node is as big as the VM size.
    from provisioner.cmd import gpu_count as catalog_gpus
    from provisioner.cmd import node_capacity

    cloud = KwokCloudProvider(api_client, catalog_gpus, node_capacity=node_capacity)
    try:
        await cloud.create(machine(name, sku="Standard_D4s_v3"))
        await eventually(lambda: node_exists(core, node_name_for(name)))
        node = await core.read_node(node_name_for(name))
        assert "nvidia.com/gpu" not in node.status.capacity
        assert node.metadata.labels["kaito.sh/machine-type"] == "cpu"
        assert "accelerator" not in node.metadata.labels
        assert (node.status.capacity["cpu"], node.status.capacity["memory"]) == ("4", "16Gi")
        assert node.status.allocatable["memory"] == "16Gi"
    finally:
        await cloud.close()


async def test_delete_before_the_node_appears_cancels_it(
    api_client: ApiClient, core: CoreV1Api, names: list[str]
) -> None:
    name = fresh_name()
    names.append(name)
    cloud = provider(api_client, delay=60.0)
    try:
        await cloud.create(machine(name))
        await cloud.delete(name)
        assert cloud.pending() == []
        with pytest.raises(NotFound):
            await cloud.get(name)
        assert not await node_exists(core, node_name_for(name))
    finally:
        await cloud.close()


async def test_delete_then_get_is_not_found(api_client: ApiClient, core: CoreV1Api, names: list[str]) -> None:
    name = fresh_name()
    names.append(name)
    cloud = provider(api_client)
    try:
        instance = await cloud.create(machine(name))
        await eventually(lambda: node_exists(core, node_name_for(name)))
        await cloud.delete(instance.provider_id)
        with pytest.raises(NotFound) as e:
            await cloud.get(name)
        assert e.value.reason == "NotFound"
        with pytest.raises(NotFound):
            await cloud.delete(name)
    finally:
        await cloud.close()


async def test_list_returns_only_our_nodes(api_client: ApiClient, core: CoreV1Api, names: list[str]) -> None:
    ours, pending, foreign = fresh_name(), fresh_name(), fresh_name()
    names.extend([ours, pending, foreign])
    # A kwok node somebody else made (e.g. a BYO GPU node): it has an agentpool label but is not ours.
    await core.create_node(
        {
            "metadata": {
                "name": node_name_for(foreign),
                "labels": {"kubernetes.azure.com/agentpool": foreign, "kaito.sh/machine-type": "gpu"},
                "annotations": {"kwok.x-k8s.io/node": "fake"},
            }
        }
    )
    fast = provider(api_client)
    slow = provider(api_client, delay=60.0)
    try:
        await fast.create(machine(ours))
        await eventually(lambda: node_exists(core, node_name_for(ours)))
        listed = {i.name: i for i in await fast.list()}
        assert ours in listed
        assert foreign not in listed
        assert listed[ours].created_at is not None

        await slow.create(machine(pending))
        slow_listed = {i.name: i.state for i in await slow.list()}
        assert slow_listed[pending] is InstanceState.PENDING
        assert slow_listed[ours] is InstanceState.RUNNING
    finally:
        await fast.close()
        await slow.close()


async def test_close_cancels_scheduled_nodes(
    api_client: ApiClient, core: CoreV1Api, names: list[str]
) -> None:
    name = fresh_name()
    names.append(name)
    cloud = provider(api_client, delay=60.0)
    await cloud.create(machine(name))
    await cloud.close()
    assert cloud.pending() == []
    assert not await node_exists(core, node_name_for(name))


async def test_bad_machines_are_rejected_up_front(api_client: ApiClient, names: list[str]) -> None:
    cloud = provider(api_client)
    try:
        with pytest.raises(SkuUnavailable, match="Standard_Unknown"):
            await cloud.create(machine(fresh_name(), sku="Standard_Unknown"))
        with pytest.raises(InvalidRequest):
            await cloud.create(machine("Not-A-Pool-Name"))
        assert cloud.pending() == []
    finally:
        await cloud.close()


async def test_a_node_the_apiserver_rejects_surfaces_on_the_next_call(
    api_client: ApiClient, core: CoreV1Api, names: list[str]
) -> None:
    name = fresh_name()
    names.append(name)
    cloud = provider(api_client)
    try:
        # A label value the API server refuses (spaces are not allowed): the launch task fails.
        await cloud.create(machine(name, team="not a valid label value"))
        await eventually(lambda: _no_pending(cloud))
        with pytest.raises(InvalidRequest, match="rejected"):
            await cloud.get(name)
        with pytest.raises(InvalidRequest):
            await cloud.create(machine(name, team="not a valid label value"))
        assert not await node_exists(core, node_name_for(name))
    finally:
        await cloud.close()


async def test_transient_apiserver_errors_during_launch_are_retried(
    control_plane: LocalCluster, core: CoreV1Api, names: list[str]
) -> None:
    """The launch's Node create meets 500s (the chaos bench's fault proxy, a real HTTP proxy in front
    of the real apiserver): the provider keeps trying and the Node appears once the apiserver heals --
    the Machine does not wait out its registration timeout on one transient error."""
    proxy = FaultProxy.for_cluster(
        control_plane,
        p=0.0,
        kinds=("500",),
        cut_watches=False,
    )
    await proxy.start()
    cfg = control_plane.client_configuration()
    cfg.host = proxy.url
    name = fresh_name()
    names.append(name)
    try:
        async with ApiClient(cfg) as api:
            cloud = provider(api, delay=0.3)
            try:
                pending = await cloud.create(machine(name))
                assert pending.state == InstanceState.PENDING
                proxy.p = 1.0  # every request fails from now on: the delayed Node create among them

                async def failed_twice() -> bool:
                    return proxy.faults["500"] >= 2

                await eventually(failed_twice)
                assert cloud.pending() == [name], "still launching, not given up"
                proxy.p = 0.0
                await eventually(lambda: node_exists(core, node_name_for(name)))
                got = await cloud.get(name)
                assert got.machine_name == name
            finally:
                await cloud.close()
    finally:
        await proxy.stop()
