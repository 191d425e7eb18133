"""Prometheus metrics of the inference server (one registry per app so tests can run several)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

ENDPOINTS = frozenset(
    {"/", "/chat", "/health", "/healthz", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
)


class RuntimeMetrics:
    """Requests, tokens, time to first token and latency, labelled by endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "kaito_inference_requests_total",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kaito_inference_request_duration_seconds",
            "Time from request start to the last byte of the response (streams included).",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "kaito_inference_time_to_first_token_seconds",
            "Time from request start to the first generated token (first streamed text for streams).",
            ["endpoint"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "kaito_inference_queue_seconds",
            "Time a generation waited for a row in the running batch.",
            ["endpoint"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "kaito_inference_prompt_tokens_total",
            "Prompt tokens processed.",
            ["endpoint"],
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "kaito_inference_generation_tokens_total",
            "Tokens generated.",
            ["endpoint"],
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "kaito_inference_generations_in_progress",
            "Generations queued or running.",
            ["endpoint"],
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "kaito_inference_model_ready", "1 once the model is loaded and serving.", registry=self.registry
        )
        self.model_load_seconds = Gauge(
            "kaito_inference_model_load_seconds", "How long loading the model took.", registry=self.registry
        )


class MetricsMiddleware:
    """Pure ASGI middleware: counts every response and times it until its last body chunk.

    A function middleware would stop the clock when a streaming response *starts*; wrapping ``send``
    measures what the client waits for.
    """

    def __init__(self, app: ASGIApp, metrics: RuntimeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection, recording metrics for HTTP requests."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        start = time.perf_counter()
        status = {"code": 500, "done": False}

        async def wrapped_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._record(endpoint, status, start)

        try:
            await self.app(scope, receive, wrapped_send)
        finally:
            self._record(endpoint, status, start)

    def _record(self, endpoint: str, status: dict[str, Any], start: float) -> None:
        if status["done"]:
            return
        status["done"] = True
        self.metrics.requests.labels(endpoint, str(status["code"])).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
