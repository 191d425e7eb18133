"""The finalization phase: the workspace finalizer, deletion of a deleting workspace's node requests,
and node requests whose workspace no longer exists.

Contract: ``await ensure_finalizer(client, ws)`` before the first node request exists; ``await
Finalization.finalize(key, raw) -> Result`` for a workspace with a deletionTimestamp (requeues while its
requests are going, then removes the finalizer and calls ``on_released(key)``); ``await
Finalization.reap_orphans(key) -> Result`` for a key whose workspace is not in the cache. Namespaced
children need none of this: they carry ownerReferences and go with the workspace.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from kaito.api.workspace import FINALIZER, Workspace
from kaito.machine.interface import RequestPhase
from kaito.runtime.controller import DONE, Result
from kaito.runtime.kube import ApiError, KubeClient, Obj, split_key, unix_time
from kaito.workspace import events as ev
from kaito.workspace import status as st
from kaito.workspace.noderequests import NodeRequests
from kaito.workspace.statuswriter import StatusWriter
from kaito.workspace.watches import WORKSPACES

log = structlog.get_logger("kaito.workspace")


async def ensure_finalizer(client: KubeClient, ws: Workspace) -> None:
    """Add ``workspace.finalizer.kaito.sh`` unless present (before the first Machine exists).

    Only cluster-scoped Machines need it: namespaced children carry ownerReferences and go with the
    workspace through garbage collection, so a workspace that never needed a Machine (existing
    nodes, ``byo``) carries no finalizer, costs no extra write and is deleted at once. The patch is
    conditional on the resourceVersion, so a workspace deleted meanwhile gets no Machine (save for
    an apiserver race that can drop the finalizer; :meth:`Finalization.reap_orphans` covers it).
    """
    finalizers = list(ws.metadata.finalizers or [])
    if FINALIZER in finalizers:
        return
    finalizers.append(FINALIZER)
    await client.patch(
        WORKSPACES,
        str(ws.metadata.name),
        {"metadata": {"finalizers": finalizers, "resourceVersion": ws.metadata.resource_version}},
        ws.metadata.namespace,
    )
    ws.metadata.finalizers = finalizers  # our parsed copy, not the cache


class Finalization:
    """Deletes a deleting workspace's node requests, then releases it; reaps orphaned requests."""

    def __init__(
        self,
        client: KubeClient,
        *,
        requests: NodeRequests,
        status: StatusWriter,
        recorder: ev.EventRecorder,
        deletion_timeout: float,
        deletion_requeue: float,
        on_released: Callable[[str], None],
    ) -> None:
        self.client = client
        self.requests = requests
        self.status = status
        self.recorder = recorder
        self.deletion_timeout = deletion_timeout
        self.deletion_requeue = deletion_requeue
        self.on_released = on_released

    async def finalize(self, key: str, raw: Obj) -> Result:
        """Delete the workspace's Machines, then drop the finalizer (children go by ownerReference).

        Machines are waited for (their deletion removes Nodes and cloud pools) for at most
        ``deletion_timeout`` seconds after the workspace's deletionTimestamp; past that the
        finalizer is removed anyway and a Warning Event names the Machines left behind.
        """
        meta = raw["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if FINALIZER not in (meta.get("finalizers") or []):
            return DONE
        await self.status.write(
            key, raw, st.Observation(generation=int(meta.get("generation") or 0), deleting=True)
        )
        remaining: list[str] = []
        for enc, m in await self.requests.live(ns, name):
            req = enc.observe(m)
            remaining.append(req.name)
            if req.phase != RequestPhase.DELETING and await self.requests.delete(req.name, enc):
                log.info(f"{enc.noun} deleted", machine=req.name)
        if remaining:
            started = unix_time(meta.get("deletionTimestamp")) or time.time()
            waited = time.time() - started
            if waited < self.deletion_timeout:
                return Result(requeue_after=self.deletion_requeue)
            enc = self.requests.encoding
            await self.recorder.event(
                raw,
                "Warning",
                f"{enc.resource.kind}DeletionStuck",
                f"{enc.noun}s {', '.join(sorted(remaining))} still exist {int(waited)}s after deletion started; "
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
        self.on_released(key)
        log.info("finalizer removed", machines_left=len(remaining))
        return DONE

    async def reap_orphans(self, key: str) -> Result:
        """Delete Machines labelled for a workspace that no longer exists.

        The finalizer should make this impossible, but the apiserver can lose it: a DELETE racing the
        patch that adds it removes the workspace anyway (kubernetes/kubernetes#77988), after which
        the Machine created on the strength of that patch has no owner and its GPU node would run
        forever. Such a Machine's own watch event brings us here. The workspace is looked up live
        first: one re-created under the same name may just not be in the cache yet.
        """
        enc = self.requests.encoding
        orphans = [
            (enc, str((m.get("metadata") or {}).get("name")))
            for m in self.requests.cached(key)
            if not (m.get("metadata") or {}).get("deletionTimestamp")
        ] + [(e, r.name) for e, r in self.requests.cached_legacy(key) if r.phase != RequestPhase.DELETING]
        if not orphans:
            return DONE
        ns, name = split_key(key)
        if await self.client.get_or_none(WORKSPACES, name, ns) is not None:
            return DONE
        for e, mname in orphans:
            if not await self.requests.delete(mname, e):
                continue
            log.warning(
                f"orphaned {e.noun} deleted: its workspace no longer exists", machine=mname, workspace=key
            )
        return DONE
