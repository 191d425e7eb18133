"""NodeClaim (``karpenter.sh/v1``, cluster-scoped): the fields KAITO and the gpu-provisioner use.

Upstream's CRD (karpenter v1, gpu-provisioner v0.3+, reference §1.2) trimmed to what either side reads
or writes: taints, startup taints, requirements (with ``minValues``), resource requests (``storage`` is
the OS disk), the node class reference, and the status the provisioner reports. Spec and status keep
unknown fields (``x-kubernetes-preserve-unknown-fields``) so an object written against the full
upstream schema (``kubelet``, ``terminationGracePeriod``, ``expireAfter``, ...) round-trips unchanged.
The spec is immutable, as upstream's CEL rule makes it: a NodeClaim is replaced, never edited.

Conditions are ``metav1.Condition``-shaped (type, status, reason, message, lastTransitionTime,
observedGeneration): ``Launched``, ``Registered``, ``Initialized`` and the summary ``Ready``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from kaito.api.machine import NodeSelectorRequirement, Quantity, Taint
from kaito.api.meta import KubeModel, ObjectMeta, cel

GROUP = "karpenter.sh"
VERSION = "v1"
KIND: Final = "NodeClaim"
PLURAL = "nodeclaims"
API_VERSION: Final = "karpenter.sh/v1"

LABEL_NODEPOOL = "karpenter.sh/nodepool"
ANNOTATION_DO_NOT_DISRUPT = "karpenter.sh/do-not-disrupt"
ANNOTATION_NODE_IMAGE_FAMILY = "kaito.sh/node-image-family"
LABEL_AZURE_SKU_NAME = "karpenter.azure.com/sku-name"

CONDITION_LAUNCHED = "Launched"
CONDITION_REGISTERED = "Registered"
CONDITION_INITIALIZED = "Initialized"
CONDITION_READY = "Ready"

_ALLOW = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class NodeClaimRequirement(NodeSelectorRequirement):
    """A node selector requirement with karpenter's ``minValues`` (flexibility for ``In``)."""

    min_values: int | None = Field(default=None, ge=1, le=50)


class NodeClassReference(KubeModel):
    """Which provider node class holds the cloud-specific settings (KAITO: ``kaito.sh/KaitoNodeClass``)."""

    model_config = _ALLOW

    group: str | None = Field(default=None, min_length=1)
    kind: str = Field(min_length=1)
    name: str = Field(min_length=1)


class NodeClaimResources(KubeModel):
    """Requests: ``storage`` is the OS disk size; other requests must appear in node allocatable."""

    model_config = _ALLOW

    requests: dict[str, Quantity] | None = None


class NodeClaimSpec(KubeModel):
    """What node the NodeClaim asks for (immutable once created)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="allow",
        json_schema_extra={"x-kubernetes-validations": [cel("self == oldSelf", "spec is immutable")]},
    )

    taints: list[Taint] | None = None
    startup_taints: list[Taint] | None = None
    requirements: list[NodeClaimRequirement] = Field(
        max_length=100,
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.all(x, x.operator == 'In' ? x.values.size() != 0 : true)",
                    "requirements operator 'In' must have a value defined",
                )
            ]
        },
    )
    resources: NodeClaimResources | None = None
    node_class_ref: NodeClassReference

    def instance_type(self) -> str | None:
        """The first value of the ``node.kubernetes.io/instance-type`` requirement (the VM size)."""
        for req in self.requirements:
            if req.key == "node.kubernetes.io/instance-type" and req.values:
                return req.values[0]
        return None


class NodeClaimCondition(KubeModel):
    """metav1.Condition as karpenter writes it on NodeClaims."""

    model_config = _ALLOW

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: datetime | None = Field(default=None, json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(default=None, ge=0)


class NodeClaimStatus(KubeModel):
    """What the provisioner observed."""

    model_config = _ALLOW

    provider_id: str | None = Field(default=None, alias="providerID")
    node_name: str | None = None
    image_id: str | None = Field(default=None, alias="imageID")
    capacity: dict[str, Quantity] | None = None
    allocatable: dict[str, Quantity] | None = None
    conditions: list[NodeClaimCondition] | None = None
    last_pod_event_time: datetime | None = Field(default=None, json_schema_extra={"format": "date-time"})

    def condition(self, type_: str) -> NodeClaimCondition | None:
        """The condition of that type, or None."""
        for cond in self.conditions or []:
            if cond.type == type_:
                return cond
        return None


class NodeClaim(KubeModel):
    """A request for one node, fulfilled by the gpu-provisioner (or Karpenter)."""

    api_version: Literal["karpenter.sh/v1"] = API_VERSION
    kind: Literal["NodeClaim"] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: NodeClaimSpec
    status: NodeClaimStatus | None = None
