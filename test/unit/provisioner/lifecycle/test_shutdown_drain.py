"""Regression: a graceful stop must not wait out its timeout when a key was re-added while in flight.

The provisioner hit this on SIGTERM: an event re-added a Machine's key during its last reconcile, the
worker finished (re-queueing the key) and exited, and the drain then waited 30 s for nothing.
"""

from __future__ import annotations

import asyncio

from kaito.runtime.workqueue import WorkQueue


async def test_drain_completes_when_the_in_flight_key_was_re_added() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("m1")
    assert q.get_nowait() == "m1"
    q.add("m1")  # an event during the reconcile: dirty again
    drain = asyncio.create_task(q.shutdown_with_drain(timeout=10))
    await asyncio.sleep(0)  # let the drain start waiting
    assert not drain.done()
    q.done("m1")  # re-queues m1, but nothing is handed out any more
    assert await asyncio.wait_for(drain, 2) is True
