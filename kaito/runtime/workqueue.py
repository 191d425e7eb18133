"""A level-triggered work queue with client-go's semantics (``util/workqueue``), for one asyncio loop.

Three behaviours in one class, as client-go layers them:

* **basic queue** -- a FIFO plus a *dirty* set (keys waiting to be processed) and a *processing* set
  (keys handed out and not yet ``done``). Adding a dirty key is a no-op; adding a key that is being
  processed only marks it dirty, and ``done`` puts it back in the FIFO -- so one key is never handled
  by two workers at once and is handed out again exactly once after ``done``.
* **delaying queue** -- ``add_after`` keeps each waiting key once, at its *earliest* ready time.
* **rate-limiting queue** -- ``add_rate_limited`` asks the rate limiter for the delay; ``forget`` resets
  the key's backoff.

All methods except :meth:`get` and :meth:`shutdown_with_drain` are synchronous and must be called from
the loop's thread. Timers use ``loop.call_later``, so the queue owns no background task.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

from kaito.runtime.metrics import QueueStats, queue_stats
from kaito.runtime.ratelimit import RateLimiter, default_controller_rate_limiter

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Rate-limiting, delaying, deduplicating work queue.

    ``name`` labels the ``workqueue_*`` metrics; an empty name records none (as client-go's unnamed
    queues). ``clock`` must be monotonic and in seconds; it is used for metrics and for computing the
    delays handed to the event loop's timers.
    """

    def __init__(
        self,
        name: str = "",
        *,
        rate_limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.rate_limiter: RateLimiter = rate_limiter or default_controller_rate_limiter()
        self._clock = clock
        self._queue: deque[K] = deque()
        # dirty key -> time of its first add while dirty (queue latency runs from there to get()).
        self._dirty: dict[K, float] = {}
        # processing key -> time it was handed out by get().
        self._processing: dict[K, float] = {}
        self._getters: deque[asyncio.Future[None]] = deque()
        self._shutting_down = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        # delaying part: heap of (ready_at, seq, key) with lazy deletion; _waiting holds the live ready_at.
        self._heap: list[tuple[float, int, K]] = []
        self._waiting: dict[K, float] = {}
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._stats: QueueStats | None = queue_stats(name, self) if name else None

    # ----------------------------------------------------------------------------------- basic queue

    def add(self, key: K) -> None:
        """Mark ``key`` as needing processing. No-op while shutting down or if already dirty."""
        if self._shutting_down or key in self._dirty:
            return
        self._dirty[key] = self._clock()
        if self._stats is not None:
            self._stats.adds += 1
        if key in self._processing:
            # done() will re-queue it; never hand one key to two workers.
            return
        self._queue.append(key)
        self._wake_getter()

    def _wake_getter(self) -> None:
        getters = self._getters
        while getters:
            fut = getters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def get(self) -> K | None:
        """Wait for the next key and mark it processing; ``None`` once shut down and empty.

        The caller must call :meth:`done` with the key when finished, whatever happened.
        """
        queue = self._queue
        while not queue:
            if self._shutting_down:
                return None
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._getters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                # A wake-up meant for us must not be lost: pass it on if work is still queued.
                if queue:
                    self._wake_getter()
                raise
        return self._take()

    def get_nowait(self) -> K | None:
        """Return the next key (marked processing) without waiting, or ``None`` if none is queued."""
        if not self._queue:
            return None
        return self._take()

    def _take(self) -> K:
        key = self._queue.popleft()
        now = self._clock()
        added = self._dirty.pop(key)
        self._processing[key] = now
        if self._stats is not None:
            self._stats.queue_duration.observe(now - added)
        return key

    def done(self, key: K) -> None:
        """Mark ``key`` as finished; if it was added meanwhile, queue it again (once)."""
        started = self._processing.pop(key, None)
        if started is None:
            return
        if self._stats is not None:
            self._stats.work_duration.observe(self._clock() - started)
        if key in self._dirty:
            self._queue.append(key)
            self._wake_getter()
        # A drain waits for handed-out keys only: one re-queued just now must not hold it up (the
        # workers may already have stopped taking keys), so check even after re-queueing.
        if not self._processing and self._drain_waiters:
            for fut in self._drain_waiters:
                if not fut.done():
                    fut.set_result(None)
            self._drain_waiters.clear()

    def __len__(self) -> int:
        """Number of keys ready to be handed out (informational only; never gate logic on it)."""
        return len(self._queue)

    def depth(self) -> int:
        """Number of dirty keys, including keys waiting for their own processing to finish."""
        return len(self._dirty)

    def processing_started(self) -> Iterable[float]:
        """Start times of the keys being processed (for the unfinished-work metrics)."""
        return self._processing.values()

    def is_processing(self, key: K) -> bool:
        """Whether ``key`` has been handed out and not yet marked done."""
        return key in self._processing

    def is_dirty(self, key: K) -> bool:
        """Whether ``key`` is waiting to be handed out."""
        return key in self._dirty

    @property
    def shutting_down(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._shutting_down

    def shutdown(self) -> None:
        """Stop accepting keys, drop delayed keys, and wake every waiting :meth:`get`.

        Keys already queued are still handed out (client-go semantics); ``get`` returns ``None`` once
        the queue is empty.
        """
        self._shutting_down = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()
        self._waiting.clear()
        getters, self._getters = self._getters, deque()
        for fut in getters:
            if not fut.done():
                fut.set_result(None)

    async def shutdown_with_drain(self, timeout: float | None = None) -> bool:
        """Shut down, then wait until every handed-out key is ``done``; False if ``timeout`` expired."""
        self.shutdown()
        if not self._processing:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            return False
        return True

    # --------------------------------------------------------------------------------- delaying queue

    def add_after(self, key: K, delay: float) -> None:
        """Add ``key`` after ``delay`` seconds; a key already waiting keeps the earlier ready time."""
        if self._shutting_down:
            return
        if self._stats is not None:
            self._stats.retries += 1
        if delay <= 0:
            self.add(key)
            return
        ready = self._clock() + delay
        current = self._waiting.get(key)
        if current is not None and current <= ready:
            return
        self._waiting[key] = ready
        heapq.heappush(self._heap, (ready, next(self._seq), key))
        if self._timer is None or ready < self._timer_at:
            self._arm(ready)

    def _arm(self, ready: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = ready
        self._timer = asyncio.get_running_loop().call_later(max(0.0, ready - self._clock()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._clock()
        heap = self._heap
        while heap and heap[0][0] <= now:
            ready, _, key = heapq.heappop(heap)
            if self._waiting.get(key) != ready:
                continue  # superseded by an earlier add_after
            del self._waiting[key]
            self.add(key)
        # Drop superseded entries at the top so the next timer is for a live deadline.
        while heap and self._waiting.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        if heap:
            self._arm(heap[0][0])

    def waiting(self) -> int:
        """Number of keys waiting for their ``add_after`` deadline."""
        return len(self._waiting)

    # ---------------------------------------------------------------------------- rate-limiting queue

    def add_rate_limited(self, key: K) -> None:
        """Add ``key`` after the delay the rate limiter assigns (counts a failure for it)."""
        self.add_after(key, self.rate_limiter.when(key))

    def forget(self, key: K) -> None:
        """Reset ``key``'s backoff. Call it on success; :meth:`done` must still be called."""
        self.rate_limiter.forget(key)

    def num_requeues(self, key: K) -> int:
        """How many times ``key`` was rate limited since it was last forgotten."""
        return self.rate_limiter.num_requeues(key)
