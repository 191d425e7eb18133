"""Work-queue semantics (client-go util/workqueue): dedup, processing exclusivity, delays, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from kaito.runtime import metrics
from kaito.runtime.ratelimit import ItemExponentialFailureRateLimiter
from kaito.runtime.workqueue import WorkQueue


async def get_within(q: WorkQueue[str], timeout: float = 2.0) -> str | None:
    async with asyncio.timeout(timeout):
        return await q.get()


async def test_fifo_and_dedup_while_dirty() -> None:
    q: WorkQueue[str] = WorkQueue()
    for k in ["a", "b", "a", "c", "b"]:
        q.add(k)
    assert len(q) == 3 and q.depth() == 3
    assert [q.get_nowait() for _ in range(3)] == ["a", "b", "c"]
    assert q.get_nowait() is None


async def test_key_added_while_processing_is_handed_out_again_exactly_once_after_done() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("k")
    key = await get_within(q)
    assert key == "k" and q.is_processing("k")
    # Added (several times) while processing: marked dirty, but NOT handed to another worker.
    q.add("k")
    q.add("k")
    assert q.is_dirty("k")
    assert len(q) == 0 and q.get_nowait() is None
    other = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    assert not other.done(), "a second worker must not receive a key that is being processed"
    q.done("k")
    assert await asyncio.wait_for(other, 2) == "k"
    # Exactly once: nothing else is queued after the re-delivery.
    assert q.get_nowait() is None and len(q) == 0
    q.done("k")
    assert not q.is_processing("k") and q.depth() == 0
    assert q.get_nowait() is None


async def test_done_without_readd_does_not_requeue() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("k")
    assert q.get_nowait() == "k"
    q.done("k")
    assert q.get_nowait() is None
    q.done("unknown")  # tolerated, like client-go


async def test_get_blocks_until_add_and_wakes_one_getter_per_key() -> None:
    q: WorkQueue[str] = WorkQueue()
    getters = [asyncio.create_task(q.get()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(g.done() for g in getters)
    q.add("x")
    done, pending = await asyncio.wait(getters, timeout=2, return_when=asyncio.FIRST_COMPLETED)
    assert [t.result() for t in done] == ["x"]
    await asyncio.sleep(0.01)
    assert len(pending) == 2 and not any(t.done() for t in pending)
    q.shutdown()
    assert await asyncio.gather(*pending) == [None, None]


async def test_cancelled_getter_does_not_swallow_a_wakeup() -> None:
    q: WorkQueue[str] = WorkQueue()
    g1 = asyncio.create_task(q.get())
    g2 = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.add("x")  # wakes g1 ...
    g1.cancel()  # ... which is cancelled before it runs
    assert await asyncio.wait_for(g2, 2) == "x"


async def test_shutdown_hands_out_queued_then_none_and_ignores_adds() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    q.add("b")
    q.shutdown()
    q.add("c")
    q.add_after("d", 0.01)
    assert await get_within(q) == "a"
    assert await get_within(q) == "b"
    assert await get_within(q) is None
    assert q.shutting_down


async def test_shutdown_with_drain_waits_for_in_flight_items() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    key = await get_within(q)
    assert key == "a"
    drain = asyncio.create_task(q.shutdown_with_drain(timeout=5))
    await asyncio.sleep(0.01)
    assert not drain.done(), "drain must wait for the in-flight item"
    q.done("a")
    assert await asyncio.wait_for(drain, 2) is True


async def test_shutdown_with_drain_times_out() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    assert q.get_nowait() == "a"
    assert await q.shutdown_with_drain(timeout=0.05) is False


async def test_add_after_delays_and_keeps_earliest_deadline() -> None:
    q: WorkQueue[str] = WorkQueue()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    q.add_after("k", 5.0)
    q.add_after("k", 0.05)  # earlier: replaces
    q.add_after("k", 10.0)  # later: ignored
    assert q.waiting() == 1 and q.get_nowait() is None
    assert await get_within(q) == "k"
    elapsed = loop.time() - t0
    assert 0.04 <= elapsed < 1.0
    q.done("k")
    assert q.waiting() == 0
    # The superseded 5 s and 10 s deadlines must not fire later.
    assert q.get_nowait() is None


async def test_add_after_zero_is_add_and_orders_by_deadline() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add_after("late", 0.15)
    q.add_after("early", 0.05)
    q.add_after("now", 0)
    assert q.get_nowait() == "now"
    assert await get_within(q) == "early"
    assert await get_within(q) == "late"


async def test_add_after_on_dirty_key_does_not_duplicate() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("k")
    q.add_after("k", 0.02)
    assert await get_within(q) == "k"
    q.done("k")
    # When the delay fires the key is added once more (it was not dirty any more), and only once.
    assert await get_within(q) == "k"
    q.done("k")
    assert q.get_nowait() is None and q.waiting() == 0


async def test_rate_limited_backoff_forget_and_requeues() -> None:
    q: WorkQueue[str] = WorkQueue(rate_limiter=ItemExponentialFailureRateLimiter(0.01, 1.0))
    loop = asyncio.get_running_loop()
    for n in range(3):
        t0 = loop.time()
        q.add_rate_limited("k")
        assert await get_within(q) == "k"
        assert loop.time() - t0 >= 0.01 * 2**n * 0.9
        q.done("k")
    assert q.num_requeues("k") == 3
    q.forget("k")
    assert q.num_requeues("k") == 0


def _sample(name: str, labels: dict[str, str]) -> float | None:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return value


async def test_metrics_follow_client_go_semantics() -> None:
    name = "unit-metrics-queue"
    labels = {"name": name, "controller": name}
    q: WorkQueue[str] = WorkQueue(name)
    q.add("a")
    q.add("a")  # deduped: not counted
    q.add("b")
    assert _sample("workqueue_adds_total", labels) == 2
    assert _sample("workqueue_depth", labels) == 2
    assert q.get_nowait() == "a"
    assert _sample("workqueue_depth", labels) == 1
    q.add("a")  # dirty while processing: depth counts it
    assert _sample("workqueue_depth", labels) == 2
    assert (_sample("workqueue_longest_running_processor_seconds", labels) or 0) >= 0
    q.done("a")
    assert _sample("workqueue_work_duration_seconds_count", labels) == 1
    assert _sample("workqueue_queue_duration_seconds_count", labels) == 1
    q.add_after("c", 0)  # every add_after counts as a retry, even a zero delay
    q.add_rate_limited("d")
    assert _sample("workqueue_retries_total", labels) == 2
    assert _sample("workqueue_unfinished_work_seconds", labels) == 0
    q.shutdown()


@pytest.mark.parametrize("workers", [1, 4])
async def test_many_workers_never_process_one_key_concurrently(workers: int) -> None:
    q: WorkQueue[str] = WorkQueue()
    active: set[str] = set()
    handled = 0
    violations = 0

    async def worker() -> None:
        nonlocal handled, violations
        while (key := await q.get()) is not None:
            if key in active:
                violations += 1
            active.add(key)
            await asyncio.sleep(0)
            if handled % 3 == 0:
                q.add(key)  # re-added while processing
            await asyncio.sleep(0)
            active.discard(key)
            handled += 1
            q.done(key)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    for i in range(200):
        q.add(f"k{i % 10}")
        await asyncio.sleep(0)
    # Queued keys are still handed out after shutdown; workers end when the queue is empty.
    q.shutdown()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert violations == 0
    assert handled >= 10
