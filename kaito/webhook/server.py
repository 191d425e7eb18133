"""The admission webhook HTTPS server (AdmissionReview v1), served by every controller replica.

Paths: ``/validate/workspace.kaito.sh`` (validating, upstream's path) and ``/mutate/workspace.kaito.sh``
(defaulting); ``/healthz`` answers 200 once the server is listening. :func:`add_to_manager` runs it
for a :class:`~kaito.runtime.manager.Manager`'s lifetime and makes the manager's ``/readyz`` wait for
it: a replica is not put behind the webhook Service (nor reported ready) before it accepts connections.

A malformed request never takes the server down: bodies that are not an AdmissionReview get HTTP 400
with a JSON error; a review whose object cannot be read is denied with a message naming the field;
an unexpected exception in a rule is logged and the request denied with HTTP 500 in the review status.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError

from kaito.api.meta import describe_validation_error
from kaito.api.workspace import GROUP, KIND, Workspace
from kaito.webhook.defaulting import default_patch
from kaito.webhook.validation import Result, WorkspaceValidator

if TYPE_CHECKING:
    from kaito.runtime.manager import Manager

VALIDATE_PATH = "/validate/workspace.kaito.sh"
MUTATE_PATH = "/mutate/workspace.kaito.sh"
HEALTH_PATH = "/healthz"
TLS_CERT_FILE = "tls.crt"
TLS_KEY_FILE = "tls.key"
MAX_BODY_BYTES = 8 * 1024 * 1024  # the apiserver allows ~3 MiB objects; old + new object both travel
INLINE_PARSE_BYTES = 256 * 1024  # larger request bodies are decoded in a worker thread

log = structlog.get_logger("kaito.webhook")

# controller-runtime's webhook metric names, so existing dashboards work; plus our decision counter.
WEBHOOK_REQUESTS = Counter(
    "controller_runtime_webhook_requests_total",
    "Total number of admission requests by HTTP status code.",
    ["code", "webhook"],
)
WEBHOOK_LATENCY = Histogram(
    "controller_runtime_webhook_latency_seconds",
    "Histogram of the latency of processing admission requests.",
    ["webhook"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
WEBHOOK_IN_FLIGHT = Gauge(
    "controller_runtime_webhook_requests_in_flight",
    "Current number of admission requests being served.",
    ["webhook"],
)
WEBHOOK_DECISIONS = Counter(
    "kaito_webhook_decisions_total",
    "Admission decisions by webhook, operation and outcome.",
    ["webhook", "operation", "allowed"],
)


Handler = Callable[[web.Request], Awaitable[web.Response]]


class BadReview(ValueError):
    """The request body is not a usable AdmissionReview v1."""


def _review(uid: str, allowed: bool, **response: Any) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": allowed, **response},
    }


def _deny(
    uid: str, code: int, message: str, reason: str = "Invalid", warnings: list[str] | None = None
) -> dict[str, Any]:
    extra: dict[str, Any] = {"status": {"code": code, "reason": reason, "message": message}}
    if warnings:
        extra["warnings"] = warnings
    return _review(uid, False, **extra)


def _parse_request(body: bytes) -> dict[str, Any]:
    try:
        review = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadReview(f"body is not JSON: {e}") from e
    if not isinstance(review, dict):
        raise BadReview("body must be a JSON object (an AdmissionReview)")
    if review.get("kind") != "AdmissionReview" or review.get("apiVersion") != "admission.k8s.io/v1":
        raise BadReview(
            f"expected apiVersion admission.k8s.io/v1, kind AdmissionReview; got "
            f"{review.get('apiVersion')!r}, {review.get('kind')!r}"
        )
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReview("AdmissionReview.request with a uid is required")
    return request


class WebhookServer:
    """aiohttp HTTPS server for the validating and mutating Workspace webhooks.

    ``cert_dir`` holds ``tls.crt``/``tls.key`` (written by :class:`kaito.webhook.certs.CertManager`);
    call :meth:`reload_certificates` after they change (new handshakes use the new pair). With
    ``cert_dir=None`` the server speaks plain HTTP (only for local tools; the apiserver needs HTTPS).
    """

    def __init__(
        self,
        validator: WorkspaceValidator,
        host: str = "0.0.0.0",
        port: int = 9443,
        cert_dir: Path | None = None,
    ) -> None:
        self.validator = validator
        self.host = host
        self._port = port
        self.cert_dir = cert_dir
        self._ssl: ssl.SSLContext | None = None  # the listening context
        self._current_ssl: ssl.SSLContext | None = None  # the newest key pair (see _select_context)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.app = web.Application(client_max_size=MAX_BODY_BYTES)
        self.app.router.add_post(VALIDATE_PATH, self._instrumented(VALIDATE_PATH, self._handle_validate))
        self.app.router.add_post(MUTATE_PATH, self._instrumented(MUTATE_PATH, self._handle_mutate))
        self.app.router.add_get(HEALTH_PATH, self._handle_health)

    @property
    def listening(self) -> bool:
        """True from the moment the socket accepts connections until :meth:`stop`."""
        return self._site is not None

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        if self._runner is not None:
            for addr in self._runner.addresses:
                if isinstance(addr, tuple) and len(addr) >= 2:
                    return int(addr[1])
        return self._port

    def _load_ssl(self) -> ssl.SSLContext:
        """A server context with the key pair of ``cert_dir`` (file reads and key parsing: call in a thread)."""
        assert self.cert_dir is not None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_dir / TLS_CERT_FILE, self.cert_dir / TLS_KEY_FILE)
        return ctx

    def _select_context(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext
    ) -> None:
        """SNI callback of the listening context: hand each new handshake the newest key pair.

        Called for every ClientHello, with or without a server name. Swapping the whole context is
        what the ssl module supports; loading into the listening context from a worker thread while
        the loop starts handshakes on it would race inside OpenSSL.
        """
        current = self._current_ssl
        if current is not None and current is not ctx:
            conn.context = current

    async def reload_certificates(self) -> None:
        """Re-read the key pair from ``cert_dir`` off the event loop; new handshakes present the new one."""
        if self._ssl is None or self.cert_dir is None:
            return
        self._current_ssl = await asyncio.to_thread(self._load_ssl)
        log.info("webhook certificate reloaded", cert_dir=str(self.cert_dir))

    async def start(self) -> None:
        """Start listening (the certificate files must exist when ``cert_dir`` is set)."""
        if self.cert_dir is not None:
            self._ssl = await asyncio.to_thread(self._load_ssl)
            self._current_ssl = self._ssl
            self._ssl.sni_callback = self._select_context
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port, ssl_context=self._ssl, backlog=512)
        await site.start()
        # Only now (the socket is bound and listening) does :attr:`listening` turn true.
        self._site = site
        log.info("webhook server listening", host=self.host, port=self.port, tls=self._ssl is not None)

    async def stop(self) -> None:
        """Stop listening and finish in-flight requests."""
        # Not ready from the first moment of a stop: new connections are about to be refused.
        self._site = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> WebhookServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def add_to_manager(self, mgr: Manager, *, alongside: Callable[[], Awaitable[None]] | None = None) -> None:
        """Serve on every replica (not leader-gated) while ``mgr`` runs; ``/readyz`` waits for :attr:`listening`.

        ``alongside`` runs while the server listens and ends with it (the certificate rotation loop);
        the server stops when the manager cancels the runnable. Without the readiness check, ``/readyz``
        could report ready (informers synced) before the socket is bound, and the apiserver's calls
        through a Service that already routes to this pod would be refused.
        """

        async def serve() -> None:
            await self.start()
            try:
                if alongside is not None:
                    await alongside()
                else:
                    await asyncio.Event().wait()  # until the manager cancels this runnable
            finally:
                await self.stop()

        mgr.add_runnable("webhook", serve, needs_leader=False)
        mgr.add_ready_check("webhook", lambda: self.listening)

    # --------------------------------------------------------------------------------------- handlers

    @staticmethod
    def _instrumented(path: str, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.Response:
            in_flight = WEBHOOK_IN_FLIGHT.labels(path)
            in_flight.inc()
            start = time.perf_counter()
            try:
                response = await handler(request)
            finally:
                in_flight.dec()
                WEBHOOK_LATENCY.labels(path).observe(time.perf_counter() - start)
            WEBHOOK_REQUESTS.labels(str(response.status), path).inc()
            return response

        return wrapped

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _read(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await request.read()
            # A review near the apiserver's object size limit takes tens of ms to decode: not on the loop.
            if len(body) > INLINE_PARSE_BYTES:
                return await asyncio.to_thread(_parse_request, body)
            return _parse_request(body)
        except BadReview as e:
            log.warning("bad admission request", path=request.path, error=str(e))
            return web.json_response({"error": str(e)}, status=400)

    async def _handle_validate(self, request: web.Request) -> web.Response:
        req = await self._read(request)
        if isinstance(req, web.Response):
            return req
        uid = req["uid"]
        try:
            review = await self.review_validate(req)
        except Exception as e:  # a rule bug must deny this request, not crash the server
            log.exception("validation failed unexpectedly", uid=uid)
            review = _deny(
                uid, 500, f"internal error in the kaito webhook: {type(e).__name__}: {e}", "InternalError"
            )
        return web.json_response(review)

    async def _handle_mutate(self, request: web.Request) -> web.Response:
        req = await self._read(request)
        if isinstance(req, web.Response):
            return req
        uid = req["uid"]
        try:
            review = self.review_mutate(req)
        except Exception as e:
            log.exception("defaulting failed unexpectedly", uid=uid)
            review = _deny(
                uid, 500, f"internal error in the kaito webhook: {type(e).__name__}: {e}", "InternalError"
            )
        return web.json_response(review)

    # ---------------------------------------------------------------------------------------- reviews

    @staticmethod
    def _check_kind(req: dict[str, Any]) -> str | None:
        kind = req.get("kind") or {}
        if not isinstance(kind, dict) or kind.get("group") != GROUP or kind.get("kind") != KIND:
            return f"this webhook admits {GROUP} {KIND} objects only; got {kind!r}"
        return None

    def _parse_workspace(self, raw: Any, namespace: str | None, what: str) -> Workspace:
        if not isinstance(raw, dict):
            raise BadReview(f"request.{what} is required and must be an object")
        # status is the controller's (written through the subresource) and not ours to judge here.
        ws = Workspace.model_validate({k: v for k, v in raw.items() if k != "status"})
        if not ws.metadata.namespace and namespace:
            ws.metadata.namespace = namespace
        return ws

    async def review_validate(self, req: dict[str, Any]) -> dict[str, Any]:
        """The validating AdmissionReview response for one request."""
        uid = req["uid"]
        problem = self._check_kind(req)
        if problem:
            return _deny(uid, 400, problem, "BadRequest")
        operation = req.get("operation")
        if operation not in ("CREATE", "UPDATE"):
            return _review(uid, True)
        namespace = req.get("namespace")
        try:
            new = self._parse_workspace(req.get("object"), namespace, "object")
            old = (
                self._parse_workspace(req.get("oldObject"), namespace, "oldObject")
                if operation == "UPDATE"
                else None
            )
        except BadReview as e:
            return _deny(uid, 400, str(e), "BadRequest")
        except ValidationError as e:
            return _deny(uid, 422, describe_validation_error(e))
        result: Result
        if old is None:
            result = await self.validator.validate_create(new)
        else:
            result = await self.validator.validate_update(old, new)
        WEBHOOK_DECISIONS.labels(VALIDATE_PATH, operation, str(result.allowed).lower()).inc()
        if not result.allowed:
            log.info(
                "workspace denied", uid=uid, operation=operation, namespace=namespace, name=new.metadata.name
            )
            return _deny(uid, 422, "; ".join(result.errors), warnings=result.warnings)
        return _review(uid, True, warnings=result.warnings) if result.warnings else _review(uid, True)

    def review_mutate(self, req: dict[str, Any]) -> dict[str, Any]:
        """The mutating AdmissionReview response (a JSONPatch with the missing defaults)."""
        uid = req["uid"]
        problem = self._check_kind(req)
        if problem:
            return _deny(uid, 400, problem, "BadRequest")
        if req.get("operation") not in ("CREATE", "UPDATE"):
            return _review(uid, True)
        obj = req.get("object")
        if not isinstance(obj, dict):
            return _deny(uid, 400, "request.object is required and must be an object", "BadRequest")
        ops = default_patch(obj)
        if not ops:
            return _review(uid, True)
        patch = base64.b64encode(json.dumps(ops).encode()).decode()
        return _review(uid, True, patchType="JSONPatch", patch=patch)
