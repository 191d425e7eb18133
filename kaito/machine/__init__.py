"""Node provisioning requests (Machines or NodeClaims) for workspaces, behind a small interface.

:class:`~kaito.machine.interface.NodeRequestEncoding` is what the workspace reconciler talks to; the
karpenter ``v1alpha5`` Machine encoding lives in :mod:`kaito.machine.machine`, the ``karpenter.sh/v1``
NodeClaim encoding in :mod:`kaito.machine.nodeclaim`. :func:`encoding_for` picks one by the
``--node-api`` flag's value.
"""

from kaito.machine.interface import NodeRequest, NodeRequestEncoding, RequestPhase
from kaito.machine.machine import MACHINES, MachineEncoding, machine_name
from kaito.machine.nodeclaim import NODECLAIMS, NodeClaimEncoding, nodeclaim_name

NODE_APIS = ("machine", "nodeclaim")
"""Values of ``--node-api``: which karpenter kind the controller creates for missing nodes."""


def encoding_for(node_api: str, *, cloud_provider: str | None = "azure") -> NodeRequestEncoding:
    """The encoding for a ``--node-api`` value; ValueError naming the choices for anything else."""
    if node_api == "machine":
        return MachineEncoding()
    if node_api == "nodeclaim":
        return NodeClaimEncoding(cloud_provider=cloud_provider)
    raise ValueError(f"node API {node_api!r} is not one of {', '.join(NODE_APIS)}")


__all__ = [
    "MACHINES",
    "NODECLAIMS",
    "NODE_APIS",
    "MachineEncoding",
    "NodeClaimEncoding",
    "NodeRequest",
    "NodeRequestEncoding",
    "RequestPhase",
    "encoding_for",
    "machine_name",
    "nodeclaim_name",
]
