"""kaito-controller flags, and the event filters that keep the controller from reconciling on noise."""

from __future__ import annotations

from typing import Any

import pytest

from kaito.cmd import _hostport, parse_args
from kaito.workspace.reconciler import node_predicate, workspace_predicate


def test_flags_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRESET_REGISTRY_NAME", raising=False)
    monkeypatch.delenv("KAITO_PROVISIONING", raising=False)
    args = parse_args([])
    assert (args.workers, args.provisioning, args.webhook, args.leader_elect) == (5, "machine", True, False)
    assert args.image_registry == "mcr.microsoft.com/aks/kaito"
    args = parse_args(
        [
            "--provisioning",
            "byo",
            "--no-webhook",
            "--image-registry",
            "my.io/kaito",
            "--leader-elect",
            "--workers",
            "9",
        ]
    )
    assert (args.provisioning, args.webhook, args.image_registry, args.leader_elect, args.workers) == (
        "byo",
        False,
        "my.io/kaito",
        True,
        9,
    )
    monkeypatch.setenv("PRESET_REGISTRY_NAME", "env.io/r")
    assert parse_args([]).image_registry == "env.io/r"
    with pytest.raises(SystemExit):
        parse_args(["--provisioning", "nodeclaim"])


def test_hostport() -> None:
    assert _hostport(":8080") == ("0.0.0.0", 8080)
    assert _hostport("127.0.0.1:9") == ("127.0.0.1", 9)
    assert _hostport("0") == ("0.0.0.0", None)


def ws(**meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": "w", "generation": 1, **meta}, "status": {"state": "Pending"}}


def test_workspace_predicate_ignores_status_only_updates() -> None:
    old = ws()
    assert workspace_predicate(None, old)
    assert not workspace_predicate(old, {**old, "status": {"state": "Ready"}})
    assert workspace_predicate(old, ws(generation=2))
    assert workspace_predicate(old, ws(annotations={"kaito.sh/enablelb": "True"}))
    assert workspace_predicate(old, ws(deletionTimestamp="2026-01-01T00:00:00Z"))


def node(ready: str = "True", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "n", "labels": labels},
        "status": {"conditions": [{"type": "Ready", "status": ready, "lastHeartbeatTime": "t1"}]},
    }


def test_node_predicate_ignores_heartbeats() -> None:
    old = node(apps="a")
    beat = node(apps="a")
    beat["status"]["conditions"][0]["lastHeartbeatTime"] = "t2"
    assert not node_predicate(old, beat)
    assert node_predicate(old, node("False", apps="a"))
    assert node_predicate(old, node(apps="b"))
    assert node_predicate(None, old)


def test_children_are_cached_without_what_the_reconciler_never_reads() -> None:
    from kaito.workspace.reconciler import slim_child

    pod = {
        "kind": "Pod",
        "metadata": {"name": "p", "managedFields": [{"manager": "x"}], "labels": {"a": "b"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}], "volumes": []},
        "status": {"phase": "Running", "containerStatuses": [{"name": "c", "ready": True}]},
    }
    slim = slim_child(pod)
    assert slim["spec"] == {"nodeName": "n1"}
    assert slim["status"]["containerStatuses"][0]["ready"] is True
    assert "managedFields" not in slim["metadata"] and slim["metadata"]["labels"] == {"a": "b"}
    assert slim_child({"kind": "Pod", "metadata": {}, "spec": {"containers": []}})["spec"] == {}

    dep = {
        "kind": "Deployment",
        "metadata": {"annotations": {"kaito.sh/spec-hash": "h"}},
        "spec": {"replicas": 1, "template": {"spec": {"containers": []}}},
        "status": {"readyReplicas": 1},
    }
    assert slim_child(dep)["spec"] == {"replicas": 1}
    assert slim_child(dep)["metadata"]["annotations"] == {"kaito.sh/spec-hash": "h"}

    cm = {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v" * 1000}}
    assert slim_child(cm) == {"kind": "ConfigMap", "metadata": {"name": "c"}}
