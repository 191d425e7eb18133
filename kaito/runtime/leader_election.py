"""Leader election on ``coordination.k8s.io/v1`` Leases, with client-go's algorithm
(``tools/leaderelection/leaderelection.go``).

* A candidate trusts only its own monotonic clock: it notes *when it observed* the Lease record change
  and treats the holder's lease as valid until ``observed + leaseDurationSeconds``; timestamps written in
  the Lease (UTC MicroTime, six fractional digits) are informational. This tolerates clock skew.
* Writes use optimistic concurrency (the Lease's resourceVersion): two candidates racing for an expired
  lease cannot both win; the loser gets 409 and stays a follower.
* The leader renews every ``retry_period``; if it cannot renew within ``renew_deadline`` -- or it sees
  another holder -- it has lost the lease and must stop at once (the Manager cancels its controllers).
* On a clean shutdown the leader releases the lease (empty holder, ``leaseDurationSeconds: 1``) so a
  standby takes over without waiting for expiry.

Defaults are controller-runtime's: 15 s lease, 10 s renew deadline, 2 s retry period.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from kaito.runtime import metrics
from kaito.runtime.kube import LEASES, ApiError, KubeClient, Obj

log = structlog.get_logger("kaito.runtime.leader_election")

JITTER_FACTOR = 1.2


def micro_time(dt: datetime | None = None) -> str:
    """Kubernetes MicroTime: UTC, exactly six fractional digits, ``Z`` suffix."""
    dt = (dt or datetime.now(UTC)).astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_identity() -> str:
    """``hostname_uuid``, like controller-runtime, so two processes on one host never collide."""
    return f"{socket.gethostname()}_{uuid.uuid4()}"


@dataclass
class LeaderElectionConfig:
    """Where the lock lives, who we are, and client-go's three durations (seconds)."""

    lease_name: str
    lease_namespace: str
    identity: str = field(default_factory=default_identity)
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    release_on_cancel: bool = True

    def validate(self) -> None:
        """client-go's rules: lease > renew deadline > 1.2 x retry period > 0."""
        if self.lease_duration <= self.renew_deadline:
            raise ValueError("lease_duration must be greater than renew_deadline")
        if self.renew_deadline <= JITTER_FACTOR * self.retry_period:
            raise ValueError("renew_deadline must be greater than 1.2 x retry_period")
        if self.retry_period <= 0:
            raise ValueError("retry_period must be positive")
        if not self.identity:
            raise ValueError("identity must not be empty")


def _record(spec: dict[str, Any]) -> tuple[Any, ...]:
    return (
        spec.get("holderIdentity") or "",
        spec.get("leaseDurationSeconds"),
        spec.get("acquireTime"),
        spec.get("renewTime"),
        spec.get("leaseTransitions"),
    )


class LeaderElector:
    """One candidate. Call :meth:`acquire`, then :meth:`renew_until_lost`; :meth:`release` on shutdown."""

    def __init__(
        self, client: KubeClient, config: LeaderElectionConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        config.validate()
        self.client = client
        self.config = config
        self._clock = clock
        self._lease: Obj | None = None  # last Lease read or written (carries the resourceVersion)
        self._observed: tuple[Any, ...] | None = None
        self._observed_time = 0.0
        self._leading = False
        self._log = log.bind(lease=f"{config.lease_namespace}/{config.lease_name}", identity=config.identity)
        self._status = metrics.LEADER_ELECTION_MASTER_STATUS.labels(config.lease_name)
        self._slowpath = metrics.LEADER_ELECTION_SLOWPATH.labels(config.lease_name)
        self._status.set(0)

    @property
    def is_leader(self) -> bool:
        """Whether we hold the lease (as of our last successful renewal)."""
        return self._leading

    @property
    def observed_holder(self) -> str:
        """The holder named by the last Lease record we saw."""
        return str(self._observed[0]) if self._observed else ""

    def _set_leading(self, leading: bool) -> None:
        if leading != self._leading:
            self._log.info("became leader" if leading else "stopped leading")
        self._leading = leading
        self._status.set(1 if leading else 0)

    def _lease_valid_for_holder(self, now: float) -> bool:
        """Whether the observed record's lease has not expired yet (by our own clock)."""
        if self._observed is None:
            return False
        duration = self._observed[1] or self.config.lease_duration
        return bool(self._observed_time + float(duration) > now)

    def _desired_spec(self, transitions: int, acquire_time: str | None) -> Obj:
        now = micro_time()
        return {
            "holderIdentity": self.config.identity,
            "leaseDurationSeconds": int(self.config.lease_duration),
            "acquireTime": acquire_time or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def _observe(self, lease: Obj) -> None:
        self._lease = lease
        rec = _record(lease.get("spec") or {})
        if rec != self._observed:
            self._observed = rec
            self._observed_time = self._clock()

    async def try_acquire_or_renew(self) -> bool:
        """One round of client-go's ``tryAcquireOrRenew``; True if we hold the lease afterwards."""
        cfg = self.config
        now = self._clock()
        # Fast path: we lead and our lease is still valid -> optimistic update of the cached object.
        if self._leading and self._lease is not None and self._lease_valid_for_holder(now):
            old_spec = self._lease.get("spec") or {}
            lease = {
                **self._lease,
                "spec": self._desired_spec(
                    int(old_spec.get("leaseTransitions") or 0), old_spec.get("acquireTime")
                ),
            }
            try:
                updated = await self.client.replace(LEASES, lease)
            except ApiError as e:
                self._slowpath.inc()
                self._log.info("fast-path renew failed; falling back to GET", status=e.status)
            else:
                self._observe(updated)
                return True

        # Slow path: GET (create if missing).
        try:
            current = await self.client.get(LEASES, cfg.lease_name, cfg.lease_namespace)
        except ApiError as e:
            if not e.not_found:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": cfg.lease_name, "namespace": cfg.lease_namespace},
                "spec": self._desired_spec(0, None),
            }
            try:
                created = await self.client.create(LEASES, body)
            except ApiError as ce:
                if ce.already_exists or ce.conflict:
                    return False  # someone else created it first
                raise
            self._observe(created)
            return True

        self._observe(current)
        spec = current.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        i_hold_it = holder == cfg.identity
        if holder and not i_hold_it and self._lease_valid_for_holder(self._clock()):
            return False  # another candidate holds a valid lease
        transitions = int(spec.get("leaseTransitions") or 0)
        if i_hold_it:
            acquire_time = spec.get("acquireTime")
        else:
            transitions += 1
            acquire_time = None
        lease = {**current, "spec": self._desired_spec(transitions, acquire_time)}
        try:
            updated = await self.client.replace(LEASES, lease)
        except ApiError as e:
            if e.conflict:
                return False  # lost the race; the next round re-reads
            raise
        self._observe(updated)
        return True

    async def _attempt(self, timeout: float) -> bool:
        """One bounded round; errors count as a failed round (logged)."""
        try:
            async with asyncio.timeout(max(0.05, timeout)):
                return await self.try_acquire_or_renew()
        except (ApiError, TimeoutError, OSError) as e:
            self._log.warning("lease round failed", error=str(e) or repr(e))
        except Exception:
            # Transport errors of every shape (aiohttp.ClientError, ...): never kill the elector.
            self._log.exception("lease round failed unexpectedly")
        return False

    async def acquire(self) -> None:
        """Block until we hold the lease (cancel to give up)."""
        cfg = self.config
        self._log.info("attempting to acquire leader lease")
        while True:
            if await self._attempt(cfg.renew_deadline):
                self._set_leading(True)
                return
            # Poll every retry period with a little jitter; but if the holder's lease expires
            # before the next poll, look again right after it expires -- a standby takes over within
            # lease duration + one retry period of the leader's last renewal it saw.
            wait = cfg.retry_period * (1.0 + random.random() * 0.2)
            if self._observed is not None and self._observed[0]:
                duration = float(self._observed[1] or cfg.lease_duration)
                until_expiry = self._observed_time + duration - self._clock()
                if 0 < until_expiry < wait:
                    wait = until_expiry + 0.01
            await asyncio.sleep(wait)

    async def renew_until_lost(self) -> None:
        """Renew every retry period; return when the lease could not be renewed within the renew
        deadline or another holder was seen. Leadership is then lost (:attr:`is_leader` is False)."""
        cfg = self.config
        while self._leading:
            await asyncio.sleep(cfg.retry_period)
            deadline = self._clock() + cfg.renew_deadline
            renewed = False
            while not renewed:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                renewed = await self._attempt(remaining)
                if renewed:
                    break
                if self.observed_holder and self.observed_holder != cfg.identity:
                    self._log.warning("lease taken by another candidate", holder=self.observed_holder)
                    break
                await asyncio.sleep(min(cfg.retry_period, max(0.0, deadline - self._clock())))
            if not renewed:
                self._log.error("leader lease lost", renew_deadline=cfg.renew_deadline)
                self._set_leading(False)
                return

    async def release(self, timeout: float = 5.0) -> bool:
        """Give the lease up (empty holder, 1 s duration) if we hold it; True if released."""
        if not self._leading or self._lease is None:
            return False
        self._set_leading(False)
        spec = self._lease.get("spec") or {}
        now = micro_time()
        lease = {
            **self._lease,
            "spec": {
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": int(spec.get("leaseTransitions") or 0),
            },
        }
        try:
            async with asyncio.timeout(timeout):
                self._observe(await self.client.replace(LEASES, lease))
        except Exception as e:
            self._log.warning("failed to release leader lease", error=str(e) or repr(e))
            return False
        self._log.info("released leader lease")
        return True
