"""What every generating endpoint does: check text and lengths, tokenize, run or stream a generation.

Everything that can be known before a stream starts (bad text, lengths, capacity) is checked before the
response headers go out, so it is answered with a 4xx/503 status instead of an in-band error after 200.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from .engine import (
    Engine,
    EngineOverloaded,
    GenerationCancelled,
    GenerationError,
    GenerationRequest,
    GenerationResult,
)
from .errors import ClientError
from .metrics import RuntimeMetrics

log = logging.getLogger("kaito_inference")
T = TypeVar("T", str, list[dict[str, Any]])

DEFAULT_MAX_NEW_TOKENS = 1024  # only when the model does not say how long its context is
_INLINE_TOKENIZE_CHARS = 4096


def check_text(value: Any, where: str) -> None:
    """Refuse text that is not valid Unicode (lone UTF-16 surrogates from ``\\ud800`` escapes) anywhere
    in ``value`` (strings, lists and dicts, recursively) with a 400 naming the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ClientError(
                f"{where} is not valid Unicode text (it contains a lone UTF-16 surrogate)", param=where
            ) from None
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_text(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, where)
            check_text(item, f"{where}.{key}")


def check_token_ids(engine: Engine, ids: list[int], where: str) -> None:
    """Refuse token ids the model does not have."""
    bad = [i for i in ids if not 0 <= i < engine.vocab_size]
    if bad:
        raise ClientError(
            f"{where} has token id {bad[0]}, outside this model's vocabulary of {engine.vocab_size} tokens",
            param=where,
        )


def context_check(engine: Engine, prompt_len: int, max_new: int | None, param: str) -> int:
    """Return the number of new tokens to generate; refuse requests the context cannot hold."""
    ctx = engine.context_length
    if prompt_len == 0:
        raise ClientError("the prompt is empty after tokenization", param=param)
    if ctx is not None and prompt_len >= ctx:
        raise ClientError(
            f"This model's maximum context length is {ctx} tokens, but the prompt has {prompt_len} tokens.",
            param=param,
        )
    if max_new is None:
        return (ctx - prompt_len) if ctx is not None else DEFAULT_MAX_NEW_TOKENS
    if ctx is not None and prompt_len + max_new > ctx:
        raise ClientError(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{prompt_len + max_new} tokens ({prompt_len} in the prompt, {max_new} for the completion).",
            param="max_tokens",
        )
    return max_new


def stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    """OpenAI ``stop`` as a tuple of non-empty strings (at most 4)."""
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise ClientError("at most 4 stop sequences are allowed", param="stop")
    return tuple(s for s in stops if s)


async def tokenize(fn: Callable[[T], list[int]], arg: T) -> list[int]:
    """Tokenize on a thread when the input is large; small inputs take microseconds, and a thread hop
    would cost more than it saves (it shows up in time to first token on a busy machine)."""
    # Many empty messages cost the chat template as much as long ones: count each as some characters.
    size = len(arg) if isinstance(arg, str) else sum(64 + len(str(m.get("content") or "")) for m in arg)
    if size <= _INLINE_TOKENIZE_CHARS:
        return fn(arg)
    return await asyncio.to_thread(fn, arg)


def record(metrics: RuntimeMetrics, endpoint: str, result: GenerationResult, start: float) -> None:
    """Token counters, queue time and (non-streamed) time to first token."""
    metrics.prompt_tokens.labels(endpoint).inc(result.prompt_tokens)
    metrics.generation_tokens.labels(endpoint).inc(result.completion_tokens)
    metrics.queue_time.labels(endpoint).observe(max(0.0, result.started_at - result.queued_at))


async def _until_disconnect(request: Request) -> None:
    # The body has been read; the next message the server delivers is the client going away.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_generations(
    request: Request, metrics: RuntimeMetrics, endpoint: str, engine: Engine, reqs: list[GenerationRequest]
) -> list[GenerationResult]:
    """Run non-streamed generations side by side (they join the batch together).

    A client that disconnects cancels them: its rows leave the batch at the next step.
    """
    start = time.perf_counter()
    for _ in reqs:
        engine.check_capacity()
    gauge = metrics.in_progress.labels(endpoint)
    gauge.inc()
    try:

        async def all_of() -> list[GenerationResult]:
            # A task group: when one generation fails, the others are cancelled with it.
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(engine.generate(r)) for r in reqs]
            return [t.result() for t in tasks]

        work = asyncio.ensure_future(all_of())
        watcher = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
            await asyncio.gather(work, watcher, return_exceptions=True)
        if work.cancelled():
            # Nobody will read this answer; the status only shows in the metrics (nginx's convention).
            raise ClientError("client closed the request", status=499)
        try:
            results = work.result()
        except BaseExceptionGroup as group:  # the first failure is the one to report
            raise group.exceptions[0] from None
    finally:
        gauge.dec()
    for result in results:
        record(metrics, endpoint, result, start)
        if result.first_token_at is not None:
            metrics.ttft.labels(endpoint).observe(max(0.0, result.first_token_at - start))
    return results


def sse(payload: Mapping[str, Any] | str) -> bytes:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def stream_response(
    metrics: RuntimeMetrics,
    endpoint: str,
    engine: Engine,
    req: GenerationRequest,
    chunk: Callable[[str, str | None], dict[str, Any]],
    first: dict[str, Any] | None,
    base: dict[str, Any],
    include_usage: bool,
) -> StreamingResponse:
    """An SSE response streaming ``req``; capacity is checked before the headers are sent."""
    start = time.perf_counter()
    engine.check_capacity()

    def with_usage(payload: dict[str, Any]) -> dict[str, Any]:
        # Under include_usage every chunk but the last carries "usage": null (OpenAI's wire format).
        return {**payload, "usage": None} if include_usage else payload

    async def events() -> AsyncIterator[bytes]:
        gauge = metrics.in_progress.labels(endpoint)
        gauge.inc()
        first_seen = False
        try:
            if first is not None:
                yield sse(with_usage(first))
            result: GenerationResult | None = None
            async for delta in engine.stream(req):
                if delta.text:
                    if not first_seen:
                        first_seen = True
                        metrics.ttft.labels(endpoint).observe(time.perf_counter() - start)
                    yield sse(with_usage(chunk(delta.text, None)))
                if delta.final is not None:
                    result = delta.final
            if result is None:  # pragma: no cover - stream() always ends with a final delta
                raise RuntimeError("stream ended without a result")
            record(metrics, endpoint, result, start)
            yield sse(with_usage(chunk("", result.sequences[0].finish_reason)))
            if include_usage:
                usage = {
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "total_tokens": result.prompt_tokens + result.completion_tokens,
                }
                yield sse({**base, "choices": [], "usage": usage})
            yield sse("[DONE]")
        except GenerationError as exc:
            yield sse(
                {"error": {"message": str(exc), "type": "invalid_request_error", "param": None, "code": None}}
            )
        except (GenerationCancelled, EngineOverloaded) as exc:
            yield sse(
                {"error": {"message": str(exc), "type": "server_error", "param": None, "code": "server_busy"}}
            )
        except Exception:
            # Headers are already sent: report in-band like OpenAI does, never with a traceback.
            log.exception("stream failed")
            yield sse(
                {
                    "error": {
                        "message": "Internal server error",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
            )
        finally:
            gauge.dec()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
