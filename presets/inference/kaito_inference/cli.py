"""Process entry point: parse flags, check adapters, serve with uvicorn, exit non-zero on load failure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from .adapters import AdapterError, discover_adapters
from .config import ConfigError, ServerConfig, parse_args

log = logging.getLogger("kaito_inference")


def _configure_logging(level: str) -> None:
    if os.environ.get("DEBUG_MODE", "").lower() == "true":  # upstream's switch
        level = "debug"
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _server_class() -> Any:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server, minus re-raising SIGTERM/SIGINT after a graceful shutdown.

        uvicorn re-raises the captured signal once it has shut down, so the process dies with 143/130;
        a drained, clean stop should exit 0 (upstream's SIGINT handler exited 0 too).
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            signals = (signal.SIGINT, signal.SIGTERM)
            for sig in signals:
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in signals:
                    loop.remove_signal_handler(sig)

    return _Server


async def serve(cfg: ServerConfig) -> int:
    """Run the server until SIGTERM/SIGINT; return the process exit code (1 if the model failed to load)."""
    import uvicorn
    from transformers.utils import logging as hf_logging

    from .server import create_app

    if cfg.log_level != "debug" and os.environ.get("DEBUG_MODE", "").lower() != "true":
        # transformers warns on every request about flag combinations upstream's defaults produce
        # (max_length with max_new_tokens, top_k with greedy decoding); keep the pod log readable.
        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]

    # Streaming hands every token from the generating thread to the event loop. With CPython's default
    # 5 ms GIL switch interval each hand-off can wait that long behind the generation loop's Python
    # code; 1 ms keeps time to first token and inter-token latency close to the model's own.
    sys.setswitchinterval(0.001)
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_failure(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(cfg, on_load_failure=on_load_failure)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        timeout_graceful_shutdown=30,
        # Longer than the idle timeouts of clients' connection pools (httpx: 5 s, uvicorn's own default)
        # and of load balancers in front (typically 60 s): otherwise the server closes an idle keep-alive
        # connection just as a client sends its next request on it, which fails with a reset.
        timeout_keep_alive=75,
        ws="none",  # no websocket endpoints; avoids importing the websockets package
        # Default access logs on every probe would drown the model's own messages.
        access_log=cfg.log_level == "debug",
    )
    server = _server_class()(config)
    await server.serve()
    return 1 if failure else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``inference_api.py``; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(args)
    except ConfigError as exc:
        print(f"inference_api.py: error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(cfg.log_level)
    try:
        # Cheap checks first, so a broken adapter is reported before minutes of model loading.
        adapters = discover_adapters(cfg.adapters_dir)
    except AdapterError as exc:
        log.error("adapter error: %s", exc)
        return 1
    for a in adapters:
        log.info("adapter %s from %s with strength %s", a.name, a.path, a.strength)
    return asyncio.run(serve(cfg))
