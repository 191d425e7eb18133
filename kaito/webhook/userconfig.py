"""User configuration documents in ConfigMaps (``inference_config.yaml``, ``training_config.yaml``).

The webhook serves on the event loop that also runs the reconcilers and renews the leader Lease, so a
user's YAML must never be parsed there: ~850 KB took 9.8 s with the pure-Python loader (1.4 s with
libyaml), past the Lease's 10 s renew deadline. Documents are therefore capped at
:data:`MAX_DOCUMENT_BYTES` (a real one is a few hundred bytes) and parsed in a worker thread, with
libyaml's loader when PyYAML was built with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import yaml

from kaito.runtime.kube import CONFIGMAPS, KubeClient

MAX_DOCUMENT_BYTES = 64 * 1024

# Fetches ConfigMap data: (namespace, name) -> data, or None when the ConfigMap does not exist.
ConfigMapReader = Callable[[str, str], Awaitable[dict[str, str] | None]]

_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class DocumentError(ValueError):
    """The document is too large or not YAML; the message says which and what to do."""


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_LOADER)  # a safe loader: CSafeLoader or SafeLoader


async def parse_document(text: str, what: str) -> Any:
    """Parse ``text`` (described as ``what`` in errors) off the event loop, after the size cap."""
    size = len(text.encode())
    if size > MAX_DOCUMENT_BYTES:
        raise DocumentError(
            f"{what} is {size // 1024} KiB, over the {MAX_DOCUMENT_BYTES // 1024} KiB limit; "
            "keep only the settings you change (the defaults need no entry)"
        )
    try:
        return await asyncio.to_thread(_load, text)
    except yaml.YAMLError as e:
        raise DocumentError(f"{what} is not valid YAML: {e}") from None


def kube_configmap_reader(api_client: Any) -> ConfigMapReader:
    """A :data:`ConfigMapReader` over a kubernetes_asyncio ``ApiClient`` (needs ``get configmaps``)."""
    client = api_client if isinstance(api_client, KubeClient) else KubeClient(api_client)

    async def read(namespace: str, name: str) -> dict[str, str] | None:
        cm = await client.get_or_none(CONFIGMAPS, name, namespace)
        return None if cm is None else {str(k): str(v) for k, v in (cm.get("data") or {}).items()}

    return read
