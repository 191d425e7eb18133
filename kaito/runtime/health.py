"""Probe and metrics HTTP servers (aiohttp on the event loop; no threads).

``/healthz`` answers 200 while every health check passes (the loop is alive to answer at all);
``/readyz`` answers 200 once every readiness check passes (the Manager adds "informers synced"; the
admission webhook adds "webhook", true while it listens, see ``WebhookServer.add_to_manager``).
Neither is gated on leadership: every replica serves them. ``/metrics`` renders the default registry.
Checks are plain callables returning ``True`` when fine; ``?verbose`` lists each one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from kaito.runtime import metrics

log = structlog.get_logger("kaito.runtime.health")

Check = Callable[[], bool]


class HttpServer:
    """A small aiohttp server bound to ``host:port`` (port 0 picks a free one; see :attr:`port`)."""

    def __init__(self, app: web.Application, host: str, port: int, name: str) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.name = name
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and start serving."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.requested_port, reuse_address=True)
        await site.start()
        self._runner = runner
        addresses = runner.addresses
        self.port = int(addresses[0][1]) if addresses else self.requested_port
        log.info("serving", server=self.name, host=self.host, port=self.port)

    async def stop(self) -> None:
        """Stop serving and close connections."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


class Probes:
    """Named health and readiness checks."""

    def __init__(self) -> None:
        self.health: dict[str, Check] = {"ping": lambda: True}
        self.ready: dict[str, Check] = {"ping": lambda: True}

    def add_health_check(self, name: str, check: Check) -> None:
        """Add a liveness check."""
        self.health[name] = check

    def add_ready_check(self, name: str, check: Check) -> None:
        """Add a readiness check."""
        self.ready[name] = check

    @staticmethod
    def _run(checks: dict[str, Check]) -> tuple[bool, list[str]]:
        ok = True
        lines: list[str] = []
        for name, check in checks.items():
            try:
                passed = bool(check())
            except Exception:
                log.exception("probe check raised", check=name)
                passed = False
            ok = ok and passed
            lines.append(f"[{'+' if passed else '-'}]{name} {'ok' if passed else 'failed'}")
        return ok, lines

    def _handler(
        self, kind: str, checks: dict[str, Check]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            ok, lines = self._run(checks)
            if "verbose" in request.query:
                text = "\n".join([*lines, f"{kind} check {'passed' if ok else 'failed'}"]) + "\n"
            else:
                text = "ok" if ok else f"{kind} check failed"
            return web.Response(status=200 if ok else 500, text=text)

        return handle

    def app(self) -> web.Application:
        """The probe application: ``/healthz`` and ``/readyz``."""
        app = web.Application()
        app.router.add_get("/healthz", self._handler("healthz", self.health))
        app.router.add_get("/readyz", self._handler("readyz", self.ready))
        return app


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=metrics.generate_latest(), headers={"Content-Type": metrics.CONTENT_TYPE_LATEST})


def metrics_app() -> web.Application:
    """The metrics application: ``/metrics`` in the Prometheus text format."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    return app
