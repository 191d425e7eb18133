"""structlog set-up: JSON lines in the cluster, coloured console locally.

Every line carries the bound context (the Controller binds ``controller``, ``key``, ``namespace``,
``name`` and ``reconcile_id`` around each reconcile through contextvars) and an ISO UTC timestamp.
Before rendering, every string value (the message, ``error=``, an exception's text, strings inside
dicts and lists) goes through :func:`kaito.runtime.redaction.redact`, which hides credentials by what
they look like (URL userinfo, ``Bearer``/``Basic`` credentials, signature query parameters, tokens);
values under keys that name a credential (``password``, ``token``, ...) are hidden whole. A key that
merely mentions a secret (``secret=hf-token``: the Secret's *name*) is kept -- operators need it.
Records of stdlib loggers (kubernetes_asyncio, aiohttp) are redacted the same way.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from kaito.runtime.redaction import REDACTED, redact

# Keys whose value is a credential itself (matched at the end: ``registry_password``, ``auth_token``);
# not ``secret`` or ``credential``, which name things (a Secret, a credential source).
SECRET_KEY_SUFFIXES = ("password", "passwd", "token", "authorization", "private_key", "apikey", "api_key")
SECRET_KEYS = frozenset({"client_secret", "secret_value", "auth"})


def _secret_key(key: str) -> bool:
    lowered = key.lower().replace("-", "_")
    return lowered in SECRET_KEYS or lowered.endswith(SECRET_KEY_SUFFIXES)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _secret_key(k) else _redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v) for v in value)
    return value


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: hide credential values (by pattern) and values under credential keys."""
    for key in list(event_dict):
        event_dict[key] = REDACTED if _secret_key(key) else _redact_value(event_dict[key])
    return event_dict


class RedactingFilter(logging.Filter):
    """A stdlib logging filter that redacts a record's formatted message (and drops its args)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_text is None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


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
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def _identity(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return event_dict
