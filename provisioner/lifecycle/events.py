"""Kubernetes Events about Machines (best-effort, written only on lifecycle transitions).

Machines are cluster-scoped, so their Events live in the ``default`` namespace, as Kubernetes does for
every cluster-scoped object (``kubectl describe machine`` finds them there). Messages come from Machine
conditions and cloud errors, which never carry credentials.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog

from kaito.runtime.kube import EVENTS, ApiError, KubeClient

log = structlog.get_logger("provisioner.events")

COMPONENT = "gpu-provisioner"
EVENT_NAMESPACE = "default"
MAX_MESSAGE = 1024

NORMAL, WARNING = "Normal", "Warning"


class EventRecorder:
    """Posts core/v1 Events about a Machine; a failed post is logged and dropped."""

    def __init__(self, client: KubeClient, component: str = COMPONENT) -> None:
        self.client = client
        self.component = component

    async def event(self, machine: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Record one Event on ``machine``."""
        meta = machine.get("metadata") or {}
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{secrets.token_hex(8)}", "namespace": EVENT_NAMESPACE},
            "involvedObject": {
                "apiVersion": machine.get("apiVersion") or "karpenter.sh/v1alpha5",
                "kind": machine.get("kind") or "Machine",
                "name": meta.get("name"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:MAX_MESSAGE],
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.client.create(EVENTS, body, EVENT_NAMESPACE)
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("could not record event", reason=reason, error=str(e))
