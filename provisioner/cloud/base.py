"""The cloud-provider interface the Machine lifecycle reconcilers call.

One Machine maps to one instance (on Azure: one AKS agent pool holding one VMSS node; on kwok: one
fake Node). The reconcilers drive it like this:

- **launch**: ``instance = await cloud.create(machine)``. Create is idempotent per Machine name: calling
  it again for a Machine whose instance exists returns that instance without creating a second one.
  While a creation is still under way, kwok returns the instance ``PENDING`` and Azure raises
  :class:`Conflict` (ARM is mid-operation); both mean "record progress, check again after a short
  requeue". Azure's create waits for the agent pool's long-running operation (bounded by
  ``ARM_OPERATION_TIMEOUT``, after which it raises Conflict and the next call adopts the pool); kwok's
  returns at once and the Node appears after its delay. Either way the Node may still be joining.
  A reconciler that does not want to hold a worker for minutes can configure a short Azure operation
  timeout and poll with ``get``: a ``FAILED`` instance carries ``failure`` (the classified reason, e.g.
  QuotaExceeded); report it, wait ``failure.backoff``, then ``create`` again (Azure re-PUTs a Failed pool).
- **register**: list Nodes with ``instance.label_selector()`` (AKS labels every node with its pool
  name; kwok does the same); exactly one Node with a non-empty ``spec.providerID`` means registered:
  copy that providerID into ``machine.status.providerID`` (Azure's Instance has no providerID before the
  Node exists; kwok's already carries ``kwok://<node>``).
- **liveness / GC**: ``await cloud.get(ref)`` where ref is the Machine name or its providerID;
  :class:`NotFound` means the instance is gone. ``await cloud.list()`` returns only instances this
  provisioner created (never a user's own node pools), each with ``machine_name`` and ``created_at`` so
  a sweep can delete instances whose Machine no longer exists (after a short grace period).
- **terminate**: ``await cloud.delete(ref, owner_kind=...)`` starts (or finishes) deletion; it returns
  when the cloud has accepted or completed it and raises :class:`NotFound` when the instance is already
  gone -- or when it belongs to the other kind (a NodeClaim's deletion never removes a Machine's
  instance of the same name, nor the reverse). Call it again on each requeue until it raises NotFound,
  then drop the finalizer.

Machines and NodeClaims are served through the same calls: the object passed to ``create`` is either,
and each instance records which kind it was made for (``Instance.owner_kind``, from its labels).

Every failure is a :class:`CloudError` subclass with a Machine-condition ``reason``, a message the
user can act on, a suggested ``backoff`` (seconds until the next attempt) and ``retryable`` (False means
the Machine spec must change first: surface it and stop retrying).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar

from provisioner.machine_fields import MachineDict, Taint, request_kind


class InstanceState(enum.StrEnum):
    """Coarse lifecycle state of a cloud instance."""

    PENDING = "Pending"  # being created/updated; no usable node yet
    RUNNING = "Running"  # created; the node exists or is joining
    DELETING = "Deleting"
    FAILED = "Failed"  # the cloud gave up on it; delete and retry
    UNKNOWN = "Unknown"


@dataclass(frozen=True)
class Instance:
    """What the cloud knows about the instance behind one Machine."""

    name: str
    """The instance name (== the Machine name; on Azure also the agent pool name)."""
    provider_id: str
    """The Node's ``spec.providerID`` when known, else empty (find the Node via ``node_selector``)."""
    instance_type: str
    labels: Mapping[str, str]
    """Labels the Node carries (the Machine's labels plus the provider's own, e.g. machine-type)."""
    taints: tuple[Taint, ...]
    capacity: Mapping[str, str]
    """Resource capacity when the provider knows it (e.g. ``nvidia.com/gpu``); may be empty."""
    state: InstanceState
    node_selector: Mapping[str, str] = field(default_factory=dict)
    """Labels that select exactly this instance's Node(s)."""
    machine_name: str = ""
    """The Machine this instance was created for (== name for both providers)."""
    created_at: datetime | None = None
    image_id: str = ""
    detail: str = ""
    """Provider-specific state text, e.g. the ARM ``provisioningState``."""
    failure: CloudError | None = None
    """Why the instance is FAILED (classified like a call error), when the cloud says."""
    owner_kind: str = "Machine"
    """The kind it was created for (``Machine`` or ``NodeClaim``; see ``machine_fields.owner_kind``)."""

    def label_selector(self) -> str:
        """``node_selector`` as a Kubernetes label selector string (for ``list_node(label_selector=...)``)."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.node_selector.items()))


class CloudError(Exception):
    """A cloud call failed. Subclasses classify why; this base class is an unclassified, transient failure."""

    reason: ClassVar[str] = "CloudProviderError"
    """The Machine condition reason (CamelCase) the reconciler reports."""
    default_backoff: ClassVar[float] = 30.0
    retryable: ClassVar[bool] = True

    def __init__(self, message: str, *, backoff: float | None = None, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        """What happened and what the user can do about it."""
        self.backoff = self.default_backoff if backoff is None else backoff
        """Seconds the caller should wait before trying again."""
        self.code = code
        """The cloud's own error code (e.g. ARM ``QuotaExceeded``), for logs and metrics."""


class QuotaExceeded(CloudError):
    """The subscription's quota for this VM family/region is used up. Retrying quickly cannot help."""

    reason = "QuotaExceeded"
    default_backoff = 300.0


class SkuUnavailable(CloudError):
    """The instance type is not offered (or not allowed) in this region/subscription."""

    reason = "SkuUnavailable"
    default_backoff = 600.0


class CapacityUnavailable(CloudError):
    """The cloud has no capacity for this instance type right now; it may come back."""

    reason = "InsufficientCapacity"
    default_backoff = 120.0


class Conflict(CloudError):
    """Another operation on the same instance is in progress; retry in a few seconds."""

    reason = "OperationInProgress"
    default_backoff = 15.0


class NotFound(CloudError):
    """The instance does not exist (already deleted or never created)."""

    reason = "NotFound"
    default_backoff = 0.0


class InvalidRequest(CloudError):
    """The Machine asks for something the cloud rejects (bad name, disk size, instance type...).

    Not retryable: the Machine/Workspace has to change first.
    """

    reason = "InvalidRequest"
    default_backoff = 600.0
    retryable = False


class AuthFailed(CloudError):
    """The provisioner's identity could not authenticate or is not authorized for the call."""

    reason = "CloudAuthFailed"
    default_backoff = 120.0


def other_owner(instance: Instance, owner_kind: str | None) -> NotFound | None:
    """NotFound to raise when ``instance`` belongs to another kind than ``owner_kind`` (else None)."""
    if owner_kind is None or instance.owner_kind == owner_kind:
        return None
    return NotFound(
        f"instance {instance.name} belongs to a {instance.owner_kind}, not a {owner_kind}; left alone",
        code="OwnedByOtherKind",
    )


def name_conflict(instance: Instance, machine: MachineDict) -> InvalidRequest | None:
    """InvalidRequest to raise when ``machine`` would adopt an instance made for the other kind."""
    kind = request_kind(machine)
    if instance.owner_kind == kind:
        return None
    return InvalidRequest(
        f"instance {instance.name} already exists for a {instance.owner_kind} of that name; "
        f"delete that {instance.owner_kind} or rename this {kind}",
        code="NameConflict",
    )


class CloudProvider(abc.ABC):
    """One small interface over Azure agent pools and kwok fake nodes. See the module docstring for the contract."""

    name: str
    """Provider name as used in metrics labels and providerIDs (``azure``, ``kwok``)."""

    @abc.abstractmethod
    async def create(self, machine: MachineDict) -> Instance:
        """Create (or adopt) the instance for a Machine; idempotent per Machine name."""

    @abc.abstractmethod
    async def get(self, ref: str) -> Instance:
        """The instance for a Machine name or a providerID; raises NotFound when it does not exist."""

    @abc.abstractmethod
    async def list(self) -> list[Instance]:
        """All instances this provisioner created (and only those)."""

    @abc.abstractmethod
    async def delete(self, ref: str, *, owner_kind: str | None = None) -> None:
        """Delete the instance for a Machine name or providerID; raises NotFound when it is already gone.

        With ``owner_kind``, an instance created for another kind counts as gone and is left alone.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook, most providers hold no resources
        """Release clients and background tasks. Idempotent."""
