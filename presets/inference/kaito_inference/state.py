"""The state every endpoint shares: configuration, metrics and the engine once the model is loaded."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Request

from .config import ServerConfig
from .engine import Engine
from .metrics import RuntimeMetrics


class ModelNotReady(Exception):
    """The model is still loading (or failed to load)."""


@dataclass
class AppState:
    """Held by the app (``app.state.runtime``); handlers get it through :func:`app_state`."""

    cfg: ServerConfig
    metrics: RuntimeMetrics
    state: Literal["loading", "ready", "failed"] = "loading"
    error: str | None = None
    engine: Engine | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def require(self) -> Engine:
        """The engine, or :class:`ModelNotReady` while there is none."""
        if self.engine is None:
            raise ModelNotReady(self.error or "Model is loading")
        return self.engine


def app_state(request: Request) -> AppState:
    """FastAPI dependency: the app's :class:`AppState`."""
    state: AppState = request.app.state.runtime
    return state
