"""The Machine lifecycle reconciler: launch -> registration -> initialization, and termination.

One reconcile of a Machine (key = its name; Machines are cluster-scoped) reads it from the informer
cache and moves it as far as it can without waiting:

1. **finalizer** ``karpenter.sh/termination`` first, so an instance is never created unguarded;
2. **launch** (until ``MachineLaunched=True``): ``cloud.create`` -- idempotent per Machine name, so a
   retry or a restarted provisioner adopts the instance it created before instead of creating a second
   one. A cloud error becomes ``MachineLaunched=False`` with the error's reason (QuotaExceeded,
   SkuUnavailable, InsufficientCapacity, ...) and actionable message, and the Machine is not tried again
   before the error's backoff has passed (our own status write must not re-trigger a create);
3. **registration** (until ``MachineRegistered=True``): find the Node by providerID or by the AKS
   ``agentpool`` labels (== Machine name), label it ``karpenter.sh/registered``, add the Machine's taints
   and startup taints and an owner reference, and copy providerID, nodeName, capacity and allocatable into
   the status. No Node within the registration timeout (15 min) -> the instance is deleted and launched
   again (``MachineLaunched=False``, reason ``RegistrationTimeout``);
4. **initialization** (until ``MachineInitialized=True``): the Node is Ready, startup and ephemeral taints
   are gone and the GPUs are allocatable -> label ``karpenter.sh/initialized``;
5. ``Ready`` summarises the three; the status is written only when it changed.

On deletion: drain (cordon, evict pods honouring PodDisruptionBudgets, bounded by a timeout) and delete
the Node(s), delete the instance, and come back (requeue) until the cloud reports it
gone; then remove the finalizer. Nothing in a reconcile waits on the cloud beyond one bounded call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from kaito.api.machine import REASON_INSTANCE_NOT_FOUND, REASON_REGISTRATION_TIMEOUT
from kaito.runtime.controller import DONE, Result
from kaito.runtime.kube import NODES, ApiError, KubeClient, Obj, Resource, resource_version, split_key
from kaito.runtime.store import Store
from provisioner import machine_fields as mf
from provisioner import metrics
from provisioner.cloud.base import CloudError, CloudProvider, Conflict, Instance, InstanceState, NotFound
from provisioner.lifecycle import conditions as cond
from provisioner.lifecycle import drain
from provisioner.lifecycle import events as ev
from provisioner.lifecycle import nodes as nd

log = structlog.get_logger("provisioner.lifecycle")

MACHINES = Resource("karpenter.sh", "v1alpha5", "machines", False, "Machine")
FINALIZER = "karpenter.sh/termination"

# Node indexes the reconciler needs on the Node informer (see :func:`node_indexers`).
NODE_POOL_INDEX = "agentpool"
NODE_PROVIDER_ID_INDEX = "provider-id"

# Both relaunch reasons are part of the contract with the workspace controller (kaito.api.machine).
REGISTRATION_TIMEOUT_REASON = REASON_REGISTRATION_TIMEOUT
LAUNCH_FAILED_REASON = "LaunchFailed"


def node_indexers() -> dict[str, Callable[[Obj], list[str]]]:
    """Indexers for the Node informer: by agent pool (both AKS labels agree) and by providerID."""

    def by_pool(node: Obj) -> list[str]:
        pool = nd.pool_of(node)
        return [pool] if pool else []

    def by_provider_id(node: Obj) -> list[str]:
        pid = nd.node_provider_id(node)
        return [pid] if pid else []

    return {NODE_POOL_INDEX: by_pool, NODE_PROVIDER_ID_INDEX: by_provider_id}


def machine_for_node(node: Obj) -> list[str]:
    """Map a Node event to the Machine key it belongs to (its agent pool name == the Machine name)."""
    pool = nd.pool_of(node)
    return [pool] if pool else []


class InstanceFailed(CloudError):
    """The cloud created the instance but reports it failed (e.g. an agent pool in state Failed)."""

    reason = LAUNCH_FAILED_REASON


@dataclass
class LifecycleOptions:
    """Timings of the lifecycle."""

    registration_timeout: float = 900.0
    """Seconds after launch by which the Node must register; otherwise delete the instance and relaunch."""
    termination_poll: float = 5.0
    """Seconds between checks while an instance is being deleted."""
    cloud_call_wait: float = 30.0
    """Longest a reconcile waits on a cloud delete (ARM's operation goes on; the next pass looks again)."""
    failed_instance_backoff: float = 30.0
    """Seconds before retrying an instance the cloud reports Failed."""
    drain_timeout: float = 600.0
    """Seconds after the Machine's deletion during which its Node is drained; then it is deleted anyway."""
    drain_poll: float = 2.0
    """Seconds between drain passes."""


@dataclass
class _Backoff:
    uid: str
    generation: int
    until: float
    retryable: bool


@dataclass
class _Pass:
    """What one reconcile has decided so far."""

    machine: Obj
    status: dict[str, Any]
    conditions: list[dict[str, Any]]
    requeue: list[float] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def transition(self, type_: str, status: str, reason: str, message: str, now: datetime) -> bool:
        """Set a condition; True (and an Event queued) when its status or reason changed."""
        before = cond.get(self.conditions, type_)
        self.conditions = cond.set_condition(self.conditions, type_, status, reason, message, now=now)
        changed = before is None or before.get("status") != status or before.get("reason") != reason
        if changed and reason:
            kind = ev.WARNING if status == cond.FALSE else ev.NORMAL
            self.events.append((kind, reason, message or f"{type_} is {status}"))
        return changed

    def after(self, seconds: float) -> None:
        self.requeue.append(max(seconds, 0.05))

    def result(self) -> Result:
        return Result(requeue_after=min(self.requeue)) if self.requeue else DONE


class MachineLifecycle:
    """Reconciles Machines against a :class:`CloudProvider`. See the module docstring."""

    def __init__(
        self,
        client: KubeClient,
        cloud: CloudProvider,
        machines: Store,
        nodes: Store,
        *,
        gpu_count: Callable[[str], int] | None = None,
        options: LifecycleOptions | None = None,
        clock: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.client = client
        self.cloud = cloud
        self.machines = machines
        self.nodes = nodes
        self.options = options or LifecycleOptions()
        self._gpu_count = gpu_count
        self._clock = clock or (lambda: datetime.now(UTC))
        self._monotonic = monotonic or asyncio.get_running_loop().time
        self._backoff: dict[str, _Backoff] = {}
        self.recorder = ev.EventRecorder(client)
        self._reported_blocked: set[tuple[str, str]] = set()
        # resourceVersion of our own last write per Machine, for read-your-writes (see _fresh).
        self._written: dict[str, str] = {}

    # ------------------------------------------------------------------------------------- entry

    async def reconcile(self, key: str) -> Result:
        """Reconcile the Machine named ``key``."""
        _, name = split_key(key)
        machine = await self._fresh(name, self.machines.get(key))
        if machine is None:
            self._backoff.pop(name, None)
            return DONE
        if not mf.is_kaito_machine(machine):
            return DONE  # not ours (upstream acts only on Machines carrying a Kaito owner label)
        if nd.is_deleting(machine):
            return await self._finalize(machine)
        machine = await self._ensure_finalizer(machine)
        status = dict(machine.get("status") or {})
        work = _Pass(machine, status, cond.conditions_of(status))
        if await self._launch(work) and await self._register(work):
            await self._initialize(work)
        await self._write_status(work)
        return work.result()

    async def _fresh(self, name: str, cached: Obj | None) -> Obj | None:
        """The Machine as of our own last write at least (the cache may not have seen that write yet).

        Acting on a cached copy older than our last write would redo work (a second create call, a
        duplicate metric) and could write back stale status, so then read it from the apiserver instead.
        """
        written = self._written.get(name)
        if written is None or cached is None:
            if cached is None:
                self._written.pop(name, None)
            return cached
        if resource_version(cached) == written:
            del self._written[name]  # the cache has caught up
            return cached
        live = await self.client.get_or_none(MACHINES, name)
        if live is None:
            self._written.pop(name, None)
        else:
            self._written[name] = resource_version(live)
        return live

    def _wrote(self, obj: Obj) -> Obj:
        self._written[str((obj.get("metadata") or {}).get("name"))] = resource_version(obj)
        return obj

    # ------------------------------------------------------------------------------- finalizer

    async def _ensure_finalizer(self, machine: Obj) -> Obj:
        meta = machine.get("metadata") or {}
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER in finalizers:
            return machine
        # resourceVersion makes the merge patch conditional: a concurrent finalizer change is a 409, not lost.
        patch = {
            "metadata": {
                "finalizers": [*finalizers, FINALIZER],
                "resourceVersion": meta.get("resourceVersion"),
            }
        }
        return self._wrote(await self.client.patch(MACHINES, str(meta["name"]), patch))

    # ---------------------------------------------------------------------------------- launch

    async def _launch(self, work: _Pass) -> bool:
        if cond.is_true(work.conditions, cond.LAUNCHED):
            return True
        machine = work.machine
        name = mf.machine_name(machine)
        now = self._clock()
        if cond.reason_of(work.conditions, cond.LAUNCHED) == REGISTRATION_TIMEOUT_REASON:
            # The previous instance never produced a Node: remove it before launching a new one.
            retry = await self._delete_instance(name)
            if retry is not None:
                work.after(retry)
                return False
        elif self._in_backoff(machine, work):
            return False
        if cond.get(work.conditions, cond.LAUNCHED) is None:
            # Tell the user at once that a (possibly minutes-long) launch is under way.
            work.conditions = cond.set_condition(
                work.conditions,
                cond.LAUNCHED,
                cond.UNKNOWN,
                "Launching",
                f"creating the {self.cloud.name} instance for machine {name}",
                now=now,
            )
            await self._write_status(work)
        try:
            instance = await self.cloud.create(machine)
            if instance.state is InstanceState.FAILED:
                if instance.failure is not None:
                    raise instance.failure  # classified by the provider (e.g. QuotaExceeded)
                raise InstanceFailed(
                    f"the {self.cloud.name} instance {instance.name} is in state {instance.detail or 'Failed'}; "
                    "creating it again",
                    backoff=self.options.failed_instance_backoff,
                    code=LAUNCH_FAILED_REASON,
                )
        except CloudError as e:
            self._launch_failed(work, e)
            return False
        self._backoff.pop(name, None)
        self._launched(work, instance)
        return True

    def _in_backoff(self, machine: Obj, work: _Pass) -> bool:
        """True while an earlier launch failure's backoff holds (and nothing changed that would help)."""
        name = mf.machine_name(machine)
        gate = self._backoff.get(name)
        if gate is None:
            return False
        meta = machine.get("metadata") or {}
        if gate.uid != mf.machine_uid(machine) or gate.generation != int(meta.get("generation") or 0):
            self._backoff.pop(name, None)  # a new Machine or a changed spec deserves a fresh try
            return False
        if self.nodes.index_keys(NODE_POOL_INDEX, name):
            return False  # the instance produced a Node after all: go and adopt it
        if not gate.retryable:
            return True  # the Machine (its spec) has to change first; that resets the gate above
        remaining = gate.until - self._monotonic()
        if remaining <= 0:
            return False
        work.after(remaining)
        return True

    def _launch_failed(self, work: _Pass, error: CloudError) -> None:
        machine = work.machine
        name = mf.machine_name(machine)
        meta = machine.get("metadata") or {}
        self._backoff[name] = _Backoff(
            uid=mf.machine_uid(machine),
            generation=int(meta.get("generation") or 0),
            until=self._monotonic() + error.backoff,
            retryable=error.retryable,
        )
        # An operation still running is progress, not failure: Unknown rather than False.
        status = cond.UNKNOWN if isinstance(error, Conflict) else cond.FALSE
        message = error.message
        if error.retryable and status == cond.FALSE and "retrying" not in message:
            message = f"{message} (next attempt in {_duration(error.backoff)})"
        elif not error.retryable:
            message = f"{message} (not retried until the Machine changes)"
        work.transition(cond.LAUNCHED, status, error.reason, message, self._clock())
        if status == cond.FALSE:
            metrics.LAUNCH_FAILURES.labels(error.reason).inc()
        pending = isinstance(error, Conflict)
        (log.info if pending else log.warning)(
            "launch waiting for a cloud operation in progress" if pending else "launch failed",
            machine=name,
            reason=error.reason,
            code=error.code,
            backoff_s=error.backoff,
            error=error.message,
        )
        if error.retryable:
            work.after(error.backoff)

    def _launched(self, work: _Pass, instance: Instance) -> None:
        now = self._clock()
        if instance.provider_id and not work.status.get("providerID"):
            work.status["providerID"] = instance.provider_id
        if instance.capacity and not work.status.get("capacity"):
            work.status["capacity"] = dict(instance.capacity)
        work.transition(
            cond.LAUNCHED, cond.TRUE, "Launched", f"{self.cloud.name} instance {instance.name} created", now
        )
        created = mf.creation_timestamp(work.machine)
        if created is not None:
            metrics.LAUNCH_DURATION.observe(max((now - created).total_seconds(), 0.0))
        log.info(
            "instance launched",
            machine=instance.name,
            state=str(instance.state),
            provider_id=instance.provider_id,
        )

    # ---------------------------------------------------------------------------- registration

    def _nodes_of(self, machine: Obj) -> list[Obj]:
        """Undeleted Nodes of this Machine: by providerID when known, else by its agent pool labels."""
        name = mf.machine_name(machine)
        pid = mf.provider_id(machine)
        found: dict[str, Obj] = {}
        if pid:
            for node in self.nodes.by_index(NODE_PROVIDER_ID_INDEX, pid):
                found[nd.node_name(node)] = node
        if not found:
            for node in self.nodes.by_index(NODE_POOL_INDEX, name):
                found[nd.node_name(node)] = node
        return [n for n in found.values() if not nd.is_deleting(n)]

    async def _register(self, work: _Pass) -> bool:
        machine = work.machine
        name = mf.machine_name(machine)
        now = self._clock()
        if cond.is_true(work.conditions, cond.REGISTERED):
            node_name = str(work.status.get("nodeName") or "")
            if node_name and (self.nodes.get(node_name) is not None or await self._node_exists(node_name)):
                return True
            # The Node went away after registering: register again (or relaunch after the timeout).
            log.warning("registered node disappeared", machine=name, node=node_name)
            work.status["nodeName"] = None
            work.conditions = cond.set_condition(
                work.conditions,
                cond.INITIALIZED,
                cond.UNKNOWN,
                "NodeNotFound",
                f"node {node_name} no longer exists",
                now=now,
            )
        found = self._nodes_of(machine)
        if not found and await self._instance_lost(work):
            return False
        if not found:
            launched_at = cond.transition_time(work.conditions, cond.LAUNCHED) or now
            waited = (now - launched_at).total_seconds()
            timeout = self.options.registration_timeout
            if waited >= timeout:
                metrics.REGISTRATION_TIMEOUTS.inc()
                message = (
                    f"no node registered for machine {name} within {_duration(timeout)} of launch; "
                    "deleting the instance and launching it again"
                )
                log.warning("registration timed out", machine=name, waited_s=waited)
                work.transition(cond.LAUNCHED, cond.FALSE, REGISTRATION_TIMEOUT_REASON, message, now)
                work.conditions = cond.set_condition(
                    work.conditions, cond.REGISTERED, cond.UNKNOWN, "NodeNotFound", message, now=now
                )
                work.status["providerID"] = None  # the next instance's Node will carry a new one
                work.after(0.05)
                return False
            work.conditions = cond.set_condition(
                work.conditions,
                cond.REGISTERED,
                cond.UNKNOWN,
                "NodeNotFound",
                f"waiting for the node of machine {name} to register (timeout {_duration(timeout)})",
                now=now,
            )
            # Node events wake us earlier; this is the deadline for the timeout check.
            work.after(timeout - waited)
            return False
        if len(found) > 1:
            names = ", ".join(sorted(nd.node_name(n) for n in found))
            work.transition(
                cond.REGISTERED,
                cond.FALSE,
                "MultipleNodesFound",
                f"expected one node for machine {name}, found {len(found)}: {names}",
                now,
            )
            return False
        node = await self._sync_node(machine, found[0])
        work.status["providerID"] = nd.node_provider_id(node) or work.status.get("providerID")
        work.status["nodeName"] = nd.node_name(node)
        work.status["capacity"] = nd.capacity(node)
        work.status["allocatable"] = nd.allocatable(node)
        work.transition(
            cond.REGISTERED, cond.TRUE, "Registered", f"node {nd.node_name(node)} registered", now
        )
        launch_time = cond.transition_time(work.conditions, cond.LAUNCHED)
        if launch_time is not None:
            metrics.REGISTRATION_DURATION.observe(max((now - launch_time).total_seconds(), 0.0))
        log.info("node registered", machine=name, node=nd.node_name(node))
        return True

    async def _instance_lost(self, work: _Pass) -> bool:
        """While waiting for the Node: if the cloud no longer has the instance (deleted out of band, a
        kwok creation lost with a restart) or reports it failed, mark the launch undone so the next pass
        launches again at once instead of waiting out the registration timeout."""
        name = mf.machine_name(work.machine)
        try:
            instance = await self.cloud.get(name)
        except NotFound:
            reason, message = REASON_INSTANCE_NOT_FOUND, f"the instance of machine {name} no longer exists"
        except CloudError:
            return False  # cannot tell now; the registration timeout still bounds the wait
        else:
            if instance.state is not InstanceState.FAILED:
                return False
            failure = instance.failure
            reason = failure.reason if failure is not None else LAUNCH_FAILED_REASON
            message = (
                failure.message
                if failure is not None
                else f"the instance of machine {name} is in state {instance.detail or 'Failed'}"
            )
        log.warning("instance lost before its node registered; relaunching", machine=name, reason=reason)
        work.transition(cond.LAUNCHED, cond.FALSE, reason, f"{message}; launching it again", self._clock())
        work.after(0.05)
        return True

    async def _node_exists(self, name: str) -> bool:
        # The cache may lag behind a just-created Node; ask the apiserver before concluding it is gone.
        return await self.client.get_or_none(NODES, name) is not None

    async def _sync_node(self, machine: Obj, node: Obj) -> Obj:
        """Label the Node registered, add the Machine's taints and an owner reference (one conditional patch)."""
        meta = node.get("metadata") or {}
        labels = meta.get("labels") or {}
        patch_meta: dict[str, Any] = {}
        if labels.get(nd.REGISTERED_LABEL) != "true":
            patch_meta["labels"] = {nd.REGISTERED_LABEL: "true"}
        mmeta = machine.get("metadata") or {}
        refs = list(meta.get("ownerReferences") or [])
        if mmeta.get("uid") and not any(r.get("uid") == mmeta["uid"] for r in refs):
            refs.append(
                {
                    "apiVersion": MACHINES.api_version,
                    "kind": MACHINES.kind,
                    "name": mmeta["name"],
                    "uid": mmeta["uid"],
                    "blockOwnerDeletion": False,
                }
            )
            patch_meta["ownerReferences"] = refs
        patch: dict[str, Any] = {}
        try:
            wanted = [*mf.taints(machine), *mf.startup_taints(machine)]
        except mf.MachineFieldError:
            wanted = []
        taints = nd.merged_taints((node.get("spec") or {}).get("taints") or [], wanted)
        if taints is not None:
            patch["spec"] = {"taints": taints}
        if not patch_meta and not patch:
            return node
        patch_meta["resourceVersion"] = meta.get("resourceVersion")
        patch["metadata"] = patch_meta
        return await self.client.patch(NODES, str(meta["name"]), patch)

    # -------------------------------------------------------------------------- initialization

    async def _initialize(self, work: _Pass) -> None:
        machine = work.machine
        now = self._clock()
        node_name = str(work.status.get("nodeName") or "")
        node = self.nodes.get(node_name) if node_name else None
        if node is None:
            node = await self.client.get_or_none(NODES, node_name) if node_name else None
        if node is None:
            work.conditions = cond.set_condition(
                work.conditions,
                cond.INITIALIZED,
                cond.UNKNOWN,
                "NodeNotFound",
                f"node {node_name} not found",
                now=now,
            )
            work.after(1.0)
            return
        # Allocatable changes as device plugins register; keep the status current until initialized.
        work.status["allocatable"] = nd.allocatable(node)
        work.status["capacity"] = nd.capacity(node)
        if cond.is_true(work.conditions, cond.INITIALIZED):
            return
        expected_gpus = self._expected_gpus(machine)
        blocker = nd.initialization_blocker(node, machine, expected_gpus)
        if blocker is not None:
            reason, message = blocker
            log.debug(
                "node not initialized yet", machine=mf.machine_name(machine), reason=reason, detail=message
            )
            work.conditions = cond.set_condition(
                work.conditions, cond.INITIALIZED, cond.UNKNOWN, reason, message, now=now
            )
            return  # Node updates wake us
        labels = (node.get("metadata") or {}).get("labels") or {}
        if labels.get(nd.INITIALIZED_LABEL) != "true":
            await self.client.patch(
                NODES, node_name, {"metadata": {"labels": {nd.INITIALIZED_LABEL: "true"}}}
            )
        work.transition(cond.INITIALIZED, cond.TRUE, "Initialized", f"node {node_name} is ready", now)
        registered_at = cond.transition_time(work.conditions, cond.REGISTERED)
        if registered_at is not None:
            metrics.INITIALIZATION_DURATION.observe(max((now - registered_at).total_seconds(), 0.0))
        log.info("node initialized", machine=mf.machine_name(machine), node=node_name, gpus=expected_gpus)

    def _expected_gpus(self, machine: Obj) -> int:
        sku = mf.instance_type(machine)
        if not sku or self._gpu_count is None:
            return 0
        try:
            return int(self._gpu_count(sku))
        except (KeyError, ValueError):
            return 0

    # ---------------------------------------------------------------------------------- status

    async def _write_status(self, work: _Pass) -> None:
        """Write the status when it differs from what the Machine has (no write otherwise)."""
        now = self._clock()
        work.conditions = cond.ordered(cond.summarize_ready(work.conditions, now=now))
        desired = dict(work.status)
        desired["conditions"] = work.conditions
        current = dict(work.machine.get("status") or {})
        if _normalized(desired) == _normalized(current):
            return
        name = mf.machine_name(work.machine)
        updated = self._wrote(await self.client.merge_patch_status(MACHINES, name, desired))
        for kind, reason, message in work.events:
            await self.recorder.event(updated, kind, reason, message)
        work.events.clear()
        work.machine = updated
        work.status = dict(updated.get("status") or {})
        work.conditions = cond.conditions_of(work.status)

    # ----------------------------------------------------------------------------- termination

    async def _finalize(self, machine: Obj) -> Result:
        meta = machine.get("metadata") or {}
        name = str(meta["name"])
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER not in finalizers:
            self._backoff.pop(name, None)
            return DONE
        # 1. The Node(s) first, so nothing new lands on a node that is about to vanish.
        pending_nodes = False
        node_names = {nd.node_name(n) for n in self._nodes_of(machine)}
        if mf.node_name(machine):
            node_names.add(mf.node_name(machine))
        requeue = 1.0
        for node_name in sorted(node_names):
            node = self.nodes.get(node_name)
            if node is None:
                node = await self.client.get_or_none(NODES, node_name)
            if node is None:
                continue
            pending_nodes = True
            if nd.is_deleting(node):
                continue
            if not await self._drained(machine, node):
                requeue = self.options.drain_poll
                continue
            log.info("deleting node", machine=name, node=node_name)
            await self.client.delete(NODES, node_name)
        if pending_nodes:
            return Result(requeue_after=requeue)
        # 2. The instance; come back until the cloud says it is gone.
        retry = await self._delete_instance(name)
        if retry is not None:
            return Result(requeue_after=retry)
        # 3. Release the Machine.
        patch = {
            "metadata": {
                "finalizers": [f for f in finalizers if f != FINALIZER],
                "resourceVersion": meta.get("resourceVersion"),
            }
        }
        try:
            await self.client.patch(MACHINES, name, patch)
        except ApiError as e:
            if not e.not_found:
                raise
        self._backoff.pop(name, None)
        self._written.pop(name, None)
        self._reported_blocked = {k for k in self._reported_blocked if k[0] != name}
        metrics.TERMINATIONS.labels("deleted").inc()
        deleted_at = cond.parse_time(meta.get("deletionTimestamp"))
        if deleted_at is not None:
            metrics.TERMINATION_DURATION.observe(max((self._clock() - deleted_at).total_seconds(), 0.0))
        log.info("machine terminated", machine=name)
        await self.recorder.event(
            machine, ev.NORMAL, "Terminated", f"node and {self.cloud.name} instance of machine {name} deleted"
        )
        return DONE

    async def _drained(self, machine: Obj, node: Obj) -> bool:
        """Cordon the node and evict its pods; True when nothing evictable is left or the drain timed out."""
        name = mf.machine_name(machine)
        node_name = nd.node_name(node)
        await drain.cordon(self.client, node)
        deleted_at = cond.parse_time((machine.get("metadata") or {}).get("deletionTimestamp"))
        if deleted_at is not None:
            waited = (self._clock() - deleted_at).total_seconds()
            if waited > self.options.drain_timeout:
                log.warning("drain timed out; deleting the node anyway", machine=name, node=node_name)
                return True
        result = await drain.evict_pods(self.client, node_name)
        if not result.remaining:
            return True
        if result.blocked and (name, node_name) not in self._reported_blocked:
            # Once per node: the user should know why the Machine is not going away yet.
            self._reported_blocked.add((name, node_name))
            await self.recorder.event(
                machine,
                ev.WARNING,
                "EvictionBlocked",
                f"draining node {node_name}: a PodDisruptionBudget does not allow evicting "
                f"{', '.join(result.blocked[:5])} yet; the node is deleted anyway after "
                f"{_duration(self.options.drain_timeout)}",
            )
        log.info("draining node", machine=name, node=node_name, pods=len(result.remaining))
        return False

    async def _delete_instance(self, name: str) -> float | None:
        """Ask the cloud to delete the instance: None once it reports the instance gone, else the
        seconds after which to look again."""
        poll = self.options.termination_poll
        try:
            async with asyncio.timeout(self.options.cloud_call_wait):
                await self.cloud.delete(name)
        except NotFound:
            return None
        except TimeoutError:
            log.info("instance deletion in progress", machine=name)
            return poll
        except CloudError as e:
            log.warning("instance deletion failed", machine=name, reason=e.reason, error=e.message)
            # A persistent failure (auth, throttling) must not become a tight loop.
            return max(poll, min(e.backoff, 60.0))
        return poll  # accepted or still running: look again on the next pass


def _normalized(status: Mapping[str, Any]) -> dict[str, Any]:
    """Status without empty values, for comparing desired and current."""
    return {k: v for k, v in status.items() if v not in (None, "", {}, [])}


def _duration(seconds: float) -> str:
    if seconds >= 120 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds >= 120:
        return f"{seconds / 60:.1f}m"
    return f"{seconds:.0f}s"
