"""Garbage collection: delete cloud instances whose Machine (or NodeClaim) is gone.

A Machine deleted while its agent pool was still being created, a finalizer removed by hand, or a
provisioner that crashed between the cloud's create and the Machine's status write can each leave an
instance (an AKS agent pool costing GPU hours) with no Machine. Every ``interval`` the sweep lists the
provider's instances (only those this provisioner created: see ``CloudProvider.list``) and deletes each
one whose Machine does not exist, together with its Nodes. A grace period after the instance's creation
time covers a Machine that the informer has not seen yet, and the Machine's absence is confirmed with a
direct GET (never from a cache, which may lag, nor from a label-scoped informer, which may not see other
provisioners' Machines).

Machines and NodeClaims coexist during a migration, and one provisioner may serve only one of them: an
instance is an orphan only when *neither* kind has an object of its name, whichever kind created it,
so a sweep never deletes what the other encoding owns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from kaito.runtime.kube import NODES, KubeClient
from provisioner import metrics
from provisioner.cloud.base import CloudError, CloudProvider, Instance, InstanceState, NotFound
from provisioner.lifecycle.kinds import KINDS

log = structlog.get_logger("provisioner.gc")


class InstanceGarbageCollector:
    """Periodic sweep of orphaned instances; run :meth:`run` as a leader-only runnable."""

    def __init__(
        self,
        client: KubeClient,
        cloud: CloudProvider,
        *,
        interval: float = 120.0,
        grace: float = 30.0,
        cloud_call_wait: float = 30.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.client = client
        self.cloud = cloud
        self.interval = interval
        self.grace = grace
        self.cloud_call_wait = cloud_call_wait
        self._clock = clock or (lambda: datetime.now(UTC))
        self.sweeps = 0
        """Completed sweeps (for diagnostics and tests)."""

    async def run(self) -> None:
        """Sweep every ``interval`` seconds until cancelled; a failed sweep is logged and retried next time."""
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("garbage collection sweep failed")
            # A periodic timer, not synchronisation: the next sweep is due in `interval` seconds.
            await asyncio.sleep(self.interval)

    async def sweep(self) -> list[str]:
        """One pass; returns the names of the instances it deleted (or started deleting)."""
        try:
            instances = await self.cloud.list()
        except CloudError as e:
            log.warning("cannot list instances; skipping this sweep", reason=e.reason, error=e.message)
            return []
        deleted: list[str] = []
        now = self._clock()
        for instance in instances:
            if not self._eligible(instance, now):
                continue
            name = instance.machine_name or instance.name
            if await self._owner_exists(name):
                continue
            log.info("deleting orphaned instance", machine=name, state=str(instance.state))
            await self._delete_nodes(instance)
            try:
                async with asyncio.timeout(self.cloud_call_wait):
                    await self.cloud.delete(instance.name, owner_kind=instance.owner_kind)
            except NotFound:
                pass
            except TimeoutError:
                log.info("orphaned instance deletion in progress", machine=name)
            except CloudError as e:
                log.warning("cannot delete orphaned instance", machine=name, reason=e.reason, error=e.message)
                continue
            metrics.TERMINATIONS.labels("garbage_collected").inc()
            deleted.append(instance.name)
        self.sweeps += 1
        return deleted

    async def _owner_exists(self, name: str) -> bool:
        """Whether a Machine or a NodeClaim of that name exists (a kind whose CRD is not installed has none)."""
        for kind in KINDS.values():
            if await self.client.get_or_none(kind.resource, name) is not None:
                return True
        return False

    def _eligible(self, instance: Instance, now: datetime) -> bool:
        if instance.state is InstanceState.DELETING or not instance.name:
            return False
        # Without a creation time the instance is old enough: only our own instances are listed at all.
        return instance.created_at is None or (now - instance.created_at).total_seconds() >= self.grace

    async def _delete_nodes(self, instance: Instance) -> None:
        if not instance.node_selector:
            return
        for node in await self.client.list_all(NODES, label_selector=instance.label_selector()):
            meta = node.get("metadata") or {}
            if not meta.get("deletionTimestamp"):
                await self.client.delete(NODES, str(meta["name"]))
