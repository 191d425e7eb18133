"""Discovery, validation and weighted merging of LoRA adapters.

The controller copies each adapter image's ``/data`` into ``<adapters_dir>/<adapter name>`` (an init
container per adapter) and sets one environment variable per adapter, named exactly like the adapter,
holding its strength (upstream contract). Every sub-directory is an adapter the user asked for, so
anything wrong with one is a start-up error: silently serving the base model would hide the mistake.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
COMBINED_ADAPTER = "combined_adapter"


class AdapterError(RuntimeError):
    """An adapter directory is missing pieces, unreadable, or does not fit the base model."""


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter found on disk and the strength it is merged with."""

    name: str
    path: Path
    strength: float


def _strength(name: str, environ: Mapping[str, str]) -> float:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        raise AdapterError(f"adapter {name!r}: strength {raw!r} (env {name}) is not a number") from None
    if not math.isfinite(value):
        raise AdapterError(f"adapter {name!r}: strength {raw!r} (env {name}) is not finite")
    return value


def discover_adapters(
    adapters_dir: str | Path, environ: Mapping[str, str] | None = None
) -> list[AdapterSpec]:
    """List the adapters under ``adapters_dir`` (sorted by name) after checking each one's files.

    A missing ``adapters_dir`` means "no adapters". Checks are cheap (no tensors are read) so a broken
    adapter is reported before minutes of model loading. Raises :class:`AdapterError`.
    """
    env = os.environ if environ is None else environ
    root = Path(adapters_dir)
    if not root.is_dir():
        return []
    specs: list[AdapterSpec] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        name = entry.name
        if not any(entry.iterdir()):
            raise AdapterError(
                f"adapter {name!r} at {entry}: directory is empty (nothing was copied from the image)"
            )
        config_file = entry / "adapter_config.json"
        if not config_file.is_file():
            raise AdapterError(f"adapter {name!r} at {entry}: adapter_config.json is missing")
        try:
            config: Any = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterError(
                f"adapter {name!r} at {entry}: adapter_config.json is unreadable: {exc}"
            ) from None
        if not isinstance(config, dict):
            raise AdapterError(f"adapter {name!r} at {entry}: adapter_config.json is not a JSON object")
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise AdapterError(
                f"adapter {name!r} at {entry}: peft_type {config.get('peft_type')!r} is not supported "
                "(only LORA adapters can be merged by strength)"
            )
        if not any((entry / w).is_file() for w in WEIGHT_FILES):
            raise AdapterError(f"adapter {name!r} at {entry}: no weights ({' or '.join(WEIGHT_FILES)})")
        specs.append(AdapterSpec(name=name, path=entry, strength=_strength(name, env)))
    return specs


def merge_adapters(model: Any, specs: list[AdapterSpec], combination_type: str = "cat") -> Any:
    """Attach ``specs`` to ``model``, combine them by strength and fold the result into the base weights.

    Uses peft's ``add_weighted_adapter``. ``cat`` (the default here) is exact: the merged weight is
    ``W + sum(strength_i * delta_i)``, so strength 0 leaves the base model bit-for-bit unchanged.
    Upstream's ``svd`` truncates the sum to the largest single rank, an approximation when several
    adapters are combined. Merging and unloading afterwards means generation pays nothing per token for
    the adapters. Returns the plain transformers model.
    """
    if not specs:
        return model
    from peft import PeftModel

    peft_model: Any = None
    for spec in specs:
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(spec.path), adapter_name=spec.name)
            else:
                peft_model.load_adapter(str(spec.path), adapter_name=spec.name)
        except Exception as exc:  # peft/safetensors raise many types; all mean "this adapter is broken"
            raise AdapterError(f"adapter {spec.name!r} at {spec.path}: cannot be loaded: {exc}") from exc
    names = [s.name for s in specs]
    weights = [s.strength for s in specs]
    try:
        peft_model.add_weighted_adapter(
            adapters=names, weights=weights, adapter_name=COMBINED_ADAPTER, combination_type=combination_type
        )
        peft_model.set_adapter(COMBINED_ADAPTER)
        for name in names:
            peft_model.delete_adapter(name)
    except Exception as exc:
        raise AdapterError(f"adapters {names} cannot be combined ({combination_type}): {exc}") from exc
    if list(peft_model.active_adapters) != [COMBINED_ADAPTER]:
        raise AdapterError(f"adapters not merged correctly: active adapters are {peft_model.active_adapters}")
    return peft_model.merge_and_unload()
