"""The node phase: select the workspace's nodes, and request (and release) the missing ones as Machines
or NodeClaims.

Contract: ``await NodeRequests.place(key, ws, preset) -> Placement``: the outcome (Ready once
``resource.count`` usable nodes are selected), the selected ``workers`` with their GPU counts, and how
many node requests are still provisioning. It creates the requests for missing node slots (after
``before_create(ws)``, which adds the workspace's finalizer), releases the ones no longer needed once no
pod of the workspace runs on their node, and never writes anything else. ``byo`` provisioning only
selects and says which nodes are missing.

The request store (:meth:`cached`, :meth:`live`, :meth:`delete`) is shared with the finalization phase.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from kaito.api.conditions import StateReason
from kaito.api.workspace import LABEL_WORKSPACE_NAME, LABEL_WORKSPACE_NAMESPACE, Workspace
from kaito.machine.interface import NodeRequest, NodeRequestEncoding, RequestPhase
from kaito.presets.registry import Preset
from kaito.runtime.informer import Informer
from kaito.runtime.kube import ApiError, KubeClient, Obj
from kaito.workspace import events as ev
from kaito.workspace import nodes as nd
from kaito.workspace import status as st
from kaito.workspace.adopt import ChildConflict, create_or_adopt
from kaito.workspace.watches import MACHINE_WS_INDEX, NODE_LABEL_INDEX, POD_WS_INDEX

log = structlog.get_logger("kaito.workspace")

QUOTA_REASONS = frozenset({"QuotaExceeded"})
SKU_REASONS = frozenset({"SkuUnavailable", "SKUUnavailable", "InsufficientCapacity"})


@dataclass(frozen=True)
class Placement:
    """Where a workspace runs: the node step's outcome and the selected nodes."""

    outcome: st.StepOutcome
    workers: list[str] = field(default_factory=list)
    gpus: list[int] = field(default_factory=list)
    pending: int = 0
    """Node requests still being provisioned (``Observation.machines_pending``)."""


def workspace_ref(ws: Workspace) -> Obj:
    """The workspace as an Event's involved object."""
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


class NodeRequests:
    """Node selection and the workspace's node requests (``encoding``'s kind; ``legacy`` kinds are
    migrated away from: watched, never created, released once not needed)."""

    def __init__(
        self,
        client: KubeClient,
        *,
        nodes: Informer,
        requests: Informer | None,
        pods: Informer,
        encoding: NodeRequestEncoding,
        recorder: ev.EventRecorder,
        byo: bool,
        before_create: Callable[[Workspace], Awaitable[None]],
        legacy: Sequence[tuple[NodeRequestEncoding, Informer]] = (),
    ) -> None:
        self.client = client
        self.nodes = nodes
        self.requests = requests
        self.pods = pods
        self.encoding = encoding
        self.recorder = recorder
        self.byo = byo
        self.before_create = before_create
        self.legacy = list(legacy)
        self._noun = encoding.noun  # "machine" / "nodeClaim" in messages
        self._kind = encoding.resource.kind  # "Machine" / "NodeClaim" in Event reasons

    # ------------------------------------------------------------------------------ request store

    def cached(self, key: str) -> list[Obj]:
        """The workspace's requests of the current kind, from the cache."""
        if self.requests is None:
            return []
        return self.requests.store.by_index(MACHINE_WS_INDEX, key)

    def cached_legacy(self, key: str) -> list[tuple[NodeRequestEncoding, NodeRequest]]:
        """The workspace's requests of the kinds migrated away from, observed."""
        return [
            (enc, enc.observe(m))
            for enc, inf in self.legacy
            for m in inf.store.by_index(MACHINE_WS_INDEX, key)
        ]

    async def live(self, namespace: str, name: str) -> list[tuple[NodeRequestEncoding, Obj]]:
        """The workspace's requests (of every kind in play) as the apiserver has them now (a consistent
        LIST, not the cache).

        The finalizer is removed on this answer: the cache can lag behind a Machine this controller
        created a moment ago (a workspace deleted right after creation), and trusting it would leave
        that Machine -- and its GPU node -- without an owner forever.
        """
        if self.requests is None:
            return []
        selector = f"{LABEL_WORKSPACE_NAME}={name},{LABEL_WORKSPACE_NAMESPACE}={namespace}"
        out: list[tuple[NodeRequestEncoding, Obj]] = []
        for enc in (self.encoding, *(e for e, _ in self.legacy)):
            out += [(enc, m) for m in await self.client.list_all(enc.resource, label_selector=selector)]
        return out

    async def delete(self, name: str, encoding: NodeRequestEncoding | None = None) -> bool:
        """Ask for a Machine's (or another kind's) deletion; False when it was already gone."""
        try:
            await self.client.delete((encoding or self.encoding).resource, name)
        except ApiError as e:
            if e.not_found:
                return False
            raise
        ev.MACHINE_OPS.labels("deleted").inc()
        return True

    # ---------------------------------------------------------------------------------- placement

    def _candidate_nodes(self, match_labels: Mapping[str, str]) -> list[Obj]:
        if not match_labels:
            return []
        k = sorted(match_labels)[0]
        return self.nodes.store.by_index(NODE_LABEL_INDEX, f"{k}={match_labels[k]}")

    async def place(self, key: str, ws: Workspace, preset: Preset | None) -> Placement:
        """Select the workspace's nodes; request the missing ones, release the surplus."""
        ns, name = str(ws.metadata.namespace), str(ws.metadata.name)
        count = ws.resource.count
        itype = ws.resource.instance_type
        labels = ws.resource.label_selector.as_map()
        preferred = list(ws.resource.preferred_nodes or [])
        current = list((ws.status.worker_nodes if ws.status is not None else None) or [])
        if not labels:
            return Placement(
                st.StepOutcome(
                    st.Phase.FAILED,
                    StateReason.NODES_MISSING,
                    "resource.labelSelector.matchLabels is empty; GPU nodes are selected by matchLabels",
                )
            )
        candidates = self._candidate_nodes(labels)
        qualifying = nd.qualifying_nodes(candidates, labels, itype, preferred, current, owner=(ns, name))
        if self.byo:
            selected = qualifying[:count]
            workers = [nd.node_name(n) for n in selected]
            gpus = [nd.node_gpus(n) for n in selected]
            if len(selected) >= count:
                return Placement(st.StepOutcome(st.Phase.READY), workers, gpus)
            missing = self._byo_missing(ws, candidates, labels, itype, preferred, len(selected))
            return Placement(missing, workers, gpus)

        # machine mode: Machines for the nodes that existing (non-Machine) nodes cannot cover.
        requests = [self.encoding.observe(m) for m in self.cached(key)]
        legacy = self.cached_legacy(key)  # never wanted: released once the workload runs without them
        # A node our Machine made (its copied labels say so) is never "existing": while its Machine is
        # being deleted the node lingers Ready for a while and must not stand in for a Machine.
        own = {nd.node_name(n) for n in qualifying if nd.provisioned_for(n) == (ns, name)}
        linked = {r.node_name for r in requests if r.node_name} | {
            r.node_name for _, r in legacy if r.node_name
        }
        machine_nodes = linked | own
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
            await self.before_create(ws)
            req = await self._create(ws, slot, itype, labels, storage)
            by_name[req.name] = req
        if len(selected) >= count:
            # A selected node of ours that no request names yet (its Machine's status has not caught
            # up) may belong to any request without a node: release none of those this time.
            unlinked = bool((own - linked) & set(workers))
            await self._release(
                key, ws, [(self.encoding, r) for r in requests] + legacy, wanted_names, workers, unlinked
            )
            return Placement(st.StepOutcome(st.Phase.READY), workers, gpus)
        wanted = [by_name[self.encoding.name_for(ns, name, s)] for s in range(needed)]
        waiting = [r for r in wanted if r.node_name not in set(workers) or r.phase != RequestPhase.READY]
        failed = [r for r in waiting if r.phase == RequestPhase.FAILED]
        if failed:
            r = failed[0]
            if r.reason in QUOTA_REASONS:
                reason = StateReason.QUOTA_EXCEEDED
            elif r.reason in SKU_REASONS:
                reason = StateReason.SKU_UNAVAILABLE
            else:
                reason = StateReason.PROVISIONING_FAILED
            message = f"{self._noun} {r.name} failed: {r.reason}: {r.message}".rstrip(": ")
            return Placement(st.StepOutcome(st.Phase.FAILED, reason, message), workers, gpus, len(waiting))
        parts = []
        for r in waiting:
            what = r.message or r.phase.value.lower()
            if r.phase == RequestPhase.READY and r.node_name:
                what = f"node {r.node_name} is not usable yet"
            parts.append(f"{r.name} ({what})")
        msg = f"creating {len(waiting)} {self._noun}s: " + ", ".join(parts) if parts else "waiting for nodes"
        return Placement(
            st.StepOutcome(st.Phase.PENDING, StateReason.PROVISIONING, msg), workers, gpus, len(waiting)
        )

    async def _release(
        self,
        key: str,
        ws: Workspace,
        requests: Sequence[tuple[NodeRequestEncoding, NodeRequest]],
        wanted_names: set[str],
        workers: Sequence[str],
        unlinked: bool = False,
    ) -> None:
        """Delete Machines the workspace no longer needs, once none of its pods runs on their node.

        A Machine beyond the slots still needed (the user now prefers existing nodes) would otherwise
        keep an idle GPU node -- and its cloud bill -- until the workspace is deleted. Only a Machine
        whose node is not selected and carries no pod of the workspace goes, so a rollout moving the
        pods keeps serving on the old node until it is done (pods are watched: the reconcile that
        sees the last one leave deletes the Machine). Objects of a kind migrated away from are never
        wanted: they go the same way once the workload runs on the new kind's nodes.
        """
        surplus = [
            (enc, r)
            for enc, r in requests
            if (enc is not self.encoding or r.name not in wanted_names)
            and r.phase != RequestPhase.DELETING
            and r.node_name not in workers
        ]
        if not surplus:
            return
        busy = {
            str((p.get("spec") or {}).get("nodeName"))
            for p in self.pods.store.by_index(POD_WS_INDEX, key)
            if (p.get("spec") or {}).get("nodeName")
        }
        for enc, r in surplus:
            if (r.node_name and r.node_name in busy) or (unlinked and not r.node_name):
                continue
            if not await self.delete(r.name, enc):
                continue
            log.info(f"surplus {enc.noun} deleted", machine=r.name, node=r.node_name)
            await self.recorder.event(
                workspace_ref(ws),
                "Normal",
                f"{enc.resource.kind}Deleted",
                f"deleted {enc.noun} {r.name}"
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
            f"provisioning is byo, so no {self._kind}s are created"
        )
        if missing_pref:
            msg += f"; preferred nodes not found: {', '.join(missing_pref)}"
        if detail:
            msg += f"; not usable: {detail}"
        return st.StepOutcome(st.Phase.FAILED, StateReason.NODES_MISSING, msg)

    async def _create(
        self, ws: Workspace, slot: int, itype: str, labels: dict[str, str], storage: str
    ) -> NodeRequest:
        ns, name = str(ws.metadata.namespace), str(ws.metadata.name)
        body = self.encoding.build(
            namespace=ns, workspace=name, slot=slot, instance_type=itype, match_labels=labels, storage=storage
        )
        mname = body["metadata"]["name"]
        # Already there: a retry, a restart or another replica created it first -- adopt it if ours.
        try:
            got = await create_or_adopt(
                self.client,
                self.encoding.resource,
                body,
                ours=lambda obj: self.encoding.belongs_to(obj, ns, name),
                conflict=f"{self._noun} {mname} exists but belongs to another workspace",
            )
        except ChildConflict as e:
            return NodeRequest(mname, RequestPhase.FAILED, None, f"{self._kind}NameConflict", str(e))
        if got.obj is None:
            return NodeRequest(
                mname, RequestPhase.PENDING, None, "Provisioning", f"{self._noun} is being replaced"
            )
        if got.created:
            ev.MACHINE_OPS.labels("created").inc()
            log.info(f"{self._noun} created", machine=mname, slot=slot, instance_type=itype)
            await self.recorder.event(
                workspace_ref(ws),
                "Normal",
                f"{self._kind}Created",
                f"created {self._noun} {mname} ({itype}) for node slot {slot}",
            )
        else:
            ev.MACHINE_OPS.labels("adopted").inc()
        return self.encoding.observe(got.obj)
