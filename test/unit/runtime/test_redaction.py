"""Value-pattern redaction: the shared case table, the runtime copies kept identical, the log processor."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import structlog

from kaito.runtime import redaction
from kaito.runtime.logging import RedactingFilter, configure_logging, redact_secrets
from test.redaction_cases import CASES

REPO = Path(__file__).resolve().parents[3]
RUNTIME_COPIES = [REPO / "presets/tuning/kaito_tuning/redaction.py", REPO / "presets/oci/redaction.py"]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_redact(text: str, expected: str) -> None:
    assert redaction.redact(text) == expected


@pytest.mark.parametrize("copy", RUNTIME_COPIES, ids=lambda p: str(p.relative_to(REPO)))
def test_runtime_copies_are_identical(copy: Path) -> None:
    """The model runtime does not ship the operator package; its copies must not drift."""
    assert copy.read_text() == Path(redaction.__file__).read_text(), (
        f"{copy} differs from kaito/runtime/redaction.py: copy the operator's file over it"
    )


def test_log_processor_keeps_a_secrets_name_and_hides_credential_values() -> None:
    """A Secret's name is what an operator needs; a token under error= or in the message must go."""
    event = redact_secrets(
        None,
        "error",
        {
            "event": "pull failed for https://robot:pw@reg.example/x",
            "secret": "hf-token",
            "secret_name": "registry-creds",
            "error": "401: Bearer eyJhbGciOi.eyJzdWIi.c2ln rejected",
            "password": "plain",
            "details": {"url": "https://d.example/a?sig=abc", "n": 1},
            "urls": ["https://u:p@h.example/"],
        },
    )
    assert event == {
        "event": "pull failed for https://[redacted]@reg.example/x",
        "secret": "hf-token",
        "secret_name": "registry-creds",
        "error": "401: Bearer [redacted] rejected",
        "password": "[redacted]",
        "details": {"url": "https://d.example/a?sig=[redacted]", "n": 1},
        "urls": ["https://[redacted]@h.example/"],
    }


def test_configured_logging_redacts_rendered_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """The whole pipeline (JSON renderer), including an exception's text."""

    try:
        configure_logging(json_output=True, level="info")
        log = structlog.get_logger("test.redaction")
        try:
            raise RuntimeError("GET https://a:b@h.example/?token=t0k failed")
        except RuntimeError:
            log.exception("request failed")
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert "request failed" in err and "h.example" in err
    for secret in ("a:b@", "t0k"):
        assert secret not in err, err


def test_stdlib_records_are_redacted() -> None:
    """kubernetes_asyncio and aiohttp log through stdlib logging; their records pass the same filter."""
    record = logging.LogRecord(
        "aiohttp.client",
        logging.WARNING,
        __file__,
        1,
        "retrying %s: %s",
        ("https://u:p@h.example/", "Bearer abc123def"),
        None,
    )
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "retrying https://[redacted]@h.example/: Bearer [redacted]"
