"""The Machine CRD on the shared apiserver; a fake ARM (+ AKS node simulator) and Azure provider per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio.client import ApiClient

from hack.localcluster import LocalCluster
from test.integration.provisioner.lifecycle.helpers import RG, SUB, AzureEnv, fake_azure

__all__ = ["RG", "SUB", "AzureEnv"]

MACHINE_CRD = Path(__file__).resolve().parents[4] / "config" / "crd" / "karpenter.sh_machines.yaml"


@pytest.fixture(scope="session")
def machine_crd(control_plane: LocalCluster) -> LocalCluster:
    """Install the Machine CRD (server-side apply: idempotent, safe beside other packages doing the same)."""
    control_plane.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=kaito-crds", "-f", str(MACHINE_CRD)
    )
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/machines.karpenter.sh")
    return control_plane


@pytest.fixture
async def azure(machine_crd: LocalCluster, api_client: ApiClient) -> AsyncIterator[AzureEnv]:
    """Fake ARM whose finished pools register an AKS-like Node in the apiserver; the real Azure SDK client."""
    async with fake_azure(machine_crd, api_client) as env:
        yield env
