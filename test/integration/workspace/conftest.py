"""The Workspace and Machine CRDs on the shared apiserver, for the workspace integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from hack.localcluster import LocalCluster

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def crds(control_plane: LocalCluster) -> LocalCluster:
    """Install both CRDs (server-side apply: idempotent beside other suites doing the same)."""
    for crd in ("kaito.sh_workspaces.yaml", "karpenter.sh_machines.yaml"):
        control_plane.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=kaito-crds",
            "-f",
            str(REPO / "config/crd" / crd),
        )
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/workspaces.kaito.sh",
        "crd/machines.karpenter.sh",
    )
    return control_plane
