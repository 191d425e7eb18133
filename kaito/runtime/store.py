"""The informer's cache: objects by ``namespace/name`` key, plus secondary indexes.

Like client-go's ``ThreadSafeStore``, but for one event loop: every method is synchronous, so a
mutation is atomic with respect to other tasks. Objects are stored by reference and replaced, never
changed in place, so a handler holding the old version keeps seeing the old version; callers must
:func:`kaito.runtime.kube.deepcopy` an object before changing it.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Mapping

from kaito.runtime.kube import Obj, object_key, resource_version, split_key

Indexer = Callable[[Obj], Iterable[str]]

NAMESPACE_INDEX = "namespace"
OWNER_UID_INDEX = "owner-uid"


def namespace_indexer(obj: Obj) -> list[str]:
    """Index by ``metadata.namespace`` (cluster-scoped objects are not indexed)."""
    ns = (obj.get("metadata") or {}).get("namespace")
    return [ns] if ns else []


def label_indexer(label: str) -> Indexer:
    """Index by the value of label ``label`` (objects without it are not indexed)."""

    def index(obj: Obj) -> list[str]:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        value = labels.get(label)
        return [value] if value is not None else []

    return index


def owner_uid_indexer(obj: Obj) -> list[str]:
    """Index by the UID of every ownerReference."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return [str(r["uid"]) for r in refs if r.get("uid")]


def owner_indexer(kind: str, api_group: str | None = None, *, controller_only: bool = False) -> Indexer:
    """Index by the ``namespace/name`` key of owners of ``kind`` (optionally only the controller ref).

    The owner is assumed to live in the object's namespace (owner references cannot cross namespaces).
    """

    def index(obj: Obj) -> list[str]:
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace")
        out: list[str] = []
        for ref in meta.get("ownerReferences") or []:
            if ref.get("kind") != kind:
                continue
            if api_group is not None and str(ref.get("apiVersion", "")).rpartition("/")[0] != api_group:
                continue
            if controller_only and not ref.get("controller"):
                continue
            out.append(f"{ns}/{ref['name']}" if ns else str(ref["name"]))
        return out

    return index


class Store:
    """Key -> object map with named indexes (``index name -> value -> keys``)."""

    def __init__(self, indexers: Mapping[str, Indexer] | None = None) -> None:
        self._items: dict[str, Obj] = {}
        self._indexers: dict[str, Indexer] = {NAMESPACE_INDEX: namespace_indexer}
        self._indices: dict[str, dict[str, set[str]]] = {NAMESPACE_INDEX: {}}
        # key -> index name -> values the object was indexed under (to un-index exactly).
        self._indexed: dict[str, dict[str, list[str]]] = {}
        for name, fn in (indexers or {}).items():
            self.add_indexer(name, fn)

    # ----------------------------------------------------------------------------------------- reads

    def get(self, key: str) -> Obj | None:
        """The cached object for ``key`` (read-only!), or ``None``."""
        return self._items.get(key)

    def get_by_name(self, name: str, namespace: str | None = None) -> Obj | None:
        """The cached object by namespace and name."""
        return self._items.get(f"{namespace}/{name}" if namespace else name)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[str]:
        """All keys."""
        return list(self._items)

    def list(self, namespace: str | None = None) -> builtins.list[Obj]:
        """All objects, or those of one namespace."""
        if namespace is None:
            return list(self._items.values())
        return self.by_index(NAMESPACE_INDEX, namespace)

    def index_keys(self, index: str, value: str) -> builtins.list[str]:
        """Keys of the objects indexed under ``value`` in ``index``."""
        if index not in self._indices:
            raise KeyError(f"no index named {index!r}")
        return sorted(self._indices[index].get(value, ()))

    def by_index(self, index: str, value: str) -> builtins.list[Obj]:
        """Objects indexed under ``value`` in ``index``."""
        return [self._items[k] for k in self.index_keys(index, value)]

    def index_values(self, index: str) -> builtins.list[str]:
        """All values that have at least one object in ``index``."""
        return [v for v, keys in self._indices[index].items() if keys]

    # ------------------------------------------------------------------------------------- indexing

    def index_names(self) -> builtins.list[str]:
        """Names of the indexes."""
        return builtins.list(self._indexers)

    def add_indexer(self, name: str, fn: Indexer) -> None:
        """Add an index; existing objects are indexed at once."""
        if name in self._indexers:
            raise ValueError(f"index {name!r} already exists")
        self._indexers[name] = fn
        self._indices[name] = {}
        for key, obj in self._items.items():
            self._index_one(key, obj, name, fn)

    def _index_one(self, key: str, obj: Obj, name: str, fn: Indexer) -> None:
        values = list(dict.fromkeys(fn(obj)))
        self._indexed.setdefault(key, {})[name] = values
        idx = self._indices[name]
        for v in values:
            idx.setdefault(v, set()).add(key)

    def _unindex(self, key: str) -> None:
        for name, values in self._indexed.pop(key, {}).items():
            idx = self._indices[name]
            for v in values:
                keys = idx.get(v)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del idx[v]

    # ------------------------------------------------------------------------------------ mutations

    def upsert(self, obj: Obj) -> Obj | None:
        """Store ``obj`` (replacing the reference) and return the previous version, if any."""
        key = object_key(obj)
        old = self._items.get(key)
        if old is not None:
            self._unindex(key)
        self._items[key] = obj
        for name, fn in self._indexers.items():
            self._index_one(key, obj, name, fn)
        return old

    def delete(self, key: str) -> Obj | None:
        """Remove ``key`` and return the last known version, if any."""
        old = self._items.pop(key, None)
        if old is not None:
            self._unindex(key)
        return old

    def replace(
        self, objs: Iterable[Obj]
    ) -> tuple[builtins.list[tuple[Obj | None, Obj]], builtins.list[Obj]]:
        """Make the store hold exactly ``objs`` (a relist).

        Returns ``(changes, deleted)``: ``changes`` holds ``(old, new)`` for objects that are new
        (``old is None``) or whose resourceVersion changed; ``deleted`` holds the last known version of
        every key that is no longer present (client-go's ``Replace`` deletes).
        """
        seen: set[str] = set()
        changes: builtins.list[tuple[Obj | None, Obj]] = []
        for obj in objs:
            key = object_key(obj)
            seen.add(key)
            old = self._items.get(key)
            if old is not None and resource_version(old) == resource_version(obj):
                continue
            self.upsert(obj)
            changes.append((old, obj))
        deleted = [self._items[k] for k in list(self._items) if k not in seen]
        for obj in deleted:
            self.delete(object_key(obj))
        return changes, deleted


def key_namespace(key: str) -> str | None:
    """The namespace part of a store key (``None`` for cluster-scoped keys)."""
    return split_key(key)[0]


__all__ = [
    "NAMESPACE_INDEX",
    "OWNER_UID_INDEX",
    "Indexer",
    "Store",
    "key_namespace",
    "label_indexer",
    "namespace_indexer",
    "owner_indexer",
    "owner_uid_indexer",
]
