"""The credentials the e2e suites hand to the system, and the scan that proves none leaked.

Every secret value an e2e test creates comes from here, so the session-level check in
``test/e2e/conftest.py`` knows what to look for: each value, and the base64 forms a docker config or a
Basic header would carry. Values are long and distinctive, so a hit is never a coincidence.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from pathlib import Path

PUSH_USER = "kaito-e2e-pusher"
PUSH_PASSWORD = "e2e-push-password-5b1c9d2e"
DATA_USER = "kaito-e2e-reader"
DATA_PASSWORD = "e2e-data-password-83fa02c7"
DATA_SIGNATURE = "e2e-sas-signature-c0ffee17"
# The dataset URL the kwok stage pod-simulate-job-failure fails (hack/kwok/kwok.yaml names it too):
# userinfo and a SAS signature, as a user's signed blob URL would carry.
FAILING_DATA_URL = (
    f"https://{DATA_USER}:{DATA_PASSWORD}@kwok.kaito.sh/simulate/fail.parquet"
    f"?sv=2022-11-02&sig={DATA_SIGNATURE}"
)

# A JWT (a ServiceAccount token, the admin token's kind): header {"alg":... base64url-encoded.
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def docker_config_json(registry: str) -> str:
    """A ``.dockerconfigjson`` for ``registry`` with the e2e push credentials."""
    return json.dumps({"auths": {registry: {"auth": _b64(f"{PUSH_USER}:{PUSH_PASSWORD}")}}})


def secret_values(extra: Iterable[str] = ()) -> dict[str, str]:
    """What must never appear in a captured log, Event, status or termination message: name -> value."""
    values = {
        "push password": PUSH_PASSWORD,
        "push user:password (base64)": _b64(f"{PUSH_USER}:{PUSH_PASSWORD}"),
        "data URL password": DATA_PASSWORD,
        "data URL user:password (base64)": _b64(f"{DATA_USER}:{DATA_PASSWORD}"),
        "data URL signature": DATA_SIGNATURE,
    }
    for i, value in enumerate(extra):
        if value:
            values[f"cluster credential #{i}"] = value
    return values


def scan(texts: Iterable[tuple[str, str]], values: dict[str, str]) -> list[str]:
    """``where: what`` for every secret value or JWT found in ``(where, text)`` pairs (no value echoed)."""
    hits: list[str] = []
    for where, text in texts:
        for lineno, line in enumerate(text.splitlines(), 1):
            for name, value in values.items():
                if value in line:
                    hits.append(f"{where}:{lineno}: {name}")
            if JWT.search(line):
                hits.append(f"{where}:{lineno}: a JSON Web Token")
    return hits


def captured_logs(roots: Iterable[Path]) -> list[tuple[str, str]]:
    """Every ``*.log`` file under ``roots`` (process logs the fixtures captured), as (path, text)."""
    out: list[tuple[str, str]] = []
    for root in roots:
        if root.is_dir():
            for path in sorted(root.rglob("*.log")):
                out.append((str(path), path.read_text(errors="replace")))
    return out
