"""The ``karpenter.sh/v1`` NodeClaim encoding of a node request (upstream Kaito v0.4.2+, reference §6.2).

Objects look as upstream's workspace controller writes them: labels ``karpenter.sh/nodepool=kaito`` and
the workspace's name/namespace (plus its ``labelSelector.matchLabels``, so the node carries what the
workload's affinity requires), annotation ``karpenter.sh/do-not-disrupt`` (Karpenter must not
consolidate a GPU node under a model) and ``kaito.sh/node-image-family``, requirements nodepool /
instance type / OS (and on Azure ``karpenter.azure.com/sku-name``), taint ``sku=gpu:NoSchedule``, the OS
disk as ``resources.requests.storage`` and a node class reference.

Names are ``ws`` + 9 hex digits, like upstream's, but of a hash over namespace, name and node slot
(deterministic, see :mod:`kaito.machine.machine`) in a domain of their own: a workspace moving from
Machines to NodeClaims gets new names, so the two kinds never ask for the same agent pool while both
exist during the migration.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kaito.api.machine import LABEL_INSTANCE_TYPE, LABEL_OS
from kaito.api.nodeclaim import (
    ANNOTATION_DO_NOT_DISRUPT,
    ANNOTATION_NODE_IMAGE_FAMILY,
    API_VERSION,
    CONDITION_INITIALIZED,
    CONDITION_LAUNCHED,
    CONDITION_REGISTERED,
    KIND,
    LABEL_AZURE_SKU_NAME,
    LABEL_NODEPOOL,
)
from kaito.api.workspace import LABEL_WORKSPACE_NAME, LABEL_WORKSPACE_NAMESPACE
from kaito.machine.interface import NodeRequest
from kaito.machine.machine import LABEL_SLOT, labelled_for, observe_conditions
from kaito.runtime.kube import Resource

Obj = dict[str, Any]

NODECLAIMS = Resource("karpenter.sh", "v1", "nodeclaims", False, KIND)
NODEPOOL = "kaito"
"""The (fake) NodePool name KAITO's NodeClaims carry: Karpenter neither scales nor consolidates it."""
DEFAULT_NODE_CLASS: dict[str, str] = {"group": "kaito.sh", "kind": "KaitoNodeClass", "name": "default"}
"""Upstream Kaito's reference on Azure since v0.7 (gpu-provisioner v0.3.6+ treats it as managed)."""
DEFAULT_IMAGE_FAMILY = "Ubuntu"


def nodeclaim_name(namespace: str, workspace: str, slot: int) -> str:
    """``ws`` + 9 hex digits of sha256(``nodeclaim/<namespace>/<name>/<slot>``): stable across retries,
    and different from the Machine name of the same slot."""
    digest = hashlib.sha256(f"nodeclaim/{namespace}/{workspace}/{slot}".encode()).hexdigest()
    return f"ws{digest[:9]}"


class NodeClaimEncoding:
    """Builds and reads NodeClaims; see :class:`kaito.machine.interface.NodeRequestEncoding`."""

    resource = NODECLAIMS
    noun = "nodeClaim"

    def __init__(
        self,
        *,
        cloud_provider: str | None = "azure",
        node_class: dict[str, str] | None = None,
        image_family: str = DEFAULT_IMAGE_FAMILY,
    ) -> None:
        self.cloud_provider = cloud_provider
        self.node_class = dict(node_class or DEFAULT_NODE_CLASS)
        self.image_family = image_family

    def name_for(self, namespace: str, workspace: str, slot: int) -> str:
        """Deterministic NodeClaim name."""
        return nodeclaim_name(namespace, workspace, slot)

    def build(
        self,
        *,
        namespace: str,
        workspace: str,
        slot: int,
        instance_type: str,
        match_labels: dict[str, str],
        storage: str,
    ) -> Obj:
        """The NodeClaim for one missing node, as upstream writes it."""
        name = self.name_for(namespace, workspace, slot)
        labels = {
            **match_labels,  # the provisioned node must carry what the workload's affinity requires
            LABEL_NODEPOOL: NODEPOOL,
            LABEL_WORKSPACE_NAME: workspace,
            LABEL_WORKSPACE_NAMESPACE: namespace,
            LABEL_SLOT: str(slot),
        }
        requirements: list[Obj] = [
            {"key": LABEL_NODEPOOL, "operator": "In", "values": [NODEPOOL]},
            {"key": LABEL_INSTANCE_TYPE, "operator": "In", "values": [instance_type]},
            {"key": LABEL_OS, "operator": "In", "values": ["linux"]},
        ]
        if self.cloud_provider == "azure":
            requirements.append({"key": LABEL_AZURE_SKU_NAME, "operator": "In", "values": [instance_type]})
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": name,
                "labels": labels,
                "annotations": {
                    ANNOTATION_DO_NOT_DISRUPT: "true",
                    ANNOTATION_NODE_IMAGE_FAMILY: self.image_family,
                },
            },
            "spec": {
                "requirements": requirements,
                "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
                "resources": {"requests": {"storage": storage or "0"}},
                "nodeClassRef": dict(self.node_class),
            },
        }

    def belongs_to(self, obj: Obj, namespace: str, workspace: str) -> bool:
        """Labels name this workspace."""
        return labelled_for(obj, namespace, workspace)

    def observe(self, obj: Obj) -> NodeRequest:
        """Ready when ``Ready`` is True; Failed when Launched/Registered/Initialized is False for a real reason."""
        return observe_conditions(
            obj, (CONDITION_LAUNCHED, CONDITION_REGISTERED, CONDITION_INITIALIZED), noun=self.noun
        )
