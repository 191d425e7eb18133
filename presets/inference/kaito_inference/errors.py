"""Error answers: every failure becomes a JSON body in the endpoint's dialect, never a stack trace.

OpenAI routes (``/v1/...``) answer ``{"error": {"message", "type", "param", "code"}}`` with ``code`` a
string or null as OpenAI sends it; upstream's routes answer ``{"detail": ...}``. A 5xx also closes the
connection (``Connection: close``), so a client's keep-alive pool does not reuse a connection the server
may have left in an unknown state.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineOverloaded, GenerationCancelled, GenerationError
from .state import ModelNotReady

log = logging.getLogger("kaito_inference")

_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}
_OPENAI_CODES = {404: "model_not_found", 413: "request_too_large", 503: "server_busy"}


class SafeJSONResponse(JSONResponse):
    """JSON rendered as ASCII: an error message that quotes a client's lone surrogate still encodes."""

    def render(self, content: Any) -> bytes:
        """Serialize ``content`` with every non-ASCII character escaped."""
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class ClientError(Exception):
    """A request the server refuses with a 4xx; ``message`` goes to the client as is."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


def is_openai_path(path: str) -> bool:
    """Whether errors on this path use OpenAI's error shape."""
    return path.startswith("/v1/")


def error_body(path: str, status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The JSON error body for ``path``'s dialect."""
    if is_openai_path(path):
        kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        code = _OPENAI_CODES.get(status)
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"detail": message}


def error_headers(status: int) -> dict[str, str] | None:
    """``Retry-After`` on 503; ``Connection: close`` on every other 5xx."""
    if status == 503:
        return {"Retry-After": "5"}
    if status >= 500:
        return {"Connection": "close"}
    return None


def error_response(request: Request, status: int, message: str, param: str | None = None) -> SafeJSONResponse:
    """An error answer for ``request``."""
    return SafeJSONResponse(
        error_body(request.url.path, status, message, param),
        status_code=status,
        headers=error_headers(status),
    )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body"


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception a handler can raise to its answer."""

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, exc.param)

    @app.exception_handler(GenerationError)
    async def _generation_error(request: Request, exc: GenerationError) -> JSONResponse:
        return error_response(request, 400, str(exc))

    @app.exception_handler(GenerationCancelled)
    async def _cancelled(request: Request, exc: GenerationCancelled) -> JSONResponse:
        return error_response(request, 503, "server is shutting down")

    @app.exception_handler(EngineOverloaded)
    async def _overloaded(request: Request, exc: EngineOverloaded) -> JSONResponse:
        return error_response(request, 503, str(exc))

    @app.exception_handler(ModelNotReady)
    async def _not_ready(request: Request, exc: ModelNotReady) -> JSONResponse:
        return error_response(request, 503, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if is_openai_path(request.url.path):
            return error_response(request, 400, _validation_message(exc))
        # Upstream (FastAPI) answers /chat validation errors with 422 and a detail list; keep that shape
        # but drop the echoed input, which can be large.
        detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return SafeJSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request, 500, "Internal server error")
