"""Workspace objects the webhook unit tests start from, and a helper to vary them."""

from __future__ import annotations

import copy
from typing import Any

BASE: dict[str, Any] = {
    "apiVersion": "kaito.sh/v1alpha1",
    "kind": "Workspace",
    "metadata": {"name": "ws", "namespace": "ns"},
    "resource": {"instanceType": "Standard_NC6s_v3", "labelSelector": {"matchLabels": {"apps": "phi-3"}}},
    "inference": {"preset": {"name": "phi-3-mini-4k-instruct"}},
}
TUNING: dict[str, Any] = {
    **{k: v for k, v in BASE.items() if k != "inference"},
    "tuning": {
        "preset": {"name": "phi-3-mini-4k-instruct"},
        "method": "qlora",
        "input": {"urls": ["https://example.com/data.parquet"]},
        "output": {"image": "myregistry.azurecr.io/adapter:0.0.1", "imagePushSecret": "push"},
    },
}


def build(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of ``base`` with ``a__b`` path changes (value None deletes)."""
    obj = copy.deepcopy(base)
    for dotted, value in changes.items():
        parts = dotted.split("__")
        target = obj
        for p in parts[:-1]:
            target = target.setdefault(p, {})
        if value is None:
            target.pop(parts[-1], None)
        else:
            target[parts[-1]] = value
    return obj
