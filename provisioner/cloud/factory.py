"""Build the configured cloud provider (wrapped in metrics) for the provisioner's entry point."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from provisioner.cloud.base import CloudProvider
from provisioner.cloud.metrics import CloudMetrics, InstrumentedCloudProvider

PROVIDERS = ("azure", "kwok")


async def open_provider(
    kind: str,
    *,
    api_client: Any = None,
    gpu_count: Callable[[str], int] | None = None,
    node_capacity: Callable[[str], Mapping[str, str]] | None = None,
    env: Mapping[str, str] | None = None,
    kwok_delay: float = 0.0,
    metrics: CloudMetrics | None = None,
) -> CloudProvider:
    """Open the ``azure`` or ``kwok`` provider, instrumented with the cloud-call metrics.

    azure: configuration and credentials from ``env`` (default ``os.environ``; see
    ``AzureConfig.from_env``). kwok: needs the cluster's ``api_client`` and the SKU catalog's
    ``gpu_count`` (and, optionally, ``node_capacity``: a CPU SKU's vCPUs and memory). The caller owns the result and must ``await provider.close()``.
    """
    if kind == "azure":
        from provisioner.cloud.azure import AzureCloudProvider, AzureConfig

        inner: CloudProvider = await AzureCloudProvider.open(AzureConfig.from_env(env))
    elif kind == "kwok":
        from provisioner.cloud.kwok import KwokCloudProvider

        if api_client is None or gpu_count is None:
            raise ValueError("the kwok provider needs api_client and gpu_count")
        inner = KwokCloudProvider(api_client, gpu_count, delay=kwok_delay, node_capacity=node_capacity)
    else:
        raise ValueError(f"unknown cloud provider {kind!r}; expected one of {', '.join(PROVIDERS)}")
    return InstrumentedCloudProvider(inner, metrics)
