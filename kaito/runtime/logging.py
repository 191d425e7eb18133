"""structlog set-up: JSON lines in the cluster, coloured console locally.

Every line carries the bound context (the Controller binds ``controller``, ``key``, ``namespace``,
``name`` and ``reconcile_id`` around each reconcile through contextvars) and an ISO UTC timestamp.
Values under secret-looking keys are redacted before rendering, so a secret is never logged by
accident through a key/value pair.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

SECRET_KEY_PARTS = ("password", "secret", "token", "authorization", "credential", "private_key", "apikey")
REDACTED = "[redacted]"


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: replace values whose key looks secret."""
    for key in list(event_dict):
        lowered = key.lower().replace("-", "_")
        if any(part in lowered for part in SECRET_KEY_PARTS):
            event_dict[key] = REDACTED
    return event_dict


def configure_logging(json_output: bool | None = None, level: str = "info") -> None:
    """Configure structlog (and route stdlib logging through the same level).

    ``json_output=None`` picks JSON when stderr is not a terminal or ``KAITO_LOG_FORMAT=json``.
    """
    if json_output is None:
        fmt = os.environ.get("KAITO_LOG_FORMAT", "")
        json_output = fmt == "json" or (fmt != "console" and not sys.stderr.isatty())
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_secrets,
            structlog.processors.EventRenamer("msg") if json_output else _identity,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(name)s %(message)s")


def _identity(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return event_dict
