"""Store: keys, indexes (namespace, label, owner), replace (relist) semantics, no in-place mutation."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kaito.runtime.store import (
    NAMESPACE_INDEX,
    Store,
    label_indexer,
    owner_indexer,
    owner_uid_indexer,
)


def obj(
    name: str,
    ns: str | None = "ns",
    rv: str = "1",
    labels: dict[str, str] | None = None,
    owners: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "resourceVersion": rv, "labels": labels or {}}
    if ns:
        meta["namespace"] = ns
    if owners:
        meta["ownerReferences"] = owners
    return {"metadata": meta}


def test_keys_and_lookup() -> None:
    s = Store()
    s.upsert(obj("a"))
    s.upsert(obj("node-1", ns=None))
    assert sorted(s.keys()) == ["node-1", "ns/a"]
    assert s.get("ns/a") is not None and s.get_by_name("a", "ns") is s.get("ns/a")
    assert s.get_by_name("node-1") is s.get("node-1")
    assert len(s.list("ns")) == 1 and len(s.list()) == 2
    assert s.delete("ns/a") is not None and s.delete("ns/a") is None


def test_indexes_follow_updates_and_deletes() -> None:
    s = Store({"app": label_indexer("app"), "owner": owner_uid_indexer})
    s.upsert(obj("a", labels={"app": "x"}, owners=[{"uid": "u1", "kind": "W", "name": "w"}]))
    s.upsert(obj("b", labels={"app": "x"}))
    s.upsert(obj("c", ns="other", labels={"app": "y"}))
    assert s.index_keys("app", "x") == ["ns/a", "ns/b"]
    assert s.index_keys("owner", "u1") == ["ns/a"]
    assert s.index_keys(NAMESPACE_INDEX, "other") == ["other/c"]
    # Relabel "a": it must leave the old index value.
    s.upsert(obj("a", rv="2", labels={"app": "y"}))
    assert s.index_keys("app", "x") == ["ns/b"]
    assert s.index_keys("app", "y") == ["ns/a", "other/c"]
    assert s.index_keys("owner", "u1") == []
    s.delete("other/c")
    assert s.index_keys("app", "y") == ["ns/a"]
    assert sorted(s.index_values("app")) == ["x", "y"]
    with pytest.raises(KeyError):
        s.index_keys("nope", "x")


def test_owner_indexer_and_late_indexer() -> None:
    s = Store()
    s.upsert(
        obj(
            "dep",
            owners=[
                {"kind": "Workspace", "name": "ws", "apiVersion": "kaito.sh/v1alpha1", "controller": True}
            ],
        )
    )
    s.add_indexer("ws", owner_indexer("Workspace", "kaito.sh", controller_only=True))
    assert s.index_keys("ws", "ns/ws") == ["ns/dep"]
    with pytest.raises(ValueError):
        s.add_indexer("ws", owner_uid_indexer)


def test_replace_reports_changes_and_vanished_keys() -> None:
    s = Store({"app": label_indexer("app")})
    for o in [obj("keep"), obj("change"), obj("gone", labels={"app": "x"})]:
        s.upsert(o)
    changes, deleted = s.replace([obj("keep"), obj("change", rv="2"), obj("new")])
    assert sorted((old is None, new["metadata"]["name"]) for old, new in changes) == [
        (False, "change"),
        (True, "new"),
    ]
    assert [d["metadata"]["name"] for d in deleted] == ["gone"]
    assert sorted(s.keys()) == ["ns/change", "ns/keep", "ns/new"]
    assert s.index_keys("app", "x") == []


def test_store_never_mutates_objects() -> None:
    s = Store({"app": label_indexer("app")})
    first = obj("a", labels={"app": "x"})
    snapshot = copy.deepcopy(first)
    s.upsert(first)
    second = obj("a", rv="2", labels={"app": "y"})
    old = s.upsert(second)
    assert old is first and first == snapshot, "the old version is handed back unchanged"
    s.replace([obj("b")])
    assert first == snapshot and second["metadata"]["labels"] == {"app": "y"}
