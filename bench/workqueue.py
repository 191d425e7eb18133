"""Work-queue microbenchmark: add/get/done cycles per second (SPEC §10 target: >= 100,000).

Runs three shapes on one event loop and prints one line each plus a JSON summary:
  * ``serial``    -- one key at a time: add, get, done (the bare cost of a cycle);
  * ``batched``   -- add N distinct keys, then get+done each (deque/dict growth, no waiting getters);
  * ``workers``   -- N distinct keys consumed by 4 concurrent worker coroutines that block in get().
Each shape runs with the ``workqueue_*`` metrics on (a named queue), as the controllers run it.

Usage: python bench/workqueue.py [--cycles N] [--repeat R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kaito.runtime.workqueue import WorkQueue


async def serial(n: int) -> float:
    q: WorkQueue[str] = WorkQueue("bench-serial")
    keys = [f"ns/obj-{i % 1000}" for i in range(n)]
    t0 = time.perf_counter()
    for k in keys:
        q.add(k)
        got = await q.get()
        assert got is not None
        q.done(got)
    return time.perf_counter() - t0


async def batched(n: int) -> float:
    q: WorkQueue[str] = WorkQueue("bench-batched")
    keys = [f"ns/obj-{i}" for i in range(n)]
    t0 = time.perf_counter()
    for k in keys:
        q.add(k)
    for _ in range(n):
        got = await q.get()
        assert got is not None
        q.done(got)
    return time.perf_counter() - t0


async def workers(n: int, concurrency: int = 4) -> float:
    q: WorkQueue[str] = WorkQueue("bench-workers")
    keys = [f"ns/obj-{i}" for i in range(n)]
    handled = 0

    async def worker() -> None:
        nonlocal handled
        while True:
            got = await q.get()
            if got is None:
                return
            handled += 1
            q.done(got)

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
        # Feed in slices so workers really block in get() between slices.
        step = 1000
        for i in range(0, n, step):
            for k in keys[i : i + step]:
                q.add(k)
            await asyncio.sleep(0)
        # Queued keys are still handed out after shutdown; get() returns None once the queue is empty.
        q.shutdown()
    assert handled == n
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, float] = {}
    for name, fn in (("serial", serial), ("batched", batched), ("workers", workers)):
        best = min([await fn(args.cycles) for _ in range(args.repeat)])
        rate = args.cycles / best
        results[name] = round(rate)
        print(f"{name:8s} {args.cycles} add/get/done cycles in {best:.3f} s: {rate:,.0f} cycles/s")
    print(json.dumps({"cycles_per_second": results, "target": 100_000}))


if __name__ == "__main__":
    asyncio.run(main())
