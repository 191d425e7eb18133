"""A list-then-watch informer (client-go's Reflector + Indexer + SharedInformer), for any resource.

* LIST is paged (``limit``/``continue``) and a consistent read (``resourceVersion=""``); a continue token
  that expired (410) restarts the LIST from the first page.
* WATCH asks for bookmarks and a server timeout randomised in [5, 10) min (as client-go does, to spread
  reconnects), and resumes from the last resourceVersion seen -- events and bookmarks alike.
* A watch that answers 410 Gone/Expired (the resourceVersion was compacted) triggers a relist; the relist
  replaces the store and emits ``on_delete`` for every key that vanished in the gap and ``on_update`` /
  ``on_add`` for what changed (DeltaFIFO ``Replace`` semantics).
* A client-side inactivity timeout (reset by every byte, bookmarks included) ends a half-open watch; the
  watch is then re-established from the last resourceVersion.
* Transport errors and 429/5xx are retried with exponential backoff and full jitter (0.8 s .. 30 s,
  reset after 2 min of health), client-go's reflector numbers.

Objects pass through ``transform`` (default: drop ``metadata.managedFields``) before they are cached.
Handlers run synchronously inside the informer's task, in event order; they must be fast (typically
they enqueue a key). An exception in a handler is logged and does not stop the informer. Cached objects
are never mutated: an update stores the new object and hands both versions to the handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
import structlog

from kaito.runtime.kube import ApiError, KubeClient, Obj, Resource, object_key, resource_version
from kaito.runtime.metrics import INFORMER_RELISTS, INFORMER_WATCH_RESTARTS
from kaito.runtime.store import Indexer, Store

log = structlog.get_logger("kaito.runtime.informer")

TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,
    ConnectionError,
    TimeoutError,
    OSError,
    ValueError,  # a truncated or garbled JSON line
)


def strip_managed_fields(obj: Obj) -> Obj:
    """Default informer transform: drop ``metadata.managedFields`` before caching.

    Server-side-apply bookkeeping is often the largest part of an object and no reconciler reads it
    from the cache; dropping it keeps the controller's memory flat (controller-runtime users do the
    same with a cache TransformFunc). The object is freshly decoded and not shared yet.
    """
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return obj


@dataclass
class EventHandler:
    """Callbacks for cache changes; any of them may be left out."""

    on_add: Callable[[Obj], None] | None = None
    on_update: Callable[[Obj, Obj], None] | None = None
    on_delete: Callable[[Obj], None] | None = None


class Backoff:
    """Exponential backoff with jitter: ``initial * 2**n`` capped at ``maximum``, times (1 + U[0, jitter)).

    It resets once ``reset_after`` seconds passed since the last failure.
    """

    def __init__(
        self,
        initial: float = 0.8,
        maximum: float = 30.0,
        jitter: float = 1.0,
        reset_after: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.reset_after = reset_after
        self._clock = clock
        self._current = 0.0
        self._last_failure: float | None = None

    def next(self) -> float:
        """Record a failure and return how long to wait before the next try."""
        now = self._clock()
        if self._last_failure is None or now - self._last_failure > self.reset_after:
            self._current = self.initial
        else:
            self._current = min(self.maximum, self._current * 2)
        self._last_failure = now
        return self._current * (1.0 + random.random() * self.jitter)

    def reset(self) -> None:
        """Forget past failures."""
        self._current = 0.0
        self._last_failure = None


class _WatchEnded(Exception):
    """The watch stream ended; ``reason`` labels the restart metric."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class InformerStats:
    """Counters tests and logs use to see what the informer did."""

    lists: int = 0
    relists_after_expired: int = 0
    watches: int = 0
    watch_restarts: dict[str, int] = field(default_factory=dict)
    events: int = 0
    bookmarks: int = 0


class Informer:
    """Keeps a :class:`Store` in sync with one resource (optionally one namespace and selectors).

    Start it with :meth:`start` (the informer owns its task; :meth:`stop` cancels and awaits it) or run
    :meth:`run` in a task you own. :meth:`wait_for_sync` returns once the first LIST is in the store.
    """

    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        indexers: Mapping[str, Indexer] | None = None,
        page_size: int = 500,
        watch_timeout: tuple[float, float] = (300.0, 600.0),
        inactivity_timeout: float = 70.0,
        backoff: Backoff | None = None,
        min_watch_duration: float = 1.0,
        transform: Callable[[Obj], Obj] | None = strip_managed_fields,
    ) -> None:
        self.client = client
        self.resource = resource
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.inactivity_timeout = inactivity_timeout
        self.min_watch_duration = min_watch_duration
        self.transform = transform
        self.backoff = backoff or Backoff()
        self.store = Store(indexers)
        self.stats = InformerStats()
        self.last_resource_version = ""
        self._handlers: list[EventHandler] = []
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._log = log.bind(resource=str(resource), namespace=namespace)

    # -------------------------------------------------------------------------------- public API

    def add_event_handler(self, handler: EventHandler) -> None:
        """Register ``handler``; if the cache already holds objects, it first gets an add for each."""
        self._handlers.append(handler)
        if handler.on_add is not None:
            for obj in self.store.list():
                self._call(handler.on_add, obj)

    def add_indexer(self, name: str, fn: Indexer) -> None:
        """Add an index to the store (existing objects are indexed at once)."""
        self.store.add_indexer(name, fn)

    @property
    def has_synced(self) -> bool:
        """Whether the first LIST has been stored (and its events delivered)."""
        return self._synced.is_set()

    async def wait_for_sync(self, timeout: float | None = None) -> bool:
        """Wait until :attr:`has_synced`; False if ``timeout`` expired first."""
        try:
            async with asyncio.timeout(timeout):
                await self._synced.wait()
        except TimeoutError:
            return False
        return True

    def start(self) -> None:
        """Run the informer in a task it owns."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"informer:{self.resource}")

    async def stop(self) -> None:
        """Cancel the task started by :meth:`start` and wait for it to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def description(self) -> str:
        """Human-readable description for logs and errors."""
        parts = [str(self.resource)]
        if self.namespace:
            parts.append(f"ns={self.namespace}")
        if self.label_selector:
            parts.append(f"labels={self.label_selector}")
        if self.field_selector:
            parts.append(f"fields={self.field_selector}")
        return " ".join(parts)

    # ---------------------------------------------------------------------------------- main loop

    async def run(self) -> None:
        """List, then watch forever (until cancelled), recovering from every error."""
        need_list = True
        expired_streak = 0  # 410s with no watch event in between
        progress_at_expiry = -1
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                await self._watch()
            except _WatchEnded as e:
                self._count_restart(e.reason)
                if e.reason == "too-short":
                    await asyncio.sleep(self.backoff.next())
                elif e.reason == "broken":
                    self._log.info("watch broken mid-stream; resuming", error=repr(e.__cause__))
                elif e.reason == "inactivity":
                    # A half-open connection: reconnect at once from the last resourceVersion.
                    self._log.warning("watch inactive; reconnecting", timeout=self.inactivity_timeout)
            except ApiError as e:
                if e.expired:
                    # The resourceVersion we hold was compacted away: only a relist can tell what
                    # happened in the gap. No backoff -- this is the normal way to catch up.
                    self._log.info("watch expired; relisting", rv=self.last_resource_version, error=str(e))
                    self.stats.relists_after_expired += 1
                    self._count_restart("expired")
                    need_list = True
                    progress = self.stats.events + self.stats.bookmarks
                    expired_streak = 1 if progress != progress_at_expiry else expired_streak + 1
                    progress_at_expiry = progress
                    if expired_streak > 1:
                        # Expired again right after a relist: the server is not making progress;
                        # do not spin on LIST+WATCH.
                        await asyncio.sleep(self.backoff.next())
                    continue
                delay = self.backoff.next()
                self._log.warning(
                    "api error in list/watch; backing off",
                    status=e.status,
                    error=str(e),
                    delay=round(delay, 3),
                )
                self._count_restart(f"http-{e.status}")
                # Anything but a retryable status may mean our view is wrong: relist to be safe. So
                # does "Too large resource version" (504): the server is behind the RV we hold.
                if not e.retryable or "too large resource version" in e.message.lower():
                    need_list = True
                await asyncio.sleep(delay)
            except TRANSPORT_ERRORS as e:
                delay = self.backoff.next()
                self._count_restart("transport")
                self._log.warning(
                    "transport error in list/watch; backing off", error=repr(e), delay=round(delay, 3)
                )
                await asyncio.sleep(delay)

    def _count_restart(self, reason: str) -> None:
        self.stats.watch_restarts[reason] = self.stats.watch_restarts.get(reason, 0) + 1
        INFORMER_WATCH_RESTARTS.labels(str(self.resource), reason).inc()

    async def _list(self) -> None:
        """Paged consistent LIST; replaces the store and emits the differences."""
        items: list[Obj] = []
        cont: str | None = None
        list_rv = ""
        while True:
            try:
                page = await self.client.list(
                    self.resource,
                    self.namespace,
                    label_selector=self.label_selector,
                    field_selector=self.field_selector,
                    limit=self.page_size,
                    continue_=cont,
                )
            except ApiError as e:
                if e.expired and cont:
                    # The continue token outlived etcd's compaction window: start over.
                    self._log.info("list continue token expired; restarting list")
                    items, cont = [], None
                    continue
                raise
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            list_rv = str(meta.get("resourceVersion", list_rv))
            cont = meta.get("continue") or None
            if not cont:
                break
        if self.stats.lists:
            INFORMER_RELISTS.labels(str(self.resource)).inc()
        self.stats.lists += 1
        api_version = self.resource.api_version
        kind = self.resource.kind
        transform = self.transform
        for i, obj in enumerate(items):
            # Items of a List carry no apiVersion/kind; give them the ones a GET or watch would have.
            obj.setdefault("apiVersion", api_version)
            if kind:
                obj.setdefault("kind", kind)
            if transform is not None:
                items[i] = transform(obj)
        changes, deleted = self.store.replace(items)
        self.last_resource_version = list_rv
        for old, new in changes:
            self._dispatch(old, new)
        for obj in deleted:
            self._dispatch_delete(obj)
        self._synced.set()
        self._log.debug("listed", items=len(items), rv=list_rv, changed=len(changes), deleted=len(deleted))

    async def _watch(self) -> None:
        """One watch request, consumed until it ends; raises to tell :meth:`run` what happened."""
        lo, hi = self.watch_timeout
        timeout_seconds = int(random.uniform(lo, hi)) if hi > lo else int(lo)
        query: dict[str, str | int | bool | None] = {
            "watch": True,
            "allowWatchBookmarks": True,
            "resourceVersion": self.last_resource_version or None,
            "timeoutSeconds": timeout_seconds,
            "labelSelector": self.label_selector,
            "fieldSelector": self.field_selector,
        }
        started = time.monotonic()
        events = 0
        try:
            async with asyncio.timeout(self.inactivity_timeout):
                resp = await self.client.open_stream(self.resource.path(self.namespace), query=query)
        except TimeoutError:
            raise _WatchEnded("inactivity") from None
        self.stats.watches += 1
        try:
            buf = b""
            while True:
                try:
                    async with asyncio.timeout(self.inactivity_timeout):
                        chunk = await resp.content.readany()
                except TimeoutError:
                    raise _WatchEnded("inactivity") from None
                if not chunk:
                    break
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    line, buf = buf[:nl], buf[nl + 1 :]
                    if line.strip():
                        events += 1
                        self._handle_event(json.loads(line))
            if buf.strip():
                events += 1
                self._handle_event(json.loads(buf))
        except TRANSPORT_ERRORS as e:
            if events or time.monotonic() - started >= self.min_watch_duration:
                # A watch that worked and then broke (a proxy or load balancer cutting long requests,
                # a reset connection): the server is reachable, so resume from the last
                # resourceVersion at once. Growing the backoff here left caches 30-60 s stale when a
                # proxy cut watches every few seconds (bench/chaos.py).
                self.backoff.reset()
                raise _WatchEnded("broken") from e
            raise
        finally:
            # close(), not release(): a half-read stream must not go back to the connection pool.
            resp.close()
        if events:
            self.backoff.reset()
        if events == 0 and time.monotonic() - started < self.min_watch_duration:
            raise _WatchEnded("too-short")
        raise _WatchEnded("closed")

    def _handle_event(self, event: Obj) -> None:
        etype = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            if "code" in event:  # a bare Status line instead of an event
                raise ApiError.from_status(int(event["code"]), event)
            raise ValueError(f"malformed watch event: {str(event)[:200]}")
        if etype == "ERROR":
            raise ApiError.from_status(int(obj.get("code") or 500), obj)
        if self.transform is not None and etype != "BOOKMARK":
            obj = self.transform(obj)
        rv = resource_version(obj)
        if etype == "BOOKMARK":
            self.stats.bookmarks += 1
            if rv:
                self.last_resource_version = rv
            return
        self.stats.events += 1
        if etype in ("ADDED", "MODIFIED"):
            old = self.store.upsert(obj)
            if rv:
                self.last_resource_version = rv
            self._dispatch(old, obj)
        elif etype == "DELETED":
            old = self.store.delete(object_key(obj))
            if rv:
                self.last_resource_version = rv
            # The event carries the final state; it is more recent than what we cached.
            self._dispatch_delete(obj if obj.get("metadata") else (old or obj))
        else:
            raise ValueError(f"unknown watch event type {etype!r}")

    # ---------------------------------------------------------------------------------- dispatch

    def _dispatch(self, old: Obj | None, new: Obj) -> None:
        for h in self._handlers:
            if old is None:
                if h.on_add is not None:
                    self._call(h.on_add, new)
            elif h.on_update is not None:
                self._call(h.on_update, old, new)

    def _dispatch_delete(self, obj: Obj) -> None:
        for h in self._handlers:
            if h.on_delete is not None:
                self._call(h.on_delete, obj)

    def _call(self, fn: Callable[..., None], *args: Obj) -> None:
        try:
            fn(*args)
        except Exception:
            self._log.exception("event handler failed", key=object_key(args[-1]))
