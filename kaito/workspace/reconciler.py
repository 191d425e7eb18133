"""The Workspace reconciler: the short sequence of phases one reconcile runs.

One reconcile reads the informer caches, makes the few writes that are needed and returns; it never
waits for a Machine or a pod (SPEC §5). Progress arrives as watch events (Machines, Nodes, Pods,
Deployments, ...) that re-enqueue the workspace; a not-ready workspace is also looked at again after
``not_ready_requeue`` seconds as a safety net. Writes are minimal: children are compared by the
:data:`~kaito.workspace.manifests.ANNOTATION_SPEC_HASH` annotation, status by content, the finalizer
only when missing.

Phases (upstream §3.2 without its blocking waits), one module each:

1. finalization (:mod:`~kaito.workspace.finalization`): a deleting workspace's node requests are
   deleted, then its finalizer removed; the finalizer ``workspace.finalizer.kaito.sh`` is added right
   before the first node request is created; requests of a workspace that is gone are reaped;
2. nodes (:mod:`~kaito.workspace.noderequests`): qualifying nodes, Machines or NodeClaims for the
   missing ones (``machine`` mode; ``byo`` never creates any and says which nodes are missing), surplus
   requests released, ``status.workerNodes``;
3. inference workload (:mod:`~kaito.workspace.workload`): Services, ConfigMap, Deployment or
   StatefulSet (created, or updated when the hash moved);
4. status (:mod:`~kaito.workspace.statuswriter`): conditions, ``state`` with a typed reason from what
   Pods and node requests report, Events on transitions -- written only when it changed.

Tuning workspaces share steps 1-2, then get the training ConfigMap and the Job
(:mod:`~kaito.workspace.tuningjob`), created once and never re-created or updated: a finished Job is
the workspace's result. Status comes from the Job: JobStarted, WorkspaceSucceeded (mirrored by
WorkspaceReady), state Running/Succeeded/Failed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from kaito.api.meta import describe_validation_error
from kaito.api.workspace import LABEL_WORKSPACE_NAME, LABEL_WORKSPACE_NAMESPACE, Workspace
from kaito.machine import NODE_APIS, encoding_for
from kaito.machine.interface import NodeRequestEncoding
from kaito.presets.registry import Preset, PresetRegistry, UnknownPresetError
from kaito.presets.skus import SkuCatalog
from kaito.runtime.controller import DONE, Controller, Result, label_mapper, owner_mapper
from kaito.runtime.informer import Informer
from kaito.runtime.kube import (
    CONFIGMAPS,
    DEPLOYMENTS,
    JOBS,
    NODES,
    PODS,
    SERVICES,
    STATEFULSETS,
    KubeClient,
    Obj,
)
from kaito.runtime.manager import Manager
from kaito.workspace import events as ev
from kaito.workspace import manifests as mf
from kaito.workspace import nodes as nd
from kaito.workspace import status as st
from kaito.workspace.adopt import ChildConflict
from kaito.workspace.finalization import Finalization, ensure_finalizer
from kaito.workspace.noderequests import NodeRequests
from kaito.workspace.statuswriter import StatusWriter
from kaito.workspace.tuningjob import TuningJobs, finished
from kaito.workspace.watches import (
    CHILD_SELECTOR,
    MACHINE_WS_INDEX,
    NODE_LABEL_INDEX,
    POD_WS_INDEX,
    WORKSPACES,
    WS_MATCH_LABEL_INDEX,
    label_pairs,
    machine_ws_key,
    node_predicate,
    pod_ws_key,
    slim_child,
    workspace_predicate,
    ws_match_pairs,
)
from kaito.workspace.workload import InferenceWorkload

__all__ = [
    "PROVISIONING_MODES",
    "WORKSPACES",
    "ChildConflict",
    "ReconcilerOptions",
    "WorkspaceReconciler",
    "node_predicate",
    "register",
    "slim_child",
    "workspace_predicate",
]

PROVISIONING_MODES = ("machine", "byo")


@dataclass
class ReconcilerOptions:
    """Behaviour switches (command-line flags)."""

    provisioning: str = "machine"
    # Which karpenter kind requests the missing nodes (kaito.machine.NODE_APIS): Machine (v1alpha5,
    # the seed's era) or NodeClaim (v1, upstream Kaito v0.4.2+ and gpu-provisioner v0.3+).
    node_api: str = "machine"
    cloud_provider: str | None = "azure"  # NodeClaims add a cloud-specific SKU requirement on Azure
    # Node APIs migrated away from (e.g. ("machine",) with node_api "nodeclaim"): their objects are
    # watched too, never created; each is released once the workload runs without its node, and
    # deleted with its workspace.
    migrate_from: tuple[str, ...] = ()
    manifests: mf.ManifestOptions = field(default_factory=mf.ManifestOptions)
    machine_deletion_timeout: float = 300.0
    not_ready_requeue: float = 60.0
    deletion_requeue: float = 5.0
    # --enable-tuning. Off for a bare process (the flag's default); the shipped manifests and Helm chart
    # turn it on and their role grants batch/jobs. When off, the webhook refuses new tuning workspaces
    # (kaito.webhook.validation.AdmissionPolicy.tuning_enabled); any that exist only get the finalizer
    # and the deletion path.
    tuning: bool = False


class WorkspaceReconciler:
    """See the module docstring. Build it with :func:`register` (which also creates the informers)."""

    def __init__(
        self,
        client: KubeClient,
        *,
        workspaces: Informer,
        nodes: Informer,
        machines: Informer | None,
        deployments: Informer,
        statefulsets: Informer,
        services: Informer,
        configmaps: Informer,
        pods: Informer,
        registry: PresetRegistry,
        skus: SkuCatalog,
        options: ReconcilerOptions | None = None,
        encoding: NodeRequestEncoding | None = None,
        recorder: ev.EventRecorder | None = None,
        jobs: Informer | None = None,
        legacy: Sequence[tuple[NodeRequestEncoding, Informer]] = (),
    ) -> None:
        self.client = client
        self.workspaces = workspaces
        self.machines = machines  # the node-request informer (its kind: ``encoding``)
        self.jobs = jobs
        self.registry = registry
        self.options = options or ReconcilerOptions()
        if self.options.provisioning not in PROVISIONING_MODES:
            raise ValueError(f"provisioning must be one of {PROVISIONING_MODES}")
        if self.options.node_api not in NODE_APIS or not set(self.options.migrate_from) <= set(NODE_APIS):
            raise ValueError(f"node_api and migrate_from must be among {NODE_APIS}")
        self.encoding: NodeRequestEncoding = encoding or encoding_for(
            self.options.node_api, cloud_provider=self.options.cloud_provider
        )
        self.recorder = recorder or ev.EventRecorder(client)
        self.status = StatusWriter(client, self.recorder)
        self.node_requests = NodeRequests(
            client,
            nodes=nodes,
            requests=machines,
            pods=pods,
            encoding=self.encoding,
            recorder=self.recorder,
            byo=self.options.provisioning == "byo",
            before_create=functools.partial(ensure_finalizer, client),
            legacy=legacy,
        )
        self.workload = InferenceWorkload(
            client,
            deployments=deployments,
            statefulsets=statefulsets,
            services=services,
            configmaps=configmaps,
            pods=pods,
            skus=skus,
            manifests=self.options.manifests,
        )
        self.tuning = (
            TuningJobs(client, jobs=jobs, pods=pods, skus=skus, manifests=self.options.manifests)
            if jobs is not None
            else None
        )
        self.finalization = Finalization(
            client,
            requests=self.node_requests,
            status=self.status,
            recorder=self.recorder,
            deletion_timeout=self.options.machine_deletion_timeout,
            deletion_requeue=self.options.deletion_requeue,
            on_released=self._forget,
        )

    def _forget(self, key: str) -> None:
        self.status.forget(key)
        self.workload.forget(key)

    def _machines_of(self, key: str) -> list[Obj]:
        """The workspace's node requests in the cache (for tests and diagnostics)."""
        return self.node_requests.cached(key)

    def _observation(self, ws: Workspace, *, tuning: bool = False) -> st.Observation:
        return st.Observation(
            generation=int(ws.metadata.generation or 0),
            machines=self.options.provisioning == "machine",
            request_kind=self.encoding.resource.kind,
            tuning_mode=tuning,
        )

    # ------------------------------------------------------------------------------------- entry

    async def reconcile(self, key: str) -> Result:
        """Reconcile one workspace key (``namespace/name``)."""
        raw = self.workspaces.store.get(key)
        if raw is None:
            self._forget(key)
            return await self.finalization.reap_orphans(key)
        try:
            ws = Workspace.model_validate(raw)
        except ValidationError as e:
            # The CRD schema should make this impossible; say so on the object instead of retrying.
            await self.recorder.event(
                raw, "Warning", "InvalidSpec", f"workspace cannot be read: {describe_validation_error(e)}"
            )
            return DONE
        if (raw.get("metadata") or {}).get("deletionTimestamp"):
            t0 = time.monotonic()
            try:
                return await self.finalization.finalize(key, raw)
            finally:
                ev.RECONCILE_STEP.labels("finalize").observe(time.monotonic() - t0)
        if ws.tuning is not None and self.tuning is not None:
            return await self._reconcile_tuning(key, raw, ws, self.tuning)
        if ws.inference is None:
            # Tuning with Jobs disabled: the finalizer makes sure any Machines labelled for the
            # workspace are deleted with it.
            await ensure_finalizer(self.client, ws)
            return DONE
        return await self._reconcile_inference(key, raw, ws)

    async def _reconcile_inference(self, key: str, raw: Obj, ws: Workspace) -> Result:
        """Nodes, then (on them) the inference workload, then status."""
        obs = self._observation(ws)
        assert ws.inference is not None
        preset: Preset | None = None
        if ws.inference.preset is not None:
            try:
                preset = self.registry.get(ws.inference.preset.name)
            except UnknownPresetError as e:
                obs.spec_error = st.StepOutcome(st.Phase.FAILED, "UnknownPreset", str(e))
                await self.status.write(key, raw, obs)
                return DONE

        t0 = time.monotonic()
        placement = await self.node_requests.place(key, ws, preset)
        ev.RECONCILE_STEP.labels("resources").observe(time.monotonic() - t0)
        obs.resource, obs.machines_pending = placement.outcome, placement.pending
        if placement.outcome.phase == st.Phase.READY:
            obs.worker_nodes = placement.workers
            t0 = time.monotonic()
            try:
                obs.inference = await self.workload.ensure(key, ws, preset, placement.workers, placement.gpus)
            except mf.ManifestError as e:
                obs.spec_error = st.StepOutcome(st.Phase.FAILED, e.reason, e.message)
            ev.RECONCILE_STEP.labels("workload").observe(time.monotonic() - t0)
        t0 = time.monotonic()
        await self.status.write(key, raw, obs)
        ev.RECONCILE_STEP.labels("status").observe(time.monotonic() - t0)
        if obs.spec_error is not None:
            return DONE  # nothing to retry until the spec changes (which re-enqueues)
        if (
            placement.outcome.phase == st.Phase.READY
            and obs.inference is not None
            and obs.inference.phase == st.Phase.READY
        ):
            return DONE
        return Result(requeue_after=self.options.not_ready_requeue)

    async def _reconcile_tuning(self, key: str, raw: Obj, ws: Workspace, jobs: TuningJobs) -> Result:
        """Nodes (until the Job exists), training ConfigMap and Job, then status read from the Job."""
        assert ws.tuning is not None
        ns, name = str(ws.metadata.namespace), str(ws.metadata.name)
        obs = self._observation(ws, tuning=True)
        try:
            preset = self.registry.get(ws.tuning.preset.name)
        except UnknownPresetError as e:
            obs.spec_error = st.StepOutcome(st.Phase.FAILED, "UnknownPreset", str(e))
            await self.status.write(key, raw, obs)
            return DONE
        job = jobs.current(ns, name)
        if job is None and finished(raw):
            # The Job finished and was removed since (by hand, or a TTL): its result stays the
            # workspace's; running it again would cost GPU hours nobody asked for.
            return DONE
        if job is None:
            # Nodes are only needed to place the Job: once it exists (running or finished) nothing is
            # provisioned again, so a finished workspace never gets new Machines or a second Job.
            placement = await self.node_requests.place(key, ws, preset)
            obs.resource, obs.machines_pending = placement.outcome, placement.pending
            if placement.outcome.phase == st.Phase.READY:
                obs.worker_nodes = placement.workers
                try:
                    job = await jobs.ensure(ws, preset, placement.workers, placement.gpus)
                except mf.ManifestError as e:
                    obs.spec_error = st.StepOutcome(st.Phase.FAILED, e.reason, e.message)
                except ChildConflict as e:
                    obs.spec_error = st.StepOutcome(st.Phase.FAILED, "ChildConflict", str(e))
        if job is not None:
            obs.tuning = jobs.outcome(key, job, ws.tuning.output.image_push_secret)
        await self.status.write(key, raw, obs)
        if obs.tuning is not None and obs.tuning.phase != st.Phase.PENDING:
            return DONE  # finished: the Job is the result and is never re-created
        if obs.spec_error is not None and obs.spec_error.reason != "ConfigMapNotFound":
            return DONE  # nothing to retry until the spec changes (which re-enqueues)
        # A user ConfigMap created later carries no label we watch: look again after a while.
        return Result(requeue_after=self.options.not_ready_requeue)


# ------------------------------------------------------------------------------------------- wiring


def register(
    mgr: Manager,
    client: KubeClient,
    *,
    registry: PresetRegistry,
    skus: SkuCatalog,
    options: ReconcilerOptions | None = None,
    workers: int = 5,
    namespace: str | None = None,
) -> tuple[WorkspaceReconciler, Controller]:
    """Create the informers, the reconciler and its controller on ``mgr``.

    Child informers watch only objects labelled ``kaito.sh/workspace`` (every child carries it), so
    the cache holds the operator's objects, not the whole cluster's.
    """
    options = options or ReconcilerOptions()
    workspaces = mgr.informer(
        WORKSPACES, namespace=namespace, indexers={WS_MATCH_LABEL_INDEX: ws_match_pairs}
    )
    nodes = mgr.informer(NODES, indexers={NODE_LABEL_INDEX: label_pairs})
    encoding = encoding_for(options.node_api, cloud_provider=options.cloud_provider)
    machine_inf = mgr.informer(encoding.resource, indexers={MACHINE_WS_INDEX: machine_ws_key})
    legacy = [
        (enc, mgr.informer(enc.resource, indexers={MACHINE_WS_INDEX: machine_ws_key}))
        for enc in (encoding_for(api) for api in options.migrate_from if api != options.node_api)
    ]
    children = {
        res: mgr.informer(res, namespace=namespace, label_selector=CHILD_SELECTOR, transform=slim_child)
        for res in (DEPLOYMENTS, STATEFULSETS, SERVICES, CONFIGMAPS)
    }
    jobs = (
        mgr.informer(JOBS, namespace=namespace, label_selector=CHILD_SELECTOR, transform=slim_child)
        if options.tuning
        else None
    )
    pods = mgr.informer(
        PODS,
        namespace=namespace,
        label_selector=CHILD_SELECTOR,
        indexers={POD_WS_INDEX: pod_ws_key},
        transform=slim_child,
    )
    rec = WorkspaceReconciler(
        client,
        workspaces=workspaces,
        nodes=nodes,
        machines=machine_inf,
        deployments=children[DEPLOYMENTS],
        statefulsets=children[STATEFULSETS],
        services=children[SERVICES],
        configmaps=children[CONFIGMAPS],
        pods=pods,
        registry=registry,
        skus=skus,
        options=options,
        encoding=encoding,
        jobs=jobs,
        legacy=legacy,
    )
    ctrl = mgr.add_controller("workspace", rec.reconcile, workers=workers)
    ctrl.watch(workspaces, predicate=workspace_predicate)
    owner = owner_mapper(WORKSPACES.kind, WORKSPACES.group)
    for inf in children.values():
        ctrl.watch(inf, owner)
    if jobs is not None:
        ctrl.watch(jobs, owner)
    ctrl.watch(pods, label_mapper(LABEL_WORKSPACE_NAME))
    ctrl.watch(machine_inf, label_mapper(LABEL_WORKSPACE_NAME, LABEL_WORKSPACE_NAMESPACE))
    for _, inf in legacy:
        ctrl.watch(inf, label_mapper(LABEL_WORKSPACE_NAME, LABEL_WORKSPACE_NAMESPACE))

    def node_to_workspaces(node: Obj) -> list[str]:
        keys: set[str] = set()
        labels = nd.node_labels(node)
        for pair in label_pairs(node):
            for ws in workspaces.store.by_index(WS_MATCH_LABEL_INDEX, pair):
                want = ((ws.get("resource") or {}).get("labelSelector") or {}).get("matchLabels") or {}
                if all(labels.get(k) == v for k, v in want.items()):
                    meta = ws.get("metadata") or {}
                    keys.add(f"{meta.get('namespace')}/{meta.get('name')}")
        return sorted(keys)

    ctrl.watch(nodes, node_to_workspaces, predicate=node_predicate)
    ev.WORKSPACE_COUNT.source = workspaces.store.list
    return rec, ctrl
