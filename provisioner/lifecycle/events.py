"""Kubernetes Events about Machines and NodeClaims (best-effort, written only on lifecycle transitions).

Machines are cluster-scoped, so their Events live in the ``default`` namespace, as Kubernetes does for
every cluster-scoped object (``kubectl describe machine`` finds them there). Messages come from Machine
conditions and cloud errors, which never carry credentials.
"""

from __future__ import annotations

from kaito.runtime import events as runtime_events
from kaito.runtime.events import CLUSTER_SCOPED_EVENT_NAMESPACE, NORMAL, WARNING
from kaito.runtime.kube import KubeClient

COMPONENT = "gpu-provisioner"
EVENT_NAMESPACE = CLUSTER_SCOPED_EVENT_NAMESPACE

__all__ = ["COMPONENT", "EVENT_NAMESPACE", "NORMAL", "WARNING", "EventRecorder"]


class EventRecorder(runtime_events.EventRecorder):
    """Events about Machines, reported by the gpu-provisioner."""

    def __init__(
        self,
        client: KubeClient,
        component: str = COMPONENT,
        *,
        kind: str = "Machine",
        api_version: str = "karpenter.sh/v1alpha5",
    ) -> None:
        super().__init__(client, component, api_version=api_version, kind=kind)
