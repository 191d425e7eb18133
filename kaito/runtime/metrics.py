"""Prometheus metrics with controller-runtime's names, so its dashboards and alerts apply unchanged.

The controller, leader-election and REST-client metrics are ordinary prometheus-client objects on the
default registry. The work-queue metrics sit on the hot path of every add/get/done, so they are kept as
plain counters on a per-queue-name :class:`QueueStats` object and exported by a collector at scrape time
(depth, unfinished work and longest-running processor are computed from the live queues then, which
also spares client-go's 500 ms ticker task).
"""

from __future__ import annotations

import time
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Protocol

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# controller-runtime exposes no ``*_created`` series; dashboards written for it expect none.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = prometheus_client.REGISTRY

RESULT_LABELS = ("success", "error", "requeue", "requeue_after")

# controller-runtime pkg/internal/controller/metrics/metrics.go buckets for reconcile time.
RECONCILE_TIME_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
    1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 15.0, 20.0, 25.0,
    30.0, 40.0, 50.0, 60.0,
)  # fmt: skip
# client-go workqueue buckets: 1e-8 .. 1e3 seconds, times 10 each.
WORKQUEUE_DURATION_BUCKETS = tuple(10.0**e for e in range(-8, 4))

RECONCILE_TOTAL = Counter(
    "controller_runtime_reconcile_total",
    "Total number of reconciliations per controller",
    ["controller", "result"],
)
RECONCILE_ERRORS = Counter(
    "controller_runtime_reconcile_errors_total",
    "Total number of reconciliation errors per controller",
    ["controller"],
)
TERMINAL_RECONCILE_ERRORS = Counter(
    "controller_runtime_terminal_reconcile_errors_total",
    "Total number of terminal reconciliation errors per controller",
    ["controller"],
)
RECONCILE_PANICS = Counter(
    "controller_runtime_reconcile_panics_total",
    "Total number of reconciliation panics (unexpected exceptions) per controller",
    ["controller"],
)
RECONCILE_TIME = Histogram(
    "controller_runtime_reconcile_time_seconds",
    "Length of time per reconciliation per controller",
    ["controller"],
    buckets=RECONCILE_TIME_BUCKETS,
)
MAX_CONCURRENT_RECONCILES = Gauge(
    "controller_runtime_max_concurrent_reconciles",
    "Maximum number of concurrent reconciles per controller",
    ["controller"],
)
ACTIVE_WORKERS = Gauge(
    "controller_runtime_active_workers",
    "Number of currently used workers per controller",
    ["controller"],
)
LEADER_ELECTION_MASTER_STATUS = Gauge(
    "leader_election_master_status",
    "Gauge of if the reporting system is master of the relevant lease, 0 indicates backup, 1 indicates "
    "master. 'name' is the string used to identify the lease.",
    ["name"],
)
LEADER_ELECTION_SLOWPATH = Counter(
    "leader_election_slowpath_total",
    "Total number of slow path exercised in renewing leader leases. 'name' is the string used to "
    "identify the lease.",
    ["name"],
)
REST_CLIENT_REQUESTS = Counter(
    "rest_client_requests_total",
    "Number of HTTP requests, partitioned by status code, method, and host.",
    ["code", "method", "host"],
)
INFORMER_RELISTS = Counter(
    "kaito_informer_relists_total",
    "Number of LISTs an informer made after its initial one (410 Gone, watch errors), by resource.",
    ["resource"],
)
INFORMER_WATCH_RESTARTS = Counter(
    "kaito_informer_watch_restarts_total",
    "Number of times an informer re-established its watch, by resource and reason.",
    ["resource", "reason"],
)


def init_controller_metrics(controller: str, workers: int) -> None:
    """Create every label combination of a controller's metrics at 0 (as controller-runtime does)."""
    for result in RESULT_LABELS:
        RECONCILE_TOTAL.labels(controller, result)
    RECONCILE_ERRORS.labels(controller)
    TERMINAL_RECONCILE_ERRORS.labels(controller)
    RECONCILE_PANICS.labels(controller)
    RECONCILE_TIME.labels(controller)
    MAX_CONCURRENT_RECONCILES.labels(controller).set(workers)
    ACTIVE_WORKERS.labels(controller).set(0)


class FastHistogram:
    """A lock-free histogram for single-threaded (event loop) hot paths; exported by a collector."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative buckets in exposition form, ``+Inf`` last."""
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            acc += n
            out.append((floatToGoString(bound), float(acc)))  # type: ignore[no-untyped-call]
        out.append(("+Inf", float(acc + self.counts[-1])))
        return out


class LiveQueue(Protocol):
    """What the collector reads from a live work queue at scrape time."""

    def depth(self) -> int:
        """Number of dirty keys."""
        ...

    def processing_started(self) -> Iterable[float]:
        """Monotonic start times of the items being processed."""
        ...


class QueueStats:
    """Monotonic work-queue counters for one queue name; shared by every queue with that name."""

    __slots__ = ("adds", "queue_duration", "queues", "retries", "work_duration")

    def __init__(self) -> None:
        self.adds = 0
        self.retries = 0
        self.queue_duration = FastHistogram(WORKQUEUE_DURATION_BUCKETS)
        self.work_duration = FastHistogram(WORKQUEUE_DURATION_BUCKETS)
        self.queues: weakref.WeakSet[LiveQueue] = weakref.WeakSet()


_QUEUE_STATS: dict[str, QueueStats] = {}


def queue_stats(name: str, queue: LiveQueue) -> QueueStats:
    """Return the stats object for ``name`` and register ``queue`` as live under it."""
    stats = _QUEUE_STATS.get(name)
    if stats is None:
        stats = _QUEUE_STATS[name] = QueueStats()
    stats.queues.add(queue)
    return stats


class _WorkQueueCollector(Collector):
    """Exports the ``workqueue_*`` families from :data:`_QUEUE_STATS` at scrape time."""

    def collect(self) -> Iterator[Metric]:
        labels = ["name", "controller"]
        depth = GaugeMetricFamily("workqueue_depth", "Current depth of workqueue", labels=labels)
        adds = CounterMetricFamily(
            "workqueue_adds", "Total number of adds handled by workqueue", labels=labels
        )
        retries = CounterMetricFamily(
            "workqueue_retries", "Total number of retries handled by workqueue", labels=labels
        )
        qdur = HistogramMetricFamily(
            "workqueue_queue_duration_seconds",
            "How long in seconds an item stays in workqueue before being requested",
            labels=labels,
        )
        wdur = HistogramMetricFamily(
            "workqueue_work_duration_seconds",
            "How long in seconds processing an item from workqueue takes.",
            labels=labels,
        )
        unfinished = GaugeMetricFamily(
            "workqueue_unfinished_work_seconds",
            "How many seconds of work has been done that is in progress and hasn't been observed by "
            "work_duration. Large values indicate stuck threads. One can deduce the number of stuck "
            "threads by observing the rate at which this increases.",
            labels=labels,
        )
        longest = GaugeMetricFamily(
            "workqueue_longest_running_processor_seconds",
            "How many seconds has the longest running processor for workqueue been running.",
            labels=labels,
        )
        now = time.monotonic()
        for name, stats in list(_QUEUE_STATS.items()):
            values = [name, name]
            live = list(stats.queues)
            depth.add_metric(values, float(sum(q.depth() for q in live)))
            adds.add_metric(values, float(stats.adds))
            retries.add_metric(values, float(stats.retries))
            qdur.add_metric(values, stats.queue_duration.buckets(), stats.queue_duration.sum)
            wdur.add_metric(values, stats.work_duration.buckets(), stats.work_duration.sum)
            ages = [now - start for q in live for start in list(q.processing_started())]
            unfinished.add_metric(values, sum(ages))
            longest.add_metric(values, max(ages, default=0.0))
        yield from (depth, adds, qdur, wdur, unfinished, longest, retries)


REGISTRY.register(_WorkQueueCollector())


def generate_latest() -> bytes:
    """Render the default registry in the Prometheus text format."""
    return prometheus_client.generate_latest(REGISTRY)


__all__ = [
    "ACTIVE_WORKERS",
    "CONTENT_TYPE_LATEST",
    "LEADER_ELECTION_MASTER_STATUS",
    "MAX_CONCURRENT_RECONCILES",
    "RECONCILE_ERRORS",
    "RECONCILE_PANICS",
    "RECONCILE_TIME",
    "RECONCILE_TOTAL",
    "REGISTRY",
    "REST_CLIENT_REQUESTS",
    "TERMINAL_RECONCILE_ERRORS",
    "FastHistogram",
    "QueueStats",
    "generate_latest",
    "init_controller_metrics",
    "queue_stats",
]
