"""The two node-request kinds the lifecycle serves: Machine (``karpenter.sh/v1alpha5``) and NodeClaim
(``karpenter.sh/v1``).

They share the lifecycle (launch -> registration -> initialization, termination) and the cloud layer;
what differs is the resource, the names of the living conditions (``MachineLaunched`` vs ``Launched``
...) and the condition shape: knative-style on Machines (reason and message optional), metav1-style on
NodeClaims, where upstream's CRD requires a reason and a message on every condition.
"""

from __future__ import annotations

from dataclasses import dataclass

from kaito.runtime.kube import Obj, Resource
from provisioner import machine_fields as mf


@dataclass(frozen=True)
class RequestKind:
    """One karpenter kind, as the lifecycle needs to know it."""

    flag: str
    """The ``--node-api`` value (``machine`` / ``nodeclaim``)."""
    resource: Resource
    launched: str
    registered: str
    initialized: str
    metav1_conditions: bool
    """Write every condition with a reason and a message (NodeClaim's CRD requires both)."""

    @property
    def kind(self) -> str:
        """``Machine`` / ``NodeClaim``."""
        return self.resource.kind

    @property
    def living(self) -> tuple[str, str, str]:
        """The conditions ``Ready`` summarises, in lifecycle order."""
        return (self.launched, self.registered, self.initialized)


MACHINES = Resource("karpenter.sh", "v1alpha5", "machines", False, mf.MACHINE_KIND)
NODECLAIMS = Resource("karpenter.sh", "v1", "nodeclaims", False, mf.NODECLAIM_KIND)

MACHINE = RequestKind(
    "machine", MACHINES, "MachineLaunched", "MachineRegistered", "MachineInitialized", metav1_conditions=False
)
NODECLAIM = RequestKind(
    "nodeclaim", NODECLAIMS, "Launched", "Registered", "Initialized", metav1_conditions=True
)

KINDS: dict[str, RequestKind] = {k.flag: k for k in (MACHINE, NODECLAIM)}
"""By ``--node-api`` value."""


def kind_of(obj: Obj) -> RequestKind:
    """The kind of a Machine or NodeClaim object."""
    return NODECLAIM if mf.request_kind(obj) == mf.NODECLAIM_KIND else MACHINE


def parse_kinds(value: str) -> list[RequestKind]:
    """``machine``, ``nodeclaim`` or ``machine,nodeclaim``; ValueError naming the choices otherwise."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in KINDS]
    if unknown or not names:
        raise ValueError(
            f"node API {value!r} is not a comma-separated list of {', '.join(KINDS)} (e.g. machine,nodeclaim)"
        )
    return [KINDS[n] for n in dict.fromkeys(names)]
