"""Helpers for the model runtime tests: a tiny random causal LM built locally, and real servers.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few sentences with the
``tokenizers`` library, the model a two-layer Llama with random weights; both are saved with
``save_pretrained`` exactly like the weights in a model image.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from kaito_inference.config import ServerConfig
from kaito_inference.engine import LoadedModel, load_model

# The tiny model itself lives in hack/ (the preset image builder runs it too); re-exported for the tests
# and the benches (which run without the repository root on sys.path).
if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hack.tiny_model import CHAT_TEMPLATE, CORPUS, build_model, build_tokenizer
from test.waiting import wait_until

__all__ = [
    "CHAT_TEMPLATE", "CORPUS", "MODEL_ID", "RunningServer", "build_model", "build_tokenizer", "free_port",
    "http_get", "http_post", "make_config", "start_server",
]  # fmt: skip

REPO = Path(__file__).resolve().parents[2]
RUNTIME_DIR = REPO / "presets" / "inference"

MODEL_ID = "tiny-llama"


def free_port() -> int:
    """A port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    """A real uvicorn server on loopback, running in its own thread and event loop."""

    url: str
    app: Any
    server: Any
    thread: threading.Thread
    failures: list[str]

    @property
    def runtime(self) -> Any:
        """The app's :class:`Runtime` (state, engine)."""
        return self.app.state.runtime

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the model is loaded (or loading failed)."""
        wait_until(lambda: self.runtime.state != "loading", timeout, "model load", interval=0.01)

    def stop(self) -> None:
        """Ask uvicorn to exit and join its thread."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "server thread did not stop"


def start_server(
    cfg: ServerConfig, load_fn: Callable[[ServerConfig], LoadedModel] = load_model, wait: bool = True
) -> RunningServer:
    """Start ``create_app(cfg)`` under uvicorn on a free loopback port."""
    import uvicorn
    from kaito_inference.server import create_app

    failures: list[str] = []
    app = create_app(cfg, load_fn=load_fn, on_load_failure=failures.append)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", ws="none")
    )
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 30, "uvicorn start", interval=0.01)
    assert thread.is_alive(), "uvicorn exited during start-up"
    running = RunningServer(f"http://127.0.0.1:{port}", app, server, thread, failures)
    if wait:
        running.wait_ready()
    return running


def make_config(model_dir: Path, adapters_dir: Path | None = None, **overrides: Any) -> ServerConfig:
    """Server configuration for the tiny model on CPU (float32 so results are exact)."""
    cfg = ServerConfig(
        pretrained_model_name_or_path=str(model_dir),
        served_model_name=MODEL_ID,
        torch_dtype="float32",
        device_map="cpu",
        adapters_dir=str(adapters_dir) if adapters_dir is not None else str(model_dir / "no-adapters"),
        port=0,
        # One intra-op thread: on the shared 2-core test machine, OpenMP threads that spin-wait for each
        # other while other processes hold the cores make a tiny model ten times slower.
        torch_threads=1,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


# Generous: on a loaded 2-core machine a 200-token sampled generation can take several seconds, and a
# client timeout is not what these tests are about.
HTTP_TIMEOUT = 60.0


def http_get(url: str, **kwargs: Any) -> httpx.Response:
    """``httpx.get`` with the tests' timeout."""
    return httpx.get(url, timeout=HTTP_TIMEOUT, **kwargs)


def http_post(url: str, **kwargs: Any) -> httpx.Response:
    """``httpx.post`` with the tests' timeout."""
    return httpx.post(url, timeout=HTTP_TIMEOUT, **kwargs)
