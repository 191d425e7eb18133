"""Wire the lifecycle controller and the garbage collector into a :class:`kaito.runtime.Manager`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kaito.runtime.controller import Controller, resource_version_changed
from kaito.runtime.kube import NODES, Obj
from kaito.runtime.manager import Manager
from provisioner import machine_fields as mf
from provisioner import metrics
from provisioner.cloud.base import CloudProvider
from provisioner.gc import InstanceGarbageCollector
from provisioner.lifecycle.reconciler import (
    MACHINES,
    LifecycleOptions,
    MachineLifecycle,
    machine_for_node,
    node_indexers,
)

CONTROLLER_NAME = "machine-lifecycle"


@dataclass
class Provisioner:
    """The pieces :func:`add_provisioner` registered (for tests and diagnostics)."""

    lifecycle: MachineLifecycle
    controller: Controller
    gc: InstanceGarbageCollector | None
    metrics_handle: object


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
) -> Provisioner:
    """Register the Machine/Node informers, the lifecycle controller and (unless ``gc_interval`` is None)
    the leader-only orphan sweep. ``machine_selector`` limits which Machines this provisioner serves."""
    options = options or LifecycleOptions()
    machines = mgr.informer(MACHINES, label_selector=machine_selector)
    nodes = mgr.informer(NODES, indexers=dict(node_indexers()))
    lifecycle = MachineLifecycle(
        mgr.client, cloud, machines.store, nodes.store, gpu_count=gpu_count, options=options
    )
    controller = mgr.add_controller(
        CONTROLLER_NAME,
        lifecycle.reconcile,
        workers=workers,
        for_=MACHINES,
        label_selector=machine_selector,
        predicate=_kaito_machine,
    )
    # A Node appearing, turning Ready or getting its GPUs wakes the Machine it belongs to.
    controller.watch(nodes, machine_for_node, predicate=resource_version_changed)
    gc: InstanceGarbageCollector | None = None
    if gc_interval is not None:
        gc = InstanceGarbageCollector(
            mgr.client, cloud, interval=gc_interval, grace=gc_grace, cloud_call_wait=options.cloud_call_wait
        )
        mgr.add_runnable("instance-gc", gc.run, needs_leader=True)
    # Only the leader reports phases, so summing the gauge over replicas counts each Machine once.
    handle = metrics.track_machines(lambda: machines.store.list() if mgr.is_leader else [])
    return Provisioner(lifecycle, controller, gc, handle)
