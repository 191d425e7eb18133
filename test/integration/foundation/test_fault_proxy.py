"""The chaos bench's fault-injecting proxy (bench/fault_proxy.py) in front of the real apiserver.

p = 1 with 500s only: every non-watch request answers a Kubernetes ``Status`` 500 without reaching the
apiserver; 429s carry ``Retry-After``; a reset is served upstream, then the connection drops; p = 0:
requests and a watch pass through unchanged, and the watch is cut after its configured time.
"""

from __future__ import annotations

import json
import secrets
import ssl
from collections.abc import AsyncIterator

import aiohttp
import pytest

from bench.fault_proxy import FaultProxy
from hack.localcluster import LocalCluster


@pytest.fixture
async def proxy(control_plane: LocalCluster) -> AsyncIterator[FaultProxy]:
    """A proxy at p = 0 in front of the session's apiserver (tests set ``p`` / ``kinds``)."""
    px = FaultProxy.for_cluster(
        control_plane,
        p=0.0,
        seed=7,
        watch_cut_range=(1.0, 1.5),
    )
    await px.start()
    try:
        yield px
    finally:
        await px.stop()


@pytest.fixture
async def http(control_plane: LocalCluster) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTPS client that trusts the cluster CA and sends the admin token (as a kubeconfig user does)."""
    ctx = ssl.create_default_context(cafile=str(control_plane.ca_file))
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx),
        headers={"Authorization": f"Bearer {control_plane.token}"},
        timeout=aiohttp.ClientTimeout(total=30),
    ) as session:
        yield session


async def test_p1_500_answers_a_status_without_forwarding(
    proxy: FaultProxy, http: aiohttp.ClientSession, control_plane: LocalCluster
) -> None:
    proxy.p, proxy.kinds = 1.0, ("500",)
    name = f"chaos-{secrets.token_hex(3)}"
    async with http.post(f"{proxy.url}/api/v1/namespaces", json={"metadata": {"name": name}}) as resp:
        assert resp.status == 500
        body = await resp.json()
    assert body["kind"] == "Status" and body["status"] == "Failure"
    assert body["code"] == 500 and body["reason"] == "InternalError"
    assert proxy.faults["500"] == 1
    # Answered by the proxy: the namespace was never created.
    status, _ = control_plane.request("GET", f"/api/v1/namespaces/{name}")
    assert status == 404


async def test_429_carries_retry_after(proxy: FaultProxy, http: aiohttp.ClientSession) -> None:
    proxy.p, proxy.kinds = 1.0, ("429",)
    async with http.get(f"{proxy.url}/api/v1/namespaces") as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
        body = await resp.json()
    assert body["reason"] == "TooManyRequests" and body["details"]["retryAfterSeconds"] == 1
    assert proxy.faults["429"] == 1


async def test_reset_drops_the_response_after_the_request_was_served(
    proxy: FaultProxy, http: aiohttp.ClientSession, control_plane: LocalCluster
) -> None:
    proxy.p, proxy.kinds = 1.0, ("reset",)
    name = f"chaos-{secrets.token_hex(3)}"
    with pytest.raises(aiohttp.ClientError):
        async with http.post(f"{proxy.url}/api/v1/namespaces", json={"metadata": {"name": name}}) as resp:
            await resp.read()
    assert proxy.faults["reset"] >= 1
    # The lost-response case: the apiserver did create it.
    status, _ = control_plane.request("GET", f"/api/v1/namespaces/{name}")
    assert status == 200


async def test_p0_passes_requests_and_a_watch_through(
    proxy: FaultProxy, http: aiohttp.ClientSession, control_plane: LocalCluster
) -> None:
    name = f"chaos-{secrets.token_hex(3)}"
    async with http.post(f"{proxy.url}/api/v1/namespaces", json={"metadata": {"name": name}}) as resp:
        assert resp.status == 201
        created = await resp.json()
    assert created["metadata"]["name"] == name
    async with http.get(f"{proxy.url}/api/v1/namespaces/{name}") as resp:
        assert resp.status == 200
        assert (await resp.json())["metadata"]["uid"] == created["metadata"]["uid"]
    async with http.get(f"{proxy.url}/api/v1/namespaces/does-not-exist-{name}") as resp:
        assert resp.status == 404  # the apiserver's own answer, passed through
        assert (await resp.json())["reason"] == "NotFound"

    # A watch from the namespace's resourceVersion sees a label change made directly on the apiserver.
    rv = created["metadata"]["resourceVersion"]
    url = f"{proxy.url}/api/v1/namespaces?watch=true&resourceVersion={rv}&fieldSelector=metadata.name={name}"
    events: list[dict[str, object]] = []
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
        assert resp.status == 200
        patched = await http.patch(
            f"{control_plane.server}/api/v1/namespaces/{name}",
            data=json.dumps({"metadata": {"labels": {"chaos": "seen"}}}),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert patched.status == 200
        patched.release()
        try:
            async for line in resp.content:
                if line.strip():
                    events.append(json.loads(line))
        except aiohttp.ClientPayloadError:
            pass  # the proxy cut the watch with a reset rather than a clean end: both are allowed
    assert [e["type"] for e in events] == ["MODIFIED"]
    obj = events[0]["object"]
    assert isinstance(obj, dict) and obj["metadata"]["labels"]["chaos"] == "seen"
    assert proxy.faults["watches"] == 1
    assert proxy.faults["watch_close"] + proxy.faults["watch_reset"] == 1
    assert sum(proxy.faults[k] for k in ("500", "429", "reset")) == 0
