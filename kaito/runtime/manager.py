"""The Manager: owns informers, controllers, leader election, and the probe and metrics servers.

Lifecycle of :meth:`Manager.run` (controller-runtime's, simplified):

1. start the probe and metrics servers and every runnable that does not need leadership (e.g. the
   admission webhook) -- on every replica;
2. start every informer (every replica keeps warm caches, so a standby takes over fast) and wait for
   them to sync (``/readyz`` turns 200 then);
3. with leader election, block until the Lease is acquired; then start the controllers and the
   runnables that need leadership;
4. run until stopped (SIGTERM/SIGINT or :meth:`stop`) or until leadership is lost.

An entry point hands the manager what it must close on the way out (:meth:`close_on_exit`) and returns
:meth:`run_main`'s exit status: 0 after a stop, 1 when leadership was lost, the caches never synced or a
runnable failed (raised, or returned while the manager was running: the webhook could not bind, the
certificate or GC loop died) -- a crashed component must not look like a clean exit (pod Completed).

On a stop: stop taking work, let in-flight reconciles finish (bounded by ``graceful_shutdown_timeout``),
release the Lease, stop informers and servers. On a loss of leadership: cancel every reconcile at
once (no graceful period -- another replica may already be leading) and raise
:class:`LeaderElectionLost`, so the process exits and restarts as a standby.

Example::

    mgr = Manager(client, ManagerOptions(name="kaito-workspace", leader_election=True,
                                         lease_name="kaito-workspace", lease_namespace="kaito-system"))
    ctrl = mgr.add_controller("workspace", reconcile, workers=5, for_=WORKSPACES,
                              owns=[DEPLOYMENTS, SERVICES],
                              watches=[(MACHINES, label_mapper("kaito.sh/workspace",
                                                               "kaito.sh/workspacenamespace"))])
    mgr.close_on_exit(api_client.close)
    return await mgr.run_main()      # the process's exit status
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from kaito.runtime.controller import Controller, KeyMapper, Predicate, Reconciler, owner_mapper
from kaito.runtime.health import HttpServer, Probes, metrics_app
from kaito.runtime.informer import Informer, strip_managed_fields
from kaito.runtime.kube import KubeClient, Obj, Resource
from kaito.runtime.leader_election import LeaderElectionConfig, LeaderElector, default_identity
from kaito.runtime.ratelimit import RateLimiter
from kaito.runtime.store import Indexer

log = structlog.get_logger("kaito.runtime.manager")

Runnable = Callable[[], Awaitable[None]]
Watch = tuple[Resource, KeyMapper]


class LeaderElectionLost(RuntimeError):
    """Leadership was lost; the process should exit (controller-runtime does the same)."""


class CacheSyncTimeout(RuntimeError):
    """The informers did not sync within ``cache_sync_timeout``."""


class RunnableFailed(RuntimeError):
    """A runnable raised, or returned while the manager was running; the manager stopped because of it."""

    def __init__(self, runnable: str, cause: BaseException) -> None:
        super().__init__(f"runnable {runnable!r} failed: {cause}")
        self.runnable = runnable
        self.cause = cause


@dataclass
class ManagerOptions:
    """Manager settings. Ports: ``None`` disables a server, ``0`` binds a free port."""

    name: str = "manager"
    leader_election: bool = False
    lease_name: str = ""
    lease_namespace: str = "kaito-system"
    identity: str = field(default_factory=default_identity)
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 8080
    probe_host: str = "0.0.0.0"
    probe_port: int | None = 8081
    graceful_shutdown_timeout: float = 30.0
    cache_sync_timeout: float = 120.0


@dataclass
class _InformerSpec:
    resource: Resource
    namespace: str | None
    label_selector: str | None
    field_selector: str | None


class Manager:
    """See the module docstring."""

    def __init__(self, client: KubeClient, options: ManagerOptions | None = None) -> None:
        self.client = client
        self.options = options or ManagerOptions()
        self.probes = Probes()
        self.controllers: list[Controller] = []
        self._informers: dict[tuple[Resource, str | None, str | None, str | None], Informer] = {}
        self._runnables: list[tuple[str, Runnable, bool]] = []
        self._stop = asyncio.Event()
        self._synced = False
        self.elector: LeaderElector | None = None
        self.elected = asyncio.Event()
        self.probe_server: HttpServer | None = None
        self.metrics_server: HttpServer | None = None
        self._log = log.bind(manager=self.options.name)
        self._closers: list[Callable[[], object]] = []
        self._failed: RunnableFailed | None = None
        self.probes.add_ready_check("informers-synced", lambda: self._synced)
        if self.options.leader_election:
            if not self.options.lease_name:
                raise ValueError("leader election needs a lease_name")
            self.elector = LeaderElector(
                client,
                LeaderElectionConfig(
                    lease_name=self.options.lease_name,
                    lease_namespace=self.options.lease_namespace,
                    identity=self.options.identity,
                    lease_duration=self.options.lease_duration,
                    renew_deadline=self.options.renew_deadline,
                    retry_period=self.options.retry_period,
                ),
            )

    # -------------------------------------------------------------------------------- registration

    def informer(
        self,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        indexers: dict[str, Indexer] | None = None,
        transform: Callable[[Obj], Obj] | None = strip_managed_fields,
    ) -> Informer:
        """The shared informer for this resource and scope (created on first use).

        ``transform`` applies when the informer is created (default: drop managedFields).
        """
        key = (resource, namespace, label_selector, field_selector)
        inf = self._informers.get(key)
        if inf is None:
            inf = Informer(
                self.client,
                resource,
                namespace=namespace,
                label_selector=label_selector,
                field_selector=field_selector,
                transform=transform,
            )
            self._informers[key] = inf
        for name, fn in (indexers or {}).items():
            if name not in inf.store.index_names():
                inf.add_indexer(name, fn)
        return inf

    @property
    def informers(self) -> list[Informer]:
        """Every registered informer."""
        return list(self._informers.values())

    def add_controller(
        self,
        name: str,
        reconcile: Reconciler,
        *,
        workers: int = 1,
        for_: Resource | None = None,
        owns: Sequence[Resource] = (),
        watches: Sequence[Watch] = (),
        namespace: str | None = None,
        label_selector: str | None = None,
        predicate: Predicate | None = None,
        rate_limiter: RateLimiter | None = None,
        reconcile_timeout: float | None = None,
    ) -> Controller:
        """Register a controller.

        ``for_``: the primary resource; its events enqueue the object's own key (filtered by
        ``predicate`` if given). ``owns``: child resources whose events enqueue the key of their
        controlling owner of ``for_``'s kind (ownerReference). ``watches``: other resources with a
        mapper from object to keys. ``namespace``/``label_selector`` scope every informer it creates.
        """
        if any(c.name == name for c in self.controllers):
            raise ValueError(f"controller name {name!r} is already used (names label the metrics)")
        ctrl = Controller(
            name, reconcile, workers=workers, rate_limiter=rate_limiter, reconcile_timeout=reconcile_timeout
        )
        if for_ is not None:
            ctrl.watch(
                self.informer(for_, namespace=namespace, label_selector=label_selector), predicate=predicate
            )
            for child in owns:
                ctrl.watch(self.informer(child, namespace=namespace), owner_mapper(for_.kind, for_.group))
        elif owns:
            raise ValueError("owns needs for_ (the owner's kind)")
        for res, mapper in watches:
            ctrl.watch(self.informer(res, namespace=namespace), mapper)
        self.controllers.append(ctrl)
        return ctrl

    def add_runnable(self, name: str, runnable: Runnable, *, needs_leader: bool) -> None:
        """Run ``runnable()`` for the manager's lifetime (only while leading if ``needs_leader``).

        It is cancelled on shutdown; a webhook server is ``needs_leader=False``, a periodic garbage
        collector ``needs_leader=True``. A runnable that raises, or returns before the manager is
        stopped, stops the manager: :meth:`run` then raises :class:`RunnableFailed` naming it.
        """
        self._runnables.append((name, runnable, needs_leader))

    def add_health_check(self, name: str, check: Callable[[], bool]) -> None:
        """Add a ``/healthz`` check."""
        self.probes.add_health_check(name, check)

    def add_ready_check(self, name: str, check: Callable[[], bool]) -> None:
        """Add a ``/readyz`` check."""
        self.probes.add_ready_check(name, check)

    # ------------------------------------------------------------------------------------- control

    @property
    def is_leader(self) -> bool:
        """True while this replica runs the controllers."""
        return self.elected.is_set()

    @property
    def synced(self) -> bool:
        """True once every informer synced."""
        return self._synced

    def stop(self) -> None:
        """Ask :meth:`run` to shut down gracefully."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT trigger a graceful :meth:`stop`."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._log.info("signal received; shutting down", signal=sig.name)
        self.stop()

    def close_on_exit(self, close: Callable[[], object]) -> None:
        """Have :meth:`close` (and so :meth:`run_main`) call ``close()`` once the manager has stopped.

        Closers run last registered first (register the API client before what uses it); an
        awaitable result is awaited, so both ``api_client.close`` and ``tempdir.cleanup`` fit.
        """
        self._closers.append(close)

    async def close(self) -> None:
        """Call every :meth:`close_on_exit` closer once, newest first; a failing one does not stop the rest."""
        while self._closers:
            close = self._closers.pop()
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self._log.exception("closing failed", closer=getattr(close, "__qualname__", repr(close)))

    async def run_main(self, *, cache_sync_hint: str = "") -> int:
        """An entry point's tail: run until SIGTERM/SIGINT or lost leadership, close, return the exit status.

        Installs the signal handlers, runs :meth:`run` and always calls :meth:`close`. The status is 0
        after a stop, 1 when leadership was lost (``exiting: leadership lost``; the process restarts as
        a standby, as controller-runtime's), 1 when the caches did not sync in time (``exiting:
        caches did not sync``, followed by ``cache_sync_hint`` when given: what to check) and 1 when a
        runnable failed (``exiting: runnable failed`` with ``runnable=`` its name and ``error=``).
        """
        loop = asyncio.get_running_loop()
        try:
            self.install_signal_handlers()
            await self.run()
        except LeaderElectionLost as e:
            self._log.error("exiting: leadership lost", error=str(e))
            return 1
        except CacheSyncTimeout as e:
            event = "exiting: caches did not sync" + (f"; {cache_sync_hint}" if cache_sync_hint else "")
            self._log.error(event, error=str(e))
            return 1
        except RunnableFailed as e:
            self._log.error("exiting: runnable failed", runnable=e.runnable, error=str(e.cause))
            return 1
        finally:
            try:
                await self.close()
            finally:
                # Until here a signal still means "stop" (not an abrupt exit) while things close.
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        return 0

    async def run(self) -> None:
        """Run until stopped (returns) or until leadership is lost (raises :class:`LeaderElectionLost`).

        Raises :class:`RunnableFailed` after a graceful shutdown when a runnable's failure stopped it.
        """
        self._failed = None
        await self._run()
        if self._failed is not None:
            raise self._failed

    async def _run(self) -> None:
        opts = self.options
        background: list[asyncio.Task[None]] = []
        leader_tasks: list[asyncio.Task[None]] = []
        renew_task: asyncio.Task[None] | None = None
        lost = False
        try:
            await self._start_servers()
            for name, runnable, needs_leader in self._runnables:
                if not needs_leader:
                    background.append(
                        asyncio.create_task(self._guard(name, runnable), name=f"runnable:{name}")
                    )
            for inf in self._informers.values():
                inf.start()
            if not await self._wait_synced(opts.cache_sync_timeout):
                if self._stop.is_set():
                    return
                raise CacheSyncTimeout(
                    f"informers not synced after {opts.cache_sync_timeout}s: "
                    + ", ".join(i.description for i in self._informers.values() if not i.has_synced)
                )
            self._synced = True
            self._log.info("caches synced", informers=len(self._informers))

            if self.elector is not None:
                if not await self._until_stopped(self.elector.acquire()):
                    return
                renew_task = asyncio.create_task(self.elector.renew_until_lost(), name="leader-renew")
            self.elected.set()
            for ctrl in self.controllers:
                ctrl.start()
            for name, runnable, needs_leader in self._runnables:
                if needs_leader:
                    leader_tasks.append(
                        asyncio.create_task(self._guard(name, runnable), name=f"runnable:{name}")
                    )

            stop_wait = asyncio.create_task(self._stop.wait(), name="manager-stop-wait")
            waiters: set[asyncio.Task[Any]] = {stop_wait}
            if renew_task is not None:
                waiters.add(renew_task)
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_wait.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stop_wait
            if renew_task is not None and renew_task.done() and not self._stop.is_set():
                lost = True
                self.elected.clear()
                self._log.error("leader election lost; stopping all controllers now")
                await asyncio.gather(*(c.abort() for c in self.controllers))
                raise LeaderElectionLost(f"lost lease {opts.lease_namespace}/{opts.lease_name}")
        finally:
            self.elected.clear()
            if not lost:
                # Graceful: stop taking work, finish in-flight reconciles (bounded), then release.
                await asyncio.gather(*(c.stop(opts.graceful_shutdown_timeout) for c in self.controllers))
            else:
                await asyncio.gather(*(c.abort() for c in self.controllers))
            await _cancel_all(leader_tasks)
            if renew_task is not None:
                await _cancel_all([renew_task])
            if self.elector is not None and not lost:
                await self.elector.release()
            await asyncio.gather(*(inf.stop() for inf in self._informers.values()))
            await _cancel_all(background)
            await self._stop_servers()
            self._log.info("manager stopped")

    async def _until_stopped(self, aw: Awaitable[None]) -> bool:
        """Await ``aw`` unless a stop comes first; True if ``aw`` finished."""
        task = asyncio.ensure_future(aw)
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel_all([stop_wait])
            if not task.done():
                await _cancel_all([task])
        if task.done() and not task.cancelled():
            task.result()
            return True
        return False

    async def _wait_synced(self, timeout: float) -> bool:
        async def all_synced() -> None:
            await asyncio.gather(*(inf.wait_for_sync() for inf in self._informers.values()))

        try:
            async with asyncio.timeout(timeout):
                return await self._until_stopped(all_synced())
        except TimeoutError:
            return False

    async def _guard(self, name: str, runnable: Runnable) -> None:
        try:
            await runnable()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._log.exception("runnable failed; stopping the manager", runnable=name)
            self._fail(name, e)
            return
        if not self._stop.is_set():
            # Runnables live as long as the manager: one that returns has stopped serving.
            self._log.error("runnable returned while the manager was running; stopping", runnable=name)
            self._fail(name, RuntimeError("returned while the manager was running"))

    def _fail(self, name: str, cause: BaseException) -> None:
        if self._failed is None:  # the first failure is the cause; the rest follow from the stop
            self._failed = RunnableFailed(name, cause)
        self.stop()

    async def _start_servers(self) -> None:
        opts = self.options
        if opts.probe_port is not None:
            self.probe_server = HttpServer(self.probes.app(), opts.probe_host, opts.probe_port, "probes")
            await self.probe_server.start()
        if opts.metrics_port is not None:
            self.metrics_server = HttpServer(metrics_app(), opts.metrics_host, opts.metrics_port, "metrics")
            await self.metrics_server.start()

    async def _stop_servers(self) -> None:
        for server in (self.probe_server, self.metrics_server):
            if server is not None:
                await server.stop()


async def _cancel_all(tasks: Sequence[asyncio.Future[Any]]) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
