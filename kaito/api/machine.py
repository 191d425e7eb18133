"""Machine (``karpenter.sh/v1alpha5``, cluster-scoped): the fields KAITO and the gpu-provisioner use.

Upstream's Machine has more fields (kubelet configuration, ...). Spec and status therefore keep unknown
fields (``extra="allow"`` here, ``x-kubernetes-preserve-unknown-fields`` in the generated CRD) so a
read-modify-write by this code never drops what another writer set.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

from kaito.api.conditions import KnativeCondition
from kaito.api.meta import KubeModel, ObjectMeta

GROUP = "karpenter.sh"
VERSION = "v1alpha5"
KIND: Final = "Machine"
PLURAL = "machines"
API_VERSION: Final = "karpenter.sh/v1alpha5"

LABEL_PROVISIONER_NAME = "karpenter.sh/provisioner-name"
LABEL_MACHINE_TYPE = "kaito.sh/machine-type"
LABEL_INSTANCE_TYPE = "node.kubernetes.io/instance-type"
LABEL_ARCH = "kubernetes.io/arch"
LABEL_OS = "kubernetes.io/os"
ANNOTATION_LINKED = "karpenter.sh/linked"
FINALIZER_TERMINATION = "karpenter.sh/termination"

CONDITION_LAUNCHED = "MachineLaunched"
CONDITION_REGISTERED = "MachineRegistered"
CONDITION_INITIALIZED = "MachineInitialized"
CONDITION_READY = "Ready"

# MachineLaunched=False reasons the gpu-provisioner sets while it deletes and launches the instance
# again on its own (no Node registered in time; the instance vanished before its Node registered).
# They report progress of a recovery, not a failure: the workspace controller keeps waiting on them
# (kaito.machine.machine.TRANSIENT_REASONS) instead of reporting ProvisioningFailed with a Warning.
REASON_REGISTRATION_TIMEOUT = "RegistrationTimeout"
REASON_INSTANCE_NOT_FOUND = "InstanceNotFound"
RELAUNCH_REASONS: Final = frozenset({REASON_REGISTRATION_TIMEOUT, REASON_INSTANCE_NOT_FOUND})

_QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)"
    r"|(\.[0-9]+))))?$"
)

# A resource quantity: int-or-string on the wire, kept as its string form in Python.
Quantity = Annotated[
    str,
    BeforeValidator(lambda v: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": _QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]

_ALLOW = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class Taint(KubeModel):
    """core/v1 Taint."""

    key: str
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]
    time_added: datetime | None = Field(default=None, json_schema_extra={"format": "date-time"})


class NodeSelectorRequirement(KubeModel):
    """core/v1 NodeSelectorRequirement."""

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[str] | None = None


class ResourceRequirements(KubeModel):
    """Requests: ``storage`` is the OS disk size; other requests must appear in node allocatable."""

    model_config = _ALLOW

    requests: dict[str, Quantity] | None = None


class MachineTemplateRef(KubeModel):
    """Reference to provider-specific settings (KAITO sets name = the machine's name)."""

    model_config = _ALLOW

    kind: str | None = None
    name: str
    api_version: str | None = None


class MachineSpec(KubeModel):
    """What node the Machine asks for."""

    model_config = _ALLOW

    taints: list[Taint] | None = None
    startup_taints: list[Taint] | None = None
    requirements: list[NodeSelectorRequirement] | None = None
    resources: ResourceRequirements | None = None
    kubelet: dict[str, Any] | None = None
    machine_template_ref: MachineTemplateRef | None = None

    def instance_type(self) -> str | None:
        """The first value of the ``node.kubernetes.io/instance-type`` requirement (the VM size)."""
        for req in self.requirements or []:
            if req.key == LABEL_INSTANCE_TYPE and req.values:
                return req.values[0]
        return None


class MachineStatus(KubeModel):
    """What the provisioner observed."""

    model_config = _ALLOW

    provider_id: str | None = Field(default=None, alias="providerID")
    node_name: str | None = None
    capacity: dict[str, Quantity] | None = None
    allocatable: dict[str, Quantity] | None = None
    conditions: list[KnativeCondition] | None = None

    def condition(self, type_: str) -> KnativeCondition | None:
        """The condition of that type, or None."""
        for cond in self.conditions or []:
            if cond.type == type_:
                return cond
        return None

    def is_ready(self) -> bool:
        """Whether the summary condition ``Ready`` is True."""
        cond = self.condition(CONDITION_READY)
        return cond is not None and cond.status == "True"


class Machine(KubeModel):
    """A request for one node, fulfilled by the gpu-provisioner."""

    api_version: Literal["karpenter.sh/v1alpha5"] = API_VERSION
    kind: Literal["Machine"] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: MachineSpec = Field(default_factory=MachineSpec)
    status: MachineStatus | None = None
