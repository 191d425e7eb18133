"""Machine conditions: transitions, the Ready summary, no churn on re-assertion."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from provisioner.lifecycle import conditions as cond

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def test_set_condition_moves_transition_time_only_on_status_flip() -> None:
    first = cond.set_condition([], cond.LAUNCHED, cond.UNKNOWN, "Launching", "creating", now=T0)
    assert first == [
        {
            "type": cond.LAUNCHED,
            "status": "Unknown",
            "lastTransitionTime": "2026-01-01T12:00:00Z",
            "reason": "Launching",
            "message": "creating",
        }
    ]
    # Same status, new reason: the transition time stays.
    second = cond.set_condition(first, cond.LAUNCHED, cond.UNKNOWN, "OperationInProgress", "", now=T1)
    assert second[0]["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    assert second[0]["reason"] == "OperationInProgress" and "message" not in second[0]
    third = cond.set_condition(second, cond.LAUNCHED, cond.TRUE, "Launched", now=T1)
    assert third[0]["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    assert cond.transition_time(third, cond.LAUNCHED) == T1
    # Inputs are never mutated.
    assert first[0]["reason"] == "Launching"


def test_reasserting_the_same_state_is_equal() -> None:
    conds = cond.set_condition([], cond.REGISTERED, cond.TRUE, "Registered", now=T0)
    assert cond.set_condition(conds, cond.REGISTERED, cond.TRUE, "Registered", now=T1) == conds


def test_ready_is_true_only_when_all_living_conditions_are() -> None:
    conds: list[cond.Condition] = []
    for type_ in cond.LIVING:
        conds = cond.set_condition(conds, type_, cond.TRUE, "Ok", now=T0)
    ready = cond.get(cond.summarize_ready(conds, now=T1), cond.READY)
    assert ready is not None and ready["status"] == "True" and ready["reason"] == "Ready"


def test_ready_repeats_the_first_condition_that_is_not_true() -> None:
    conds = cond.set_condition([], cond.LAUNCHED, cond.FALSE, "QuotaExceeded", "raise the quota", now=T0)
    ready = cond.get(cond.summarize_ready(conds, now=T1), cond.READY)
    assert ready == {
        "type": "Ready",
        "status": "False",
        "lastTransitionTime": "2026-01-01T12:05:00Z",
        "reason": "QuotaExceeded",
        "message": "raise the quota",
    }
    conds = cond.set_condition([], cond.LAUNCHED, cond.TRUE, "Launched", now=T0)
    ready = cond.get(cond.summarize_ready(conds, now=T1), cond.READY)
    assert ready is not None and (ready["status"], ready["reason"]) == ("Unknown", "Registering")


def test_ordered_is_stable() -> None:
    conds = [{"type": t, "status": "True"} for t in ("Zeta", cond.READY, cond.INITIALIZED, cond.LAUNCHED)]
    assert [c["type"] for c in cond.ordered(conds)] == [cond.LAUNCHED, cond.INITIALIZED, cond.READY, "Zeta"]


def test_parse_time_tolerates_garbage() -> None:
    assert cond.parse_time("2026-01-01T12:00:00Z") == T0
    assert cond.parse_time("yesterday") is None
    assert cond.parse_time(None) is None
    assert cond.conditions_of({"conditions": [{"type": "A"}, "junk", {"no": "type"}]}) == [{"type": "A"}]
