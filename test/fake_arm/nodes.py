"""Registers a Node for each agent pool the fake ARM finishes, as AKS would, in a real kube-apiserver.

With this hook the Azure provider's whole path can be exercised locally: the pool's Node appears with
AKS's name (``aks-<pool>-<digits>-vmss000000``), the ``agentpool`` labels, the pool's nodeLabels and
nodeTaints, ``nvidia.com/gpu`` capacity and an ``azure:///...`` providerID. It is annotated for kwok, so
in the full local cluster kwok keeps it Ready. Deleting the pool deletes its Node(s).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio.client import ApiClient, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from provisioner.cloud.azure import AGENTPOOL_LABEL, AKS_AGENTPOOL_LABEL, AzureProviderID
from provisioner.machine_fields import INSTANCE_TYPE_LABEL


class AksNodeSimulator:
    """A FakeArm hook (``FakeArm(hooks=[AksNodeSimulator(...)])``) that creates/deletes pool Nodes."""

    def __init__(
        self,
        api_client: ApiClient,
        gpu_count: Callable[[str], int],
        *,
        subscription_id: str,
        node_resource_group: str,
        cluster_name: str,
    ) -> None:
        self._core = CoreV1Api(api_client)
        self._gpu_count = gpu_count
        self._subscription = subscription_id
        self._node_rg = node_resource_group
        # AKS uses one numeric suffix for every pool of a cluster.
        self._digits = f"{zlib.crc32(cluster_name.encode()) % 10**8:08d}"

    def node_name(self, pool: str) -> str:
        """The Node name AKS gives the first VM of ``pool``."""
        return f"aks-{pool}-{self._digits}-vmss000000"

    async def __call__(self, event: str, pool: dict[str, Any]) -> None:
        """Create the pool's Node on ``ready``; delete it on ``deleted``."""
        name = str(pool["name"])
        node = self.node_name(name)
        if event == "deleted":
            try:
                await self._core.delete_node(node)
            except ApiException as e:
                if e.status != 404:
                    raise
            return
        props = pool["properties"]
        vm_size = str(props["vmSize"])
        labels = {str(k): str(v) for k, v in (props.get("nodeLabels") or {}).items()}
        labels.update(
            {
                AGENTPOOL_LABEL: name,
                AKS_AGENTPOOL_LABEL: name,
                INSTANCE_TYPE_LABEL: vm_size,
                "kubernetes.io/hostname": node,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            }
        )
        capacity = {"cpu": "32", "memory": "256Gi", "pods": "110"}
        gpus = self._gpu_count(vm_size)
        if gpus > 0:
            capacity["nvidia.com/gpu"] = str(gpus)
            labels["accelerator"] = "nvidia"
        taints = []
        for raw in props.get("nodeTaints") or []:
            key_value, _, effect = str(raw).rpartition(":")
            key, _, value = key_value.partition("=")
            taints.append(
                {"key": key, "value": value, "effect": effect} if value else {"key": key, "effect": effect}
            )
        body: Any = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node, "labels": labels, "annotations": {"kwok.x-k8s.io/node": "fake"}},
            "spec": {
                "providerID": str(AzureProviderID.for_node(self._subscription, self._node_rg, node)),
                "taints": taints,
            },
            "status": {"capacity": capacity, "allocatable": dict(capacity)},
        }
        try:
            await self._core.create_node(body)
        except ApiException as e:
            if e.status != 409:  # an update of an existing pool keeps its Node
                raise
