"""Controller semantics: results, retries, terminal errors, panics, workers, metrics, log context."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict

import structlog

from kaito.runtime import metrics
from kaito.runtime.controller import (
    DONE,
    Controller,
    ReconcileError,
    Result,
    TerminalError,
    generation_changed,
    label_mapper,
    owner_mapper,
)
from kaito.runtime.ratelimit import ItemExponentialFailureRateLimiter

_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def total(name: str, result: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value(
            "controller_runtime_reconcile_total", {"controller": name, "result": result}
        )
        or 0.0
    )


def counter(metric: str, name: str) -> float:
    return metrics.REGISTRY.get_sample_value(metric, {"controller": name}) or 0.0


async def wait_for(cond: asyncio.Event, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        await cond.wait()


async def test_error_is_retried_with_backoff_then_success_forgets() -> None:
    name = unique("retry")
    calls: list[str] = []
    finished = asyncio.Event()

    async def reconcile(key: str) -> Result:
        calls.append(key)
        if len(calls) < 3:
            raise ReconcileError("not yet")
        finished.set()
        return DONE

    ctrl = Controller(name, reconcile, rate_limiter=ItemExponentialFailureRateLimiter(0.001, 0.01))
    ctrl.start()
    ctrl.enqueue("ns/a")
    await wait_for(finished)
    assert calls == ["ns/a"] * 3
    await ctrl.stop(timeout=2)
    assert total(name, "error") == 2 and total(name, "success") == 1
    assert counter("controller_runtime_reconcile_errors_total", name) == 2
    assert counter("controller_runtime_reconcile_panics_total", name) == 0
    assert ctrl.queue.num_requeues("ns/a") == 0, "success forgets the backoff"


async def test_unexpected_exception_counts_as_panic_and_worker_survives() -> None:
    name = unique("panic")
    seen: dict[str, int] = defaultdict(int)
    ok = asyncio.Event()
    bad_retried = asyncio.Event()

    async def reconcile(key: str) -> Result:
        seen[key] += 1
        if key == "bad" and seen[key] == 1:
            raise KeyError("bug")
        if key == "bad":
            bad_retried.set()
        if key == "good":
            ok.set()
        return DONE

    ctrl = Controller(name, reconcile, rate_limiter=ItemExponentialFailureRateLimiter(0.001, 0.01))
    ctrl.start()
    ctrl.enqueue("bad")
    ctrl.enqueue("good")
    await wait_for(ok)
    await wait_for(bad_retried)
    await ctrl.stop(timeout=2)
    assert counter("controller_runtime_reconcile_panics_total", name) == 1
    assert total(name, "error") == 1


async def test_terminal_error_is_not_retried() -> None:
    """A retry would come after 1 ms; a sentinel queued 50 ms later on the one worker comes after it.

    The worker adds a retry (if it wrongly did) before the test adds the sentinel: the retry is ready
    first and the single worker takes keys in order, so by the time the sentinel is reconciled a retry
    of "k" would have run -- no shutdown that could drop it.
    """
    name = unique("terminal")
    calls: dict[str, int] = defaultdict(int)
    called = asyncio.Event()
    sentinel = asyncio.Event()

    async def reconcile(key: str) -> Result:
        calls[key] += 1
        if key == "sentinel":
            sentinel.set()
            return DONE
        called.set()
        raise TerminalError("spec is invalid")

    ctrl = Controller(name, reconcile, rate_limiter=ItemExponentialFailureRateLimiter(0.001, 0.01))
    ctrl.start()
    try:
        ctrl.enqueue("k")
        await wait_for(called)
        ctrl.queue.add_after("sentinel", 0.05)
        await wait_for(sentinel)
        assert calls == {"k": 1, "sentinel": 1}, "a terminal error must not be retried"
        assert ctrl.queue.num_requeues("k") == 0
    finally:
        await ctrl.stop(timeout=1)
    assert counter("controller_runtime_terminal_reconcile_errors_total", name) == 1
    assert counter("controller_runtime_reconcile_errors_total", name) == 1


async def test_requeue_after_forgets_backoff_and_adds_after_delay() -> None:
    name = unique("requeue")
    loop = asyncio.get_running_loop()
    times: list[float] = []
    twice = asyncio.Event()

    async def reconcile(key: str) -> Result:
        times.append(loop.time())
        if len(times) == 2:
            twice.set()
            return DONE
        return Result(requeue_after=0.2)

    ctrl = Controller(name, reconcile)
    ctrl.queue.rate_limiter.when("k")  # pretend an earlier failure
    ctrl.start()
    ctrl.enqueue("k")
    await wait_for(twice)
    await ctrl.stop(timeout=1)
    assert times[1] - times[0] >= 0.19
    assert total(name, "requeue_after") == 1 and total(name, "success") == 1
    assert ctrl.queue.num_requeues("k") == 0


async def test_workers_run_concurrently_but_never_on_the_same_key() -> None:
    name = unique("workers")
    running: set[str] = set()
    max_parallel = 0
    overlap = False
    release = asyncio.Event()
    three_running = asyncio.Event()
    count = 0
    all_done = asyncio.Event()

    async def reconcile(key: str) -> Result:
        nonlocal max_parallel, overlap, count
        if key in running:
            overlap = True
        running.add(key)
        max_parallel = max(max_parallel, len(running))
        if len(running) == 3:
            three_running.set()
        await release.wait()
        running.discard(key)
        count += 1
        if count >= 4:
            all_done.set()
        return DONE

    ctrl = Controller(name, reconcile, workers=3)
    ctrl.start()
    for k in ["a", "b", "c"]:
        ctrl.enqueue(k)
    await wait_for(three_running)
    ctrl.enqueue("a")  # while "a" is processing: must wait, not run in parallel
    assert metrics.ACTIVE_WORKERS.labels(name)._value.get() == 3
    release.set()
    await wait_for(all_done)
    await ctrl.stop(timeout=2)
    assert max_parallel == 3 and not overlap and count == 4
    assert counter("controller_runtime_max_concurrent_reconciles", name) == 3
    assert counter("controller_runtime_active_workers", name) == 0


async def test_stop_finishes_in_flight_and_abort_cancels() -> None:
    name = unique("stop")
    started = asyncio.Event()
    finished = False
    cancelled = False

    async def slow(key: str) -> Result:
        nonlocal finished, cancelled
        started.set()
        try:
            await asyncio.sleep(0.1 if key == "graceful" else 30)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finished = True
        return DONE

    ctrl = Controller(name, slow)
    ctrl.start()
    ctrl.enqueue("graceful")
    await wait_for(started)
    assert await ctrl.stop(timeout=5) is True
    assert finished and not cancelled

    started.clear()
    ctrl2 = Controller(unique("abort"), slow)
    ctrl2.start()
    ctrl2.enqueue("slow")
    await wait_for(started)
    async with asyncio.timeout(2):
        await ctrl2.abort()
    assert cancelled


async def test_reconcile_log_lines_carry_key_and_reconcile_id() -> None:
    name = unique("logs")
    done = asyncio.Event()
    logger = structlog.get_logger("test")

    async def reconcile(key: str) -> Result:
        logger.info("inside")
        done.set()
        return DONE

    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        ctrl = Controller(name, reconcile)
        ctrl.start()
        ctrl.enqueue("ns/obj")
        await wait_for(done)
        await ctrl.stop(timeout=1)
    inside = [e for e in logs if e.get("event") == "inside"]
    assert len(inside) == 1
    line = inside[0]
    assert line["key"] == "ns/obj" and line["namespace"] == "ns" and line["name"] == "obj"
    assert line["controller"] == name and len(line["reconcile_id"]) == 36


def test_mappers_and_predicates() -> None:
    child = {
        "metadata": {
            "namespace": "ns",
            "name": "dep",
            "ownerReferences": [
                {"apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace", "name": "ws", "controller": True},
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "cm"},
            ],
        }
    }
    assert owner_mapper("Workspace")(child) == ["ns/ws"]
    assert owner_mapper("Workspace", "kaito.sh")(child) == ["ns/ws"]
    assert owner_mapper("Workspace", "other.io")(child) == []
    assert owner_mapper("ConfigMap")(child) == []  # not the controller ref
    assert owner_mapper("ConfigMap", controller_only=False)(child) == ["ns/cm"]
    machine = {
        "metadata": {
            "name": "m1",
            "labels": {"kaito.sh/workspace": "ws", "kaito.sh/workspacenamespace": "ns"},
        }
    }
    assert label_mapper("kaito.sh/workspace", "kaito.sh/workspacenamespace")(machine) == ["ns/ws"]
    assert label_mapper("missing")(machine) == []
    a = {"metadata": {"generation": 1}}
    assert generation_changed(None, a)
    assert not generation_changed(a, {"metadata": {"generation": 1}})
    assert generation_changed(a, {"metadata": {"generation": 2}})
