"""Node provisioning requests (Machines) for workspaces, behind a small interface.

:class:`~kaito.machine.interface.NodeRequestEncoding` is what the workspace reconciler talks to; the
karpenter ``v1alpha5`` Machine encoding lives in :mod:`kaito.machine.machine`. A NodeClaim
(``karpenter.sh/v1``) encoding can implement the same interface later.
"""

from kaito.machine.interface import NodeRequest, NodeRequestEncoding, RequestPhase
from kaito.machine.machine import MACHINES, MachineEncoding, machine_name

__all__ = [
    "MACHINES",
    "MachineEncoding",
    "NodeRequest",
    "NodeRequestEncoding",
    "RequestPhase",
    "machine_name",
]
