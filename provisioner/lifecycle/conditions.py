"""Machine and NodeClaim status conditions, as plain dicts.

Upstream's living set is ``MachineLaunched``, ``MachineRegistered``, ``MachineInitialized`` on Machines
and ``Launched``, ``Registered``, ``Initialized`` on NodeClaims (``living`` parameters); the summary
``Ready`` is True exactly when all three are True, and otherwise repeats the first one that is not
(its status, reason and message), so a reader of ``Ready`` alone learns what is holding the Machine up.

Everything here is pure: functions take the current list and return a new one, never mutating their
input (the list may come from an informer cache).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

LAUNCHED = "MachineLaunched"
REGISTERED = "MachineRegistered"
INITIALIZED = "MachineInitialized"
READY = "Ready"
LIVING = (LAUNCHED, REGISTERED, INITIALIZED)

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"

Condition = dict[str, Any]


def format_time(when: datetime) -> str:
    """RFC 3339 in UTC with second precision, as the apiserver stores metav1.Time."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(raw: Any) -> datetime | None:
    """Parse an RFC 3339 timestamp (``...Z``) to an aware UTC datetime; None when absent or malformed."""
    if not isinstance(raw, str) or not raw:
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


def conditions_of(status: Mapping[str, Any] | None) -> list[Condition]:
    """A copy of ``status.conditions`` (entries that are not objects with a type are dropped)."""
    raw = (status or {}).get("conditions")
    if not isinstance(raw, list):
        return []
    return [dict(c) for c in raw if isinstance(c, Mapping) and isinstance(c.get("type"), str)]


def get(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    """The condition of ``type_`` or None."""
    for cond in conditions:
        if cond.get("type") == type_:
            return cond
    return None


def is_true(conditions: Sequence[Mapping[str, Any]], type_: str) -> bool:
    """Whether the condition of ``type_`` exists with status True."""
    cond = get(conditions, type_)
    return cond is not None and cond.get("status") == TRUE


def reason_of(conditions: Sequence[Mapping[str, Any]], type_: str) -> str:
    """The reason of the condition of ``type_`` ("" when absent)."""
    cond = get(conditions, type_)
    return str(cond.get("reason") or "") if cond is not None else ""


def transition_time(conditions: Sequence[Mapping[str, Any]], type_: str) -> datetime | None:
    """``lastTransitionTime`` of the condition of ``type_``."""
    cond = get(conditions, type_)
    return parse_time(cond.get("lastTransitionTime")) if cond is not None else None


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: str,
    reason: str = "",
    message: str = "",
    *,
    now: datetime,
) -> list[Condition]:
    """Return ``conditions`` with ``type_`` set; ``lastTransitionTime`` moves only when the status flips.

    Re-asserting the same status, reason and message returns an equal list, so the caller can compare
    and skip the write (no churn).
    """
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            out.append(dict(cond))
            continue
        found = True
        flipped = cond.get("status") != status
        new: Condition = {
            "type": type_,
            "status": status,
            "lastTransitionTime": format_time(now) if flipped else cond.get("lastTransitionTime"),
        }
        if new["lastTransitionTime"] is None:
            new["lastTransitionTime"] = format_time(now)
        if reason:
            new["reason"] = reason
        if message:
            new["message"] = message
        if cond.get("severity") and not flipped:
            new["severity"] = cond["severity"]
        out.append(new)
    if not found:
        new = {"type": type_, "status": status, "lastTransitionTime": format_time(now)}
        if reason:
            new["reason"] = reason
        if message:
            new["message"] = message
        out.append(new)
    return out


def summarize_ready(
    conditions: Sequence[Mapping[str, Any]], *, now: datetime, living: Sequence[str] = LIVING
) -> list[Condition]:
    """Set ``Ready`` from the living conditions (True when all are True; else the first that is not)."""
    for i, type_ in enumerate(living):
        cond = get(conditions, type_)
        if cond is None:
            return set_condition(
                conditions,
                READY,
                UNKNOWN,
                _PENDING_REASONS[i],
                f"{type_} has not been reported yet",
                now=now,
            )
        if cond.get("status") != TRUE:
            return set_condition(
                conditions,
                READY,
                str(cond.get("status") or UNKNOWN),
                str(cond.get("reason") or _PENDING_REASONS[i]),
                str(cond.get("message") or ""),
                now=now,
            )
    return set_condition(conditions, READY, TRUE, "Ready", "", now=now)


_PENDING_REASONS = ("Launching", "Registering", "Initializing")  # by position in the living set


def ordered(conditions: Sequence[Mapping[str, Any]], living: Sequence[str] = LIVING) -> list[Condition]:
    """Conditions in a stable order (living set, Ready, then others by type) so equal states compare equal."""
    rank = {t: i for i, t in enumerate((*living, READY))}
    return sorted((dict(c) for c in conditions), key=lambda c: (rank.get(c["type"], 99), c["type"]))


def as_metav1(conditions: Sequence[Mapping[str, Any]], generation: int) -> list[Condition]:
    """Conditions with every field ``metav1.Condition`` requires (NodeClaims): a reason (the status when
    none was given), a message (possibly empty) and the ``observedGeneration`` they were computed for."""
    out: list[Condition] = []
    for cond in conditions:
        new = dict(cond)
        new.setdefault("reason", str(cond.get("status") or UNKNOWN))
        new.setdefault("message", "")
        new["observedGeneration"] = generation
        out.append(new)
    return out
