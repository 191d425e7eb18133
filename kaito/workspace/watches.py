"""What the workspace controller watches and how: resources, cache indexes, event filters, transforms.

Shared by the phases (:mod:`~kaito.workspace.noderequests`, :mod:`~kaito.workspace.workload`, ...) that
read the informer caches, and by :func:`kaito.workspace.reconciler.register` that creates them.
"""

from __future__ import annotations

from kaito.api.workspace import GROUP, LABEL_WORKSPACE_NAME, LABEL_WORKSPACE_NAMESPACE
from kaito.runtime.informer import strip_managed_fields
from kaito.runtime.kube import Obj, Resource
from kaito.workspace import nodes as nd

WORKSPACES = Resource(GROUP, "v1alpha1", "workspaces", True, "Workspace")
CHILD_SELECTOR = LABEL_WORKSPACE_NAME  # every child carries it: informers watch only those

NODE_LABEL_INDEX = "label-pair"
WS_MATCH_LABEL_INDEX = "match-label"
MACHINE_WS_INDEX = "workspace"
POD_WS_INDEX = "workspace"


def label_pairs(obj: Obj) -> list[str]:
    """Index: every ``key=value`` label of an object (Nodes, by what a workspace's selector names)."""
    return [f"{k}={v}" for k, v in ((obj.get("metadata") or {}).get("labels") or {}).items()]


def ws_match_pairs(obj: Obj) -> list[str]:
    """Index: every ``key=value`` of a workspace's ``resource.labelSelector.matchLabels``."""
    resource = obj.get("resource") or {}
    labels = (resource.get("labelSelector") or {}).get("matchLabels") or {}
    return [f"{k}={v}" for k, v in labels.items()]


def machine_ws_key(obj: Obj) -> list[str]:
    """Index: the ``namespace/name`` key of the workspace a (cluster-scoped) node request is labelled for."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    ns, name = labels.get(LABEL_WORKSPACE_NAMESPACE), labels.get(LABEL_WORKSPACE_NAME)
    return [f"{ns}/{name}"] if ns and name else []


def pod_ws_key(obj: Obj) -> list[str]:
    """Index: the ``namespace/name`` key of the workspace a pod belongs to."""
    meta = obj.get("metadata") or {}
    name = (meta.get("labels") or {}).get(LABEL_WORKSPACE_NAME)
    return [f"{meta.get('namespace')}/{name}"] if name else []


def workspace_predicate(old: Obj | None, new: Obj) -> bool:
    """Workspace events worth a reconcile: adds, spec (generation), annotations, labels, deletion,
    finalizers. Our own status writes do not re-trigger."""
    if old is None:
        return True
    om, nm = old.get("metadata") or {}, new.get("metadata") or {}
    return any(
        om.get(k) != nm.get(k)
        for k in ("generation", "annotations", "labels", "deletionTimestamp", "finalizers")
    )


def node_predicate(old: Obj | None, new: Obj) -> bool:
    """Node events that can change a selection: add, labels, readiness, deletion, GPU count (not heartbeats)."""
    if old is None:
        return True
    return (
        nd.node_labels(old) != nd.node_labels(new)
        or nd.node_ready(old) != nd.node_ready(new)
        or (old.get("metadata") or {}).get("deletionTimestamp")
        != (new.get("metadata") or {}).get("deletionTimestamp")
        or nd.node_gpus(old) != nd.node_gpus(new)
    )


def slim_child(obj: Obj) -> Obj:
    """Informer transform for the children: drop what the reconciler never reads from its cache.

    It reads children's metadata (spec hash, ownerReferences, resourceVersion) and status, a pod's
    node, and nothing of pod templates or ConfigMap data: updates send the desired spec, never the
    cached one. Cached as decoded Python objects, the templates were most of the controller's memory
    at 1,000 workspaces (a Deployment's template alone is ~30 KB of dicts and strings).
    """
    obj = strip_managed_fields(obj)
    kind = obj.get("kind")
    spec = obj.get("spec")
    if kind == "Pod":
        node = spec.get("nodeName") if isinstance(spec, dict) else None
        obj["spec"] = {"nodeName": node} if node else {}
    elif kind == "ConfigMap":
        obj.pop("data", None)
        obj.pop("binaryData", None)
    elif isinstance(spec, dict):
        spec.pop("template", None)  # Deployment, StatefulSet, Job
    return obj
