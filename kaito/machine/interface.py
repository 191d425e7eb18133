"""The interface between the workspace reconciler and a node-request API (Machine or NodeClaim)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from kaito.runtime.kube import Resource

Obj = dict[str, Any]


class RequestPhase(StrEnum):
    """Where one node request stands, as far as the workspace is concerned."""

    PENDING = "Pending"
    READY = "Ready"
    FAILED = "Failed"
    DELETING = "Deleting"


@dataclass(frozen=True)
class NodeRequest:
    """What the reconciler needs to know about one request object."""

    name: str
    phase: RequestPhase
    node_name: str | None = None
    reason: str = ""
    message: str = ""
    instance_type: str | None = None


class NodeRequestEncoding(Protocol):
    """Builds and reads one kind of cluster-scoped node-request object."""

    resource: Resource
    noun: str
    """How messages name one object: ``machine`` / ``nodeClaim`` (upstream's wording)."""

    def name_for(self, namespace: str, workspace: str, slot: int) -> str:
        """Deterministic object name for the workspace's ``slot``-th node (retries cannot duplicate)."""
        ...

    def build(
        self,
        *,
        namespace: str,
        workspace: str,
        slot: int,
        instance_type: str,
        match_labels: dict[str, str],
        storage: str,
    ) -> Obj:
        """The object to create."""
        ...

    def observe(self, obj: Obj) -> NodeRequest:
        """Summarise an existing object."""
        ...

    def belongs_to(self, obj: Obj, namespace: str, workspace: str) -> bool:
        """Whether ``obj`` was created for that workspace (adoption check on AlreadyExists)."""
        ...
