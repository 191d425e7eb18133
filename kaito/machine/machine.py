"""The ``karpenter.sh/v1alpha5`` Machine encoding of a node request (upstream §4, deterministic names).

Upstream named Machines ``ws`` + 9 hex digits of a hash over the namespace, the name and *the current
time*, so a retry after a lost response created a second Machine. Here the hash covers namespace, name
and the node slot only: a retry, a restarted controller or a second replica computes the same name and
the create answers AlreadyExists, which the caller treats as adoption.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kaito.api.machine import (
    CONDITION_INITIALIZED,
    CONDITION_LAUNCHED,
    CONDITION_READY,
    CONDITION_REGISTERED,
    LABEL_ARCH,
    LABEL_INSTANCE_TYPE,
    LABEL_MACHINE_TYPE,
    LABEL_OS,
    LABEL_PROVISIONER_NAME,
    RELAUNCH_REASONS,
)
from kaito.api.workspace import LABEL_WORKSPACE_NAME, LABEL_WORKSPACE_NAMESPACE
from kaito.machine.interface import NodeRequest, RequestPhase
from kaito.runtime.kube import Resource

Obj = dict[str, Any]

MACHINES = Resource("karpenter.sh", "v1alpha5", "machines", False, "Machine")
LABEL_SLOT = "kaito.sh/node-slot"

# Condition reasons that mean "still trying", not "failed" (a provisioner retrying a conflict, or
# relaunching an instance whose Node never registered: the provisioner's own recovery).
TRANSIENT_REASONS = frozenset(
    {"", "OperationInProgress", "Launching", "Pending", "Registering", "Initializing", *RELAUNCH_REASONS}
)


def machine_name(namespace: str, workspace: str, slot: int) -> str:
    """``ws`` + 9 hex digits of sha256(``<namespace>/<name>/<slot>``): stable across retries."""
    digest = hashlib.sha256(f"{namespace}/{workspace}/{slot}".encode()).hexdigest()
    return f"ws{digest[:9]}"


def _conditions(obj: Obj) -> dict[str, Obj]:
    return {str(c.get("type")): c for c in (obj.get("status") or {}).get("conditions") or []}


class MachineEncoding:
    """Builds and reads Machines; see :class:`kaito.machine.interface.NodeRequestEncoding`."""

    resource = MACHINES

    def name_for(self, namespace: str, workspace: str, slot: int) -> str:
        """Deterministic Machine name."""
        return machine_name(namespace, workspace, slot)

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
        """The Machine for one missing node: upstream's labels, requirements, taint and disk request."""
        name = self.name_for(namespace, workspace, slot)
        labels = {
            **match_labels,  # the provisioned node must carry what the workload's affinity requires
            LABEL_PROVISIONER_NAME: "default",
            LABEL_WORKSPACE_NAME: workspace,
            LABEL_WORKSPACE_NAMESPACE: namespace,
            LABEL_SLOT: str(slot),
        }
        return {
            "apiVersion": f"{MACHINES.group}/{MACHINES.version}",
            "kind": "Machine",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "machineTemplateRef": {"name": name},
                "requirements": [
                    {"key": LABEL_INSTANCE_TYPE, "operator": "In", "values": [instance_type]},
                    {"key": LABEL_PROVISIONER_NAME, "operator": "In", "values": ["default"]},
                    {"key": LABEL_MACHINE_TYPE, "operator": "In", "values": ["gpu"]},
                    {"key": LABEL_ARCH, "operator": "In", "values": ["amd64"]},
                    {"key": LABEL_OS, "operator": "In", "values": ["linux"]},
                ],
                "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
                "resources": {"requests": {"storage": storage or "0"}},
            },
        }

    def belongs_to(self, obj: Obj, namespace: str, workspace: str) -> bool:
        """Labels name this workspace."""
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return bool(
            labels.get(LABEL_WORKSPACE_NAME) == workspace
            and labels.get(LABEL_WORKSPACE_NAMESPACE) == namespace
        )

    def observe(self, obj: Obj) -> NodeRequest:
        """Ready when condition ``Ready`` is True; Failed when a lifecycle condition is False for a real reason."""
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        name = str(meta.get("name", ""))
        node = status.get("nodeName") or None
        itype = None
        for req in (obj.get("spec") or {}).get("requirements") or []:
            if req.get("key") == LABEL_INSTANCE_TYPE and req.get("values"):
                itype = str(req["values"][0])
        if meta.get("deletionTimestamp"):
            return NodeRequest(
                name, RequestPhase.DELETING, node, "Deleting", "machine is being deleted", itype
            )
        conds = _conditions(obj)
        ready = conds.get(CONDITION_READY)
        if ready is not None and ready.get("status") == "True":
            return NodeRequest(name, RequestPhase.READY, node, "", "", itype)
        for ctype in (CONDITION_LAUNCHED, CONDITION_REGISTERED, CONDITION_INITIALIZED, CONDITION_READY):
            cond = conds.get(ctype)
            if cond is None or cond.get("status") != "False":
                continue
            reason = str(cond.get("reason") or "")
            if reason in TRANSIENT_REASONS:
                continue
            return NodeRequest(name, RequestPhase.FAILED, node, reason, str(cond.get("message") or ""), itype)
        # The most advanced condition that is not True says what the provisioner is doing.
        detail = ""
        for ctype in (CONDITION_LAUNCHED, CONDITION_REGISTERED, CONDITION_INITIALIZED):
            cond = conds.get(ctype)
            if cond is None or cond.get("status") != "True":
                detail = f"waiting for {ctype}"
                if cond is not None and cond.get("message"):
                    detail += f": {cond['message']}"
                break
        return NodeRequest(name, RequestPhase.PENDING, node, "Provisioning", detail, itype)
