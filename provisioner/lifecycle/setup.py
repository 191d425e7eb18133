"""Wire the lifecycle controllers and the garbage collector into a :class:`kaito.runtime.Manager`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kaito.runtime.controller import Controller, resource_version_changed
from kaito.runtime.kube import NODES, Obj
from kaito.runtime.manager import Manager
from provisioner import machine_fields as mf
from provisioner import metrics
from provisioner.cloud.base import CloudProvider
from provisioner.gc import InstanceGarbageCollector
from provisioner.lifecycle.kinds import MACHINE, RequestKind
from provisioner.lifecycle.reconciler import (
    LifecycleOptions,
    MachineLifecycle,
    machine_for_node,
    node_indexers,
)

CONTROLLER_NAME = "machine-lifecycle"
"""The Machine controller's name; other kinds' controllers are ``<kind>-lifecycle``."""


@dataclass
class Provisioner:
    """The pieces :func:`add_provisioner` registered (for tests and diagnostics).

    ``lifecycle``/``controller`` are the first kind's; ``lifecycles``/``controllers`` hold every kind's.
    """

    lifecycle: MachineLifecycle
    controller: Controller
    gc: InstanceGarbageCollector | None
    metrics_handle: object
    lifecycles: dict[str, MachineLifecycle]
    controllers: dict[str, Controller]


def _kaito_machine(old: Obj | None, new: Obj) -> bool:
    # Only Kaito's Machines, and only real changes (periodic relists re-deliver identical objects).
    return mf.is_kaito_machine(new) and resource_version_changed(old, new)


def add_provisioner(
    mgr: Manager,
    cloud: CloudProvider,
    *,
    gpu_count: Callable[[str], int] | None = None,
    options: LifecycleOptions | None = None,
    workers: int = 10,
    machine_selector: str | None = None,
    gc_interval: float | None = 120.0,
    gc_grace: float = 30.0,
    kinds: Sequence[RequestKind] = (MACHINE,),
) -> Provisioner:
    """Register, per served kind (Machine, NodeClaim), its informer and lifecycle controller; the Node
    informer; and (unless ``gc_interval`` is None) the leader-only orphan sweep, which considers both
    kinds whichever are served. ``machine_selector`` limits which objects this provisioner serves."""
    if not kinds:
        raise ValueError("serve at least one node-request kind")
    options = options or LifecycleOptions()
    nodes = mgr.informer(NODES, indexers=dict(node_indexers()))
    lifecycles: dict[str, MachineLifecycle] = {}
    controllers: dict[str, Controller] = {}
    stores = []
    for kind in kinds:
        informer = mgr.informer(kind.resource, label_selector=machine_selector)
        stores.append(informer.store)
        lifecycle = MachineLifecycle(
            mgr.client, cloud, informer.store, nodes.store, gpu_count=gpu_count, options=options, kind=kind
        )
        controller = mgr.add_controller(
            CONTROLLER_NAME if kind is MACHINE else f"{kind.flag}-lifecycle",
            lifecycle.reconcile,
            workers=workers,
            for_=kind.resource,
            label_selector=machine_selector,
            predicate=_kaito_machine,
        )
        # A Node appearing, turning Ready or getting its GPUs wakes the object it belongs to (the
        # other kind's controller finds no object of that name and stops there).
        controller.watch(nodes, machine_for_node, predicate=resource_version_changed)
        lifecycles[kind.flag] = lifecycle
        controllers[kind.flag] = controller
    gc: InstanceGarbageCollector | None = None
    if gc_interval is not None:
        gc = InstanceGarbageCollector(
            mgr.client, cloud, interval=gc_interval, grace=gc_grace, cloud_call_wait=options.cloud_call_wait
        )
        mgr.add_runnable("instance-gc", gc.run, needs_leader=True)
    # Only the leader reports phases, so summing the gauge over replicas counts each object once.
    handle = metrics.track_machines(
        lambda: [obj for store in stores for obj in store.list()] if mgr.is_leader else []
    )
    first = kinds[0].flag
    return Provisioner(lifecycles[first], controllers[first], gc, handle, lifecycles, controllers)
