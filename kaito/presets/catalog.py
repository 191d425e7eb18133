"""Where the YAML catalogs live: ``presets/models`` and ``presets/skus``.

Resolution order: the ``KAITO_CATALOG_DIR`` environment variable (a directory holding ``models/`` and
``skus/``; container images copy the catalogs there), then ``presets/`` of the source checkout this
package lives in (development, editable installs, tests).
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path

ENV_CATALOG_DIR = "KAITO_CATALOG_DIR"


class CatalogError(RuntimeError):
    """The catalog cannot be found or does not parse."""


def catalog_dir() -> Path:
    """The directory with ``models/`` and ``skus/`` (see the module docstring for the search order)."""
    override = os.environ.get(ENV_CATALOG_DIR)
    candidates = [Path(override)] if override else []
    candidates.append(Path(__file__).resolve().parents[2] / "presets")
    for candidate in candidates:
        if (candidate / "models").is_dir() and (candidate / "skus").is_dir():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise CatalogError(
        f"preset catalog not found (tried {tried}); set {ENV_CATALOG_DIR} to a directory with models/ and skus/"
    )


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|m|s)")


def parse_duration(value: str | int | float) -> timedelta:
    """Parse ``"30m"``, ``"1h30m"``, ``"90s"`` (Go duration subset) or a number of seconds."""
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    text = value.strip()
    pos = 0
    total = 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        amount = float(match[1])
        total += amount * {"h": 3600, "m": 60, "s": 1}[match[2]]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"{value!r} is not a duration (examples: 30m, 1h30m, 90s)")
    return timedelta(seconds=total)
