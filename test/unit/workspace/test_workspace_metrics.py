"""The workspace gauges computed from the cache at scrape time (what the alerting rules read)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from kaito.workspace.events import WorkspaceCountCollector

CREATED, FAILED_AT, DELETED = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"


def ws(name: str, state: str | None, succeeded: str | None = None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": "team-a", "name": name, "creationTimestamp": CREATED}
    if deleting:
        meta["deletionTimestamp"] = DELETED
    status: dict[str, Any] = {}
    if state:
        status["state"] = state
    if succeeded:
        status["conditions"] = [
            {"type": "WorkspaceSucceeded", "status": succeeded, "lastTransitionTime": FAILED_AT}
        ]
    return {"metadata": meta, "status": status}


def test_not_ready_since_names_each_unhealthy_workspace_and_when_it_became_so() -> None:
    workspaces = [
        ws("new", None),
        ws("pending", "Pending"),
        ws("broke", "NotReady", succeeded="False"),
        ws("serving", "Ready", succeeded="True"),
        ws("tuning", "Running", succeeded="Unknown"),
        ws("tuned", "Succeeded", succeeded="True"),
        ws("failed", "Failed", succeeded="False"),
        ws("going", "Deleting", succeeded="True", deleting=True),
    ]
    collector = WorkspaceCountCollector()
    collector.source = lambda: workspaces
    registry = CollectorRegistry()
    registry.register(collector)

    def since(name: str, state: str) -> float | None:
        labels = {"workspace_namespace": "team-a", "workspace_name": name, "state": state}
        return registry.get_sample_value("kaito_workspace_not_ready_since_timestamp_seconds", labels)

    assert since("new", "Unknown") == 1767225600.0  # no status yet: since creation
    assert since("pending", "Pending") == 1767225600.0
    assert since("broke", "NotReady") == 1767312000.0  # since WorkspaceSucceeded turned False
    assert since("failed", "Failed") == 1767312000.0
    assert since("going", "Deleting") == 1767398400.0  # since the deletion request
    series = [
        s
        for m in registry.collect()
        if m.name == "kaito_workspace_not_ready_since_timestamp_seconds"
        for s in m.samples
    ]
    assert {s.labels["workspace_name"] for s in series} == {"new", "pending", "broke", "failed", "going"}
    assert registry.get_sample_value("kaito_workspace_count", {"state": "Ready"}) == 1
    assert registry.get_sample_value("kaito_workspace_count", {"state": "Unknown"}) == 1
