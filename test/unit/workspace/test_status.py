"""Status computation: conditions, state and typed reasons, minimal writes, transitions."""

from __future__ import annotations

from typing import Any

from kaito.workspace import status as st

READY = st.StepOutcome(st.Phase.READY)


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_ready_workspace() -> None:
    obs = st.Observation(
        generation=3, resource=READY, inference=READY, worker_nodes=["b", "a"], machines=True
    )
    s = st.desired_status(None, obs, now="2026-01-01T00:00:00Z")
    assert s["state"] == "Ready" and s["reason"] == "Ready"
    assert s["observedGeneration"] == 3
    assert s["workerNodes"] == ["a", "b"]
    for t in ("ResourceReady", "InferenceReady", "WorkspaceSucceeded", "WorkspaceReady", "MachineReady"):
        assert cond(s, t)["status"] == "True"
        assert cond(s, t)["observedGeneration"] == 3
    assert cond(s, "InferenceReady")["reason"] == "WorkspaceInferenceStatusSuccess"
    assert cond(s, "ResourceReady")["reason"] == "workspaceResourceStatusSuccess"


def test_no_write_when_unchanged_and_transition_time_kept() -> None:
    obs = st.Observation(generation=1, resource=READY, inference=READY, worker_nodes=["a"])
    first = st.desired_status(None, obs, now="2026-01-01T00:00:00Z")
    second = st.desired_status(first, obs, now="2026-01-02T00:00:00Z")
    assert st.status_patch(first, second) is None
    assert st.transitions(first, second) == []
    # A message change is written but keeps lastTransitionTime; a status flip moves it.
    failing = st.Observation(
        generation=1,
        resource=READY,
        inference=st.StepOutcome(st.Phase.FAILED, "CrashLoopBackOff", "CrashLoopBackOff: pod p"),
        worker_nodes=["a"],
    )
    third = st.desired_status(second, failing, now="2026-01-03T00:00:00Z")
    assert st.status_patch(second, third) is not None
    assert cond(third, "ResourceReady")["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert cond(third, "InferenceReady")["lastTransitionTime"] == "2026-01-03T00:00:00Z"
    assert (third["state"], third["reason"]) == ("NotReady", "CrashLoopBackOff")
    ts = {t.type: t for t in st.transitions(second, third)}
    assert set(ts) == {"InferenceReady", "WorkspaceSucceeded", "WorkspaceReady"}
    assert ts["InferenceReady"].event_type == "Warning"


def test_pending_resources() -> None:
    obs = st.Observation(
        generation=1,
        resource=st.StepOutcome(st.Phase.PENDING, "Provisioning", "creating 1 machines"),
        machines=True,
    )
    s = st.desired_status(None, obs)
    assert (s["state"], s["reason"]) == ("Pending", "Provisioning")
    assert cond(s, "ResourceReady")["status"] == "Unknown"
    assert cond(s, "ResourceReady")["reason"] == "CreateMachinePending"
    assert cond(s, "WorkspaceReady")["reason"] == "workspacePending"
    assert all(t.event_type == "Normal" for t in st.transitions(None, s))


def test_quota_failure_is_not_ready_with_reason() -> None:
    obs = st.Observation(
        generation=1,
        resource=st.StepOutcome(
            st.Phase.FAILED, "QuotaExceeded", "machine ws1 failed: QuotaExceeded: no cores"
        ),
        machines=True,
    )
    s = st.desired_status(None, obs)
    assert (s["state"], s["reason"]) == ("NotReady", "QuotaExceeded")
    assert cond(s, "ResourceReady")["status"] == "False"
    assert cond(s, "MachineReady")["reason"] == "checkMachineStatusFailed"
    assert cond(s, "WorkspaceSucceeded")["reason"] == "workspaceFailed"


def test_spec_error_and_deleting() -> None:
    s = st.desired_status(
        None, st.Observation(generation=2, spec_error=st.StepOutcome(st.Phase.FAILED, "UnknownPreset", "x"))
    )
    assert (s["state"], s["reason"]) == ("Failed", "UnknownPreset")
    d = st.desired_status(s, st.Observation(generation=2, deleting=True))
    assert d["state"] == "Deleting"
    assert cond(d, "WorkspaceDeleting")["reason"] == "workspaceDeleted"


def pod(name: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": status}


def waiting(reason: str, last: str | None = None) -> dict[str, Any]:
    cs: dict[str, Any] = {"name": "c", "state": {"waiting": {"reason": reason, "message": "m"}}}
    if last:
        cs["lastState"] = {"terminated": {"reason": last, "exitCode": 137}}
    return cs


def test_pod_problems() -> None:
    assert st.pod_problem([]) is None
    assert st.pod_problem([pod("p", containerStatuses=[{"name": "c", "state": {"running": {}}}])]) is None
    assert st.pod_problem([pod("p", containerStatuses=[waiting("ImagePullBackOff")])])[0] == "ImagePullError"  # type: ignore[index]
    assert st.pod_problem([pod("p", initContainerStatuses=[waiting("ErrImagePull")])])[0] == "ImagePullError"  # type: ignore[index]
    crash = st.pod_problem([pod("p", containerStatuses=[waiting("CrashLoopBackOff", "Error")])])
    assert crash is not None and crash[0] == "CrashLoopBackOff" and "pod p container c" in crash[1]
    oom = st.pod_problem([pod("p", containerStatuses=[waiting("CrashLoopBackOff", "OOMKilled")])])
    assert oom is not None and oom[0] == "OOMKilled"
    unsched = st.pod_problem(
        [
            pod(
                "p",
                conditions=[
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3"}
                ],
            )
        ]
    )
    assert unsched is not None and unsched[0] == "Unschedulable" and "0/3" in unsched[1]
    assert st.pod_problem([pod("p", reason="Evicted", message="disk")])[0] == "PodEvicted"  # type: ignore[index]


def test_one_event_per_status_write() -> None:
    pending = st.desired_status(
        None,
        st.Observation(
            generation=1, resource=READY, inference=st.StepOutcome(st.Phase.PENDING, "Deploying", "0/1")
        ),
    )
    ready = st.desired_status(pending, st.Observation(generation=1, resource=READY, inference=READY))
    summary = st.summarise(st.transitions(pending, ready))
    assert summary is not None
    kind, reason, message = summary
    assert (kind, reason) == ("Normal", "workspaceReady")
    assert message.startswith("WorkspaceReady=True") and "InferenceReady=True" in message
    assert st.summarise([]) is None


def test_tuning_states_follow_the_job() -> None:
    """Tuning: Pending before the Job, Running, then Succeeded or Failed with the Job's reason; no
    InferenceReady; WorkspaceReady mirrors WorkspaceSucceeded; each flip is a transition."""
    now = "2026-01-01T00:00:00Z"
    pending = st.desired_status(
        None,
        st.Observation(
            generation=1, tuning_mode=True, resource=st.StepOutcome(st.Phase.PENDING, "Provisioning", "m")
        ),
        now=now,
    )
    assert (pending["state"], pending["reason"]) == ("Pending", "Provisioning")
    assert cond(pending, "JobStarted")["status"] == "Unknown"
    assert all(c["type"] != "InferenceReady" for c in pending["conditions"])

    running_job = st.StepOutcome(st.Phase.PENDING, "Running", "tuning job j is running")
    running = st.desired_status(
        pending, st.Observation(generation=1, tuning_mode=True, resource=READY, tuning=running_job), now=now
    )
    assert running["state"] == "Running"
    assert cond(running, "JobStarted")["status"] == "True"
    assert cond(running, "WorkspaceSucceeded")["status"] == "Unknown"
    assert [t.type for t in st.transitions(pending, running)] == ["ResourceReady", "JobStarted"]

    done = st.desired_status(
        running,
        st.Observation(generation=1, tuning_mode=True, tuning=st.StepOutcome(st.Phase.READY, "Succeeded")),
        now=now,
    )
    assert (done["state"], done["reason"]) == ("Succeeded", "Succeeded")
    assert cond(done, "WorkspaceSucceeded")["status"] == cond(done, "WorkspaceReady")["status"] == "True"
    assert cond(done, "ResourceReady")["status"] == "True"  # kept from before: resources not re-checked

    failed_job = st.StepOutcome(st.Phase.FAILED, "BackoffLimitExceeded", "tuning job j failed: x")
    failed = st.desired_status(
        running, st.Observation(generation=1, tuning_mode=True, tuning=failed_job), now=now
    )
    assert (failed["state"], failed["reason"]) == ("Failed", "BackoffLimitExceeded")
    ws_ok = cond(failed, "WorkspaceSucceeded")
    assert ws_ok["status"] == "False" and ws_ok["reason"] == "workspaceFailed"
    assert ws_ok["message"] == "tuning job j failed: x"
    summary = st.summarise(st.transitions(running, failed))
    assert summary is not None
    assert summary[0] == "Warning" and summary[1] == "workspaceFailed"
    assert "WorkspaceReady=False: tuning job j failed: x" in summary[2]
    assert st.summarise(st.transitions(running, done)) == (
        "Normal",
        "workspaceSucceeded",
        "WorkspaceReady=True: workspace succeeds; WorkspaceSucceeded=True: workspace succeeds",
    )
