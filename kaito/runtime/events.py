"""Recording core/v1 Events about any object (best-effort, as client-go's recorder).

Events of cluster-scoped objects (Machines, Nodes) live in the ``default`` namespace, as Kubernetes does
for every cluster-scoped object, so ``kubectl describe`` finds them. A failed post is logged and dropped:
an Event must never fail a reconcile. Messages are truncated to 1 KiB; callers build them from
conditions and typed errors, never from secret values.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog

from kaito.runtime.kube import EVENTS, ApiError, KubeClient
from kaito.runtime.redaction import redact

log = structlog.get_logger("kaito.runtime.events")

Obj = dict[str, Any]
NORMAL, WARNING = "Normal", "Warning"
CLUSTER_SCOPED_EVENT_NAMESPACE = "default"
MAX_MESSAGE = 1024


class EventRecorder:
    """Posts Events about objects on behalf of one component.

    ``api_version``/``kind`` fill in objects that lack them (items of a LIST carry neither).
    """

    def __init__(self, client: KubeClient, component: str, *, api_version: str = "", kind: str = "") -> None:
        self.client = client
        self.component = component
        self.api_version = api_version
        self.kind = kind

    async def event(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        """Record one Event on ``obj``; never raises for an API or transport failure.

        The message is redacted (:func:`kaito.runtime.redaction.redact`): Events quote text from
        elsewhere (container messages, cloud errors) and anyone who may list Events can read them.
        """
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or CLUSTER_SCOPED_EVENT_NAMESPACE
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        involved: Obj = {
            "apiVersion": obj.get("apiVersion") or self.api_version,
            "kind": obj.get("kind") or self.kind,
            "name": meta.get("name"),
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        }
        if meta.get("namespace"):
            involved["namespace"] = meta["namespace"]
        body: Obj = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{secrets.token_hex(8)}", "namespace": ns},
            "involvedObject": involved,
            "type": type_,
            "reason": reason,
            "message": redact(message)[:MAX_MESSAGE],
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.client.create(EVENTS, body, ns)
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("could not record event", component=self.component, reason=reason, error=str(e))
