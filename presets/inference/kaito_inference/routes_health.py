"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .state import AppState, app_state

router = APIRouter()
State = Annotated[AppState, Depends(app_state)]


@router.get("/")
async def root() -> dict[str, str]:
    """Liveness of the HTTP server itself (upstream)."""
    return {"message": "Server is running"}


async def health(state: State) -> JSONResponse:
    """Readiness: 200 once the model is loaded, 503 while loading or after a failed load."""
    if state.state == "ready":
        return JSONResponse({"status": "Healthy"})
    if state.state == "failed":
        return JSONResponse({"status": "Failed", "detail": state.error}, status_code=503)
    return JSONResponse({"status": "Loading", "detail": "Model is loading"}, status_code=503)


router.add_api_route("/health", health, methods=["GET"], summary="Readiness: 200 once the model is loaded")
router.add_api_route("/healthz", health, methods=["GET"], summary="Same as /health (upstream v0.3 path)")


@router.get("/metrics")
async def prometheus_metrics(state: State) -> Response:
    """Prometheus exposition of requests, tokens, time to first token and latency."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
