"""Choosing the worker nodes of a workspace (pure; upstream §3.4 with its order made explicit).

A node qualifies when it carries every ``labelSelector.matchLabels`` pair, is not being deleted, is
``Ready``, and either is named in ``preferredNodes`` or has the requested instance type. Qualifying
nodes are ordered: preferred first, then the current ``status.workerNodes`` (so a running workload does
not hop nodes), then nodes a provisioner created (label ``kaito.sh/machine-type``), then by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kaito.api.machine import LABEL_INSTANCE_TYPE, LABEL_MACHINE_TYPE

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


def qualify(
    node: Obj, match_labels: Mapping[str, str], instance_type: str, preferred: Iterable[str]
) -> Qualification:
    """Classify one node (see the module docstring)."""
    name = node_name(node)
    if not matches_labels(node, match_labels):
        return Qualification(name, False, "labels do not match")
    if (node.get("metadata") or {}).get("deletionTimestamp"):
        return Qualification(name, False, "being deleted")
    if not node_ready(node):
        return Qualification(name, False, "not Ready")
    if name not in set(preferred) and node_labels(node).get(LABEL_INSTANCE_TYPE) != instance_type:
        return Qualification(name, False, f"instance type is not {instance_type}")
    return Qualification(name, True)


def qualifying_nodes(
    nodes: Iterable[Obj],
    match_labels: Mapping[str, str],
    instance_type: str,
    preferred: Sequence[str] = (),
    current: Sequence[str] = (),
) -> list[Obj]:
    """Usable nodes in selection order (see the module docstring)."""
    pref = set(preferred)
    cur = set(current)
    usable = [n for n in nodes if qualify(n, match_labels, instance_type, pref).usable]

    def order(n: Obj) -> tuple[int, int, int, str]:
        name = node_name(n)
        return (
            0 if name in pref else 1,
            0 if name in cur else 1,
            0 if LABEL_MACHINE_TYPE in node_labels(n) else 1,
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
) -> list[Obj]:
    """The first ``count`` qualifying nodes (fewer when not enough qualify)."""
    return qualifying_nodes(nodes, match_labels, instance_type, preferred, current)[:count]
