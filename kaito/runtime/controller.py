"""The reconcile loop: N workers draining a rate-limited work queue of object keys.

The contract is controller-runtime's (``pkg/internal/controller/controller.go``):

* a reconciler is ``async def reconcile(key: str) -> Result | None`` -- it gets only the key
  (``namespace/name``, or ``name`` for cluster-scoped objects) and reads the current state itself;
* it returns :data:`DONE` (or ``None``) -> the key's backoff is forgotten;
* ``Result(requeue_after=s)`` -> forget the backoff, then add the key again after ``s`` seconds;
* it raises :class:`TerminalError` -> no retry (counted, logged; surface it in the object's status);
* it raises anything else -> retried with the rate limiter (5 ms doubling to 1000 s, 10 qps overall).
  Exceptions that are not API/transport/:class:`ReconcileError` errors are programming errors and are
  also counted in ``controller_runtime_reconcile_panics_total``; the worker never dies.

One key is never reconciled by two workers at once (the queue's processing set guarantees it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import aiohttp
import structlog

from kaito.runtime import metrics
from kaito.runtime.informer import EventHandler, Informer
from kaito.runtime.kube import ApiError, Obj, object_key, split_key
from kaito.runtime.ratelimit import RateLimiter
from kaito.runtime.workqueue import WorkQueue

log = structlog.get_logger("kaito.runtime.controller")


@dataclass(frozen=True)
class Result:
    """What a reconcile asks for next: nothing (``requeue_after=None``) or another look after a delay."""

    requeue_after: float | None = None


DONE = Result()


class TerminalError(Exception):
    """A reconcile error that retrying cannot fix (bad spec, ...): the key is not requeued."""


class ReconcileError(Exception):
    """An expected, retryable reconcile failure (not counted as a panic)."""


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ReconcileError,
    ApiError,
    aiohttp.ClientError,
    ConnectionError,
    TimeoutError,
)

Reconciler = Callable[[str], Awaitable[Result | None]]
KeyMapper = Callable[[Obj], Iterable[str]]
Predicate = Callable[[Obj | None, Obj], bool]


class Controller:
    """Runs ``reconcile`` for keys from its queue on ``workers`` concurrent worker tasks."""

    def __init__(
        self,
        name: str,
        reconcile: Reconciler,
        *,
        workers: int = 1,
        rate_limiter: RateLimiter | None = None,
        reconcile_timeout: float | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.name = name
        self.reconcile = reconcile
        self.workers = workers
        self.reconcile_timeout = reconcile_timeout
        self.queue: WorkQueue[str] = WorkQueue(name, rate_limiter=rate_limiter)
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._log = log.bind(controller=name)
        metrics.init_controller_metrics(name, workers)
        self._m_total = {r: metrics.RECONCILE_TOTAL.labels(name, r) for r in metrics.RESULT_LABELS}
        self._m_errors = metrics.RECONCILE_ERRORS.labels(name)
        self._m_terminal = metrics.TERMINAL_RECONCILE_ERRORS.labels(name)
        self._m_panics = metrics.RECONCILE_PANICS.labels(name)
        self._m_time = metrics.RECONCILE_TIME.labels(name)
        self._m_active = metrics.ACTIVE_WORKERS.labels(name)

    # ------------------------------------------------------------------------------------ feeding

    def enqueue(self, key: str) -> None:
        """Ask for ``key`` to be reconciled (deduplicated)."""
        self.queue.add(key)

    def enqueue_after(self, key: str, delay: float) -> None:
        """Ask for ``key`` to be reconciled after ``delay`` seconds (earliest request wins)."""
        self.queue.add_after(key, delay)

    def watch(
        self,
        informer: Informer,
        mapper: KeyMapper | None = None,
        *,
        predicate: Predicate | None = None,
    ) -> EventHandler:
        """Enqueue keys for the informer's events.

        ``mapper`` turns an object into the keys to reconcile (default: the object's own key); for an
        update both the old and the new object are mapped, so a child that changed owner wakes both.
        ``predicate(old, new)`` can filter adds (``old=None``) and updates; deletes always pass.
        """
        map_keys: KeyMapper = mapper or (lambda obj: (object_key(obj),))

        def on_add(obj: Obj) -> None:
            if predicate is None or predicate(None, obj):
                for key in map_keys(obj):
                    self.queue.add(key)

        def on_update(old: Obj, new: Obj) -> None:
            if predicate is not None and not predicate(old, new):
                return
            for key in {*map_keys(old), *map_keys(new)}:
                self.queue.add(key)

        def on_delete(obj: Obj) -> None:
            for key in map_keys(obj):
                self.queue.add(key)

        handler = EventHandler(on_add=on_add, on_update=on_update, on_delete=on_delete)
        informer.add_event_handler(handler)
        return handler

    # ------------------------------------------------------------------------------------ running

    async def run(self) -> None:
        """Run the workers until :meth:`stop` (graceful) or cancellation (immediate)."""
        self._log.info("starting workers", workers=self.workers)
        async with asyncio.TaskGroup() as tg:
            for i in range(self.workers):
                tg.create_task(self._worker(), name=f"controller:{self.name}:worker-{i}")
        self._log.info("workers stopped")

    def start(self) -> None:
        """Run the workers in a task the controller owns."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"controller:{self.name}")

    async def stop(self, timeout: float = 30.0) -> bool:
        """Stop taking work, let in-flight reconciles finish for up to ``timeout`` s, then cancel them.

        Returns True when every in-flight reconcile finished in time.
        """
        self._stopping = True
        drained = await self.queue.shutdown_with_drain(timeout)
        if not drained:
            self._log.warning("in-flight reconciles did not finish in time; cancelling", timeout=timeout)
        await self.abort()
        return drained

    async def abort(self) -> None:
        """Stop at once: cancel in-flight reconciles (used when leadership is lost)."""
        self._stopping = True
        self.queue.shutdown()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _worker(self) -> None:
        queue = self.queue
        while not self._stopping:
            key = await queue.get()
            if key is None:
                return
            try:
                await self._process(key)
            finally:
                queue.done(key)

    async def _process(self, key: str) -> None:
        reconcile_id = str(uuid.uuid4())
        namespace, name = split_key(key)
        self._m_active.inc()
        start = time.monotonic()
        outcome: str | None = "success"
        with structlog.contextvars.bound_contextvars(
            controller=self.name, key=key, namespace=namespace, name=name, reconcile_id=reconcile_id
        ):
            try:
                async with asyncio.timeout(self.reconcile_timeout):
                    result = await self.reconcile(key)
            except asyncio.CancelledError:
                outcome = None  # aborted (leadership lost / shutdown): not a reconcile outcome
                raise
            except TerminalError as e:
                outcome = "error"
                self._m_terminal.inc()
                self._m_errors.inc()
                self.queue.forget(key)
                self._log.error("reconcile failed terminally; not retrying", key=key, error=str(e))
            except Exception as e:
                outcome = "error"
                self._m_errors.inc()
                if not isinstance(e, EXPECTED_ERRORS):
                    self._m_panics.inc()
                    self._log.exception("reconcile raised unexpectedly; retrying", key=key)
                else:
                    self._log.warning(
                        "reconcile failed; retrying",
                        key=key,
                        error=str(e) or repr(e),
                        requeues=self.queue.num_requeues(key),
                    )
                self.queue.add_rate_limited(key)
            else:
                if result is not None and result.requeue_after is not None and result.requeue_after > 0:
                    outcome = "requeue_after"
                    self.queue.forget(key)
                    self.queue.add_after(key, result.requeue_after)
                else:
                    self.queue.forget(key)
            finally:
                self._m_active.dec()
                if outcome is not None:
                    self._m_time.observe(time.monotonic() - start)
                    self._m_total[outcome].inc()


# ---------------------------------------------------------------------------------------- mappers


def owner_mapper(kind: str, api_group: str | None = None, *, controller_only: bool = True) -> KeyMapper:
    """Map a child object to the key(s) of its owner(s) of ``kind`` (by ownerReference).

    The owner lives in the child's namespace (ownerReferences cannot cross namespaces); for a
    cluster-scoped child the key is the owner's name.
    """

    def keys(obj: Obj) -> list[str]:
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace")
        out: list[str] = []
        for ref in meta.get("ownerReferences") or []:
            if ref.get("kind") != kind or (controller_only and not ref.get("controller")):
                continue
            if api_group is not None and str(ref.get("apiVersion", "")).rpartition("/")[0] != api_group:
                continue
            out.append(f"{ns}/{ref['name']}" if ns else str(ref["name"]))
        return out

    return keys


def label_mapper(name_label: str, namespace_label: str | None = None) -> KeyMapper:
    """Map an object to ``<ns>/<name>`` read from its labels (for cluster-scoped children such as
    Machines, which carry their Workspace's name and namespace as labels instead of an ownerReference).
    Without ``namespace_label`` the object's own namespace is used."""

    def keys(obj: Obj) -> list[str]:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        name = labels.get(name_label)
        if not name:
            return []
        ns = labels.get(namespace_label) if namespace_label else meta.get("namespace")
        return [f"{ns}/{name}" if ns else str(name)]

    return keys


def generation_changed(old: Obj | None, new: Obj) -> bool:
    """Predicate: adds, and updates that changed ``metadata.generation`` (spec changes)."""
    if old is None:
        return True
    return (old.get("metadata") or {}).get("generation") != (new.get("metadata") or {}).get("generation")


def resource_version_changed(old: Obj | None, new: Obj) -> bool:
    """Predicate: adds, and updates whose resourceVersion changed (skips no-op resyncs)."""
    if old is None:
        return True
    return (old.get("metadata") or {}).get("resourceVersion") != (new.get("metadata") or {}).get(
        "resourceVersion"
    )
