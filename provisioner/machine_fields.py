"""Pure readers for a Machine (``karpenter.sh/v1alpha5``) or NodeClaim (``karpenter.sh/v1``) given as a plain dict.

The fields the provisioner reads have the same paths in both kinds (labels, ``spec.requirements``,
``spec.taints``, ``spec.resources.requests``, ``status.providerID``); "Machine" below means either.
:func:`request_kind` tells them apart, :func:`default_pool_labels` and :func:`owner_kind` are the one
place that knows how an instance (agent pool, kwok node) records which kind it was created for.

The provisioner receives Machines from the API server as JSON-shaped dicts (what an informer caches).
These helpers read the few fields the cloud providers need, tolerate missing sections (a Machine is
user-editable, so nothing beyond ``metadata.name`` is guaranteed) and never mutate their input.

Also here: Kubernetes resource-quantity parsing, because the OS disk size comes from
``spec.resources.requests.storage`` and must be converted to GiB exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from kaito.api.quantity import QuantityError
from kaito.api.quantity import parse_quantity as _parse_quantity

MachineDict = Mapping[str, Any]
"""A Machine object as a JSON-shaped mapping (``apiVersion``, ``kind``, ``metadata``, ``spec``, ``status``)."""

INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
WORKSPACE_LABEL = "kaito.sh/workspace"
WORKSPACE_NAMESPACE_LABEL = "kaito.sh/workspacenamespace"
RAGENGINE_LABEL = "kaito.sh/ragengine"
MACHINE_TYPE_LABEL = "kaito.sh/machine-type"
PROVISIONER_NAME_LABEL = "karpenter.sh/provisioner-name"
NODEPOOL_LABEL = "karpenter.sh/nodepool"
CREATION_TIMESTAMP_LABEL = "kaito.sh/creation-timestamp"

# The layout upstream uses for kaito.sh/creation-timestamp: label-value safe (no colons), UTC.
CREATION_TIMESTAMP_FORMAT = "%Y-%m-%dT%H-%M-%SZ"

_TAINT_EFFECTS = frozenset({"NoSchedule", "PreferNoSchedule", "NoExecute"})


class MachineFieldError(ValueError):
    """A Machine field is missing or malformed in a way the user has to fix."""


@dataclass(frozen=True, slots=True)
class Taint:
    """A Kubernetes taint (``key``, optional ``value``, ``effect``)."""

    key: str
    effect: str
    value: str = ""

    def to_aks(self) -> str:
        """Format as an AKS ``nodeTaints`` entry: ``key=value:effect`` (an empty value gives ``key=:effect``)."""
        return f"{self.key}={self.value}:{self.effect}"

    def to_dict(self) -> dict[str, str]:
        """Format as a Kubernetes ``Taint`` object (JSON shape)."""
        out = {"key": self.key, "effect": self.effect}
        if self.value:
            out["value"] = self.value
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Taint:
        """Parse a Kubernetes taint object; raises MachineFieldError when key or effect is missing/invalid."""
        key = raw.get("key")
        effect = raw.get("effect")
        if not isinstance(key, str) or not key:
            raise MachineFieldError(f"taint {dict(raw)!r} has no key")
        if effect not in _TAINT_EFFECTS:
            raise MachineFieldError(
                f"taint {key!r} has effect {effect!r}; expected one of {', '.join(sorted(_TAINT_EFFECTS))}"
            )
        value = raw.get("value") or ""
        return cls(key=key, effect=str(effect), value=str(value))


MACHINE_KIND = "Machine"
NODECLAIM_KIND = "NodeClaim"
NODECLAIM_API_VERSION = "karpenter.sh/v1"


def request_kind(obj: MachineDict) -> str:
    """``NodeClaim`` or ``Machine``: the object's ``kind`` (or, without one, its ``apiVersion``)."""
    kind = obj.get("kind")
    if kind in (MACHINE_KIND, NODECLAIM_KIND):
        return str(kind)
    return NODECLAIM_KIND if obj.get("apiVersion") == NODECLAIM_API_VERSION else MACHINE_KIND


def default_pool_labels(obj: MachineDict) -> dict[str, str]:
    """The labels an instance starts from before the object's own (upstream §2.1): Machines'
    pools carry ``karpenter.sh/provisioner-name=default`` (v0.1-v0.2), NodeClaims' ``karpenter.sh/nodepool=kaito``
    (v0.3+)."""
    if request_kind(obj) == NODECLAIM_KIND:
        return {NODEPOOL_LABEL: "kaito"}
    return {PROVISIONER_NAME_LABEL: "default"}


def owner_kind(labels: Mapping[str, str]) -> str:
    """Which kind an instance with these (node) labels was created for: a NodePool label means a
    NodeClaim, as upstream's gpu-provisioner v0.3+ marks its pools; otherwise a Machine."""
    return NODECLAIM_KIND if NODEPOOL_LABEL in labels else MACHINE_KIND


def _section(obj: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = obj.get(name)
    return value if isinstance(value, Mapping) else {}


def _str_map(raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): str(v) for k, v in raw.items() if v is not None}


def machine_name(machine: MachineDict) -> str:
    """``metadata.name``; raises MachineFieldError when absent (a Machine without a name cannot be provisioned)."""
    name = _section(machine, "metadata").get("name")
    if not isinstance(name, str) or not name:
        raise MachineFieldError("machine has no metadata.name")
    return name


def machine_uid(machine: MachineDict) -> str:
    """``metadata.uid`` or an empty string."""
    return str(_section(machine, "metadata").get("uid") or "")


def machine_labels(machine: MachineDict) -> dict[str, str]:
    """A copy of ``metadata.labels``."""
    return _str_map(_section(machine, "metadata").get("labels"))


def machine_annotations(machine: MachineDict) -> dict[str, str]:
    """A copy of ``metadata.annotations``."""
    return _str_map(_section(machine, "metadata").get("annotations"))


def is_kaito_machine(machine: MachineDict) -> bool:
    """True when the Machine belongs to Kaito (label ``kaito.sh/workspace`` or ``kaito.sh/ragengine``).

    Upstream's controllers act only on such Machines; other Machines in the cluster are not ours.
    """
    labels = machine_labels(machine)
    return WORKSPACE_LABEL in labels or RAGENGINE_LABEL in labels


def requirements(machine: MachineDict) -> list[Mapping[str, Any]]:
    """``spec.requirements`` (node selector requirements), skipping malformed entries."""
    raw = _section(machine, "spec").get("requirements")
    if not isinstance(raw, list):
        return []
    return [r for r in raw if isinstance(r, Mapping) and isinstance(r.get("key"), str)]


def requirement_values(machine: MachineDict, key: str) -> list[str]:
    """The values of the first ``In`` requirement on ``key`` (empty when there is none)."""
    for req in requirements(machine):
        if req.get("key") == key and req.get("operator", "In") == "In":
            values = req.get("values")
            if isinstance(values, list):
                return [str(v) for v in values]
    return []


def instance_type(machine: MachineDict) -> str | None:
    """The VM size: the first value of the ``node.kubernetes.io/instance-type`` requirement, as upstream reads it."""
    values = requirement_values(machine, INSTANCE_TYPE_LABEL)
    return values[0] if values else None


def require_instance_type(machine: MachineDict) -> str:
    """Like instance_type() but raises MachineFieldError with upstream's wording when there is none."""
    value = instance_type(machine)
    if not value:
        raise MachineFieldError(
            f"machine {machine_name(machine)} spec has no requirement for instance type "
            f"({INSTANCE_TYPE_LABEL} In [...])"
        )
    return value


def single_value_requirement_labels(machine: MachineDict) -> dict[str, str]:
    """Labels implied by single-valued ``In`` requirements (Karpenter copies these onto the Machine after launch)."""
    out: dict[str, str] = {}
    for req in requirements(machine):
        values = req.get("values")
        if req.get("operator", "In") == "In" and isinstance(values, list) and len(values) == 1:
            out[str(req["key"])] = str(values[0])
    return out


def taints(machine: MachineDict) -> list[Taint]:
    """``spec.taints`` parsed; raises MachineFieldError on a malformed taint."""
    raw = _section(machine, "spec").get("taints")
    if not isinstance(raw, list):
        return []
    return [Taint.from_dict(t) for t in raw if isinstance(t, Mapping)]


def startup_taints(machine: MachineDict) -> list[Taint]:
    """``spec.startupTaints`` parsed (not sent to the cloud; the lifecycle waits for them to go)."""
    raw = _section(machine, "spec").get("startupTaints")
    if not isinstance(raw, list):
        return []
    return [Taint.from_dict(t) for t in raw if isinstance(t, Mapping)]


def resource_requests(machine: MachineDict) -> dict[str, str]:
    """``spec.resources.requests`` as strings (quantities unparsed)."""
    return _str_map(_section(_section(machine, "spec"), "resources").get("requests"))


def storage_request(machine: MachineDict) -> str | None:
    """The ``storage`` request quantity string, or None."""
    return resource_requests(machine).get("storage")


def provider_id(machine: MachineDict) -> str:
    """``status.providerID`` or an empty string."""
    return str(_section(machine, "status").get("providerID") or "")


def node_name(machine: MachineDict) -> str:
    """``status.nodeName`` or an empty string."""
    return str(_section(machine, "status").get("nodeName") or "")


def creation_timestamp(machine: MachineDict) -> datetime | None:
    """``metadata.creationTimestamp`` parsed as an aware UTC datetime, or None."""
    raw = _section(machine, "metadata").get("creationTimestamp")
    if isinstance(raw, datetime):
        return raw if raw.tzinfo else raw.replace(tzinfo=UTC)
    if not isinstance(raw, str) or not raw:
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


def format_creation_label(when: datetime) -> str:
    """Format a time for the ``kaito.sh/creation-timestamp`` label (upstream's label-safe layout)."""
    return when.astimezone(UTC).strftime(CREATION_TIMESTAMP_FORMAT)


def parse_creation_label(value: str) -> datetime | None:
    """Parse a ``kaito.sh/creation-timestamp`` label value; None when malformed."""
    try:
        return datetime.strptime(value, CREATION_TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


# --- resource quantities -------------------------------------------------------------------------

GIB = 2**30


def parse_quantity(value: str | int | float) -> Decimal:
    """Parse a Kubernetes resource quantity (``"120Gi"``, ``"100G"``, ``"1Ti"``, ``"500m"``, ``"1e3"``) exactly.

    Returns the value in base units (bytes for storage) as a Decimal; raises MachineFieldError when the
    string is not a valid quantity. Delegates to :mod:`kaito.api.quantity` so the operator and the
    provisioner can never disagree about a quantity.
    """
    try:
        return _parse_quantity(value)
    except QuantityError as e:
        raise MachineFieldError(f"invalid quantity {value!r} (expected e.g. 120Gi, 100G, 1Ti)") from e


def quantity_to_gib(value: str | int | float) -> int:
    """Convert a storage quantity to whole GiB, rounding UP so the disk is never smaller than requested.

    ``"120Gi"`` -> 120, ``"1Ti"`` -> 1024, ``"100G"`` (10^11 bytes = 93.13 GiB) -> 94. Upstream truncated
    (and before v0.3.4 wrapped the byte count into 32 bits); rounding up is what a request means.
    """
    nbytes = parse_quantity(value)
    if nbytes < 0:
        raise MachineFieldError(f"storage quantity {value!r} is negative")
    return math.ceil(nbytes / GIB)


def os_disk_size_gib(machine: MachineDict) -> int:
    """The OS disk size in GiB from ``spec.resources.requests.storage``; raises MachineFieldError when missing/zero.

    A missing or zero request is rejected (upstream v0.3.4+), because AKS would otherwise silently pick
    its default disk, which is too small for most model images.
    """
    raw = storage_request(machine)
    if raw is None:
        raise MachineFieldError(
            f"machine {machine_name(machine)} has no spec.resources.requests.storage; set the disk size"
        )
    gib = quantity_to_gib(raw)
    if gib <= 0:
        raise MachineFieldError(
            f"storage request of machine {machine_name(machine)} should be more than 0 (got {raw!r})"
        )
    return gib
