"""A fault-injecting HTTPS reverse proxy in front of a kube-apiserver (SPEC §10, fault injection).

Clients (the controllers under test) talk to the proxy with a kubeconfig whose ``server`` is the proxy;
the proxy terminates TLS with a certificate those clients already trust (the local cluster's apiserver
serving certificate, which covers 127.0.0.1) and forwards every request over TLS to the real apiserver,
the client's ``Authorization`` header passed through unchanged.

Faults, each counted by kind in :attr:`FaultProxy.faults`:

* every non-watch request fails with probability ``p``, the kind drawn evenly from

  - ``500``: an ``InternalError`` ``Status``, answered without forwarding;
  - ``429``: a ``TooManyRequests`` ``Status`` with ``Retry-After: 1``, answered without forwarding (as
    the apiserver's own limiter does: the request was not processed);
  - ``reset``: the request *is* forwarded and served, then the client's connection is reset (RST, no
    response) -- the lost-response case, where a retried create meets its own first attempt;

* every watch (``watch=true``) is streamed through chunk by chunk and cut after a random 1-10 s, half
  of the cuts a clean end of the response (``watch_close``, as the apiserver's own timeout does), half
  a connection reset (``watch_reset``).

``p = 0`` forwards every request unchanged (watches are still cut unless ``cut_watches=False``).

Usage::

    proxy = FaultProxy(upstream="https://127.0.0.1:6443", ca_file=ca, cert_file=crt, key_file=key, p=0.1)
    await proxy.start()
    proxy.write_kubeconfig(cluster_kubeconfig, out_path)
    ...
    await proxy.stop()
    print(proxy.faults)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import ssl
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

# Headers that describe one hop, not the message: never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        # The upstream client decompresses (aiohttp's default); the body we send on is plain.
        "content-encoding",
        "accept-encoding",
    }
)

FAULT_KINDS = ("500", "429", "reset")


def status_body(code: int, reason: str, message: str, retry_after: int | None = None) -> dict[str, Any]:
    """A Kubernetes ``Status`` object as the apiserver writes it for a failure."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if retry_after is not None:
        body["details"] = {"retryAfterSeconds": retry_after}
    return body


def is_watch(request: web.Request) -> bool:
    """``?watch=true`` (or ``1``), or the deprecated ``/watch/`` path form."""
    flag = request.query.get("watch", "").lower()
    return flag in ("true", "1") or "/watch/" in request.path


def _reset(request: web.Request) -> None:
    """Close the client's connection with a TCP RST (SO_LINGER 0), not a FIN."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class FaultProxy:
    """The proxy: an aiohttp server (TLS) forwarding to ``upstream`` with an aiohttp client (TLS).

    ``kinds`` limits the faults drawn (default: all three, evenly). ``p`` may be changed while running; ``faults`` counts every injected fault by kind, and the
    ``requests`` / ``watches`` keys count what passed through.
    """

    def __init__(
        self,
        *,
        upstream: str,
        ca_file: Path | str,
        cert_file: Path | str,
        key_file: Path | str,
        p: float = 0.10,
        kinds: Sequence[str] = FAULT_KINDS,
        cut_watches: bool = True,
        watch_cut_range: tuple[float, float] = (1.0, 10.0),
        seed: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.ca_file = str(ca_file)
        self.cert_file = str(cert_file)
        self.key_file = str(key_file)
        self.p = p
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown or not kinds:
            raise ValueError(f"fault kinds must be a non-empty subset of {FAULT_KINDS}, got {kinds}")
        self.kinds = tuple(kinds)
        self.cut_watches = cut_watches
        self.watch_cut_range = watch_cut_range
        self.rng = random.Random(seed)
        self.host = host
        self.port = port
        self.faults: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def for_cluster(cls, cluster: Any, **options: Any) -> FaultProxy:
        """A proxy in front of a ``hack.localcluster.LocalCluster``'s apiserver, serving with its
        certificate (which covers 127.0.0.1) and trusting its CA; ``options`` as for the constructor."""
        pki = Path(cluster.workdir) / "pki"
        return cls(
            upstream=cluster.server,
            ca_file=pki / "ca.crt",
            cert_file=pki / "apiserver.crt",
            key_file=pki / "apiserver.key",
            **options,
        )

    @property
    def url(self) -> str:
        """``https://host:port`` of the running proxy."""
        return f"https://{self.host}:{self.port}"

    def fault_counts(self) -> dict[str, int]:
        """Injected faults by kind (every kind present, zeros included)."""
        return {k: self.faults[k] for k in (*FAULT_KINDS, "watch_close", "watch_reset")}

    async def start(self) -> None:
        """Listen (a free port when ``port`` is 0) and open the upstream connection pool."""
        upstream_ssl = ssl.create_default_context(cafile=self.ca_file)
        # No connection limit: every client watch holds one upstream connection for its lifetime.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=upstream_ssl, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ssl.load_cert_chain(self.cert_file, self.key_file)
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that goes away cancels its forwarded watch at once.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=server_ssl)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Close the listener, every open connection and the upstream pool."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def write_kubeconfig(self, source: Path, dest: Path) -> Path:
        """Copy the kubeconfig ``source`` to ``dest`` with every cluster's ``server`` set to the proxy."""
        import yaml

        cfg = yaml.safe_load(source.read_text())
        for cluster in cfg.get("clusters") or []:
            cluster["cluster"]["server"] = self.url
        dest.write_text(json.dumps(cfg, indent=2))
        dest.chmod(0o600)
        return dest

    # ---- request handling ------------------------------------------------------------------------

    def _draw_fault(self) -> str | None:
        if self.p <= 0 or self.rng.random() >= self.p:
            return None
        return self.rng.choice(self.kinds)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if is_watch(request):
            self.faults["watches"] += 1
            return await self._watch(request)
        self.faults["requests"] += 1
        fault = self._draw_fault()
        if fault == "500":
            self.faults["500"] += 1
            return web.json_response(
                status_body(500, "InternalError", "fault injected by the chaos proxy"), status=500
            )
        if fault == "429":
            self.faults["429"] += 1
            return web.json_response(
                status_body(429, "TooManyRequests", "fault injected by the chaos proxy", retry_after=1),
                status=429,
                headers={"Retry-After": "1"},
            )
        status, headers, body = await self._forward(request)
        if fault == "reset":
            self.faults["reset"] += 1
            _reset(request)
            # Nothing can be written to an aborted transport; aiohttp drops this response quietly.
            return web.Response(status=status)
        return web.Response(status=status, headers=headers, body=body)

    def _upstream_request(self, request: web.Request) -> tuple[str, dict[str, str]]:
        url = self.upstream + request.rel_url.path_qs
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        return url, headers

    @staticmethod
    def _response_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
        return {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}

    async def _forward(self, request: web.Request) -> tuple[int, dict[str, str], bytes]:
        assert self._session is not None
        url, headers = self._upstream_request(request)
        data = await request.read()
        try:
            async with self._session.request(
                request.method,
                url,
                headers=headers,
                data=data or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=120),
            ) as resp:
                return resp.status, self._response_headers(resp), await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            body = json.dumps(status_body(502, "InternalError", f"chaos proxy: upstream failed: {e}"))
            return 502, {"Content-Type": "application/json"}, body.encode()

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        url, headers = self._upstream_request(request)
        lo, hi = self.watch_cut_range
        cut_at = asyncio.get_running_loop().time() + self.rng.uniform(lo, hi)
        try:
            async with self._session.request(
                request.method, url, headers=headers, allow_redirects=False
            ) as resp:
                out = web.StreamResponse(status=resp.status, headers=self._response_headers(resp))
                await out.prepare(request)
                return await self._pump(request, resp, out, cut_at)
        except (aiohttp.ClientError, TimeoutError) as e:
            body = status_body(502, "InternalError", f"chaos proxy: upstream failed: {e}")
            return web.json_response(body, status=502)

    async def _pump(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        out: web.StreamResponse,
        cut_at: float,
    ) -> web.StreamResponse:
        """Copy upstream chunks to the client until the upstream ends or the cut time comes."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = cut_at - loop.time() if self.cut_watches else None
            if remaining is not None and remaining <= 0:
                break
            try:
                chunk = await asyncio.wait_for(resp.content.readany(), remaining)
            except TimeoutError:
                break
            if not chunk:
                await out.write_eof()
                return out
            await out.write(chunk)
        if self.rng.random() < 0.5:
            self.faults["watch_close"] += 1
            await out.write_eof()
        else:
            self.faults["watch_reset"] += 1
            _reset(request)
        return out
