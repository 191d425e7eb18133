"""Draining a Machine's Node before it is deleted: cordon, then evict its pods through the Eviction API.

Evictions honour PodDisruptionBudgets (the apiserver answers 429 while a budget forbids one), so a
workload with a budget moves off gracefully; the lifecycle keeps retrying on its termination requeue
until the pods are gone or its drain timeout has passed. DaemonSet pods, mirror (static) pods and pods
that already finished are left alone, as ``kubectl drain`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kaito.runtime.kube import NODES, PODS, ApiError, KubeClient

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


@dataclass
class DrainStatus:
    """What is left on the node after one drain pass."""

    remaining: list[str] = field(default_factory=list)
    """``namespace/name`` of evictable pods still on the node (including ones terminating)."""
    blocked: list[str] = field(default_factory=list)
    """Pods whose eviction a PodDisruptionBudget refused this pass."""


def is_evictable(pod: Mapping[str, Any]) -> bool:
    """Whether draining should evict this pod (not a DaemonSet or mirror pod, not finished)."""
    meta = pod.get("metadata") or {}
    if MIRROR_ANNOTATION in (meta.get("annotations") or {}):
        return False
    if any(ref.get("kind") == "DaemonSet" for ref in meta.get("ownerReferences") or []):
        return False
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


async def cordon(client: KubeClient, node: Mapping[str, Any]) -> None:
    """Mark the node unschedulable (no-op when it already is)."""
    if (node.get("spec") or {}).get("unschedulable"):
        return
    name = str((node.get("metadata") or {}).get("name"))
    await client.patch(NODES, name, {"spec": {"unschedulable": True}})


async def evict_pods(client: KubeClient, node_name: str) -> DrainStatus:
    """One drain pass: ask for the eviction of every evictable pod on the node that is not yet going."""
    status = DrainStatus()
    pods = await client.list_all(PODS, field_selector=f"spec.nodeName={node_name}")
    for pod in pods:
        if not is_evictable(pod):
            continue
        meta = pod.get("metadata") or {}
        ns, name = str(meta.get("namespace")), str(meta.get("name"))
        key = f"{ns}/{name}"
        if meta.get("deletionTimestamp"):
            status.remaining.append(key)  # terminating: wait for it
            continue
        body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": ns}}
        try:
            await client.request("POST", PODS.path(ns, name, "eviction"), body=body)
        except ApiError as e:
            if e.not_found:
                continue  # already gone
            if e.status != 429:
                raise
            status.blocked.append(key)  # a PodDisruptionBudget forbids it right now
        status.remaining.append(key)
    return status
