"""Which pods a drain evicts (as ``kubectl drain`` picks them)."""

from __future__ import annotations

from typing import Any

import pytest

from provisioner.lifecycle.drain import is_evictable


def pod(**meta: Any) -> dict[str, Any]:
    phase = meta.pop("phase", "Running")
    return {"metadata": {"name": "p", "namespace": "ns", **meta}, "status": {"phase": phase}}


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (pod(), True),
        (pod(ownerReferences=[{"kind": "ReplicaSet", "name": "rs"}]), True),
        (pod(ownerReferences=[{"kind": "DaemonSet", "name": "ds"}]), False),
        (pod(annotations={"kubernetes.io/config.mirror": "abc"}), False),
        (pod(phase="Succeeded"), False),
        (pod(phase="Failed"), False),
        (pod(phase="Pending"), True),
    ],
)
def test_is_evictable(p: dict[str, Any], expected: bool) -> None:
    assert is_evictable(p) is expected
