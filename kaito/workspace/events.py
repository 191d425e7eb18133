"""Kubernetes Events for workspaces (core/v1), and the workspace metrics.

Events are written only on transitions (the reconciler decides), so an idle operator writes none.
A failing Event write is logged and dropped: Events are best-effort, as in client-go's recorder.
Messages are truncated to 1 KiB and never include secret values (they are built from conditions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kaito.api.conditions import ConditionType, WorkspaceState
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
# States in which a workspace does what it was asked to (serving, tuning or done tuning).
HEALTHY_STATES = frozenset({WorkspaceState.READY, WorkspaceState.RUNNING, WorkspaceState.SUCCEEDED})

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


def _unix_time(raw: Any) -> float | None:
    if not isinstance(raw, str) or not raw:
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def not_ready_since(ws: Mapping[str, Any]) -> float | None:
    """Unix time since which a workspace has not been in a healthy state; None when it is healthy.

    Being deleted: its deletionTimestamp. Otherwise the last transition of its WorkspaceSucceeded
    condition (when it stopped succeeding), or its creation when it never had that condition.
    """
    meta = ws.get("metadata") or {}
    deleting = _unix_time(meta.get("deletionTimestamp"))
    if deleting is not None:
        return deleting
    status = ws.get("status") or {}
    if status.get("state") in HEALTHY_STATES:
        return None
    for c in status.get("conditions") or ():
        if isinstance(c, Mapping) and c.get("type") == ConditionType.WORKSPACE_SUCCEEDED:
            since = _unix_time(c.get("lastTransitionTime"))
            if since is not None:
                return since
    return _unix_time(meta.get("creationTimestamp"))


class WorkspaceCountCollector(Collector):
    """``kaito_workspace_count{state}`` and ``kaito_workspace_not_ready_since_timestamp_seconds``,
    computed at scrape time from the informer cache (no timer task).

    The second has one series per workspace that is not Ready/Running/Succeeded (Pending, NotReady,
    Failed, Deleting, or no status yet), labelled ``workspace_namespace``, ``workspace_name`` and
    ``state`` (not ``namespace``: Prometheus gives that label to the scraped pod's namespace); its
    value is :func:`not_ready_since`, so ``time() - x`` is how long it has not been ready (the
    KaitoWorkspaceNotReady alert in config/prometheus/alerts.yaml). Every replica with a cache reports
    it: alerts take the max over replicas.
    """

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[Obj]] | None = None

    def collect(self) -> Iterator[Metric]:
        """Count cached workspaces by ``status.state`` (``Unknown`` before the first status write)."""
        family = GaugeMetricFamily(
            "kaito_workspace_count", "Number of workspaces by state.", labels=["state"]
        )
        not_ready = GaugeMetricFamily(
            "kaito_workspace_not_ready_since_timestamp_seconds",
            "Unix time since which a workspace has not been Ready, Running or Succeeded.",
            labels=["workspace_namespace", "workspace_name", "state"],
        )
        counts = dict.fromkeys(STATES, 0)
        if self.source is not None:
            for ws in self.source():
                state = (ws.get("status") or {}).get("state") or "Unknown"
                counts[state] = counts.get(state, 0) + 1
                since = not_ready_since(ws)
                if since is not None:
                    meta = ws.get("metadata") or {}
                    labels = [str(meta.get("namespace") or ""), str(meta.get("name") or ""), state]
                    not_ready.add_metric(labels, since)
        for state, n in counts.items():
            family.add_metric([state], n)
        yield family
        yield not_ready


WORKSPACE_COUNT = WorkspaceCountCollector()
runtime_metrics.REGISTRY.register(WORKSPACE_COUNT)
