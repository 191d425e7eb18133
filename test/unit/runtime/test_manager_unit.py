"""Manager lifecycle without a cluster: runnables, probes and graceful stop (no informers, no election)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
import structlog
from kubernetes_asyncio.client import ApiClient, Configuration

from kaito.runtime.controller import Result
from kaito.runtime.kube import CONFIGMAPS, KubeClient
from kaito.runtime.manager import Manager, ManagerOptions, RunnableFailed


@pytest.fixture
async def kube() -> KubeClient:
    # Never contacted: this manager has no informers and no leader election.
    api = ApiClient(Configuration(host="http://127.0.0.1:9"))
    try:
        return KubeClient(api)
    finally:
        await api.close()


def options() -> ManagerOptions:
    return ManagerOptions(
        name="unit", metrics_host="127.0.0.1", metrics_port=0, probe_host="127.0.0.1", probe_port=0
    )


async def test_runnables_start_and_are_cancelled_on_stop(kube: KubeClient) -> None:
    mgr = Manager(kube, options())
    started: set[str] = set()
    cancelled: set[str] = set()
    both = asyncio.Event()

    def runnable(name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            started.add(name)
            if len(started) == 2:
                both.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.add(name)
                raise

        return run

    mgr.add_runnable("webhook", runnable("webhook"), needs_leader=False)
    mgr.add_runnable("gc", runnable("gc"), needs_leader=True)
    task = asyncio.create_task(mgr.run())
    async with asyncio.timeout(5):
        await both.wait()
    assert mgr.is_leader and mgr.synced
    assert mgr.probe_server is not None and mgr.metrics_server is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{mgr.probe_server.port}/readyz") as r:
            assert r.status == 200
        async with http.get(f"http://127.0.0.1:{mgr.metrics_server.port}/metrics") as r:
            assert r.status == 200
    mgr.stop()
    async with asyncio.timeout(5):
        await task
    assert cancelled == {"webhook", "gc"}
    assert not mgr.is_leader


async def test_a_runnable_that_cannot_bind_stops_the_manager_and_run_main_returns_1(kube: KubeClient) -> None:
    """A webhook-like server whose port is taken: the manager stops and exits 1 naming it (not 0)."""
    mgr = Manager(kube, ManagerOptions(name="unit-fail", metrics_port=None, probe_port=None))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]

    async def webhook() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)  # EADDRINUSE
        async with server:
            await server.serve_forever()

    mgr.add_runnable("webhook", webhook, needs_leader=False)
    try:
        with structlog.testing.capture_logs() as logs:
            async with asyncio.timeout(5):
                code = await mgr.run_main()
    finally:
        taken.close()
    assert code == 1, "a crashed runnable must not exit 0 (the pod would show Completed)"
    (exiting,) = [e for e in logs if e["event"].startswith("exiting")]
    assert exiting["event"] == "exiting: runnable failed" and exiting["runnable"] == "webhook"
    assert exiting["log_level"] == "error" and "address already in use" in exiting["error"]


async def test_a_runnable_that_returns_early_is_a_failure(kube: KubeClient) -> None:
    """A certificate loop that ends while the manager runs leaves the webhook unserved: run raises."""
    mgr = Manager(kube, ManagerOptions(name="unit-return", metrics_port=None, probe_port=None))

    async def cert_loop() -> None:
        return None

    mgr.add_runnable("webhook-certs", cert_loop, needs_leader=True)
    async with asyncio.timeout(5):
        with pytest.raises(RunnableFailed) as failed:
            await mgr.run()
    assert failed.value.runnable == "webhook-certs"


def test_registration_rules(kube: KubeClient) -> None:
    mgr = Manager(kube, options())

    async def reconcile(key: str) -> Result | None:
        return None

    mgr.add_controller("c", reconcile, for_=CONFIGMAPS)
    with pytest.raises(ValueError, match="already used"):
        mgr.add_controller("c", reconcile, for_=CONFIGMAPS)
    with pytest.raises(ValueError, match="owns needs for_"):
        mgr.add_controller("d", reconcile, owns=[CONFIGMAPS])
    assert mgr.informer(CONFIGMAPS) is mgr.informers[0], "one shared informer per resource and scope"
    assert mgr.informer(CONFIGMAPS, namespace="x") is not mgr.informers[0]
    with pytest.raises(ValueError, match="lease_name"):
        Manager(kube, ManagerOptions(leader_election=True))


async def test_run_main_stops_on_sigterm_closes_newest_first_and_returns_0(kube: KubeClient) -> None:
    mgr = Manager(kube, options())
    closed: list[str] = []

    async def close_api() -> None:
        closed.append("api")

    def broken_close() -> None:
        closed.append("broken")
        raise OSError("already gone")

    mgr.close_on_exit(close_api)
    mgr.close_on_exit(broken_close)
    mgr.close_on_exit(lambda: closed.append("tempdir"))
    task = asyncio.create_task(mgr.run_main())
    async with asyncio.timeout(5):
        await mgr.elected.wait()
    assert closed == []
    # The real signal: run_main installed the handler that turns it into a graceful stop.
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(5):
        assert await task == 0
    # A failing closer does not keep the ones registered before it from running.
    assert closed == ["tempdir", "broken", "api"]
    loop = asyncio.get_running_loop()
    assert not loop.remove_signal_handler(signal.SIGTERM), "run_main left its SIGTERM handler behind"
    await mgr.close()
    assert closed == ["tempdir", "broken", "api"], "closers run once"


async def test_run_main_returns_1_with_the_hint_when_caches_do_not_sync() -> None:
    # The informer's apiserver (127.0.0.1:9) refuses connections: it can never sync.
    api = ApiClient(Configuration(host="http://127.0.0.1:9"))
    with structlog.testing.capture_logs() as logs:
        mgr = Manager(
            KubeClient(api),
            ManagerOptions(name="unsynced", metrics_port=None, probe_port=None, cache_sync_timeout=0.3),
        )
        mgr.informer(CONFIGMAPS)
        closed = asyncio.Event()

        async def close() -> None:
            closed.set()

        mgr.close_on_exit(api.close)
        mgr.close_on_exit(close)
        async with asyncio.timeout(10):
            code = await mgr.run_main(cache_sync_hint="is the CRD installed?")
    assert code == 1 and closed.is_set()
    (exiting,) = [e for e in logs if e["event"].startswith("exiting")]
    assert exiting["event"] == "exiting: caches did not sync; is the CRD installed?"
    assert exiting["log_level"] == "error" and "configmaps" in exiting["error"]
