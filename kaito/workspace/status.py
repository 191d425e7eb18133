"""Workspace status: conditions, ``status.state`` with a typed reason, and the minimal write.

The reconciler gathers what it observed into an :class:`Observation`; :func:`desired_status` turns it
into the status the workspace should show (conditions keep their ``lastTransitionTime`` unless their
status flips, as ``meta.SetStatusCondition`` does); :func:`status_patch` answers ``None`` when that is
what the object already shows, so an unchanged reconcile writes nothing. :func:`transitions` lists the
condition changes the reconciler reports as Events.

Condition types and reasons are upstream's (reference §3.8) where upstream has them; the summary
``WorkspaceReady`` (v0.3.0's name, the seed's column) is kept alongside ``WorkspaceSucceeded``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from kaito.api.conditions import ConditionReason as R
from kaito.api.conditions import ConditionType as T
from kaito.api.conditions import StateReason, WorkspaceState
from kaito.runtime.redaction import redact

Obj = dict[str, Any]


class Phase(StrEnum):
    """Progress of one step (resources, inference)."""

    PENDING = "Pending"
    READY = "Ready"
    FAILED = "Failed"


@dataclass(frozen=True)
class StepOutcome:
    """What one step found: its phase, a typed reason (``StateReason`` value or similar) and a message."""

    phase: Phase
    reason: str = ""
    message: str = ""


@dataclass
class Observation:
    """Everything status is computed from, gathered by one reconcile."""

    generation: int
    resource: StepOutcome | None = None
    inference: StepOutcome | None = None
    worker_nodes: Sequence[str] | None = None
    machines: bool = False  # whether Machines are in play (machine provisioning mode)
    machines_pending: int = 0
    spec_error: StepOutcome | None = None  # the spec cannot be served (terminal until it changes)
    deleting: bool = False
    # Tuning workspaces: ``tuning_mode`` switches to Job conditions; ``tuning`` is the Job's outcome
    # (None while no Job exists; PENDING means it runs).
    tuning_mode: bool = False
    tuning: StepOutcome | None = None
    extra_messages: list[str] = field(default_factory=list)


PENDING_MSG = "workspace has not become ready yet"


def _cond(type_: str, status: str, reason: str, message: str) -> tuple[str, str, str, str]:
    return (type_, status, reason, message)


def desired_conditions(obs: Observation) -> list[tuple[str, str, str, str]]:
    """(type, status, reason, message) for every condition this observation determines."""
    out: list[tuple[str, str, str, str]] = []
    if obs.deleting:
        out.append(_cond(T.WORKSPACE_DELETING, "True", R.WORKSPACE_DELETED, "workspace is being deleted"))
        return out
    if obs.spec_error is not None:
        msg = obs.spec_error.message
        if not obs.tuning_mode:
            out.append(_cond(T.INFERENCE_READY, "False", R.INFERENCE_STATUS_FAILED, msg))
        out.append(_cond(T.WORKSPACE_SUCCEEDED, "False", R.WORKSPACE_FAILED, msg))
        out.append(_cond(T.WORKSPACE_READY, "False", R.WORKSPACE_FAILED, msg))
        return out
    res = obs.resource
    if res is not None:
        if res.phase == Phase.READY:
            out.append(
                _cond(T.RESOURCE_READY, "True", R.RESOURCE_STATUS_SUCCESS, "workspace resource is ready")
            )
            if obs.machines:
                out.append(
                    _cond(
                        T.MACHINE_READY,
                        "True",
                        R.INSTALL_NODE_PLUGINS_SUCCESS,
                        "machines plugins have been installed successfully",
                    )
                )
        elif res.phase == Phase.FAILED:
            out.append(_cond(T.RESOURCE_READY, "False", R.RESOURCE_STATUS_FAILED, res.message))
            if obs.machines:
                out.append(_cond(T.MACHINE_READY, "False", R.CHECK_MACHINE_STATUS_FAILED, res.message))
        else:
            out.append(_cond(T.RESOURCE_READY, "Unknown", R.CREATE_MACHINE_PENDING, res.message))
            if obs.machines:
                out.append(_cond(T.MACHINE_READY, "Unknown", R.CREATE_MACHINE_PENDING, res.message))
    if obs.tuning_mode:
        return out + _tuning_conditions(obs)
    inf = obs.inference
    if inf is not None:
        if inf.phase == Phase.READY:
            out.append(
                _cond(
                    T.INFERENCE_READY,
                    "True",
                    R.INFERENCE_STATUS_SUCCESS,
                    "Inference has been deployed successfully",
                )
            )
        elif inf.phase == Phase.FAILED:
            out.append(_cond(T.INFERENCE_READY, "False", R.INFERENCE_STATUS_FAILED, inf.message))
        else:
            out.append(_cond(T.INFERENCE_READY, "Unknown", "InferencePending", inf.message))
    elif res is not None and res.phase != Phase.READY:
        out.append(_cond(T.INFERENCE_READY, "Unknown", "InferencePending", "waiting for GPU nodes"))

    ready = res is not None and res.phase == Phase.READY and inf is not None and inf.phase == Phase.READY
    failed = (res is not None and res.phase == Phase.FAILED) or (
        inf is not None and inf.phase == Phase.FAILED
    )
    if ready:
        out.append(_cond(T.WORKSPACE_SUCCEEDED, "True", R.WORKSPACE_SUCCEEDED, "workspace succeeds"))
        out.append(_cond(T.WORKSPACE_READY, "True", R.WORKSPACE_READY, "workspace is ready"))
    elif failed:
        step = res if res is not None and res.phase == Phase.FAILED else inf
        assert step is not None
        out.append(_cond(T.WORKSPACE_SUCCEEDED, "False", R.WORKSPACE_FAILED, step.message))
        out.append(_cond(T.WORKSPACE_READY, "False", R.WORKSPACE_FAILED, step.message))
    else:
        step = inf if inf is not None else res
        msg = step.message if step is not None and step.message else PENDING_MSG
        out.append(_cond(T.WORKSPACE_SUCCEEDED, "False", R.WORKSPACE_PENDING, msg))
        out.append(_cond(T.WORKSPACE_READY, "False", R.WORKSPACE_PENDING, msg))
    return out


def _tuning_conditions(obs: Observation) -> list[tuple[str, str, str, str]]:
    """JobStarted, and WorkspaceSucceeded mirrored by WorkspaceReady, from resources and the Job."""
    out: list[tuple[str, str, str, str]] = []
    res, job = obs.resource, obs.tuning
    if job is not None:
        out.append(_cond(T.JOB_STARTED, "True", R.TUNING_JOB_STARTED, "tuning job has started"))
    elif res is not None and res.phase == Phase.FAILED:
        out.append(_cond(T.JOB_STARTED, "False", R.TUNING_JOB_FAILED, res.message))
    else:
        out.append(_cond(T.JOB_STARTED, "Unknown", "JobPending", "waiting for GPU nodes"))
    if job is not None and job.phase == Phase.READY:
        status, reason, msg = "True", R.WORKSPACE_SUCCEEDED, job.message or "workspace succeeds"
    elif job is not None and job.phase == Phase.FAILED:
        status, reason, msg = "False", R.WORKSPACE_FAILED, job.message
    elif res is not None and res.phase == Phase.FAILED:
        status, reason, msg = "False", R.WORKSPACE_FAILED, res.message
    else:
        # Unknown, not False, until the Job finishes: the outcome is open, and the flip to True or
        # False is then a transition with its own Event.
        step = job if job is not None else res
        status, reason = "Unknown", R.WORKSPACE_PENDING
        msg = step.message if step is not None and step.message else PENDING_MSG
    out.append(_cond(T.WORKSPACE_SUCCEEDED, status, reason, msg))
    out.append(_cond(T.WORKSPACE_READY, status, reason, msg))
    return out


def _tuning_state(obs: Observation) -> tuple[str, str]:
    res, job = obs.resource, obs.tuning
    if job is not None:
        if job.phase == Phase.READY:
            return WorkspaceState.SUCCEEDED, StateReason.SUCCEEDED
        if job.phase == Phase.FAILED:
            return WorkspaceState.FAILED, job.reason or StateReason.JOB_FAILED
        return WorkspaceState.RUNNING, job.reason or "Running"
    if res is not None and res.phase == Phase.FAILED:
        return WorkspaceState.FAILED, res.reason or StateReason.PROVISIONING_FAILED
    return WorkspaceState.PENDING, (
        res.reason if res is not None and res.reason else StateReason.PROVISIONING
    )


def desired_state(obs: Observation) -> tuple[str, str]:
    """``(status.state, status.reason)``: never Ready unless resources and inference both are.

    Tuning: Pending until the Job exists, then Running, Succeeded or Failed (with the Job's reason).
    """
    if obs.deleting:
        return WorkspaceState.DELETING, StateReason.DELETING
    if obs.spec_error is not None:
        return WorkspaceState.FAILED, obs.spec_error.reason or "InvalidSpec"
    if obs.tuning_mode:
        return _tuning_state(obs)
    res, inf = obs.resource, obs.inference
    if res is not None and res.phase == Phase.FAILED:
        return WorkspaceState.NOT_READY, res.reason or StateReason.PROVISIONING_FAILED
    if inf is not None and inf.phase == Phase.FAILED:
        return WorkspaceState.NOT_READY, inf.reason or "InferenceFailed"
    if res is not None and res.phase == Phase.READY and inf is not None and inf.phase == Phase.READY:
        return WorkspaceState.READY, StateReason.READY
    if res is None or res.phase != Phase.READY:
        return WorkspaceState.PENDING, (
            res.reason if res is not None and res.reason else StateReason.PROVISIONING
        )
    return WorkspaceState.PENDING, (inf.reason if inf is not None and inf.reason else StateReason.DEPLOYING)


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def desired_status(current: Mapping[str, Any] | None, obs: Observation, now: str | None = None) -> Obj:
    """The full status object the workspace should show (conditions merged into the current ones)."""
    current = current or {}
    stamp = now or _now()
    conditions: list[Obj] = [dict(c) for c in current.get("conditions") or []]
    by_type = {c.get("type"): c for c in conditions}
    for type_, cstatus, creason, message in desired_conditions(obs):
        existing = by_type.get(type_)
        new: Obj = {
            "type": type_,
            "status": cstatus,
            "reason": creason,
            # Conditions quote pods, Jobs and Machines (termination messages, pull errors):
            # no credential in them may reach a status anyone who can read the Workspace sees.
            "message": redact(message),
            "observedGeneration": obs.generation,
            "lastTransitionTime": stamp,
        }
        if existing is None:
            conditions.append(new)
            by_type[type_] = new
            continue
        if existing.get("status") == cstatus and existing.get("lastTransitionTime"):
            new["lastTransitionTime"] = existing["lastTransitionTime"]
        existing.clear()
        existing.update(new)
    state, reason = desired_state(obs)
    out: Obj = {
        "conditions": conditions,
        "state": str(state),
        "reason": str(reason),
        "observedGeneration": obs.generation,
    }
    workers = obs.worker_nodes if obs.worker_nodes is not None else current.get("workerNodes")
    if workers is not None:
        out["workerNodes"] = sorted(workers)
    return out


def _normalise(status: Mapping[str, Any]) -> Obj:
    conds = sorted(
        (
            {
                k: c.get(k)
                for k in ("type", "status", "reason", "message", "observedGeneration", "lastTransitionTime")
            }
            for c in status.get("conditions") or []
        ),
        key=lambda c: str(c["type"]),
    )
    return {
        "conditions": conds,
        "state": status.get("state"),
        "reason": status.get("reason"),
        "observedGeneration": status.get("observedGeneration"),
        "workerNodes": sorted(status.get("workerNodes") or []),
    }


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> Obj | None:
    """The merge patch body for the status subresource, or ``None`` when nothing would change."""
    if _normalise(current or {}) == _normalise(desired):
        return None
    return {"status": dict(desired)}


@dataclass(frozen=True)
class Transition:
    """A condition whose status or reason changed (or that appeared): one Event."""

    type: str
    old: str | None
    new: str
    reason: str
    message: str

    @property
    def event_type(self) -> str:
        """``Warning`` for a condition turning False for a failure, else ``Normal`` (pending is normal)."""
        return "Warning" if self.new == "False" and "pending" not in self.reason.lower() else "Normal"


def transitions(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> list[Transition]:
    """Conditions whose status or reason differs between ``current`` and ``desired``.

    A new reason under the same status is news to the user (Unschedulable, then CrashLoopBackOff), so it
    gets an Event too; an unchanged reconcile still yields none.
    """
    before = {c.get("type"): c for c in (current or {}).get("conditions") or []}
    out: list[Transition] = []
    for c in desired.get("conditions") or []:
        old = before.get(c["type"])
        if old is None or old.get("status") != c["status"] or old.get("reason") != c["reason"]:
            out.append(
                Transition(
                    c["type"],
                    old.get("status") if old else None,
                    c["status"],
                    c["reason"],
                    c.get("message", ""),
                )
            )
    return out


EVENT_PRIORITY = (
    "WorkspaceDeleting",
    "WorkspaceReady",
    "InferenceReady",
    "JobStarted",
    "ResourceReady",
    "MachineReady",
    "WorkspaceSucceeded",
)


def summarise(changes: Sequence[Transition]) -> tuple[str, str, str] | None:
    """One Event ``(type, reason, message)`` for the condition changes of one status write.

    The reason is that of the most telling changed condition (WorkspaceReady first); the message lists
    every change, so one write costs one Event instead of one per condition.
    """
    if not changes:
        return None
    rank = {t: i for i, t in enumerate(EVENT_PRIORITY)}
    lead = min(changes, key=lambda t: rank.get(t.type, len(rank)))
    ordered = sorted(changes, key=lambda t: rank.get(t.type, len(rank)))
    message = "; ".join(f"{t.type}={t.new}" + (f": {t.message}" if t.message else "") for t in ordered)
    kind = "Warning" if any(t.event_type == "Warning" for t in changes) else "Normal"
    return kind, lead.reason, message


def condition_status(status: Mapping[str, Any] | None, type_: str) -> str | None:
    """The status string of a condition, or None."""
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == type_:
            return str(c.get("status"))
    return None


# ------------------------------------------------------------------------------------------ pods

IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
CONFIG_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})


def _container_problem(pod: str, cs: Mapping[str, Any]) -> tuple[str, str] | None:
    name = cs.get("name", "?")
    state = cs.get("state") or {}
    last = (cs.get("lastState") or {}).get("terminated") or {}
    waiting = state.get("waiting") or {}
    terminated = state.get("terminated") or {}
    wreason = str(waiting.get("reason") or "")
    detail = str(waiting.get("message") or "")
    where = f"pod {pod} container {name}"
    if wreason in IMAGE_PULL_REASONS:
        return StateReason.IMAGE_PULL_ERROR, f"{where}: {wreason}" + (f": {detail}" if detail else "")
    if terminated.get("reason") == "OOMKilled" or (
        wreason == "CrashLoopBackOff" and last.get("reason") == "OOMKilled"
    ):
        return StateReason.OOM_KILLED, f"{where} was OOMKilled"
    if wreason == "CrashLoopBackOff":
        code = last.get("exitCode")
        tail = f" (last exit code {code})" if code is not None else ""
        return StateReason.CRASH_LOOP_BACK_OFF, f"{where} is in CrashLoopBackOff{tail}" + (
            f": {detail}" if detail else ""
        )
    if wreason in CONFIG_REASONS:
        return "ContainerConfigError", f"{where}: {wreason}" + (f": {detail}" if detail else "")
    return None


def pod_problem(pods: Iterable[Mapping[str, Any]]) -> tuple[str, str] | None:
    """The first typed problem a workspace's pods report (sorted by pod name), or None.

    Reasons: ImagePullError, OOMKilled, CrashLoopBackOff, ContainerConfigError, PodEvicted, Unschedulable.
    """
    for pod in sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("name", ""))):
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        name = str(meta.get("name", ""))
        status = pod.get("status") or {}
        if status.get("reason") == "Evicted":
            return "PodEvicted", f"pod {name} was evicted: {status.get('message', '')}".rstrip(": ")
        for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            problem = _container_problem(name, cs)
            if problem is not None:
                return problem
        for cond in status.get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                return (
                    StateReason.UNSCHEDULABLE,
                    f"pod {name} is unschedulable: {cond.get('message', '')}",
                )
    return None
