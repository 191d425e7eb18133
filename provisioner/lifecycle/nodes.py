"""Pure checks on Node objects (JSON-shaped dicts) for registration and initialization."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from provisioner import machine_fields as mf
from provisioner.cloud.azure import AGENTPOOL_LABEL, AKS_AGENTPOOL_LABEL
from provisioner.machine_fields import MachineFieldError, Taint

GPU_RESOURCE = "nvidia.com/gpu"
REGISTERED_LABEL = "karpenter.sh/registered"
INITIALIZED_LABEL = "karpenter.sh/initialized"

# Taints the node lifecycle puts on every new node and removes by itself (upstream's "known ephemeral").
EPHEMERAL_TAINTS: tuple[tuple[str, str], ...] = (
    ("node.kubernetes.io/not-ready", "NoSchedule"),
    ("node.kubernetes.io/not-ready", "NoExecute"),
    ("node.kubernetes.io/unreachable", "NoSchedule"),
    ("node.cloudprovider.kubernetes.io/uninitialized", "NoSchedule"),
)

Node = Mapping[str, Any]


def node_name(node: Node) -> str:
    """``metadata.name``."""
    return str((node.get("metadata") or {}).get("name") or "")


def node_provider_id(node: Node) -> str:
    """``spec.providerID`` ("" when unset)."""
    return str((node.get("spec") or {}).get("providerID") or "")


def node_labels(node: Node) -> dict[str, str]:
    """A copy of ``metadata.labels``."""
    return {str(k): str(v) for k, v in ((node.get("metadata") or {}).get("labels") or {}).items()}


def is_deleting(obj: Node) -> bool:
    """Whether the object has a deletionTimestamp."""
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def pool_of(node: Node) -> str:
    """The agent pool (== Machine name) a Node belongs to: both AKS agentpool labels must agree."""
    labels = node_labels(node)
    pool = labels.get(AKS_AGENTPOOL_LABEL, "")
    return pool if pool and labels.get(AGENTPOOL_LABEL) == pool else ""


def is_ready(node: Node) -> bool:
    """Whether the Node's Ready condition is True."""
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return bool(c.get("status") == "True")
    return False


def taints_of(node: Node) -> list[Taint]:
    """``spec.taints`` parsed (malformed entries skipped)."""
    out: list[Taint] = []
    for raw in (node.get("spec") or {}).get("taints") or []:
        try:
            out.append(Taint.from_dict(raw))
        except MachineFieldError:
            continue
    return out


def has_taint(taints: Iterable[Taint], key: str, effect: str) -> bool:
    """Whether a taint with that key and effect is present (value ignored, as the taint matcher does)."""
    return any(t.key == key and t.effect == effect for t in taints)


def _quantity(raw: Any) -> Decimal:
    try:
        return mf.parse_quantity(str(raw))
    except MachineFieldError:
        return Decimal(0)


def allocatable(node: Node) -> dict[str, str]:
    """``status.allocatable`` as strings."""
    return {str(k): str(v) for k, v in ((node.get("status") or {}).get("allocatable") or {}).items()}


def capacity(node: Node) -> dict[str, str]:
    """``status.capacity`` as strings."""
    return {str(k): str(v) for k, v in ((node.get("status") or {}).get("capacity") or {}).items()}


def initialization_blocker(
    node: Node, machine: Mapping[str, Any], expected_gpus: int
) -> tuple[str, str] | None:
    """Why the Node is not initialized yet, as ``(reason, message)``; None when it is.

    Initialized means (upstream's rules, plus the GPU check Kaito relies on): the Node is Ready; none of
    the Machine's startup taints and none of the known ephemeral taints remain; every non-zero resource
    the Machine requests (other than ``storage``, the OS disk) is allocatable; and, for a GPU instance
    type, ``nvidia.com/gpu`` is allocatable (the device plugin has registered the GPUs).
    """
    name = node_name(node)
    if not is_ready(node):
        return "NodeNotReady", f"node {name} is not Ready yet"
    taints = taints_of(node)
    try:
        startup = mf.startup_taints(machine)
    except MachineFieldError:
        startup = []
    remaining = [t for t in startup if has_taint(taints, t.key, t.effect)]
    if remaining:
        keys = ", ".join(f"{t.key}:{t.effect}" for t in remaining)
        return "StartupTaintsExist", f"node {name} still has startup taints {keys}"
    ephemeral = [f"{k}:{e}" for k, e in EPHEMERAL_TAINTS if has_taint(taints, k, e)]
    if ephemeral:
        return "KnownEphemeralTaintsExist", f"node {name} still has taints {', '.join(ephemeral)}"
    alloc = allocatable(node)
    for resource, raw in sorted(mf.resource_requests(machine).items()):
        if resource == "storage" or _quantity(raw) <= 0:
            continue
        if _quantity(alloc.get(resource, "0")) <= 0:
            return "ResourceNotRegistered", f"node {name} does not report {resource} as allocatable yet"
    if expected_gpus > 0 and _quantity(alloc.get(GPU_RESOURCE, "0")) <= 0:
        return (
            "ResourceNotRegistered",
            f"node {name} does not report {GPU_RESOURCE} as allocatable yet (the NVIDIA device plugin "
            f"has not registered the {expected_gpus} GPU(s) of this instance type)",
        )
    return None


def merged_taints(
    existing: Sequence[Mapping[str, Any]], wanted: Iterable[Taint]
) -> list[dict[str, Any]] | None:
    """``existing`` plus every wanted taint whose key/effect is missing; None when nothing is missing."""
    have = [Taint.from_dict(t) for t in existing if t.get("key") and t.get("effect")]
    extra = [t.to_dict() for t in wanted if not has_taint(have, t.key, t.effect)]
    if not extra:
        return None
    return [dict(t) for t in existing] + extra
