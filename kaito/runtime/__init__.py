"""Controller machinery shared by the workspace controller and the gpu-provisioner.

Hand-written informers feeding a rate-limited, level-triggered work queue, client-go/controller-runtime
semantics throughout. Start with :class:`Manager` (``manager.py``); the pieces are usable on their own.
"""

from kaito.runtime.controller import (
    DONE,
    Controller,
    ReconcileError,
    Result,
    TerminalError,
    generation_changed,
    label_mapper,
    owner_mapper,
    resource_version_changed,
)
from kaito.runtime.informer import EventHandler, Informer
from kaito.runtime.kube import ApiError, KubeClient, Obj, Resource, deepcopy, object_key, split_key
from kaito.runtime.leader_election import LeaderElectionConfig, LeaderElector
from kaito.runtime.manager import LeaderElectionLost, Manager, ManagerOptions
from kaito.runtime.store import Store, label_indexer, owner_indexer, owner_uid_indexer
from kaito.runtime.workqueue import WorkQueue

__all__ = [
    "DONE",
    "ApiError",
    "Controller",
    "EventHandler",
    "Informer",
    "KubeClient",
    "LeaderElectionConfig",
    "LeaderElectionLost",
    "LeaderElector",
    "Manager",
    "ManagerOptions",
    "Obj",
    "ReconcileError",
    "Resource",
    "Result",
    "Store",
    "TerminalError",
    "WorkQueue",
    "deepcopy",
    "generation_changed",
    "label_indexer",
    "label_mapper",
    "object_key",
    "owner_indexer",
    "owner_mapper",
    "owner_uid_indexer",
    "resource_version_changed",
    "split_key",
]
