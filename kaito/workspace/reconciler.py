"""The Workspace reconciler (inference path): nodes, Machines, workload, status, deletion.

One reconcile reads the informer caches, makes the few writes that are needed and returns; it never
waits for a Machine or a pod (SPEC §5). Progress arrives as watch events (Machines, Nodes, Pods,
Deployments, ...) that re-enqueue the workspace; a not-ready workspace is also looked at again after
``not_ready_requeue`` seconds as a safety net. Writes are minimal: children are compared by the
:data:`~kaito.workspace.manifests.ANNOTATION_SPEC_HASH` annotation, status by content, the finalizer
only when missing.

Steps (upstream §3.2 without its blocking waits):

1. a deleting workspace goes to :meth:`_finalize`; the finalizer ``workspace.finalizer.kaito.sh`` is
   added right before the first Machine is created (namespaced children need none: they carry
   ownerReferences);
2. resources: qualifying nodes, Machines for the missing ones (``machine`` mode; ``byo`` never creates
   any and says which nodes are missing), ``status.workerNodes``;
3. inference: Services, ConfigMap, Deployment or StatefulSet (created, or updated when the hash moved);
4. status: conditions, ``state`` with a typed reason from what Pods and Machines report, Events on
   transitions -- written only when it changed.

Tuning workspaces (:mod:`kaito.workspace.tuning`) share steps 1-2, then get the training ConfigMap
(the method's default template, copied into the namespace when absent) and the Job, created once and
never re-created or updated: a finished Job is the workspace's result. Status comes from the Job:
JobStarted, WorkspaceSucceeded (mirrored by WorkspaceReady), state Running/Succeeded/Failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from pydantic import ValidationError

from kaito.api.conditions import StateReason
from kaito.api.workspace import (
    FINALIZER,
    GROUP,
    LABEL_WORKSPACE_NAME,
    LABEL_WORKSPACE_NAMESPACE,
    Workspace,
)
from kaito.machine.interface import NodeRequest, NodeRequestEncoding, RequestPhase
from kaito.machine.machine import MachineEncoding
from kaito.presets.registry import Preset, PresetRegistry, UnknownPresetError
from kaito.presets.skus import SkuCatalog
from kaito.runtime.controller import DONE, Controller, Result, label_mapper, owner_mapper
from kaito.runtime.informer import Informer, strip_managed_fields
from kaito.runtime.kube import (
    CONFIGMAPS,
    DEPLOYMENTS,
    JOBS,
    NODES,
    PODS,
    SERVICES,
    STATEFULSETS,
    ApiError,
    KubeClient,
    Obj,
    Resource,
    deepcopy,
    split_key,
)
from kaito.runtime.manager import Manager
from kaito.workspace import events as ev
from kaito.workspace import manifests as mf
from kaito.workspace import nodes as nd
from kaito.workspace import status as st
from kaito.workspace import tuning as tn

log = structlog.get_logger("kaito.workspace")

WORKSPACES = Resource(GROUP, "v1alpha1", "workspaces", True, "Workspace")
CHILD_SELECTOR = LABEL_WORKSPACE_NAME  # every child carries it: informers watch only those

NODE_LABEL_INDEX = "label-pair"
WS_MATCH_LABEL_INDEX = "match-label"
MACHINE_WS_INDEX = "workspace"
POD_WS_INDEX = "workspace"

PROVISIONING_MODES = ("machine", "byo")

QUOTA_REASONS = frozenset({"QuotaExceeded"})
SKU_REASONS = frozenset({"SkuUnavailable", "SKUUnavailable", "InsufficientCapacity"})


@dataclass
class ReconcilerOptions:
    """Behaviour switches (command-line flags)."""

    provisioning: str = "machine"
    manifests: mf.ManifestOptions = field(default_factory=mf.ManifestOptions)
    machine_deletion_timeout: float = 300.0
    not_ready_requeue: float = 60.0
    deletion_requeue: float = 5.0
    # Tuning Jobs need batch/jobs permissions the installed RBAC does not grant yet: off by default,
    # tuning workspaces then only get the finalizer and the deletion path.
    tuning: bool = False


# ------------------------------------------------------------------------------------ index helpers


def _label_pairs(obj: Obj) -> list[str]:
    return [f"{k}={v}" for k, v in ((obj.get("metadata") or {}).get("labels") or {}).items()]


def _ws_match_pairs(obj: Obj) -> list[str]:
    resource = obj.get("resource") or {}
    labels = (resource.get("labelSelector") or {}).get("matchLabels") or {}
    return [f"{k}={v}" for k, v in labels.items()]


def _machine_ws_key(obj: Obj) -> list[str]:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    ns, name = labels.get(LABEL_WORKSPACE_NAMESPACE), labels.get(LABEL_WORKSPACE_NAME)
    return [f"{ns}/{name}"] if ns and name else []


def _pod_ws_key(obj: Obj) -> list[str]:
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


def _rv_int(rv: str | None) -> int | None:
    try:
        return int(rv) if rv else None
    except ValueError:
        return None


def _parse_time(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _tuning_finished(raw: Obj) -> bool:
    """Whether the status reports a tuning Job that started and ended (Succeeded or Failed)."""
    status = raw.get("status") or {}
    started = st.condition_status(status, "JobStarted") == "True"
    return started and status.get("state") in ("Succeeded", "Failed")


class ChildConflict(Exception):
    """A child's name is taken by an object the workspace does not own."""


@dataclass(frozen=True)
class _Applied:
    """What the last successful apply of a workspace's children was built from and wrote.

    A reconcile whose inputs (``fingerprint``, ``preset``) are unchanged and whose children still carry
    the written spec hashes in the cache skips building the manifests: most reconciles are triggered by
    pod and Deployment status events, and building (YAML, hashing) was half of their CPU at scale.
    """

    fingerprint: tuple[Any, ...]
    preset: Preset | None
    children: tuple[tuple[str, str, str], ...]  # (kind, name, spec hash)
    kind: str


# ----------------------------------------------------------------------------------------- reconciler


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
    ) -> None:
        self.client = client
        self.workspaces = workspaces
        self.nodes = nodes
        self.machines = machines
        self.deployments = deployments
        self.statefulsets = statefulsets
        self.services = services
        self.configmaps = configmaps
        self.pods = pods
        self.jobs = jobs
        self.registry = registry
        self.skus = skus
        self.options = options or ReconcilerOptions()
        if self.options.provisioning not in PROVISIONING_MODES:
            raise ValueError(f"provisioning must be one of {PROVISIONING_MODES}")
        self.encoding: NodeRequestEncoding = encoding or MachineEncoding()
        self.recorder = recorder or ev.EventRecorder(client)
        # Last status written per key, with the resourceVersion the write returned: a reconcile that
        # runs before the watch delivers our own write must not write (and announce) the same again.
        self._written: dict[str, tuple[int | None, Obj]] = {}
        self._applied: dict[str, _Applied] = {}

    # ------------------------------------------------------------------------------------- entry

    async def reconcile(self, key: str) -> Result:
        """Reconcile one workspace key (``namespace/name``)."""
        raw = self.workspaces.store.get(key)
        if raw is None:
            self._written.pop(key, None)
            self._applied.pop(key, None)
            return await self._reap_orphans(key)
        try:
            ws = Workspace.model_validate(raw)
        except ValidationError as e:
            # The CRD schema should make this impossible; say so on the object instead of retrying.
            await self.recorder.event(raw, "Warning", "InvalidSpec", f"workspace cannot be read: {e}")
            return DONE
        if (raw.get("metadata") or {}).get("deletionTimestamp"):
            t0 = time.monotonic()
            try:
                return await self._finalize(key, raw)
            finally:
                ev.RECONCILE_STEP.labels("finalize").observe(time.monotonic() - t0)
        if ws.tuning is not None and self.jobs is not None:
            return await self._reconcile_tuning(key, raw, ws)
        if ws.inference is None:
            # Tuning with Jobs disabled: the finalizer makes sure any Machines labelled for the
            # workspace are deleted with it.
            await self._ensure_finalizer(ws)
            return DONE
        return await self._reconcile_inference(key, raw, ws)

    # ------------------------------------------------------------------------------------ finalizer

    async def _ensure_finalizer(self, ws: Workspace) -> None:
        """Add ``workspace.finalizer.kaito.sh`` unless present (before the first Machine exists).

        Only cluster-scoped Machines need it: namespaced children carry ownerReferences and go with the
        workspace through garbage collection, so a workspace that never needed a Machine (existing
        nodes, ``byo``) carries no finalizer, costs no extra write and is deleted at once. The patch is
        conditional on the resourceVersion, so a workspace deleted meanwhile gets no Machine (save for
        an apiserver race that can drop the finalizer; :meth:`_reap_orphans` covers it).
        """
        finalizers = list(ws.metadata.finalizers or [])
        if FINALIZER in finalizers:
            return
        finalizers.append(FINALIZER)
        await self.client.patch(
            WORKSPACES,
            str(ws.metadata.name),
            {"metadata": {"finalizers": finalizers, "resourceVersion": ws.metadata.resource_version}},
            ws.metadata.namespace,
        )
        ws.metadata.finalizers = finalizers  # our parsed copy, not the cache

    async def _finalize(self, key: str, raw: Obj) -> Result:
        """Delete the workspace's Machines, then drop the finalizer (children go by ownerReference).

        Machines are waited for (their deletion removes Nodes and cloud pools) for at most
        ``machine_deletion_timeout`` seconds after the workspace's deletionTimestamp; past that the
        finalizer is removed anyway and a Warning Event names the Machines left behind.
        """
        meta = raw["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if FINALIZER not in (meta.get("finalizers") or []):
            return DONE
        await self._write_status(
            key, raw, st.Observation(generation=int(meta.get("generation") or 0), deleting=True)
        )
        remaining: list[str] = []
        for m in await self._live_machines(ns, name):
            req = self.encoding.observe(m)
            remaining.append(req.name)
            if req.phase != RequestPhase.DELETING and await self._delete_machine(req.name):
                log.info("machine deleted", machine=req.name)
        if remaining:
            started = _parse_time(meta.get("deletionTimestamp")) or time.time()
            waited = time.time() - started
            if waited < self.options.machine_deletion_timeout:
                return Result(requeue_after=self.options.deletion_requeue)
            await self.recorder.event(
                raw,
                "Warning",
                "MachineDeletionStuck",
                f"machines {', '.join(sorted(remaining))} still exist {int(waited)}s after deletion started; "
                "removing the finalizer anyway -- check the gpu-provisioner",
            )
        finalizers = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
        try:
            await self.client.patch(
                WORKSPACES,
                name,
                {"metadata": {"finalizers": finalizers, "resourceVersion": meta.get("resourceVersion")}},
                ns,
            )
        except ApiError as e:
            if e.not_found:
                return DONE
            raise
        self._written.pop(key, None)
        self._applied.pop(key, None)
        log.info("finalizer removed", machines_left=len(remaining))
        return DONE

    # ------------------------------------------------------------------------------------ inference

    async def _reconcile_inference(self, key: str, raw: Obj, ws: Workspace) -> Result:
        generation = int(ws.metadata.generation or 0)
        obs = st.Observation(generation=generation, machines=self.options.provisioning == "machine")
        assert ws.inference is not None
        preset: Preset | None = None
        if ws.inference.preset is not None:
            try:
                preset = self.registry.get(ws.inference.preset.name)
            except UnknownPresetError as e:
                obs.spec_error = st.StepOutcome(st.Phase.FAILED, "UnknownPreset", str(e))
                await self._write_status(key, raw, obs)
                return DONE

        t0 = time.monotonic()
        resource, workers, worker_gpus = await self._ensure_resources(key, ws, preset, obs)
        ev.RECONCILE_STEP.labels("resources").observe(time.monotonic() - t0)
        obs.resource = resource
        if resource.phase == st.Phase.READY:
            obs.worker_nodes = workers
            t0 = time.monotonic()
            try:
                obs.inference = await self._ensure_inference(key, ws, preset, workers, worker_gpus)
            except mf.ManifestError as e:
                obs.spec_error = st.StepOutcome(st.Phase.FAILED, e.reason, e.message)
            ev.RECONCILE_STEP.labels("workload").observe(time.monotonic() - t0)
        t0 = time.monotonic()
        await self._write_status(key, raw, obs)
        ev.RECONCILE_STEP.labels("status").observe(time.monotonic() - t0)
        if obs.spec_error is not None:
            return DONE  # nothing to retry until the spec changes (which re-enqueues)
        if (
            resource.phase == st.Phase.READY
            and obs.inference is not None
            and obs.inference.phase == st.Phase.READY
        ):
            return DONE
        return Result(requeue_after=self.options.not_ready_requeue)

    # --------------------------------------------------------------------------------------- tuning

    async def _reconcile_tuning(self, key: str, raw: Obj, ws: Workspace) -> Result:
        """Nodes (until the Job exists), training ConfigMap and Job, then status read from the Job."""
        assert ws.tuning is not None
        ns, name = str(ws.metadata.namespace), str(ws.metadata.name)
        obs = st.Observation(
            generation=int(ws.metadata.generation or 0),
            machines=self.options.provisioning == "machine",
            tuning_mode=True,
        )
        try:
            preset = self.registry.get(ws.tuning.preset.name)
        except UnknownPresetError as e:
            obs.spec_error = st.StepOutcome(st.Phase.FAILED, "UnknownPreset", str(e))
            await self._write_status(key, raw, obs)
            return DONE
        job = self.jobs.store.get_by_name(name, ns) if self.jobs is not None else None
        if job is None and _tuning_finished(raw):
            # The Job finished and was removed since (by hand, or a TTL): its result stays the
            # workspace's; running it again would cost GPU hours nobody asked for.
            return DONE
        if job is None:
            # Nodes are only needed to place the Job: once it exists (running or finished) nothing is
            # provisioned again, so a finished workspace never gets new Machines or a second Job.
            resource, workers, worker_gpus = await self._ensure_resources(key, ws, preset, obs)
            obs.resource = resource
            if resource.phase == st.Phase.READY:
                obs.worker_nodes = workers
                try:
                    job = await self._ensure_job(ws, preset, workers, worker_gpus)
                except mf.ManifestError as e:
                    obs.spec_error = st.StepOutcome(st.Phase.FAILED, e.reason, e.message)
                except ChildConflict as e:
                    obs.spec_error = st.StepOutcome(st.Phase.FAILED, "ChildConflict", str(e))
        if job is not None:
            pods = self.pods.store.by_index(POD_WS_INDEX, key)
            obs.tuning = tn.job_outcome(job, pods, ws.tuning.output.image_push_secret)
        await self._write_status(key, raw, obs)
        if obs.tuning is not None and obs.tuning.phase != st.Phase.PENDING:
            return DONE  # finished: the Job is the result and is never re-created
        if obs.spec_error is not None and obs.spec_error.reason != "ConfigMapNotFound":
            return DONE  # nothing to retry until the spec changes (which re-enqueues)
        # A user ConfigMap created later carries no label we watch: look again after a while.
        return Result(requeue_after=self.options.not_ready_requeue)

    async def _ensure_job(
        self, ws: Workspace, preset: Preset, workers: list[str], worker_gpus: list[int]
    ) -> Obj:
        """Training ConfigMap, then the Job (adopted when it already exists and is ours)."""
        assert ws.tuning is not None
        ns, name = str(ws.metadata.namespace), str(ws.metadata.name)
        sku = self.skus.get(ws.resource.instance_type)
        desired = tn.build_job(
            ws, preset, self.options.manifests, sku=sku, nodes=workers, node_gpus=worker_gpus
        )
        cm_name = tn.config_name(ws)
        cm = await self.client.get_or_none(CONFIGMAPS, cm_name, ns)
        default_cm = tn.build_default_config(ws)
        if cm is None and default_cm is not None:
            try:
                await self.client.create(CONFIGMAPS, default_cm, ns)
                ev.CHILD_WRITES.labels("ConfigMap", "create").inc()
                log.info("child created", kind="ConfigMap", child=cm_name)
            except ApiError as e:
                if not e.already_exists:
                    raise
                # Another workspace created it meanwhile: become an owner of that one below.
                cm = await self.client.get_or_none(CONFIGMAPS, cm_name, ns)
        if cm is not None and default_cm is not None:
            # Shared by the namespace's tuning workspaces: deleting the one that created it must not
            # take it from the others (a Job retrying its pod needs it mounted).
            patch = tn.owner_patch(ws, cm)
            if patch is not None:
                await self.client.patch(CONFIGMAPS, cm_name, patch, ns)
                ev.CHILD_WRITES.labels("ConfigMap", "update").inc()
                log.info("shared ConfigMap owner added", child=cm_name)
        missing = default_cm is None if cm is None else tn.TRAINING_CONFIG_KEY not in (cm.get("data") or {})
        if missing:
            raise mf.ManifestError(
                "ConfigMapNotFound",
                f"tuning.config: ConfigMap {cm_name} with key {tn.TRAINING_CONFIG_KEY} "
                f"not found in namespace {ns}",
            )
        try:
            created = await self.client.create(JOBS, desired, ns)
            ev.CHILD_WRITES.labels("Job", "create").inc()
            log.info("child created", kind="Job", child=name)
            return created
        except ApiError as e:
            if not e.already_exists:
                raise
        # The cache is behind our own earlier create, or someone else's Job has the name.
        existing = await self.client.get_or_none(JOBS, name, ns)
        refs = ((existing or {}).get("metadata") or {}).get("ownerReferences") or []
        if existing is None or not any(r.get("uid") == ws.metadata.uid for r in refs):
            raise ChildConflict(
                f"Job {ns}/{name} already exists and does not belong to this workspace; delete or rename it"
            )
        return existing

    # ------------------------------------------------------------------------------------ resources

    def _machines_of(self, key: str) -> list[Obj]:
        if self.machines is None:
            return []
        return self.machines.store.by_index(MACHINE_WS_INDEX, key)

    async def _delete_machine(self, name: str) -> bool:
        """Ask for a Machine's deletion; False when it was already gone."""
        try:
            await self.client.delete(self.encoding.resource, name)
        except ApiError as e:
            if e.not_found:
                return False
            raise
        ev.MACHINE_OPS.labels("deleted").inc()
        return True

    async def _reap_orphans(self, key: str) -> Result:
        """Delete Machines labelled for a workspace that no longer exists.

        The finalizer should make this impossible, but the apiserver can lose it: a DELETE racing the
        patch that adds it removes the workspace anyway (kubernetes/kubernetes#77988), after which
        the Machine created on the strength of that patch has no owner and its GPU node would run
        forever. Such a Machine's own watch event brings us here. The workspace is looked up live
        first: one re-created under the same name may just not be in the cache yet.
        """
        orphans = [
            m for m in self._machines_of(key) if not (m.get("metadata") or {}).get("deletionTimestamp")
        ]
        if not orphans:
            return DONE
        ns, name = split_key(key)
        if await self.client.get_or_none(WORKSPACES, name, ns) is not None:
            return DONE
        for m in orphans:
            mname = str((m.get("metadata") or {}).get("name"))
            if not await self._delete_machine(mname):
                continue
            log.warning(
                "orphaned machine deleted: its workspace no longer exists", machine=mname, workspace=key
            )
        return DONE

    async def _live_machines(self, namespace: str, name: str) -> list[Obj]:
        """The workspace's Machines as the apiserver has them now (a consistent LIST, not the cache).

        The finalizer is removed on this answer: the cache can lag behind a Machine this controller
        created a moment ago (a workspace deleted right after creation), and trusting it would leave
        that Machine -- and its GPU node -- without an owner forever.
        """
        if self.machines is None:
            return []
        selector = f"{LABEL_WORKSPACE_NAME}={name},{LABEL_WORKSPACE_NAMESPACE}={namespace}"
        return await self.client.list_all(self.encoding.resource, label_selector=selector)

    def _candidate_nodes(self, match_labels: Mapping[str, str]) -> list[Obj]:
        if not match_labels:
            return []
        k = sorted(match_labels)[0]
        return self.nodes.store.by_index(NODE_LABEL_INDEX, f"{k}={match_labels[k]}")

    async def _ensure_resources(
        self, key: str, ws: Workspace, preset: Preset | None, obs: st.Observation
    ) -> tuple[st.StepOutcome, list[str], list[int]]:
        ns, name = str(ws.metadata.namespace), str(ws.metadata.name)
        count = ws.resource.count
        itype = ws.resource.instance_type
        labels = ws.resource.label_selector.as_map()
        preferred = list(ws.resource.preferred_nodes or [])
        current = list((ws.status.worker_nodes if ws.status is not None else None) or [])
        if not labels:
            return (
                st.StepOutcome(
                    st.Phase.FAILED,
                    StateReason.NODES_MISSING,
                    "resource.labelSelector.matchLabels is empty; GPU nodes are selected by matchLabels",
                ),
                [],
                [],
            )
        candidates = self._candidate_nodes(labels)
        qualifying = nd.qualifying_nodes(candidates, labels, itype, preferred, current, owner=(ns, name))
        if self.options.provisioning == "byo":
            selected = qualifying[:count]
            workers = [nd.node_name(n) for n in selected]
            gpus = [nd.node_gpus(n) for n in selected]
            if len(selected) >= count:
                return st.StepOutcome(st.Phase.READY), workers, gpus
            return self._byo_missing(ws, candidates, labels, itype, preferred, len(selected)), workers, gpus

        # machine mode: Machines for the nodes that existing (non-Machine) nodes cannot cover.
        requests = [self.encoding.observe(m) for m in self._machines_of(key)]
        # A node our Machine made (its copied labels say so) is never "existing": while its Machine is
        # being deleted the node lingers Ready for a while and must not stand in for a Machine.
        own = {nd.node_name(n) for n in qualifying if nd.provisioned_for(n) == (ns, name)}
        machine_nodes = {r.node_name for r in requests if r.node_name} | own
        external = [n for n in qualifying if nd.node_name(n) not in machine_nodes]
        needed = max(0, count - len(external))
        wanted_names = {self.encoding.name_for(ns, name, s) for s in range(needed)}
        # Nodes of Machines beyond the slots still needed (preferredNodes or other existing nodes now
        # cover them) or already going are chosen last: the workload moves off them and the Machines
        # are released below.
        staying = {
            r.node_name
            for r in requests
            if r.node_name and r.name in wanted_names and r.phase != RequestPhase.DELETING
        }
        leaving = machine_nodes - staying
        if leaving:
            pref = frozenset(preferred)
            qualifying = sorted(
                qualifying, key=lambda n: nd.node_name(n) in leaving and nd.node_name(n) not in pref
            )
        selected = qualifying[:count]
        workers = [nd.node_name(n) for n in selected]
        gpus = [nd.node_gpus(n) for n in selected]
        by_name = {r.name: r for r in requests}
        storage = preset.disk_storage if preset is not None else "0"
        if ws.tuning is not None and preset is not None and preset.tuning is not None:
            storage = preset.tuning.disk_storage  # the tuning Job's own disk requirement
        for slot in range(needed):
            mname = self.encoding.name_for(ns, name, slot)
            if mname in by_name:
                continue
            await self._ensure_finalizer(ws)
            req = await self._create_machine(ws, slot, itype, labels, storage)
            by_name[req.name] = req
        if len(selected) >= count:
            await self._release_machines(key, ws, requests, wanted_names, workers)
            return st.StepOutcome(st.Phase.READY), workers, gpus
        wanted = [by_name[self.encoding.name_for(ns, name, s)] for s in range(needed)]
        waiting = [r for r in wanted if r.node_name not in set(workers) or r.phase != RequestPhase.READY]
        obs.machines_pending = len(waiting)
        failed = [r for r in waiting if r.phase == RequestPhase.FAILED]
        if failed:
            r = failed[0]
            if r.reason in QUOTA_REASONS:
                reason = StateReason.QUOTA_EXCEEDED
            elif r.reason in SKU_REASONS:
                reason = StateReason.SKU_UNAVAILABLE
            else:
                reason = StateReason.PROVISIONING_FAILED
            return (
                st.StepOutcome(
                    st.Phase.FAILED, reason, f"machine {r.name} failed: {r.reason}: {r.message}".rstrip(": ")
                ),
                workers,
                gpus,
            )
        parts = []
        for r in waiting:
            what = r.message or r.phase.value.lower()
            if r.phase == RequestPhase.READY and r.node_name:
                what = f"node {r.node_name} is not usable yet"
            parts.append(f"{r.name} ({what})")
        msg = f"creating {len(waiting)} machines: " + ", ".join(parts) if parts else "waiting for nodes"
        return st.StepOutcome(st.Phase.PENDING, StateReason.PROVISIONING, msg), workers, gpus

    async def _release_machines(
        self,
        key: str,
        ws: Workspace,
        requests: Sequence[NodeRequest],
        wanted_names: set[str],
        workers: Sequence[str],
    ) -> None:
        """Delete Machines the workspace no longer needs, once none of its pods runs on their node.

        A Machine beyond the slots still needed (the user now prefers existing nodes) would otherwise
        keep an idle GPU node -- and its cloud bill -- until the workspace is deleted. Only a Machine
        whose node is not selected and carries no pod of the workspace goes, so a rollout moving the
        pods keeps serving on the old node until it is done (pods are watched: the reconcile that
        sees the last one leave deletes the Machine).
        """
        surplus = [
            r
            for r in requests
            if r.name not in wanted_names and r.phase != RequestPhase.DELETING and r.node_name not in workers
        ]
        if not surplus:
            return
        busy = {
            str((p.get("spec") or {}).get("nodeName"))
            for p in self.pods.store.by_index(POD_WS_INDEX, key)
            if (p.get("spec") or {}).get("nodeName")
        }
        for r in surplus:
            if r.node_name and r.node_name in busy:
                continue
            if not await self._delete_machine(r.name):
                continue
            log.info("surplus machine deleted", machine=r.name, node=r.node_name)
            await self.recorder.event(
                self._ref(ws),
                "Normal",
                "MachineDeleted",
                f"deleted machine {r.name}"
                + (f" (node {r.node_name})" if r.node_name else "")
                + ": the selected nodes cover the workspace without it",
            )

    def _byo_missing(
        self,
        ws: Workspace,
        candidates: Sequence[Obj],
        labels: Mapping[str, str],
        itype: str,
        preferred: Sequence[str],
        have: int,
    ) -> st.StepOutcome:
        count = ws.resource.count
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        owner = (str(ws.metadata.namespace), str(ws.metadata.name))
        unusable = [
            q for q in (nd.qualify(n, labels, itype, preferred, owner) for n in candidates) if not q.usable
        ]
        detail = "; ".join(f"{q.name}: {q.why}" for q in sorted(unusable, key=lambda q: q.name)[:10])
        missing_pref = [p for p in preferred if self.nodes.store.get(p) is None]
        msg = (
            f"need {count} Ready nodes with labels {selector} and instance type {itype}, found {have}; "
            f"provisioning is byo, so no Machines are created"
        )
        if missing_pref:
            msg += f"; preferred nodes not found: {', '.join(missing_pref)}"
        if detail:
            msg += f"; not usable: {detail}"
        return st.StepOutcome(st.Phase.FAILED, StateReason.NODES_MISSING, msg)

    async def _create_machine(
        self, ws: Workspace, slot: int, itype: str, labels: dict[str, str], storage: str
    ) -> NodeRequest:
        ns, name = str(ws.metadata.namespace), str(ws.metadata.name)
        body = self.encoding.build(
            namespace=ns, workspace=name, slot=slot, instance_type=itype, match_labels=labels, storage=storage
        )
        mname = body["metadata"]["name"]
        try:
            created = await self.client.create(self.encoding.resource, body)
            ev.MACHINE_OPS.labels("created").inc()
            log.info("machine created", machine=mname, slot=slot, instance_type=itype)
            await self.recorder.event(
                self._ref(ws),
                "Normal",
                "MachineCreated",
                f"created machine {mname} ({itype}) for node slot {slot}",
            )
            return self.encoding.observe(created)
        except ApiError as e:
            if not e.already_exists:
                raise
        # A retry, a restart or another replica created it first: adopt it if it is ours.
        existing = await self.client.get_or_none(self.encoding.resource, mname)
        if existing is None:
            return NodeRequest(mname, RequestPhase.PENDING, None, "Provisioning", "machine is being replaced")
        if not self.encoding.belongs_to(existing, ns, name):
            return NodeRequest(
                mname,
                RequestPhase.FAILED,
                None,
                "MachineNameConflict",
                f"machine {mname} exists but belongs to another workspace",
            )
        ev.MACHINE_OPS.labels("adopted").inc()
        return self.encoding.observe(existing)

    @staticmethod
    def _ref(ws: Workspace) -> Obj:
        return {
            "apiVersion": ws.api_version,
            "kind": ws.kind,
            "metadata": {
                "name": ws.metadata.name,
                "namespace": ws.metadata.namespace,
                "uid": ws.metadata.uid,
                "resourceVersion": ws.metadata.resource_version,
            },
        }

    # ------------------------------------------------------------------------------------- workload

    async def _ensure_inference(
        self, key: str, ws: Workspace, preset: Preset | None, workers: list[str], worker_gpus: list[int]
    ) -> st.StepOutcome:
        assert ws.inference is not None
        ns = str(ws.metadata.namespace)
        if ws.inference.config:
            cm = await self.client.get_or_none(CONFIGMAPS, ws.inference.config, ns)
            if cm is None or mf.INFERENCE_CONFIG_KEY not in (cm.get("data") or {}):
                return st.StepOutcome(
                    st.Phase.FAILED,
                    "ConfigMapNotFound",
                    f"inference.config: ConfigMap {ws.inference.config} with key {mf.INFERENCE_CONFIG_KEY} "
                    f"not found in namespace {ns}",
                )
        fingerprint = (
            ws.metadata.uid,
            ws.metadata.generation,  # every field but metadata and status
            tuple(sorted(ws.annotations().items())),
            tuple(sorted((ws.metadata.labels or {}).items())),
            tuple(workers),
            tuple(worker_gpus),
        )
        memo = self._applied.get(key)
        if (
            memo is not None
            and memo.fingerprint == fingerprint
            and memo.preset is preset
            and self._current(memo, ns)
        ):
            kind = memo.kind
        else:
            sku = self.skus.get(ws.resource.instance_type)
            wl = mf.build_inference(
                ws, preset, self.options.manifests, sku=sku, nodes=workers, node_gpus=worker_gpus
            )
            # Independent objects (the pods wait for the ConfigMap by themselves): one round trip, not three.
            try:
                await asyncio.gather(*(self._apply(obj) for obj in wl.objects()))
            except ChildConflict as e:
                self._applied.pop(key, None)
                return st.StepOutcome(st.Phase.FAILED, "ChildConflict", str(e))
            kind = wl.kind
            self._applied[key] = _Applied(
                fingerprint,
                preset,
                tuple(
                    (
                        str(o["kind"]),
                        str(o["metadata"]["name"]),
                        str(o["metadata"]["annotations"][mf.ANNOTATION_SPEC_HASH]),
                    )
                    for o in wl.objects()
                ),
                kind,
            )
        workload_cache = self.deployments if kind == "Deployment" else self.statefulsets
        current = workload_cache.store.get_by_name(str(ws.metadata.name), ns)
        replicas = ws.resource.count
        if current is None:
            return st.StepOutcome(
                st.Phase.PENDING, StateReason.DEPLOYING, f"{kind} {ws.metadata.name} is being created"
            )
        # Ready while enough pods serve, also during a rolling update (surge keeps the old pods serving).
        ready = int((current.get("status") or {}).get("readyReplicas") or 0)
        if ready >= replicas:
            return st.StepOutcome(st.Phase.READY)
        pods = self.pods.store.by_index(POD_WS_INDEX, f"{ns}/{ws.metadata.name}")
        problem = st.pod_problem(pods)
        if problem is not None:
            return st.StepOutcome(st.Phase.FAILED, problem[0], f"{problem[0]}: {problem[1]}")
        for cond in (current.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Progressing" and cond.get("status") == "False":
                return st.StepOutcome(
                    st.Phase.FAILED,
                    str(cond.get("reason") or "ProgressDeadlineExceeded"),
                    f"{kind} {ws.metadata.name} is not progressing: {cond.get('message', '')}",
                )
        return st.StepOutcome(
            st.Phase.PENDING,
            StateReason.DEPLOYING,
            f"{ready}/{replicas} inference pods ready",
        )

    def _current(self, memo: _Applied, namespace: str) -> bool:
        """Whether every child ``memo`` wrote is in the cache with the spec hash it was written with."""
        for kind, name, want in memo.children:
            obj = self._cache_for(kind)[0].store.get_by_name(name, namespace)
            have = ((obj or {}).get("metadata") or {}).get("annotations") or {}
            if have.get(mf.ANNOTATION_SPEC_HASH) != want:
                return False
        return True

    def _cache_for(self, kind: str) -> tuple[Informer, Resource]:
        return {
            "Deployment": (self.deployments, DEPLOYMENTS),
            "StatefulSet": (self.statefulsets, STATEFULSETS),
            "Service": (self.services, SERVICES),
            "ConfigMap": (self.configmaps, CONFIGMAPS),
        }[kind]

    async def _apply(self, desired: Obj) -> bool:
        """Create ``desired`` or update it when its hash moved; True when something was written."""
        kind = str(desired["kind"])
        inf, res = self._cache_for(kind)
        meta = desired["metadata"]
        ns, name = meta["namespace"], meta["name"]
        current = inf.store.get_by_name(name, ns)
        want = meta["annotations"][mf.ANNOTATION_SPEC_HASH]
        if current is None:
            try:
                await self.client.create(res, desired, ns)
                ev.CHILD_WRITES.labels(kind, "create").inc()
                log.info("child created", kind=kind, child=name)
                return True
            except ApiError as e:
                if not e.already_exists:
                    raise
            # Either the cache is behind our own earlier create (its event will follow), or someone
            # else's object has the name: never take that one over.
            existing = await self.client.get_or_none(res, name, ns)
            owner_uid = desired["metadata"]["ownerReferences"][0]["uid"]
            refs = ((existing or {}).get("metadata") or {}).get("ownerReferences") or []
            if existing is not None and not any(r.get("uid") == owner_uid for r in refs):
                raise ChildConflict(
                    f"{kind} {ns}/{name} already exists and does not belong to this workspace; "
                    "delete or rename it"
                )
            return False
        have = ((current.get("metadata") or {}).get("annotations") or {}).get(mf.ANNOTATION_SPEC_HASH)
        if have == want:
            return False
        try:
            if kind in ("Service", "ConfigMap"):
                # Merge patch keeps apiserver-assigned fields (clusterIP, nodePorts) intact.
                patch: Obj = {"metadata": {"annotations": meta["annotations"], "labels": meta["labels"]}}
                if kind == "Service":
                    patch["spec"] = desired["spec"]
                else:
                    patch["data"] = desired["data"]
                patch["metadata"]["resourceVersion"] = (current.get("metadata") or {}).get("resourceVersion")
                await self.client.patch(res, name, patch, ns)
            else:
                body = deepcopy(current)
                body.pop("status", None)
                body["metadata"].setdefault("annotations", {}).update(meta["annotations"])
                body["metadata"].setdefault("labels", {}).update(meta["labels"])
                body["spec"] = desired["spec"]
                await self.client.replace(res, body)
        except ApiError as e:
            if e.conflict:
                return True  # our cache is stale; the watch brings the new version and re-enqueues
            raise
        ev.CHILD_WRITES.labels(kind, "update").inc()
        log.info("child updated", kind=kind, child=name, old_hash=have, new_hash=want)
        return True

    # --------------------------------------------------------------------------------------- status

    async def _write_status(self, key: str, raw: Obj, obs: st.Observation) -> None:
        meta = raw.get("metadata") or {}
        current = raw.get("status") or {}
        memo = self._written.get(key)
        if memo is not None:
            cached_rv = _rv_int(meta.get("resourceVersion"))
            if memo[0] is not None and cached_rv is not None and cached_rv < memo[0]:
                current = memo[1]  # the cache has not caught up with our last write yet
            else:
                self._written.pop(key, None)
        desired = st.desired_status(current, obs)
        patch = st.status_patch(current, desired)
        if patch is None:
            return
        ns, name = split_key(key)
        changes = st.transitions(current, desired)
        if not current.get("conditions") and all(
            t.event_type == "Normal" and t.new != "True" for t in changes
        ):
            changes = []  # the first, pending status of a new workspace is not a transition worth an Event
        summary = st.summarise(changes)
        write = self.client.merge_patch_status(WORKSPACES, name, desired, ns)
        try:
            if summary is None:
                updated = await write
            else:
                # The Event does not depend on the write's answer: send both at once.
                updated, _ = await asyncio.gather(write, self.recorder.event(raw, *summary))
        except ApiError as e:
            if e.not_found:
                return
            raise
        ev.STATUS_WRITES.inc()
        self._written[key] = (_rv_int((updated.get("metadata") or {}).get("resourceVersion")), desired)


# ------------------------------------------------------------------------------------------- wiring


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
        WORKSPACES, namespace=namespace, indexers={WS_MATCH_LABEL_INDEX: _ws_match_pairs}
    )
    nodes = mgr.informer(NODES, indexers={NODE_LABEL_INDEX: _label_pairs})
    machine_inf = mgr.informer(MachineEncoding.resource, indexers={MACHINE_WS_INDEX: _machine_ws_key})
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
        indexers={POD_WS_INDEX: _pod_ws_key},
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
        jobs=jobs,
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

    def node_to_workspaces(node: Obj) -> list[str]:
        keys: set[str] = set()
        labels = nd.node_labels(node)
        for pair in _label_pairs(node):
            for ws in workspaces.store.by_index(WS_MATCH_LABEL_INDEX, pair):
                want = ((ws.get("resource") or {}).get("labelSelector") or {}).get("matchLabels") or {}
                if all(labels.get(k) == v for k, v in want.items()):
                    meta = ws.get("metadata") or {}
                    keys.add(f"{meta.get('namespace')}/{meta.get('name')}")
        return sorted(keys)

    ctrl.watch(nodes, node_to_workspaces, predicate=node_predicate)
    ev.WORKSPACE_COUNT.source = workspaces.store.list
    return rec, ctrl
