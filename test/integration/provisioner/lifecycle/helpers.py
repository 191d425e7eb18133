"""Helpers for the lifecycle integration tests: Machines, the in-process provisioner, a stand-in kubelet."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

from hack.localcluster import LocalCluster
from kaito.runtime.kube import KubeClient
from kaito.runtime.manager import Manager, ManagerOptions
from provisioner.cloud.azure import AzureCloudProvider, AzureConfig
from provisioner.cloud.base import CloudProvider
from provisioner.cloud.metrics import InstrumentedCloudProvider
from provisioner.lifecycle.reconciler import LifecycleOptions
from provisioner.lifecycle.setup import Provisioner, add_provisioner
from test.fake_arm import FakeArm, FakeArmServer, StaticTokenCredential
from test.fake_arm.nodes import AksNodeSimulator
from test.waiting import eventually

GROUP, VERSION, PLURAL = "karpenter.sh", "v1alpha5", "machines"
SUB, RG = "sub-lifecycle", "kaito-rg"
SKU = "Standard_NC12s_v3"
GPUS = {SKU: 2, "Standard_NC6s_v3": 1}


def gpu_count(sku: str) -> int:
    """The test SKU catalog."""
    return GPUS[sku]


def fresh_name(prefix: str = "lc") -> str:
    """A Machine (== agent pool) name that is unique across the shared apiserver."""
    return prefix + secrets.token_hex(4)


def machine_manifest(name: str, run: str, sku: str = SKU) -> dict[str, Any]:
    """A Machine like the workspace controller creates, labelled for the provisioner serving ``run``."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Machine",
        "metadata": {
            "name": name,
            "labels": {
                "karpenter.sh/provisioner-name": "default",
                "kaito.sh/workspace": "falcon",
                "kaito.sh/workspacenamespace": "demo",
                "kaito.test/run": run,
            },
        },
        "spec": {
            "machineTemplateRef": {"name": name},
            "requirements": [
                {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": [sku]},
                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
            ],
            "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
            "resources": {"requests": {"storage": "120Gi"}},
        },
    }


def condition(machine: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    """The condition of ``type_`` ({} when absent)."""
    for c in ((machine or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


class Machines:
    """Machine CRUD for tests."""

    def __init__(self, api_client: ApiClient) -> None:
        self.api = CustomObjectsApi(api_client)

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = await self.api.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
        return created

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = await self.api.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return found

    async def delete(self, name: str) -> None:
        await self.api.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)

    async def patch(self, name: str, patch: dict[str, Any]) -> None:
        await self.api.patch_cluster_custom_object(
            GROUP, VERSION, PLURAL, name, patch, _content_type="application/merge-patch+json"
        )

    async def wait_condition(
        self, name: str, type_: str, status: str, timeout: float = 30.0, reason: str | None = None
    ) -> dict[str, Any]:
        """Wait until the Machine's condition ``type_`` has ``status`` (and ``reason``); return the Machine."""

        async def check() -> dict[str, Any] | None:
            m = await self.get(name)
            c = condition(m, type_)
            if c.get("status") == status and (reason is None or c.get("reason") == reason):
                return m
            return None

        return await eventually(check, timeout, f"machine {name} {type_}={status} ({reason or 'any reason'})")


async def mark_node_ready(api_client: ApiClient, node: str) -> None:
    """What the kubelet and the node-lifecycle controller do on a real cluster (the apiserver-only test
    plane has neither): report Ready, then lift the ``not-ready`` taint the apiserver put on the Node."""
    core = CoreV1Api(api_client)
    await core.patch_node_status(
        node,
        {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                    }
                ]
            }
        },
    )
    for _ in range(10):  # the provisioner patches the Node too: a conditional read-modify-write may conflict
        current = await core.read_node(node)
        taints = [
            {"key": t.key, "value": t.value, "effect": t.effect}
            for t in current.spec.taints or []
            if t.key != "node.kubernetes.io/not-ready"
        ]
        patch = {
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "spec": {"taints": taints},
        }
        try:
            await core.patch_node(node, patch)
            return
        except ApiException as e:
            if e.status != 409:
                raise
    raise AssertionError(f"could not lift the not-ready taint of node {node}")


async def nodes_of_pool(api_client: ApiClient, pool: str) -> list[Any]:
    """Nodes carrying both AKS agentpool labels for ``pool``."""
    core = CoreV1Api(api_client)
    selector = f"agentpool={pool},kubernetes.azure.com/agentpool={pool}"
    return list((await core.list_node(label_selector=selector)).items)


@contextlib.asynccontextmanager
async def running_provisioner(
    cluster: LocalCluster,
    cloud: CloudProvider,
    run: str,
    *,
    options: LifecycleOptions | None = None,
    gc_interval: float | None = None,
    gc_grace: float = 30.0,
    machine_selector: str | None = None,
) -> AsyncIterator[Provisioner]:
    """The provisioner's Manager running in this process, serving Machines labelled ``kaito.test/run=run``
    (or those ``machine_selector`` selects)."""
    async with ApiClient(cluster.client_configuration()) as api:
        mgr = Manager(
            KubeClient(api),
            ManagerOptions(
                name=f"provisioner-{run}", metrics_port=None, probe_port=None, graceful_shutdown_timeout=5.0
            ),
        )
        prov = add_provisioner(
            mgr,
            cloud,
            gpu_count=gpu_count,
            options=options or LifecycleOptions(termination_poll=0.2),
            workers=4,
            machine_selector=machine_selector or f"kaito.test/run={run}",
            gc_interval=gc_interval,
            gc_grace=gc_grace,
        )
        task = asyncio.create_task(mgr.run(), name=f"provisioner-{run}")

        async def leading() -> bool:
            if task.done():
                task.result()  # surface a startup failure
            return mgr.is_leader

        try:
            await eventually(leading, 30, "the in-process provisioner to start")
            yield prov
        finally:
            mgr.stop()
            await task


@dataclass
class AzureEnv:
    """A fake ARM server with its Azure provider, for one test."""

    cluster: LocalCluster
    arm: FakeArm
    server: FakeArmServer
    config: AzureConfig
    cloud: InstrumentedCloudProvider
    run: str


@contextlib.asynccontextmanager
async def fake_azure(cluster: LocalCluster, api_client: ApiClient) -> AsyncIterator[AzureEnv]:
    """A fake ARM whose finished pools register an AKS-like Node in the apiserver, and the real Azure
    SDK provider talking to it (the ``azure`` fixture; other suites run the provisioner on it too)."""
    # A unique AKS cluster name gives unique node names, so tests sharing the apiserver never collide.
    aks = f"aks-{secrets.token_hex(3)}"
    arm = FakeArm(polls=1, hooks=[AksNodeSimulator(api_client, gpu_count, location="eastus")])
    async with FakeArmServer(arm) as server:
        config = AzureConfig(
            subscription_id=SUB,
            resource_group=RG,
            cluster_name=aks,
            arm_endpoint=server.endpoint,
            ca_file=str(server.ca_file),
            polling_interval=0.0,
            max_retries=0,
        )
        cloud = InstrumentedCloudProvider(await AzureCloudProvider.open(config, StaticTokenCredential()))
        try:
            yield AzureEnv(cluster, arm, server, config, cloud, secrets.token_hex(4))
        finally:
            await cloud.close()
            assert arm.hook_errors == []
