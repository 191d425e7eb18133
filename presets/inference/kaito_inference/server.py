"""The FastAPI application: upstream's ``/chat``, health, an OpenAI-compatible API and Prometheus metrics.

The model loads in the background after the server starts listening, so probes get an honest 503
("Loading") instead of connection refused; every model endpoint answers 503 until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServerConfig
from .engine import (
    Engine,
    EngineOverloaded,
    GenerationCancelled,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    LoadedModel,
    load_model,
)
from .metrics import MetricsMiddleware, RuntimeMetrics
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, UnifiedRequest

log = logging.getLogger("kaito_inference")
T = TypeVar("T", str, list[dict[str, Any]])

# generate() arguments that take Python objects or control internals; JSON cannot express them safely.
_FORBIDDEN_GENERATE_KWARGS = frozenset(
    {
        "streamer",
        "stopping_criteria",
        "logits_processor",
        "prefix_allowed_tokens_fn",
        "assistant_model",
        "assistant_tokenizer",
        "tokenizer",
        "synced_gpus",
        "generation_config",
        "negative_prompt_ids",
        "negative_prompt_attention_mask",
        "input_ids",
        "inputs",
        "attention_mask",
        "past_key_values",
        "use_model_defaults",
        "custom_generate",
        "trust_remote_code",
    }
)
_DEFAULT_MAX_NEW_TOKENS = 1024  # only when the model does not say how long its context is


class ClientError(Exception):
    """A request the server refuses with a 4xx; ``message`` goes to the client as is."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


class ModelNotReady(Exception):
    """The model is still loading (or failed to load)."""


class Runtime:
    """The app's state: the engine once loaded, and what went wrong if loading failed."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.state = "loading"
        self.error: str | None = None
        self.engine: Engine | None = None
        self.created = int(time.time())

    def require(self) -> Engine:
        """The engine, or :class:`ModelNotReady` while there is none."""
        if self.engine is None:
            raise ModelNotReady(self.error or "Model is loading")
        return self.engine


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _error(request: Request, status: int, message: str, param: str | None = None) -> JSONResponse:
    """An error body in the dialect of the endpoint: OpenAI's ``{"error": {...}}`` or upstream's ``detail``."""
    headers = {"Retry-After": "5"} if status == 503 else None
    if _is_openai(request):
        kind = {400: "invalid_request_error", 404: "not_found_error", 422: "invalid_request_error"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body"


def _message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        content = msg.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ClientError(
                        f"messages[{i}]: only text content parts are supported", param="messages"
                    )
                texts.append(part["text"])
            content = "".join(texts)
        role = "system" if msg.role == "developer" else msg.role
        out.append({"role": role, "content": content or ""})
    return out


def _context_check(engine: Engine, prompt_len: int, max_new: int | None, what: str) -> int:
    """Return the number of new tokens to generate; refuse requests the context cannot hold."""
    ctx = engine.context_length
    if ctx is not None and prompt_len >= ctx:
        raise ClientError(
            f"This model's maximum context length is {ctx} tokens, but the prompt has {prompt_len} tokens.",
            param="messages" if what == "chat" else "prompt",
        )
    if max_new is None:
        return (ctx - prompt_len) if ctx is not None else _DEFAULT_MAX_NEW_TOKENS
    if ctx is not None and prompt_len + max_new > ctx:
        raise ClientError(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{prompt_len + max_new} tokens ({prompt_len} in the prompt, {max_new} for the completion).",
            param="max_tokens",
        )
    return max_new


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise ClientError("at most 4 stop sequences are allowed", param="stop")
    return [s for s in stops if s]


def _sampling_kwargs(
    body: ChatCompletionRequest | CompletionRequest, max_new: int, engine: Engine
) -> dict[str, Any]:
    if body.presence_penalty or body.frequency_penalty:
        raise ClientError(
            "presence_penalty and frequency_penalty are not supported", param="presence_penalty"
        )
    if body.logprobs:
        raise ClientError("logprobs are not supported", param="logprobs")
    # Unknown fields are accepted (clients send many optional ones); these would change the answer if
    # honoured, so silently ignoring them would be wrong.
    extra = body.model_extra or {}
    if extra.get("logit_bias"):
        raise ClientError("logit_bias is not supported", param="logit_bias")
    response_format = extra.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
        raise ClientError("only the 'text' response_format is supported", param="response_format")
    if body.stream and body.n > 1:
        raise ClientError("n > 1 is not supported with stream", param="n")
    kwargs: dict[str, Any] = {"max_new_tokens": max_new, "num_return_sequences": body.n}
    if body.temperature > 0:
        # top_k=0 disables top-k so sampling follows OpenAI's temperature/top_p semantics.
        kwargs.update(do_sample=True, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k)
    else:
        if body.n > 1:
            raise ClientError("n > 1 needs temperature > 0 (greedy decoding gives one answer)", param="n")
        kwargs["do_sample"] = False
    if body.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = body.repetition_penalty
    if body.min_tokens:
        kwargs["min_new_tokens"] = min(body.min_tokens, max_new)
    eos = sorted(engine.loaded.eos_token_ids)
    if eos:
        kwargs["eos_token_id"] = eos
    return kwargs


_INLINE_TOKENIZE_CHARS = 4096


async def _offload(fn: Callable[[T], list[int]], arg: T) -> list[int]:
    """Tokenize on a thread when the input is large; small inputs take microseconds, and a thread hop
    would cost more than it saves (it shows up in time to first token on a busy machine)."""
    size = len(arg) if isinstance(arg, str) else sum(len(str(m.get("content") or "")) for m in arg)
    if size <= _INLINE_TOKENIZE_CHARS:
        return fn(arg)
    return await asyncio.to_thread(fn, arg)


def _sse(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def create_app(
    cfg: ServerConfig,
    load_fn: Callable[[ServerConfig], LoadedModel] = load_model,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the app. ``load_fn`` runs on a background thread at start-up; if it raises,
    ``on_load_failure`` is called with the message (the CLI uses it to exit non-zero)."""
    runtime = Runtime(cfg)
    metrics = RuntimeMetrics()

    async def load() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[LoadedModel] = loop.create_future()

        def settle(result: LoadedModel | None, error: BaseException | None) -> None:
            if done.done():  # the lifespan gave up on the load (shutdown)
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)  # type: ignore[arg-type]

        def target() -> None:
            # A daemon thread instead of the default executor: a model load cannot be interrupted, and
            # shutting down during a load must not wait minutes for it.
            result: LoadedModel | None = None
            error: BaseException | None = None
            try:
                result = load_fn(cfg)
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server already stopped
                loop.call_soon_threadsafe(settle, result, error)

        started = time.perf_counter()
        threading.Thread(target=target, name="load-model", daemon=True).start()
        try:
            loaded = await done
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            runtime.state = "failed"
            runtime.error = f"model failed to load: {exc}"
            log.error("%s", runtime.error)
            if on_load_failure is not None:
                on_load_failure(runtime.error)
            return
        runtime.engine = Engine(
            loaded, max_workers=cfg.max_concurrent_generations, max_pending=cfg.max_pending_generations
        )
        runtime.state = "ready"
        metrics.model_ready.set(1)
        metrics.model_load_seconds.set(time.perf_counter() - started)
        log.info("model %s ready in %.1fs", cfg.model_id, time.perf_counter() - started)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(load(), name="load-model")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if runtime.engine is not None:
                await runtime.engine.close()

    app = FastAPI(title="KAITO inference server", lifespan=lifespan)
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # -- errors ------------------------------------------------------------------------------------

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        return _error(request, exc.status, exc.message, exc.param)

    @app.exception_handler(GenerationError)
    async def _generation_error(request: Request, exc: GenerationError) -> JSONResponse:
        return _error(request, 400, str(exc))

    @app.exception_handler(GenerationCancelled)
    async def _cancelled(request: Request, exc: GenerationCancelled) -> JSONResponse:
        return _error(request, 503, "server is shutting down")

    @app.exception_handler(EngineOverloaded)
    async def _overloaded(request: Request, exc: EngineOverloaded) -> JSONResponse:
        return _error(request, 503, str(exc))

    @app.exception_handler(ModelNotReady)
    async def _not_ready(request: Request, exc: ModelNotReady) -> JSONResponse:
        return _error(request, 503, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if _is_openai(request):
            return _error(request, 400, _validation_message(exc))
        # Upstream (FastAPI) answers /chat validation errors with 422 and a detail list; keep that shape
        # but drop the echoed input, which can be large.
        detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error(request, 500, "Internal server error")

    # -- health --------------------------------------------------------------------------------------

    @app.get("/")
    async def root() -> dict[str, str]:
        """Liveness of the HTTP server itself (upstream)."""
        return {"message": "Server is running"}

    async def health() -> JSONResponse:
        if runtime.state == "ready":
            return JSONResponse({"status": "Healthy"})
        if runtime.state == "failed":
            return JSONResponse({"status": "Failed", "detail": runtime.error}, status_code=503)
        return JSONResponse({"status": "Loading", "detail": "Model is loading"}, status_code=503)

    app.add_api_route("/health", health, methods=["GET"], summary="Readiness: 200 once the model is loaded")
    app.add_api_route("/healthz", health, methods=["GET"], summary="Same as /health (upstream v0.3 path)")

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus exposition of requests, tokens, time to first token and latency."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def record_tokens(endpoint: str, result: GenerationResult, start: float) -> None:
        metrics.prompt_tokens.labels(endpoint).inc(result.prompt_tokens)
        metrics.generation_tokens.labels(endpoint).inc(result.completion_tokens)
        metrics.queue_time.labels(endpoint).observe(max(0.0, result.started_at - result.queued_at))
        if result.first_token_at is not None:
            metrics.ttft.labels(endpoint).observe(max(0.0, result.first_token_at - start))

    async def run(endpoint: str, engine: Engine, req: GenerationRequest, start: float) -> GenerationResult:
        gauge = metrics.in_progress.labels(endpoint)
        gauge.inc()
        try:
            result = await engine.generate(req)
        finally:
            gauge.dec()
        record_tokens(endpoint, result, start)
        return result

    # -- upstream /chat ------------------------------------------------------------------------------

    @app.post("/chat")
    async def chat(body: UnifiedRequest) -> dict[str, Any]:
        """Upstream's generation endpoint: ``prompt`` or ``messages`` in, ``{"Result": text}`` out."""
        start = time.perf_counter()
        engine = runtime.require()
        use_messages = body.messages is not None and (cfg.pipeline == "conversational" or not body.prompt)
        if use_messages:
            if not body.messages:
                raise ClientError("Conversational parameter messages required")
            input_ids = await _offload(engine.encode_messages, _message_dicts(body.messages))
        else:
            if not body.prompt:
                raise ClientError(
                    "Conversational parameter messages required"
                    if cfg.pipeline == "conversational"
                    else "Text generation parameter prompt required"
                )
            input_ids = await _offload(engine.encode_prompt, (body.prefix or "") + body.prompt)

        gen = body.generate_kwargs.model_dump(exclude_none=True)
        bad = sorted(_FORBIDDEN_GENERATE_KWARGS.intersection(gen))
        if bad:
            raise ClientError(f"generate_kwargs cannot set {', '.join(bad)}")
        ctx = engine.context_length
        if ctx is not None:
            for key in ("max_length", "max_new_tokens"):
                if key in gen and gen[key] > ctx:
                    raise ClientError(
                        f"generate_kwargs.{key}={gen[key]} exceeds the model's context length of {ctx} tokens"
                    )
        if body.handle_long_generation not in (None, "hole"):
            raise ClientError("handle_long_generation must be 'hole' or null")
        if body.handle_long_generation == "hole" and ctx is not None:
            keep = ctx - int(gen.get("max_new_tokens") or 1)
            input_ids = input_ids[-keep:]
        elif ctx is not None and len(input_ids) >= ctx:
            raise ClientError(
                f"the prompt has {len(input_ids)} tokens but the model's context length is {ctx} tokens "
                "(set handle_long_generation to 'hole' to keep only its end)"
            )
        if gen.get("eos_token_id") is None and engine.loaded.eos_token_ids:
            # Upstream passed only the tokenizer's EOS, so chat models whose turns end with another
            # token (phi-3's <|end|>, llama-3's <|eot_id|>, listed in generation_config) ran on to
            # max_length; stop on all of them.
            gen["eos_token_id"] = sorted(engine.loaded.eos_token_ids)
        if gen.get("pad_token_id") is None and engine.tokenizer.pad_token_id is not None:
            gen["pad_token_id"] = engine.tokenizer.pad_token_id
        req = GenerationRequest(
            input_ids=input_ids,
            generate_kwargs=gen,
            clean_up_tokenization_spaces=body.clean_up_tokenization_spaces,
        )
        result = await run("/chat", engine, req, start)
        if use_messages:
            # Upstream returned a Python repr of the whole conversation here; the reply text is what
            # callers actually want.
            return {"Result": "".join(s.text for s in result.sequences)}
        lead = (body.prompt or "") if body.return_full_text else ""
        return {"Result": "".join(lead + s.text for s in result.sequences)}

    # -- OpenAI-compatible API -------------------------------------------------------------------------

    def check_model(name: str) -> None:
        if name != cfg.model_id:
            raise ClientError(
                f"The model `{name}` does not exist. This server serves `{cfg.model_id}`.",
                status=404,
                param="model",
            )

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The one model this server serves (adapters are merged into it)."""
        engine = runtime.require()
        entry: dict[str, Any] = {
            "id": cfg.model_id,
            "object": "model",
            "created": runtime.created,
            "owned_by": "kaito",
            "root": cfg.pretrained_model_name_or_path,
            "parent": None,
            "max_model_len": engine.context_length,
            "adapters": [{"name": a.name, "strength": a.strength} for a in engine.loaded.adapters],
        }
        return {"object": "list", "data": [entry]}

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def stream_response(
        endpoint: str,
        engine: Engine,
        req: GenerationRequest,
        start: float,
        chunk: Callable[[str, str | None], dict[str, Any]],
        first: dict[str, Any] | None,
        base: dict[str, Any],
        include_usage: bool,
    ) -> StreamingResponse:
        engine.check_capacity()

        async def events() -> AsyncIterator[bytes]:
            gauge = metrics.in_progress.labels(endpoint)
            gauge.inc()
            first_seen = False
            try:
                if first is not None:
                    yield _sse(first)
                result: GenerationResult | None = None
                async for delta in engine.stream(req):
                    if delta.text:
                        if not first_seen:
                            first_seen = True
                            metrics.ttft.labels(endpoint).observe(time.perf_counter() - start)
                        yield _sse(chunk(delta.text, None))
                    if delta.final is not None:
                        result = delta.final
                if result is None:  # pragma: no cover - stream() always ends with a final delta
                    raise RuntimeError("stream ended without a result")
                metrics.prompt_tokens.labels(endpoint).inc(result.prompt_tokens)
                metrics.generation_tokens.labels(endpoint).inc(result.completion_tokens)
                metrics.queue_time.labels(endpoint).observe(max(0.0, result.started_at - result.queued_at))
                yield _sse(chunk("", result.sequences[0].finish_reason))
                if include_usage:
                    yield _sse(
                        {
                            **base,
                            "choices": [],
                            "usage": usage(result.prompt_tokens, result.completion_tokens),
                        }
                    )
                yield _sse("[DONE]")
            except GenerationError as exc:
                yield _sse({"error": {"message": str(exc), "type": "invalid_request_error", "code": 400}})
            except (GenerationCancelled, EngineOverloaded) as exc:
                yield _sse({"error": {"message": str(exc), "type": "server_error", "code": 503}})
            except Exception:
                # Headers are already sent: report in-band like OpenAI does, never with a traceback.
                log.exception("stream failed")
                yield _sse(
                    {"error": {"message": "Internal server error", "type": "server_error", "code": 500}}
                )
            finally:
                gauge.dec()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> dict[str, Any] | StreamingResponse:
        """OpenAI chat completions, optionally streamed as server-sent events."""
        start = time.perf_counter()
        check_model(body.model)
        engine = runtime.require()
        if body.tools:
            raise ClientError("tools are not supported by this runtime", param="tools")
        input_ids = await _offload(engine.encode_messages, _message_dicts(body.messages))
        max_new = _context_check(
            engine, len(input_ids), body.max_completion_tokens or body.max_tokens, "chat"
        )
        req = GenerationRequest(
            input_ids=input_ids,
            generate_kwargs=_sampling_kwargs(body, max_new, engine),
            stop=_stop_list(body.stop),
            seed=body.seed,
        )
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": cfg.model_id}
        if body.stream:
            chunk_base = {**base, "object": "chat.completion.chunk"}

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                delta = {"content": text} if finish is None else {}
                return {**chunk_base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            first = {
                **chunk_base,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                ],
            }
            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream_response(
                "/v1/chat/completions", engine, req, start, chunk, first, chunk_base, include
            )
        result = await run("/v1/chat/completions", engine, req, start)
        return {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": s.text},
                    "logprobs": None,
                    "finish_reason": s.finish_reason,
                }
                for i, s in enumerate(result.sequences)
            ],
            "usage": usage(result.prompt_tokens, result.completion_tokens),
        }

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        """OpenAI text completions, optionally streamed as server-sent events."""
        start = time.perf_counter()
        check_model(body.model)
        engine = runtime.require()
        if body.suffix:
            raise ClientError("suffix is not supported", param="suffix")
        if body.best_of not in (None, 1, body.n):
            raise ClientError("best_of is not supported", param="best_of")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts or any(not p for p in prompts):
            raise ClientError(
                "prompt must be a non-empty string or list of non-empty strings", param="prompt"
            )
        if body.stream and len(prompts) > 1:
            raise ClientError("stream supports a single prompt", param="prompt")
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        reqs = []
        for prompt in prompts:
            ids = await _offload(engine.encode_prompt, prompt)
            max_new = _context_check(engine, len(ids), max_tokens, "completion")
            reqs.append(
                GenerationRequest(
                    input_ids=ids,
                    generate_kwargs=_sampling_kwargs(body, max_new, engine),
                    stop=_stop_list(body.stop),
                    seed=body.seed,
                )
            )
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": cfg.model_id}
        if body.stream:
            chunk_base = {**base, "object": "text_completion"}

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                return {
                    **chunk_base,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                }

            first = chunk(prompts[0], None) if body.echo else None
            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream_response(
                "/v1/completions", engine, reqs[0], start, chunk, first, chunk_base, include
            )
        choices: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = 0
        for prompt, req in zip(prompts, reqs, strict=True):
            result = await run("/v1/completions", engine, req, start)
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
            for s in result.sequences:
                text = (prompt + s.text) if body.echo else s.text
                choices.append(
                    {"index": len(choices), "text": text, "logprobs": None, "finish_reason": s.finish_reason}
                )
        return {
            **base,
            "object": "text_completion",
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        }

    return app
