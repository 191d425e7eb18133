"""The Machine and NodeClaim CRDs on the shared apiserver; a fake ARM (+ AKS node simulator) and Azure
provider per test."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes_asyncio.client import ApiClient

from hack.localcluster import LocalCluster
from provisioner.cloud.azure import AzureCloudProvider, AzureConfig
from provisioner.cloud.metrics import InstrumentedCloudProvider
from test.fake_arm import FakeArm, FakeArmServer, StaticTokenCredential
from test.fake_arm.nodes import AksNodeSimulator
from test.integration.provisioner.lifecycle.helpers import gpu_count

CRD_DIR = Path(__file__).resolve().parents[4] / "config" / "crd"
MACHINE_CRD = CRD_DIR / "karpenter.sh_machines.yaml"
NODECLAIM_CRD = CRD_DIR / "karpenter.sh_nodeclaims.yaml"
SUB, RG = "sub-lifecycle", "kaito-rg"


@pytest.fixture(scope="session")
def machine_crd(control_plane: LocalCluster) -> LocalCluster:
    """Install the Machine and NodeClaim CRDs (server-side apply: idempotent, safe beside other packages
    doing the same)."""
    for crd in (MACHINE_CRD, NODECLAIM_CRD):
        control_plane.kubectl(
            "apply", "--server-side", "--force-conflicts", "--field-manager=kaito-crds", "-f", str(crd)
        )
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/machines.karpenter.sh",
        "crd/nodeclaims.karpenter.sh",
    )
    return control_plane


@dataclass
class AzureEnv:
    """A fake ARM server with its Azure provider, for one test."""

    cluster: LocalCluster
    arm: FakeArm
    server: FakeArmServer
    config: AzureConfig
    cloud: InstrumentedCloudProvider
    run: str


@pytest.fixture
async def azure(machine_crd: LocalCluster, api_client: ApiClient) -> AsyncIterator[AzureEnv]:
    """Fake ARM whose finished pools register an AKS-like Node in the apiserver; the real Azure SDK client."""
    # A unique AKS cluster name gives unique node names, so tests sharing the apiserver never collide.
    aks = f"aks-{secrets.token_hex(3)}"
    arm = FakeArm(polls=1, hooks=[AksNodeSimulator(api_client, gpu_count, location="eastus")])
    async with FakeArmServer(arm) as server:
        config = AzureConfig(
            subscription_id=SUB,
            resource_group=RG,
            cluster_name=aks,
            arm_endpoint=server.endpoint,
            ca_file=str(server.ca_file),
            polling_interval=0.0,
            max_retries=0,
        )
        cloud = InstrumentedCloudProvider(await AzureCloudProvider.open(config, StaticTokenCredential()))
        try:
            yield AzureEnv(machine_crd, arm, server, config, cloud, secrets.token_hex(4))
        finally:
            await cloud.close()
            assert arm.hook_errors == []
