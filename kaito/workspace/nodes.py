"""Choosing the worker nodes of a workspace (pure; upstream §3.4 with its order made explicit).

A node qualifies when it carries every ``labelSelector.matchLabels`` pair, is not being deleted, is
``Ready``, was not provisioned for another workspace (the Machine labels a provisioner copies onto its
node say for whom), and either is named in ``preferredNodes`` or has the requested instance type (a
preferred node skips the last two checks: the user chose it). Qualifying
nodes are ordered: preferred first, then the current ``status.workerNodes`` (so a running workload does
not hop nodes), then nodes a provisioner created (label ``kaito.sh/machine-type``, or Karpenter's
``karpenter.sh/nodepool`` as upstream checks with NodeClaims), then by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kaito.api.machine import LABEL_INSTANCE_TYPE, LABEL_MACHINE_TYPE
from kaito.api.nodeclaim import LABEL_NODEPOOL
from kaito.api.workspace import LABEL_WORKSPACE_NAME, LABEL_WORKSPACE_NAMESPACE

Obj = Mapping[str, Any]
GPU_RESOURCE = "nvidia.com/gpu"


def node_name(node: Obj) -> str:
    """``metadata.name``."""
    return str((node.get("metadata") or {}).get("name", ""))


def node_labels(node: Obj) -> Mapping[str, str]:
    """``metadata.labels`` (never None)."""
    return (node.get("metadata") or {}).get("labels") or {}


def node_ready(node: Obj) -> bool:
    """Whether the ``Ready`` condition is True."""
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def node_gpus(node: Obj) -> int:
    """``nvidia.com/gpu`` allocatable (capacity when allocatable is missing), 0 when none."""
    status = node.get("status") or {}
    raw = (status.get("allocatable") or {}).get(GPU_RESOURCE) or (status.get("capacity") or {}).get(
        GPU_RESOURCE
    )
    try:
        return int(str(raw)) if raw is not None else 0
    except ValueError:
        return 0


def matches_labels(node: Obj, match_labels: Mapping[str, str]) -> bool:
    """Whether the node carries every ``key=value`` of ``match_labels``."""
    labels = node_labels(node)
    return all(labels.get(k) == v for k, v in match_labels.items())


@dataclass(frozen=True)
class Qualification:
    """Why a node matching the labels was or was not usable (for status messages)."""

    name: str
    usable: bool
    why: str = ""


def provisioned_for(node: Obj) -> tuple[str, str] | None:
    """``(namespace, name)`` of the workspace whose Machine created this node (its copied labels)."""
    labels = node_labels(node)
    ws, ns = labels.get(LABEL_WORKSPACE_NAME), labels.get(LABEL_WORKSPACE_NAMESPACE)
    return (ns, ws) if ws and ns else None


def qualify(
    node: Obj,
    match_labels: Mapping[str, str],
    instance_type: str,
    preferred: Iterable[str],
    owner: tuple[str, str] | None = None,
) -> Qualification:
    """Classify one node (see the module docstring). ``owner`` is the ``(namespace, name)`` of the
    workspace asking: a node provisioned for another workspace is not usable unless preferred."""
    why = _unusable(node, match_labels, instance_type, frozenset(preferred), owner)
    return Qualification(node_name(node), why is None, why or "")


def _unusable(
    node: Obj,
    match_labels: Mapping[str, str],
    instance_type: str,
    preferred: frozenset[str],
    owner: tuple[str, str] | None,
) -> str | None:
    """Why ``node`` is not usable, or None when it is (the hot path: every candidate, every reconcile)."""
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    for k, v in match_labels.items():
        if labels.get(k) != v:
            return "labels do not match"
    name = meta.get("name", "")
    preferred_node = name in preferred
    if owner is not None and not preferred_node:
        ws, ns = labels.get(LABEL_WORKSPACE_NAME), labels.get(LABEL_WORKSPACE_NAMESPACE)
        if ws and ns and (ns, ws) != owner:
            return f"provisioned for workspace {ns}/{ws}"
    if meta.get("deletionTimestamp"):
        return "being deleted"
    if not node_ready(node):
        return "not Ready"
    if not preferred_node and labels.get(LABEL_INSTANCE_TYPE) != instance_type:
        return f"instance type is not {instance_type}"
    return None


def qualifying_nodes(
    nodes: Iterable[Obj],
    match_labels: Mapping[str, str],
    instance_type: str,
    preferred: Sequence[str] = (),
    current: Sequence[str] = (),
    owner: tuple[str, str] | None = None,
) -> list[Obj]:
    """Usable nodes in selection order (see the module docstring)."""
    pref = frozenset(preferred)
    cur = frozenset(current)
    usable = [n for n in nodes if _unusable(n, match_labels, instance_type, pref, owner) is None]

    def order(n: Obj) -> tuple[int, int, int, str]:
        name = node_name(n)
        return (
            0 if name in pref else 1,
            0 if name in cur else 1,
            0 if _provisioned(node_labels(n)) else 1,
            name,
        )

    return sorted(usable, key=order)


def select_nodes(
    nodes: Iterable[Obj],
    match_labels: Mapping[str, str],
    instance_type: str,
    count: int,
    preferred: Sequence[str] = (),
    current: Sequence[str] = (),
    owner: tuple[str, str] | None = None,
) -> list[Obj]:
    """The first ``count`` qualifying nodes (fewer when not enough qualify)."""
    return qualifying_nodes(nodes, match_labels, instance_type, preferred, current, owner)[:count]


def _provisioned(labels: Mapping[str, str]) -> bool:
    """Whether a node was made by a provisioner (gpu-provisioner's machine-type, or a Karpenter NodePool)."""
    return LABEL_MACHINE_TYPE in labels or LABEL_NODEPOOL in labels
