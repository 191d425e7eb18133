"""The FastAPI application: upstream's ``/chat``, health, an OpenAI-compatible API and Prometheus metrics.

The endpoints live in one module per group (``routes_health``, ``routes_models``, ``routes_chat``,
``routes_openai``) and share an :class:`~.state.AppState`; this module assembles them. The model loads in
the background after the server starts listening, so probes get an honest 503 ("Loading") instead of
connection refused; every model endpoint answers 503 until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import routes_chat, routes_health, routes_models, routes_openai
from .body_limits import BodyLimitMiddleware
from .config import ServerConfig
from .engine import Engine, LoadedModel, load_model
from .errors import install_error_handlers
from .metrics import MetricsMiddleware, RuntimeMetrics
from .state import AppState

log = logging.getLogger("kaito_inference")


async def _load(
    state: AppState,
    load_fn: Callable[[ServerConfig], LoadedModel],
    on_load_failure: Callable[[str], None] | None,
) -> None:
    """Load the model on a daemon thread and publish the engine (or the failure) in ``state``."""
    cfg = state.cfg
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
        state.state = "failed"
        state.error = f"model failed to load: {exc}"
        log.error("%s", state.error)
        if on_load_failure is not None:
            on_load_failure(state.error)
        return
    state.engine = Engine(
        loaded, max_batch=cfg.max_concurrent_generations, max_pending=cfg.max_pending_generations
    )
    state.state = "ready"
    state.metrics.model_ready.set(1)
    state.metrics.model_load_seconds.set(time.perf_counter() - started)
    log.info("model %s ready in %.1fs", cfg.model_id, time.perf_counter() - started)


def create_app(
    cfg: ServerConfig,
    load_fn: Callable[[ServerConfig], LoadedModel] = load_model,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the app. ``load_fn`` runs on a background thread at start-up; if it raises,
    ``on_load_failure`` is called with the message (the CLI uses it to exit non-zero)."""
    state = AppState(cfg=cfg, metrics=RuntimeMetrics())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_load(state, load_fn, on_load_failure), name="load-model")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if state.engine is not None:
                await state.engine.close()

    app = FastAPI(title="KAITO inference server", lifespan=lifespan)
    app.state.runtime = state
    app.state.metrics = state.metrics
    # Outermost first: metrics see every answer, the body limits included.
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_body_bytes, timeout_s=cfg.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    install_error_handlers(app)
    for module in (routes_health, routes_models, routes_chat, routes_openai):
        app.include_router(module.router)
    return app
