"""Informer against the real kube-apiserver: sync, events, relist after compaction, apiserver restart,
half-open watch through a proxy that stops forwarding."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes_asyncio.client import ApiClient, Configuration

from hack.localcluster import Component, LocalCluster, free_port
from kaito.runtime.informer import Backoff, EventHandler, Informer
from kaito.runtime.kube import CONFIGMAPS, KubeClient, Obj, object_key
from kaito.runtime.metrics import REGISTRY
from test.integration.runtime.tcpproxy import TcpProxy
from test.waiting import eventually

LABEL = "kaito.test/informer"


@dataclass
class Recorder:
    """Records handler calls in order, per key."""

    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, key, resourceVersion)

    def handler(self) -> EventHandler:
        def rv(o: Obj) -> str:
            return str(o["metadata"].get("resourceVersion", ""))

        return EventHandler(
            on_add=lambda o: self.events.append(("add", object_key(o), rv(o))),
            on_update=lambda old, new: self.events.append(("update", object_key(new), rv(new))),
            on_delete=lambda o: self.events.append(("delete", object_key(o), rv(o))),
        )

    def of(self, key: str) -> list[str]:
        return [t for t, k, _ in self.events if k == key]


def cm(name: str, ns: str, value: str = "1", label: str = "yes") -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns, "labels": {LABEL: label}},
        "data": {"v": value},
    }


def configuration(server: str, cluster: LocalCluster) -> Configuration:
    cfg = cluster.client_configuration()
    cfg.host = server
    return cfg


@contextlib.asynccontextmanager
async def running(inf: Informer) -> AsyncIterator[Informer]:
    inf.start()
    try:
        yield inf
    finally:
        await inf.stop()


async def test_initial_paged_sync_then_create_update_delete_events(
    control_plane: LocalCluster, api_client: ApiClient, namespace: str
) -> None:
    kube = KubeClient(api_client)
    for i in range(12):
        await kube.create(CONFIGMAPS, cm(f"pre-{i}", namespace))
    await kube.create(CONFIGMAPS, cm("unlabelled", namespace, label="no"))
    rec = Recorder()
    inf = Informer(kube, CONFIGMAPS, namespace=namespace, label_selector=f"{LABEL}=yes", page_size=5)
    inf.add_event_handler(rec.handler())
    requests_before = (
        REGISTRY.get_sample_value(
            "rest_client_requests_total", {"code": "200", "method": "GET", "host": kube.host}
        )
        or 0.0
    )
    async with running(inf):
        assert await inf.wait_for_sync(30)
        assert sorted(inf.store.keys()) == sorted(f"{namespace}/pre-{i}" for i in range(12))
        assert inf.stats.lists == 1
        assert all(o["kind"] == "ConfigMap" and o["apiVersion"] == "v1" for o in inf.store.list())
        assert all("managedFields" not in o["metadata"] for o in inf.store.list()), "default transform"
        # 12 items in pages of 5 -> 3 LIST requests, all counted.
        after = (
            REGISTRY.get_sample_value(
                "rest_client_requests_total", {"code": "200", "method": "GET", "host": kube.host}
            )
            or 0.0
        )
        assert after - requests_before >= 3

        created = await kube.create(CONFIGMAPS, cm("new", namespace))
        updated = await kube.patch(CONFIGMAPS, "pre-0", {"data": {"v": "2"}}, namespace)
        await kube.delete(CONFIGMAPS, "pre-1", namespace)
        # Leaving the selector looks like a delete to this informer.
        await kube.patch(CONFIGMAPS, "pre-2", {"metadata": {"labels": {LABEL: "no"}}}, namespace)

        async def converged() -> bool:
            return (
                f"{namespace}/pre-1" not in inf.store
                and f"{namespace}/pre-2" not in inf.store
                and f"{namespace}/new" in inf.store
                and inf.store.get(f"{namespace}/pre-0") is not None
                and inf.store.get(f"{namespace}/pre-0")["data"]["v"] == "2"  # type: ignore[index]
            )

        await eventually(converged, 15, "informer to see create/update/delete")
        assert rec.of(f"{namespace}/new") == ["add"]
        assert rec.of(f"{namespace}/pre-0") == ["add", "update"]
        assert rec.of(f"{namespace}/pre-1") == ["add", "delete"]
        assert rec.of(f"{namespace}/pre-2") == ["add", "delete"]
        assert f"{namespace}/unlabelled" not in inf.store
        assert "managedFields" not in inf.store.get(f"{namespace}/new")["metadata"]  # type: ignore[index]
        assert ("add", f"{namespace}/new", created["metadata"]["resourceVersion"]) in rec.events
        assert ("update", f"{namespace}/pre-0", updated["metadata"]["resourceVersion"]) in rec.events
        assert inf.stats.relists_after_expired == 0


async def test_field_selector_and_cluster_wide_watch(api_client: ApiClient, namespace: str) -> None:
    kube = KubeClient(api_client)
    await kube.create(CONFIGMAPS, cm("picked", namespace))
    await kube.create(CONFIGMAPS, cm("ignored", namespace))
    inf = Informer(kube, CONFIGMAPS, field_selector=f"metadata.name=picked,metadata.namespace={namespace}")
    async with running(inf):
        assert await inf.wait_for_sync(30)
        assert inf.store.keys() == [f"{namespace}/picked"]


# ------------------------------------------------------------------------------------------------
# Relist after etcd compaction, through a second apiserver without a watch cache
# ------------------------------------------------------------------------------------------------


def _apiserver_ready(server: str, token: str, ca: Path) -> bool:
    req = urllib.request.Request(f"{server}/readyz", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(ca)), timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def uncached_apiserver(control_plane: LocalCluster) -> Iterator[str]:
    """A second kube-apiserver on the same etcd data with ``--watch-cache=false``.

    With the watch cache on, the apiserver serves a watch from an old resourceVersion out of its
    in-memory window even after etcd compacted it; without it, watches go to etcd, which answers a
    compacted revision with 410 Gone -- exactly the case the informer's relist exists for.
    """
    import time

    base = control_plane.components["kube-apiserver"]
    port = free_port()
    argv = [a for a in base.argv if not a.startswith(("--secure-port=", "--watch-cache"))]
    argv += [f"--secure-port={port}", "--watch-cache=false"]
    log_path = control_plane.logs_dir / "kube-apiserver-uncached.log"
    comp = Component("kube-apiserver-uncached", argv, log_path)
    comp.start()
    server = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not _apiserver_ready(server, control_plane.token, control_plane.ca_file):
            if not comp.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uncached apiserver did not start:\n{comp.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        comp.stop()


async def test_relist_after_compaction_delivers_changes_and_deletes_from_the_gap(
    control_plane: LocalCluster, uncached_apiserver: str, api_client: ApiClient, namespace: str
) -> None:
    kube = KubeClient(api_client)  # writes go to the main apiserver; same etcd
    for name in ("keep", "change", "remove"):
        await kube.create(CONFIGMAPS, cm(name, namespace))
    host, port = uncached_apiserver.removeprefix("https://").split(":")
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    rec = Recorder()
    async with ApiClient(configuration(f"https://127.0.0.1:{proxy.port}", control_plane)) as via_proxy:
        inf = Informer(
            KubeClient(via_proxy),
            CONFIGMAPS,
            namespace=namespace,
            backoff=Backoff(initial=0.2, maximum=1.0),
        )
        inf.add_event_handler(rec.handler())
        try:
            async with running(inf):
                assert await inf.wait_for_sync(30)
                assert len(inf.store) == 3
                watches_before = inf.stats.watches

                async def watching() -> bool:
                    return inf.stats.watches > 0 and len(proxy._conns) > 0

                await eventually(watching, 10, "the watch to be established")
                stale_rv = inf.last_resource_version

                await proxy.cut()  # the watch is gone and cannot come back yet
                changed = await kube.patch(CONFIGMAPS, "change", {"data": {"v": "2"}}, namespace)
                await kube.delete(CONFIGMAPS, "remove", namespace)
                added = await kube.create(CONFIGMAPS, cm("added", namespace))
                await kube.create(CONFIGMAPS, cm("flash", namespace))
                await kube.delete(CONFIGMAPS, "flash", namespace)
                # Move etcd past the stale revision and compact: a watch from it is now impossible.
                await kube.create(CONFIGMAPS, cm("bump", namespace, label="no"))
                revision = await asyncio.to_thread(control_plane.compact_etcd)
                assert revision > int(stale_rv)
                proxy.resume()

                async def caught_up() -> bool:
                    return (
                        inf.stats.relists_after_expired >= 1
                        and f"{namespace}/remove" not in inf.store
                        and f"{namespace}/added" in inf.store
                    )

                await eventually(caught_up, 30, "the informer to relist after 410")
                assert inf.stats.lists >= 2
                assert rec.of(f"{namespace}/remove") == ["add", "delete"]
                assert rec.of(f"{namespace}/added") == ["add"]
                assert rec.of(f"{namespace}/change") == ["add", "update"]
                assert rec.of(f"{namespace}/keep") == ["add"], "unchanged objects produce no event"
                assert rec.of(f"{namespace}/flash") == [], "created and deleted inside the gap: invisible"
                store_change = inf.store.get(f"{namespace}/change")
                assert store_change is not None
                assert store_change["metadata"]["resourceVersion"] == changed["metadata"]["resourceVersion"]
                assert ("add", f"{namespace}/added", added["metadata"]["resourceVersion"]) in rec.events
                assert inf.stats.watches > watches_before

                # And the informer keeps watching after the relist.
                await kube.create(CONFIGMAPS, cm("after", namespace))

                async def sees_after() -> bool:
                    return f"{namespace}/after" in inf.store

                await eventually(sees_after, 15, "a new event after the relist")
        finally:
            await proxy.close()


# ------------------------------------------------------------------------------------------------
# kube-apiserver restart mid-watch
# ------------------------------------------------------------------------------------------------


async def restart_apiserver(cluster: LocalCluster) -> None:
    """Restart kube-apiserver without blocking the event loop.

    Stopping may take seconds, so it runs in a worker thread; starting must happen on this (the main)
    thread: the launcher sets PR_SET_PDEATHSIG, which kills a child when the *thread* that forked it
    exits, and the loop's worker threads end with the test.
    """
    await asyncio.to_thread(cluster.stop_apiserver)
    cluster.components["kube-apiserver"].start()

    async def ready() -> bool:
        return await asyncio.to_thread(_apiserver_ready, cluster.server, cluster.token, cluster.ca_file)

    await eventually(ready, 60, "kube-apiserver to be ready again")


async def test_apiserver_restart_mid_watch_loses_no_event(
    control_plane: LocalCluster, namespace: str
) -> None:
    async with ApiClient(control_plane.client_configuration()) as api:
        kube = KubeClient(api)
        for i in range(5):
            await kube.create(CONFIGMAPS, cm(f"c{i}", namespace))
        rec = Recorder()
        inf = Informer(kube, CONFIGMAPS, namespace=namespace, backoff=Backoff(initial=0.2, maximum=1.0))
        inf.add_event_handler(rec.handler())
        async with running(inf):
            assert await inf.wait_for_sync(30)
            # Changes right before the restart may or may not have reached the watch yet.
            await kube.patch(CONFIGMAPS, "c0", {"data": {"v": "before"}}, namespace)
            await kube.delete(CONFIGMAPS, "c1", namespace)
            await restart_apiserver(control_plane)
            # ... and changes right after it, while the informer is still reconnecting.
            await kube.patch(CONFIGMAPS, "c2", {"data": {"v": "after"}}, namespace)
            await kube.delete(CONFIGMAPS, "c3", namespace)
            await kube.create(CONFIGMAPS, cm("c5", namespace))

            truth = {object_key(o): o for o in await kube.list_all(CONFIGMAPS, namespace)}

            async def matches() -> bool:
                cached = {object_key(o): o["metadata"]["resourceVersion"] for o in inf.store.list()}
                return {k: o["metadata"]["resourceVersion"] for k, o in truth.items()} == cached

            await eventually(matches, 60, "the informer cache to match the apiserver after a restart")
            assert sum(inf.stats.watch_restarts.values()) >= 1
            ns = namespace
            assert rec.of(f"{ns}/c0")[-1] == "update"
            assert rec.of(f"{ns}/c1") == ["add", "delete"]
            assert rec.of(f"{ns}/c2") == ["add", "update"]
            assert rec.of(f"{ns}/c3") == ["add", "delete"]
            assert rec.of(f"{ns}/c4") == ["add"]
            assert rec.of(f"{ns}/c5") == ["add"]


# ------------------------------------------------------------------------------------------------
# Half-open watch through a proxy that stops forwarding
# ------------------------------------------------------------------------------------------------


async def test_half_open_watch_is_detected_and_reestablished_within_inactivity_timeout(
    control_plane: LocalCluster, api_client: ApiClient, namespace: str
) -> None:
    host, port = control_plane.server.removeprefix("https://").split(":")
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    inactivity = 3.0
    kube = KubeClient(api_client)
    try:
        async with ApiClient(configuration(f"https://127.0.0.1:{proxy.port}", control_plane)) as via_proxy:
            inf = Informer(
                KubeClient(via_proxy), CONFIGMAPS, namespace=namespace, inactivity_timeout=inactivity
            )
            async with running(inf):
                assert await inf.wait_for_sync(30)

                async def watching() -> bool:
                    return inf.stats.watches >= 1

                await eventually(watching, 10, "the watch to start")
                await kube.create(CONFIGMAPS, cm("warmup", namespace))

                async def warm() -> bool:
                    return f"{namespace}/warmup" in inf.store

                await eventually(warm, 10, "the first event through the proxy")
                assert proxy.blackhole() >= 1
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                name = f"during-{secrets.token_hex(2)}"
                await kube.create(CONFIGMAPS, cm(name, namespace))

                async def seen() -> bool:
                    return f"{namespace}/{name}" in inf.store

                await eventually(seen, inactivity + 10, "the event created while the watch was half-open")
                elapsed = loop.time() - t0
                assert inf.stats.watch_restarts.get("inactivity", 0) >= 1
                # Detected after `inactivity` s of silence, then one reconnect + resume from the last RV.
                assert elapsed < inactivity + 5, elapsed
                assert inf.stats.relists_after_expired == 0 and inf.stats.lists == 1
    finally:
        await proxy.close()
