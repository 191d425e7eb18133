"""Cloud-call metrics, the provider factory and credential selection (no network)."""

from __future__ import annotations

from typing import Any

import pytest
from azure.identity.aio import (
    ClientSecretCredential,
    DefaultAzureCredential,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
)
from prometheus_client import CollectorRegistry

from provisioner.cloud.azure import AzureCloudProvider, AzureConfig, build_credential
from provisioner.cloud.base import CloudError, CloudProvider, Instance, QuotaExceeded
from provisioner.cloud.factory import open_provider
from provisioner.cloud.metrics import CloudMetrics, InstrumentedCloudProvider
from provisioner.machine_fields import MachineDict


class ScriptedProvider(CloudProvider):
    """A provider whose calls fail or succeed as the test says (to observe the metrics decorator)."""

    name = "scripted"

    def __init__(self) -> None:
        self.fail_with: BaseException | None = None
        self.closed = False

    async def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    async def create(self, machine: MachineDict) -> Instance:
        await self._maybe_fail()
        raise AssertionError("not used")

    async def get(self, ref: str) -> Instance:
        await self._maybe_fail()
        raise AssertionError("not used")

    async def list(self) -> list[Instance]:
        await self._maybe_fail()
        return []

    async def delete(self, ref: str, *, owner_kind: str | None = None) -> None:
        await self._maybe_fail()

    async def close(self) -> None:
        self.closed = True


async def test_metrics_count_calls_and_errors_by_reason() -> None:
    registry = CollectorRegistry()
    inner = ScriptedProvider()
    cloud = InstrumentedCloudProvider(inner, CloudMetrics(registry))

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    await cloud.list()
    await cloud.delete("x")
    inner.fail_with = QuotaExceeded("no cores")
    with pytest.raises(QuotaExceeded):
        await cloud.delete("x")
    inner.fail_with = RuntimeError("bug")
    with pytest.raises(RuntimeError):
        await cloud.list()

    assert sample("kaito_cloud_request_duration_seconds_count", provider="scripted", operation="list") == 2
    assert sample("kaito_cloud_request_duration_seconds_count", provider="scripted", operation="delete") == 2
    assert (
        sample(
            "kaito_cloud_request_errors_total",
            provider="scripted",
            operation="delete",
            reason="QuotaExceeded",
        )
        == 1
    )
    assert (
        sample("kaito_cloud_request_errors_total", provider="scripted", operation="list", reason="Unknown")
        == 1
    )
    await cloud.close()
    assert inner.closed


def test_cloud_error_defaults() -> None:
    err = CloudError("x")
    assert err.reason == "CloudProviderError" and err.retryable and err.backoff == 30.0
    assert QuotaExceeded("q", backoff=7).backoff == 7


@pytest.mark.parametrize(
    ("env", "cls"),
    [
        ({}, ManagedIdentityCredential),
        ({"AZURE_CLIENT_ID": "cid"}, ManagedIdentityCredential),
        (
            {"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "cid", "AZURE_FEDERATED_TOKEN_FILE": "/tok"},
            WorkloadIdentityCredential,
        ),
        (
            {"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "cid", "AZURE_CLIENT_SECRET": "s"},
            ClientSecretCredential,
        ),
        ({"DEPLOYMENT_MODE": "managed"}, DefaultAzureCredential),
    ],
)
async def test_build_credential_picks_the_azure_identity_class(env: dict[str, str], cls: type[Any]) -> None:
    base = {"ARM_SUBSCRIPTION_ID": "s", "ARM_RESOURCE_GROUP": "rg", "AZURE_CLUSTER_NAME": "c"}
    credential = build_credential(AzureConfig.from_env({**base, **env}))
    try:
        assert isinstance(credential, cls)
    finally:
        await credential.close()


async def test_factory_builds_instrumented_providers() -> None:
    env = {
        "ARM_SUBSCRIPTION_ID": "s",
        "ARM_RESOURCE_GROUP": "rg",
        "AZURE_CLUSTER_NAME": "c",
        "AZURE_TENANT_ID": "t",
        "AZURE_CLIENT_ID": "cid",
        "AZURE_CLIENT_SECRET": "s",
    }
    cloud = await open_provider("azure", env=env, metrics=CloudMetrics(CollectorRegistry()))
    try:
        assert isinstance(cloud, InstrumentedCloudProvider)
        assert isinstance(cloud.inner, AzureCloudProvider)
        assert cloud.name == "azure"
        assert cloud.inner.config.cluster_name == "c"
    finally:
        await cloud.close()
    with pytest.raises(ValueError, match="api_client"):
        await open_provider("kwok")
    with pytest.raises(ValueError, match="unknown cloud provider"):
        await open_provider("gcp")
