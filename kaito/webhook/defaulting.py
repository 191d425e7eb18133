"""Defaults applied by the mutating webhook: ``resource.count: 1``, adapter ``strength: "1.0"``,
preset ``accessMode: public``.

The CRD schema carries the same defaults (so they hold with no webhook); the webhook keeps them for
objects that reach it without schema defaulting (direct callers, older CRDs) and fixes upstream's
hazard of an adapter without a strength crashing the manifest builder. Only what is missing is
added: a user's values are never rewritten.
"""

from __future__ import annotations

from typing import Any

from kaito.api.workspace import DEFAULT_ADAPTER_STRENGTH, ModelImageAccessMode

JsonPatch = list[dict[str, Any]]


def default_patch(obj: dict[str, Any]) -> JsonPatch:
    """RFC 6902 operations that add the missing defaults to a raw Workspace object."""
    ops: JsonPatch = []
    resource = obj.get("resource")
    if isinstance(resource, dict) and resource.get("count") is None:
        ops.append({"op": "add", "path": "/resource/count", "value": 1})
    for section in ("inference", "tuning"):
        spec = obj.get(section)
        if not isinstance(spec, dict):
            continue
        preset = spec.get("preset")
        if isinstance(preset, dict) and not preset.get("accessMode"):
            ops.append(
                {
                    "op": "add",
                    "path": f"/{section}/preset/accessMode",
                    "value": ModelImageAccessMode.PUBLIC.value,
                }
            )
    inference = obj.get("inference")
    adapters = inference.get("adapters") if isinstance(inference, dict) else None
    if isinstance(adapters, list):
        for i, adapter in enumerate(adapters):
            if isinstance(adapter, dict) and adapter.get("strength") in (None, ""):
                ops.append(
                    {
                        "op": "add",
                        "path": f"/inference/adapters/{i}/strength",
                        "value": DEFAULT_ADAPTER_STRENGTH,
                    }
                )
    return ops


def apply_patch(obj: dict[str, Any], ops: JsonPatch) -> dict[str, Any]:
    """Apply ``add`` operations made by :func:`default_patch` to a copy of ``obj`` (for tests and callers)."""
    import copy

    out = copy.deepcopy(obj)
    for op in ops:
        if op["op"] != "add":
            raise ValueError(f"unsupported op {op['op']}")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        target: Any = out
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last = parts[-1]
        if isinstance(target, list):
            target.insert(int(last), op["value"])
        else:
            target[last] = op["value"]
    return out
