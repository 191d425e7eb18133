"""Registers a Node for each agent pool the fake ARM finishes, as AKS would, in a real kube-apiserver.

With this hook the Azure provider's whole path can be exercised locally: the pool's Node appears with
AKS's name (``aks-<pool>-<digits>-vmss000000``), the ``agentpool`` labels, the pool's nodeLabels and
nodeTaints, ``nvidia.com/gpu`` capacity and an ``azure:///...`` providerID. It is annotated for kwok, so
in the full local cluster kwok keeps it Ready. Deleting the pool deletes its Node(s).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio.client import ApiClient, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from provisioner.cloud.azure import AGENTPOOL_LABEL, AKS_AGENTPOOL_LABEL, AzureProviderID
from provisioner.machine_fields import INSTANCE_TYPE_LABEL

_POOL_ID_RE = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/Microsoft\.ContainerService/"
    r"managedClusters/(?P<cluster>[^/]+)/agentPools/(?P<name>[^/]+)$",
    re.IGNORECASE,
)


def _parse_pool_id(pool_id: str) -> tuple[str, str, str, str]:
    match = _POOL_ID_RE.match(pool_id)
    if not match:
        raise ValueError(f"not an agent pool id: {pool_id!r}")
    return match["sub"], match["rg"], match["cluster"], match["name"]


class AksNodeSimulator:
    """A FakeArm hook (``FakeArm(hooks=[AksNodeSimulator(...)])``) that creates/deletes pool Nodes."""

    def __init__(
        self, api_client: ApiClient, gpu_count: Callable[[str], int], *, location: str = "eastus"
    ) -> None:
        self._core = CoreV1Api(api_client)
        self._gpu_count = gpu_count
        self._location = location

    def node_name(self, pool_id: str) -> str:
        """The Node name AKS gives the first VM of the pool with ARM id ``pool_id``."""
        sub, rg, cluster, name = _parse_pool_id(pool_id)
        # AKS uses one numeric suffix for every pool of a cluster.
        digits = zlib.crc32(f"{sub}/{rg}/{cluster}".lower().encode()) % 10**8
        return f"aks-{name}-{digits:08d}-vmss000000"

    def node_resource_group(self, pool_id: str) -> str:
        """AKS's default node resource group ``MC_<rg>_<cluster>_<location>``."""
        _, rg, cluster, _ = _parse_pool_id(pool_id)
        return f"MC_{rg}_{cluster}_{self._location}"

    async def __call__(self, event: str, pool: dict[str, Any]) -> None:
        """Create the pool's Node on ``ready``; delete it on ``deleted``."""
        name = str(pool["name"])
        node = self.node_name(str(pool["id"]))
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
                "providerID": str(
                    AzureProviderID.for_node(
                        _parse_pool_id(str(pool["id"]))[0], self.node_resource_group(str(pool["id"])), node
                    )
                ),
                "taints": taints,
            },
            "status": {"capacity": capacity, "allocatable": dict(capacity)},
        }
        try:
            await self._core.create_node(body)
        except ApiException as e:
            if e.status != 409:  # an update of an existing pool keeps its Node
                raise
