"""Fixtures for the model runtime tests (helpers live in runtime_support.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The runtime is not an installed package (the image copies it next to inference_api.py), and the
# helpers module sits beside this file; make both importable whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "presets" / "inference"))

from kaito_inference.config import ServerConfig
from kaito_inference.engine import LoadedModel, load_model
from runtime_support import (
    RunningServer,
    build_model,
    build_tokenizer,
    make_config,
    start_server,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the tiny model and tokenizer, as ``/workspace/tfs/weights`` would."""
    path = tmp_path_factory.mktemp("weights")
    tokenizer = build_tokenizer(path)
    build_model(path, tokenizer)
    return path


@pytest.fixture(scope="session")
def base_server(tiny_model_dir: Path) -> Iterator[RunningServer]:
    """One server over the tiny base model shared by the endpoint tests (they do not change it)."""
    running = start_server(make_config(tiny_model_dir))
    assert running.runtime.state == "ready", running.failures
    yield running
    running.stop()


@pytest.fixture
def server_factory() -> Iterator[Callable[..., RunningServer]]:
    """Start servers with custom configurations; all are stopped at the end of the test."""
    started: list[RunningServer] = []

    def factory(
        cfg: ServerConfig, load_fn: Callable[[ServerConfig], LoadedModel] = load_model, wait: bool = True
    ) -> RunningServer:
        running = start_server(cfg, load_fn=load_fn, wait=wait)
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()
