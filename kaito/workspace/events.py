"""Kubernetes Events for workspaces (core/v1), and the workspace metrics.

Events are written only on transitions (the reconciler decides), so an idle operator writes none.
A failing Event write is logged and dropped: Events are best-effort, as in client-go's recorder.
Messages are truncated to 1 KiB and never include secret values (they are built from conditions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kaito.api.conditions import WorkspaceState
from kaito.runtime import events as runtime_events
from kaito.runtime import metrics as runtime_metrics
from kaito.runtime.kube import KubeClient

log = structlog.get_logger("kaito.workspace.events")

Obj = dict[str, Any]
COMPONENT = "kaito-workspace-controller"


class EventRecorder(runtime_events.EventRecorder):
    """Events about Workspaces, reported by the workspace controller."""

    def __init__(self, client: KubeClient, component: str = COMPONENT) -> None:
        super().__init__(client, component, api_version="kaito.sh/v1alpha1", kind="Workspace")


# ------------------------------------------------------------------------------------------ metrics

STATES = (*tuple(s.value for s in WorkspaceState), "Unknown")

CHILD_WRITES = Counter(
    "kaito_workspace_child_writes_total",
    "Writes of workspace children by kind and operation (create, update, delete).",
    ["kind", "operation"],
)
STATUS_WRITES = Counter(
    "kaito_workspace_status_writes_total", "Workspace status subresource writes (only on change)."
)
MACHINE_OPS = Counter(
    "kaito_machine_operations_total",
    "Machine operations by the workspace controller: created, adopted, deleted.",
    ["operation"],
)
RECONCILE_STEP = Histogram(
    "kaito_workspace_reconcile_step_seconds",
    "Time per workspace reconcile step (resources, workload, status, finalize).",
    ["step"],
    buckets=runtime_metrics.RECONCILE_TIME_BUCKETS,
)


class WorkspaceCountCollector(Collector):
    """``kaito_workspace_count{state}`` computed at scrape time from the informer cache (no timer task)."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[Obj]] | None = None

    def collect(self) -> Iterator[Metric]:
        """Count cached workspaces by ``status.state`` (``Unknown`` before the first status write)."""
        family = GaugeMetricFamily(
            "kaito_workspace_count", "Number of workspaces by state.", labels=["state"]
        )
        counts = dict.fromkeys(STATES, 0)
        if self.source is not None:
            for ws in self.source():
                state = (ws.get("status") or {}).get("state") or "Unknown"
                counts[state] = counts.get(state, 0) + 1
        for state, n in counts.items():
            family.add_metric([state], n)
        yield family


WORKSPACE_COUNT = WorkspaceCountCollector()
runtime_metrics.REGISTRY.register(WORKSPACE_COUNT)
