"""The status phase: write what :mod:`kaito.workspace.status` computes, only when it changed, with one
Event per transition.

Contract: ``await StatusWriter.write(key, raw, observation)`` -- ``raw`` is the workspace as the cache
has it; the write is a merge patch of the status subresource, skipped when the desired status equals
what the object (or our own last write, while the cache has not caught up with it) shows.
``forget(key)`` when the workspace is gone.
"""

from __future__ import annotations

import asyncio

from kaito.runtime.kube import ApiError, KubeClient, Obj, split_key
from kaito.workspace import events as ev
from kaito.workspace import status as st
from kaito.workspace.watches import WORKSPACES


def _rv_int(rv: str | None) -> int | None:
    try:
        return int(rv) if rv else None
    except ValueError:
        return None


class StatusWriter:
    """Minimal status writes and their Events."""

    def __init__(self, client: KubeClient, recorder: ev.EventRecorder) -> None:
        self.client = client
        self.recorder = recorder
        # Last status written per key, with the resourceVersion the write returned: a reconcile that
        # runs before the watch delivers our own write must not write (and announce) the same again.
        self._written: dict[str, tuple[int | None, Obj]] = {}

    def forget(self, key: str) -> None:
        """Drop what is remembered about ``key`` (the workspace is gone)."""
        self._written.pop(key, None)

    async def write(self, key: str, raw: Obj, obs: st.Observation) -> None:
        """Write the status ``obs`` determines, unless the workspace already shows it."""
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
