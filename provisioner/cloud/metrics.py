"""Prometheus metrics for cloud-provider calls.

``kaito_cloud_request_duration_seconds{provider,operation}`` times every call (successful or not) and
``kaito_cloud_request_errors_total{provider,operation,reason}`` counts failures by the CloudError
reason, so a dashboard can tell quota exhaustion from capacity shortages at a glance.

Wrap a provider once at wiring time: ``cloud = InstrumentedCloudProvider(AzureCloudProvider(...))``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from provisioner.cloud.base import CloudError, CloudProvider, Instance
from provisioner.machine_fields import MachineDict

# Cloud calls range from a ~50 ms GET to a 10-minute agent-pool create.
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)


class CloudMetrics:
    """The two cloud-call metrics, registered in one registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.duration = Histogram(
            "kaito_cloud_request_duration_seconds",
            "Duration of cloud-provider calls in seconds.",
            ["provider", "operation"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "kaito_cloud_request_errors_total",
            "Cloud-provider calls that failed, by classified reason.",
            ["provider", "operation", "reason"],
            registry=registry,
        )

    @asynccontextmanager
    async def observe(self, provider: str, operation: str) -> AsyncIterator[None]:
        """Time the enclosed call and count it as an error (by CloudError reason) when it raises."""
        start = time.monotonic()
        try:
            yield
        except CloudError as e:
            self.errors.labels(provider, operation, e.reason).inc()
            raise
        except Exception:
            self.errors.labels(provider, operation, "Unknown").inc()
            raise
        finally:
            self.duration.labels(provider, operation).observe(time.monotonic() - start)


_default: CloudMetrics | None = None


def default_metrics() -> CloudMetrics:
    """The process-wide CloudMetrics on the default registry (created on first use)."""
    global _default  # noqa: PLW0603 - one registration per process; a second would raise in prometheus-client
    if _default is None:
        _default = CloudMetrics()
    return _default


class InstrumentedCloudProvider(CloudProvider):
    """A CloudProvider decorator that records duration and error metrics around every call."""

    def __init__(self, inner: CloudProvider, metrics: CloudMetrics | None = None) -> None:
        self.inner = inner
        self.metrics = metrics or default_metrics()
        self.name = inner.name
        self._provider = inner.name

    async def create(self, machine: MachineDict) -> Instance:
        """Instrumented CloudProvider.create."""
        async with self.metrics.observe(self._provider, "create"):
            return await self.inner.create(machine)

    async def get(self, ref: str) -> Instance:
        """Instrumented CloudProvider.get."""
        async with self.metrics.observe(self._provider, "get"):
            return await self.inner.get(ref)

    async def list(self) -> list[Instance]:
        """Instrumented CloudProvider.list."""
        async with self.metrics.observe(self._provider, "list"):
            return await self.inner.list()

    async def delete(self, ref: str, *, owner_kind: str | None = None) -> None:
        """Instrumented CloudProvider.delete."""
        async with self.metrics.observe(self._provider, "delete"):
            await self.inner.delete(ref, owner_kind=owner_kind)

    async def close(self) -> None:
        """Close the wrapped provider."""
        await self.inner.close()
