"""Prometheus metrics of the Machine lifecycle (``kaito_machine_*``).

Cloud-call durations and errors by operation live in :mod:`provisioner.cloud.metrics`; these are about
Machines:

- ``kaito_machine_phase{phase}``: Machines by phase (Launching, Registering, Initializing, Ready,
  Failed, Terminating), computed from the informer cache at scrape time, so it can never drift;
- ``kaito_machine_launch_duration_seconds``: Machine creation -> MachineLaunched=True;
- ``kaito_machine_registration_duration_seconds``: launched -> the Node is linked;
- ``kaito_machine_initialization_duration_seconds``: registered -> the Node is Ready with its GPUs;
- ``kaito_machine_launch_failures_total{reason}``: failed launches by condition reason (QuotaExceeded...);
- ``kaito_machine_registration_timeouts_total``: instances deleted because no Node registered in time;
- ``kaito_machine_terminations_total{reason}``: instances removed (``deleted``: the Machine was deleted;
  ``garbage_collected``: the sweep removed an instance whose Machine was gone);
- ``kaito_machine_termination_duration_seconds``: deletionTimestamp -> finalizer removed;
- ``kaito_machine_provisioning_since_timestamp_seconds{machine}``: for each Machine that is neither Ready
  nor being deleted, when it stopped being Ready (its Ready condition's last transition) or, never Ready,
  its creation: ``time() - x`` is how long it has been provisioning (the KaitoMachineStuckProvisioning
  alert in config/prometheus/alerts.yaml);
- ``kaito_machine_deleting_since_timestamp_seconds{machine}``: the deletionTimestamp of each Machine being
  deleted (KaitoMachineStuckDeleting).

The gauges computed from the cache are reported by the leader only (see
:func:`provisioner.lifecycle.setup`), so summing or taking the max over replicas counts each Machine once.
"""

from __future__ import annotations

import weakref
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from provisioner.lifecycle import conditions as cond

PHASES = ("Launching", "Registering", "Initializing", "Ready", "Failed", "Terminating")

# Launches take from under a second (kwok) to tens of minutes (a large GPU VM on AKS).
_DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600)

LAUNCH_DURATION = Histogram(
    "kaito_machine_launch_duration_seconds",
    "Seconds from Machine creation until its instance was launched.",
    buckets=_DURATION_BUCKETS,
)
REGISTRATION_DURATION = Histogram(
    "kaito_machine_registration_duration_seconds",
    "Seconds from launch until the Machine's Node registered.",
    buckets=_DURATION_BUCKETS,
)
INITIALIZATION_DURATION = Histogram(
    "kaito_machine_initialization_duration_seconds",
    "Seconds from registration until the Node was Ready with its GPUs allocatable.",
    buckets=_DURATION_BUCKETS,
)
TERMINATION_DURATION = Histogram(
    "kaito_machine_termination_duration_seconds",
    "Seconds from the Machine's deletion request until its instance was gone and the finalizer removed.",
    buckets=_DURATION_BUCKETS,
)
LAUNCH_FAILURES = Counter(
    "kaito_machine_launch_failures_total",
    "Failed instance launches, by Machine condition reason.",
    ["reason"],
)
REGISTRATION_TIMEOUTS = Counter(
    "kaito_machine_registration_timeouts_total",
    "Instances deleted and relaunched because their Node did not register in time.",
)
TERMINATIONS = Counter(
    "kaito_machine_terminations_total",
    "Instances removed, by reason (deleted, garbage_collected).",
    ["reason"],
)


def phase_of(machine: Mapping[str, Any]) -> str:
    """The lifecycle phase of a Machine, from its deletionTimestamp and conditions."""
    if (machine.get("metadata") or {}).get("deletionTimestamp"):
        return "Terminating"
    conds = cond.conditions_of(machine.get("status"))
    if cond.is_true(conds, cond.READY):
        return "Ready"
    if cond.is_true(conds, cond.REGISTERED):
        return "Initializing"
    if cond.is_true(conds, cond.LAUNCHED):
        return "Registering"
    launched = cond.get(conds, cond.LAUNCHED)
    if launched is not None and launched.get("status") == cond.FALSE:
        return "Failed"
    return "Launching"


MachineSource = Callable[[], Iterable[Mapping[str, Any]]]


def provisioning_since(machine: Mapping[str, Any]) -> float | None:
    """Unix time since which a Machine has been on its way to Ready; None when Ready or deleting."""
    if phase_of(machine) in ("Ready", "Terminating"):
        return None
    ready = cond.get(cond.conditions_of(machine.get("status")), cond.READY)
    since = cond.parse_time(ready.get("lastTransitionTime")) if ready is not None else None
    if since is None:
        since = cond.parse_time((machine.get("metadata") or {}).get("creationTimestamp"))
    return since.timestamp() if since is not None else None


def deleting_since(machine: Mapping[str, Any]) -> float | None:
    """The Machine's deletionTimestamp as Unix time; None when it is not being deleted."""
    since = cond.parse_time((machine.get("metadata") or {}).get("deletionTimestamp"))
    return since.timestamp() if since is not None else None


class _PhaseCollector(Collector):
    """Counts the Machines of every attached source by phase, and times the unfinished ones, at scrape
    time."""

    def __init__(self) -> None:
        # Weak references: a stopped provisioner (e.g. in tests) must not keep reporting.
        self._sources: weakref.WeakSet[_Source] = weakref.WeakSet()

    def attach(self, source: _Source) -> None:
        self._sources.add(source)

    def collect(self) -> Iterator[Metric]:
        tally: Tally[str] = Tally()
        provisioning = GaugeMetricFamily(
            "kaito_machine_provisioning_since_timestamp_seconds",
            "Unix time since which a Machine that is neither Ready nor deleting has been provisioning.",
            labels=["machine"],
        )
        deleting = GaugeMetricFamily(
            "kaito_machine_deleting_since_timestamp_seconds",
            "Unix time a Machine that is still present was asked to be deleted (its deletionTimestamp).",
            labels=["machine"],
        )
        for source in list(self._sources):
            for machine in source.list():
                tally[phase_of(machine)] += 1
                name = str((machine.get("metadata") or {}).get("name") or "")
                if (since := provisioning_since(machine)) is not None:
                    provisioning.add_metric([name], since)
                if (since := deleting_since(machine)) is not None:
                    deleting.add_metric([name], since)
        family = GaugeMetricFamily("kaito_machine_phase", "Machines by lifecycle phase.", labels=["phase"])
        for phase in PHASES:
            family.add_metric([phase], float(tally[phase]))
        yield family
        yield provisioning
        yield deleting


class _Source:
    """A weak-referenceable holder of a machine-listing callable."""

    def __init__(self, fn: MachineSource) -> None:
        self.list = fn


_COLLECTOR = _PhaseCollector()
REGISTRY.register(_COLLECTOR)


def track_machines(fn: MachineSource) -> object:
    """Report the Machines ``fn()`` returns in ``kaito_machine_phase``; keep the returned handle alive.

    Reporting stops when the handle is garbage collected.
    """
    source = _Source(fn)
    _COLLECTOR.attach(source)
    return source
