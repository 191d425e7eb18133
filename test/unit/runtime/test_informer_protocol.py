"""Informer protocol edge cases against a scripted HTTP server (real sockets, real aiohttp client).

The integration suite covers the real apiserver; this covers answers that are hard to provoke there on
demand: ERROR 410 events, events split across chunks, bookmarks advancing the resourceVersion, an
expired continue token in the middle of a paged LIST, and 429 on the watch.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio.client import ApiClient, Configuration

from kaito.runtime.informer import Backoff, EventHandler, Informer
from kaito.runtime.kube import CONFIGMAPS, KubeClient, Obj, object_key

RESET = b"<reset the connection>"


def cm(name: str, rv: str) -> Obj:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}, "data": {}}


@dataclass
class Script:
    """What the fake server answers: a queue of LIST answers and a queue of watch streams."""

    lists: list[Any] = field(default_factory=list)  # each: (status, body) or list of pages
    watches: list[Any] = field(default_factory=list)  # each: (status, body) or list of byte chunks
    list_queries: list[dict[str, str]] = field(default_factory=list)
    watch_queries: list[dict[str, str]] = field(default_factory=list)
    exhausted: asyncio.Event = field(default_factory=asyncio.Event)
    closing: asyncio.Event = field(default_factory=asyncio.Event)


def make_app(script: Script) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        q = dict(request.query)
        if q.get("watch") == "true":
            script.watch_queries.append(q)
            if not script.watches:
                script.exhausted.set()
                await script.closing.wait()  # stay quiet until the test ends
                return web.json_response({}, status=503)
            item = script.watches.pop(0)
            if isinstance(item, tuple):
                status, body = item
                return web.json_response(body, status=status)
            resp = web.StreamResponse()
            resp.content_type = "application/json"
            await resp.prepare(request)
            for chunk in item:
                if chunk == RESET:
                    assert request.transport is not None
                    request.transport.abort()  # a proxy cutting the watch mid-stream
                    return resp
                await resp.write(chunk)
                await asyncio.sleep(0.01)
            await resp.write_eof()
            return resp
        script.list_queries.append(q)
        item = script.lists[0]
        if isinstance(item, tuple):
            script.lists.pop(0)
            status, body = item
            return web.json_response(body, status=status)
        page = item.pop(0)
        if not item:
            script.lists.pop(0)
        return web.json_response(page)

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ns/configmaps", handle)
    return app


@pytest.fixture
async def server() -> AsyncIterator[tuple[Script, KubeClient]]:
    script = Script()
    runner = web.AppRunner(make_app(script), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    cfg = Configuration(host=f"http://127.0.0.1:{port}")
    async with ApiClient(cfg) as api:
        yield script, KubeClient(api)
    script.closing.set()
    await runner.cleanup()


def line(event_type: str, obj: Obj) -> bytes:
    return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"


def page(items: list[Obj], rv: str, cont: str = "") -> Obj:
    meta = {"resourceVersion": rv}
    if cont:
        meta["continue"] = cont
    return {"kind": "ConfigMapList", "apiVersion": "v1", "metadata": meta, "items": items}


def recorder() -> tuple[list[tuple[str, str]], EventHandler]:
    events: list[tuple[str, str]] = []
    return events, EventHandler(
        on_add=lambda o: events.append(("add", object_key(o))),
        on_update=lambda old, new: events.append(("update", object_key(new))),
        on_delete=lambda o: events.append(("delete", object_key(o))),
    )


async def run_until_exhausted(inf: Informer, script: Script) -> None:
    inf.start()
    try:
        async with asyncio.timeout(10):
            await script.exhausted.wait()
    finally:
        await inf.stop()


async def test_split_chunks_bookmarks_and_410_error_event_relist(server: tuple[Script, KubeClient]) -> None:
    script, kube = server
    script.lists = [
        [page([cm("a", "1"), cm("b", "1")], "10")],
        [page([cm("a", "12"), cm("c", "13")], "20")],  # after 410: b vanished, a changed, c new
    ]
    split = line("ADDED", cm("x", "11"))
    script.watches = [
        [split[:7], split[7:], line("BOOKMARK", {"metadata": {"resourceVersion": "15"}})],
        [line("ERROR", {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"})],
    ]
    events, handler = recorder()
    inf = Informer(kube, CONFIGMAPS, namespace="ns", backoff=Backoff(initial=0.01, maximum=0.02))
    inf.add_event_handler(handler)
    await run_until_exhausted(inf, script)
    assert script.list_queries[0].get("limit") == "500"
    assert script.watch_queries[0]["resourceVersion"] == "10"
    assert script.watch_queries[0]["allowWatchBookmarks"] == "true"
    assert 300 <= int(script.watch_queries[0]["timeoutSeconds"]) <= 600
    assert script.watch_queries[1]["resourceVersion"] == "15", "the bookmark advanced the RV"
    assert script.watch_queries[2]["resourceVersion"] == "20", "resumed from the relist's RV"
    assert inf.stats.relists_after_expired == 1
    assert events == [
        ("add", "ns/a"),
        ("add", "ns/b"),
        ("add", "ns/x"),
        ("update", "ns/a"),
        ("add", "ns/c"),
        ("delete", "ns/b"),
        ("delete", "ns/x"),
    ]
    assert sorted(inf.store.keys()) == ["ns/a", "ns/c"]


async def test_expired_continue_token_restarts_the_list(server: tuple[Script, KubeClient]) -> None:
    script, kube = server
    script.lists = [
        [page([cm("a", "1")], "10", cont="tok1")],
        (410, {"kind": "Status", "code": 410, "reason": "Expired", "message": "continue expired"}),
        [page([cm("a", "1")], "11", cont="tok2"), page([cm("b", "2")], "11")],
    ]
    inf = Informer(kube, CONFIGMAPS, namespace="ns", page_size=1)
    await run_until_exhausted(inf, script)
    assert [q.get("continue") for q in script.list_queries] == [None, "tok1", None, "tok2"]
    assert sorted(inf.store.keys()) == ["ns/a", "ns/b"]
    assert inf.has_synced and script.watch_queries[0]["resourceVersion"] == "11"


async def test_429_on_watch_backs_off_and_rewatches_from_same_rv(server: tuple[Script, KubeClient]) -> None:
    script, kube = server
    script.lists = [[page([cm("a", "1")], "10")]]
    script.watches = [
        (429, {"kind": "Status", "code": 429, "reason": "TooManyRequests", "message": "slow down"}),
        [line("MODIFIED", cm("a", "11"))],
    ]
    events, handler = recorder()
    inf = Informer(kube, CONFIGMAPS, namespace="ns", backoff=Backoff(initial=0.01, maximum=0.02))
    inf.add_event_handler(handler)
    await run_until_exhausted(inf, script)
    assert len(script.list_queries) == 1, "a retryable error does not relist"
    assert [q["resourceVersion"] for q in script.watch_queries] == ["10", "10", "11"]
    assert inf.stats.watch_restarts.get("http-429") == 1
    assert events == [("add", "ns/a"), ("update", "ns/a")]


async def test_handler_exception_does_not_stop_the_informer(server: tuple[Script, KubeClient]) -> None:
    script, kube = server
    script.lists = [[page([cm("a", "1")], "10")]]
    script.watches = [[line("ADDED", cm("b", "11"))]]
    seen: list[str] = []

    def boom(obj: Obj) -> None:
        seen.append(object_key(obj))
        raise RuntimeError("handler bug")

    inf = Informer(kube, CONFIGMAPS, namespace="ns")
    inf.add_event_handler(EventHandler(on_add=boom))
    await run_until_exhausted(inf, script)
    assert seen == ["ns/a", "ns/b"]
    assert sorted(inf.store.keys()) == ["ns/a", "ns/b"]


async def test_repeated_410_relists_each_time_and_converges(server: tuple[Script, KubeClient]) -> None:
    script, kube = server
    gone = (410, {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"})
    script.lists = [[page([cm("a", "1")], "10")], [page([cm("a", "1")], "11")], [page([cm("b", "2")], "12")]]
    script.watches = [gone, gone, [line("ADDED", cm("c", "13"))]]
    events, handler = recorder()
    inf = Informer(kube, CONFIGMAPS, namespace="ns", backoff=Backoff(initial=0.01, maximum=0.02))
    inf.add_event_handler(handler)
    await run_until_exhausted(inf, script)
    assert inf.stats.relists_after_expired == 2 and inf.stats.lists == 3
    assert [q["resourceVersion"] for q in script.watch_queries] == ["10", "11", "12", "13"]
    assert events == [("add", "ns/a"), ("add", "ns/b"), ("delete", "ns/a"), ("add", "ns/c")]


async def test_watch_cut_mid_stream_resumes_at_once_without_growing_backoff(
    server: tuple[Script, KubeClient],
) -> None:
    """A proxy resetting every watch after an event (bench/chaos.py found caches 30-60 s stale): each
    cut resumes from the last resourceVersion at once. With a 5 s initial backoff, backing off on even
    one of the five cuts would blow the 10 s budget of ``run_until_exhausted``."""
    script, kube = server
    script.lists = [[page([cm("a", "1")], "10")]]
    script.watches = [[line("MODIFIED", cm("a", str(11 + i))), RESET] for i in range(5)]
    events, handler = recorder()
    inf = Informer(kube, CONFIGMAPS, namespace="ns", backoff=Backoff(initial=5.0, maximum=30.0))
    inf.add_event_handler(handler)
    await run_until_exhausted(inf, script)
    assert [q["resourceVersion"] for q in script.watch_queries] == ["10", "11", "12", "13", "14", "15"]
    assert inf.stats.watch_restarts.get("broken") == 5
    assert len(script.list_queries) == 1, "a cut watch resumes; it does not relist"
    assert events == [("add", "ns/a")] + [("update", "ns/a")] * 5
