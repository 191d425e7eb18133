"""Status conditions: the metav1.Condition shape used by Workspace and the knative-style one of Machine.

Condition type and reason strings are upstream's (reference §3.8) so scripts that wait on
``kubectl wait --for=condition=WorkspaceSucceeded`` keep working.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

ConditionStatus = Literal["True", "False", "Unknown"]


class ConditionType(StrEnum):
    """Workspace condition types (upstream names)."""

    RESOURCE_READY = "ResourceReady"
    INFERENCE_READY = "InferenceReady"
    JOB_STARTED = "JobStarted"
    WORKSPACE_SUCCEEDED = "WorkspaceSucceeded"
    WORKSPACE_READY = "WorkspaceReady"
    MACHINE_READY = "MachineReady"
    NODECLAIM_READY = "NodeClaimReady"
    WORKSPACE_DELETING = "WorkspaceDeleting"


class ConditionReason(StrEnum):
    """Reasons written by upstream for the conditions above (reference §3.8)."""

    CREATE_MACHINE_PENDING = "CreateMachinePending"
    MACHINE_FAILED_CREATION = "machineFailedCreation"
    CHECK_MACHINE_STATUS_FAILED = "checkMachineStatusFailed"
    CREATE_NODECLAIM_PENDING = "CreateNodeClaimPending"
    CHECK_NODECLAIM_STATUS_FAILED = "checkNodeClaimStatusFailed"
    INSTALL_NODE_PLUGINS_SUCCESS = "installNodePluginsSuccess"
    RESOURCE_STATUS_FAILED = "workspaceResourceStatusFailed"
    RESOURCE_STATUS_SUCCESS = "workspaceResourceStatusSuccess"
    INFERENCE_STATUS_SUCCESS = "WorkspaceInferenceStatusSuccess"
    INFERENCE_STATUS_FAILED = "WorkspaceInferenceStatusFailed"
    TUNING_JOB_STARTED = "WorkspaceTuningJobStatusStarted"
    TUNING_JOB_FAILED = "WorkspaceTuningJobStatusFailed"
    WORKSPACE_SUCCEEDED = "workspaceSucceeded"
    WORKSPACE_READY = "workspaceReady"
    WORKSPACE_FAILED = "workspaceFailed"
    WORKSPACE_PENDING = "workspacePending"
    WORKSPACE_DELETED = "workspaceDeleted"


class WorkspaceState(StrEnum):
    """``status.state`` (SPEC §4): Pending/Ready/NotReady for inference, Running/Succeeded/Failed for tuning."""

    PENDING = "Pending"
    READY = "Ready"
    NOT_READY = "NotReady"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    DELETING = "Deleting"


class StateReason(StrEnum):
    """Typed reasons behind ``status.state`` (``status.reason``), derived from what children report."""

    INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
    PROVISIONING = "Provisioning"
    PROVISIONING_FAILED = "ProvisioningFailed"
    QUOTA_EXCEEDED = "QuotaExceeded"
    SKU_UNAVAILABLE = "SKUUnavailable"
    NODES_MISSING = "NodesMissing"
    IMAGE_PULL_ERROR = "ImagePullError"
    CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"
    OOM_KILLED = "OOMKilled"
    UNSCHEDULABLE = "Unschedulable"
    JOB_FAILED = "JobFailed"
    DEPLOYING = "Deploying"
    READY = "Ready"
    SUCCEEDED = "Succeeded"
    DELETING = "Deleting"


class _CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_CamelModel):
    """metav1.Condition."""

    type: str = Field(description="Type of the condition, e.g. ResourceReady.", max_length=316)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="CamelCase machine-readable reason for the last transition.", max_length=1024
    )
    message: str = Field(default="", description="Human-readable detail.", max_length=32768)
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was computed for.", ge=0
    )
    last_transition_time: datetime = Field(
        default_factory=lambda: datetime.now(UTC),
        description="When the status last changed.",
        json_schema_extra={"format": "date-time"},
    )


class KnativeCondition(_CamelModel):
    """Condition of a karpenter.sh/v1alpha5 Machine (knative ``apis.Condition`` shape)."""

    type: str = Field(description="MachineLaunched, MachineRegistered, MachineInitialized or Ready.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    severity: str | None = Field(default=None, description="Error, Warning or Info (empty = Error).")
    last_transition_time: datetime | None = Field(
        default=None, description="When the status last changed.", json_schema_extra={"format": "date-time"}
    )
    reason: str | None = Field(default=None, description="Machine-readable reason.")
    message: str | None = Field(default=None, description="Human-readable detail.")


C = TypeVar("C", Condition, KnativeCondition)


def find_condition(conditions: list[C], type_: str) -> C | None:
    """The condition of the given type, or None."""
    for condition in conditions:
        if condition.type == type_:
            return condition
    return None


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    observed_generation: int | None = None,
    now: datetime | None = None,
) -> bool:
    """Set a condition in place like ``meta.SetStatusCondition``; return whether anything changed.

    ``lastTransitionTime`` moves only when the status flips, so re-asserting the same state is a no-op
    and costs no write.
    """
    existing = find_condition(conditions, type_)
    if existing is None:
        conditions.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                observed_generation=observed_generation,
                last_transition_time=now or datetime.now(UTC).replace(microsecond=0),
            )
        )
        return True
    changed = False
    if existing.status != status:
        existing.status = status
        existing.last_transition_time = now or datetime.now(UTC).replace(microsecond=0)
        changed = True
    for attr, value in (
        ("reason", reason),
        ("message", message),
        ("observed_generation", observed_generation),
    ):
        if getattr(existing, attr) != value:
            setattr(existing, attr, value)
            changed = True
    return changed
