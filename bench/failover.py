"""Leader failover under load (SPEC §10): ``kill -9`` the leading ``kaito-controller``, F times.

One fresh full local cluster (etcd, apiserver, controller-manager, scheduler, kwok) with the Workspace
and Machine CRDs, and, as real processes (each dies with this script: parent-death signal):

* two ``python -m kaito --leader-elect --provisioning machine --no-webhook`` replicas (slots ``a`` and
  ``b``; every process gets its own identity ``replica-<slot>-<generation>`` and its own metrics/probe
  ports);
* one ``python -m provisioner --cloud kwok`` (Machines become kwok Nodes).

Load: for the whole run a stream of phi-3 workspaces on ``Standard_NC6s_v3`` with a labelSelector (no
pre-existing node matches, so each needs a Machine) is created, one every ``--create-interval``
seconds, and some are deleted (a random one every ``--delete-every``-th tick; the oldest ones whenever
more than ``--max-live`` exist), only once at least ``--min-delete-age`` seconds old.

Each failover: wait until the Lease ``kaito-workspace`` names a live replica and the other one answers
``/readyz`` (caches warm, standing by); ``kill -9`` the holder; create a probe workspace at once; then
measure

* **takeover**: kill -> the standby holds the Lease (its ``acquireTime``, written by the standby with
  this host's clock, so poll granularity does not count);
* **first reconcile**: kill -> the standby's ``controller_runtime_reconcile_total`` moves;
* **probe Machine**: kill -> the probe workspace's Machine exists (new work done by the new leader);

and restart the killed slot as the new standby (a new process, a new identity).

Throughout, every Machine event is audited: a name other than the controller's deterministic
``machine_name(namespace, workspace, slot)`` or a slot past ``resource.count`` is a *duplicate*; a
Machine alive (no deletionTimestamp) in a write newer than its workspace's deletion is an *orphan*
(reported with the workspace's create/delete answers and its state in the DELETED event, so the cause
shows). At the end the load stops, deletions settle, every remaining workspace must be
``WorkspaceReady=True``, and: exactly ``resource.count`` Machines per workspace with the deterministic
names, none left for a deleted workspace, and exactly the controller's Deployment and Services per
workspace (none left for a deleted one). Process logs and per-failover samples stay in ``--log-dir``.

Usage: python bench/failover.py [--failovers 100] [--lease-duration 4 --renew-deadline 3
       --retry-period 1 | --default-timings] [--create-interval 1] [--max-live 25]
       [--min-delete-age 3] [--kill-jitter 1] [--log-dir DIR]
       python bench/failover.py --failovers 2 --inject-duplicate   # self-check: must exit 1
       python bench/failover.py --failovers 1 --min-delete-age 0  # may delete a workspace ms after
                                    # creating it (seed 1: ws-00006), racing the controller's finalizer

Targets (SPEC §10): takeover and first reconcile <= 20 s with the default timings (15 s lease, 10 s
renew deadline, 2 s retry); 0 duplicate (and 0 orphaned) Machines, no duplicate Deployments/Services
across 100 failovers. 100 failovers with the short timings take about 12 minutes on 2 cores.
Exit status: 0 when all hold, 1 otherwise (a duplicate or orphan, a stuck or slow takeover, a replica
that crashed, a workspace not Ready at the end), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubernetes_asyncio.client import ApiClient

from bench.common import REPO, die_with_parent, scrape, start_cluster, workspace_ready
from hack.localcluster import LocalCluster, free_port
from kaito.api.workspace import LABEL_WORKSPACE_NAME, LABEL_WORKSPACE_NAMESPACE, Workspace
from kaito.machine import MACHINES, machine_name
from kaito.machine.machine import LABEL_SLOT, MachineEncoding
from kaito.presets.registry import default_registry
from kaito.presets.skus import default_sku_catalog
from kaito.runtime.informer import EventHandler, Informer
from kaito.runtime.kube import DEPLOYMENTS, LEASES, SERVICES, ApiError, KubeClient, Obj
from kaito.runtime.logging import configure_logging
from kaito.workspace import manifests as mf
from kaito.workspace.reconciler import WORKSPACES

NS = "failover"
ELECTION_NS = "kaito-system"
LEASE = "kaito-workspace"
INSTANCE = "Standard_NC6s_v3"
PRESET = "phi-3-mini-4k-instruct"
LABEL = {"apps": "failover"}
COUNT = 1  # resource.count of every workspace here
TARGET_S = 20.0
DEFAULT_TIMINGS = (15.0, 10.0, 2.0)


def log(msg: str) -> None:
    """Progress on stderr (stdout carries only the result lines)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def workspace(name: str) -> Obj:
    """A phi-3 workspace that needs one new node (no existing node carries ``apps=failover``)."""
    return {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": name, "namespace": NS},
        "resource": {"instanceType": INSTANCE, "count": COUNT, "labelSelector": {"matchLabels": LABEL}},
        "inference": {"preset": {"name": PRESET}},
    }


def expected_children(name: str) -> set[tuple[str, str]]:
    """(kind, name) of the Deployment and Services the controller builds for workspace ``name``."""
    raw = workspace(name)
    raw["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    wl = mf.build_inference(
        Workspace.model_validate(raw),
        default_registry().get(PRESET),
        mf.ManifestOptions(registry="registry.invalid/kaito"),
        sku=default_sku_catalog().get(INSTANCE),
        nodes=[f"node-{i}" for i in range(COUNT)],
    )
    return {
        (o["kind"], o["metadata"]["name"]) for o in wl.objects() if o["kind"] in ("Deployment", "Service")
    }


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no samples)."""
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s), max(1, math.ceil(q * len(s)))) - 1], 2)


def summary(xs: list[float]) -> dict[str, float | None]:
    return {
        "p50": round(statistics.median(xs), 2) if xs else None,
        "p95": percentile(xs, 0.95),
        "max": round(max(xs), 2) if xs else None,
    }


def probe_ready(port: int) -> bool:
    """Whether /readyz answers 200 (blocking; call in a thread)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def reconciles(metrics: str) -> float:
    """Sum of the workspace controller's ``controller_runtime_reconcile_total`` over results."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith('controller_runtime_reconcile_total{controller="workspace"'):
            total += float(line.rsplit(" ", 1)[1])
    return total


def micro_time(value: str | None) -> float | None:
    """A Lease MicroTime as a Unix timestamp."""
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def rv(obj: Obj) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


async def wait_for(
    what: str, fn: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.2
) -> bool:
    """Poll ``fn`` until true or ``timeout``; False (and a log line) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if await fn():
            return True
        if time.monotonic() > deadline:
            log(f"timed out after {timeout:.0f}s waiting for {what}")
            return False
        await asyncio.sleep(interval)


# ------------------------------------------------------------------------------------------ processes


@dataclass
class Proc:
    """A child process (a controller replica or the provisioner) with its ports and log file."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    metrics_port: int
    probe_port: int
    killed: bool = False  # killed on purpose by the bench

    def alive(self) -> bool:
        return self.proc.returncode is None

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def ready(self) -> bool:
        return self.alive() and await asyncio.to_thread(probe_ready, self.probe_port)

    async def reconciles(self) -> float | None:
        try:
            return reconciles(await asyncio.to_thread(scrape, self.metrics_port))
        except OSError:
            return None


@dataclass
class Fleet:
    """Starts and kills the controller replicas and the provisioner."""

    cluster: LocalCluster
    log_dir: Path
    timings: tuple[float, float, float]
    workers: int
    procs: list[Proc] = field(default_factory=list)
    replicas: dict[str, Proc] = field(default_factory=dict)
    generation: dict[str, int] = field(default_factory=dict)

    async def _spawn(self, name: str, argv: list[str], metrics: int, probe: int) -> Proc:
        path = self.log_dir / f"{name}.log"
        with path.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=REPO,
                env=self.cluster.env(),
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        p = Proc(name, proc, path, metrics, probe)
        self.procs.append(p)
        return p

    async def start_replica(self, slot: str) -> Proc:
        """A new process for ``slot`` with a fresh identity ``replica-<slot>-<generation>``."""
        gen = self.generation.get(slot, -1) + 1
        self.generation[slot] = gen
        identity = f"replica-{slot}-{gen}"
        metrics, probe = free_port(), free_port()
        lease, renew, retry = self.timings
        argv = [
            sys.executable,
            "-m",
            "kaito",
            "--kubeconfig",
            str(self.cluster.kubeconfig),
            "--provisioning",
            "machine",
            "--no-webhook",
            "--leader-elect",
            "--leader-election-namespace",
            ELECTION_NS,
            "--leader-election-identity",
            identity,
            "--leader-election-lease-duration",
            str(lease),
            "--leader-election-renew-deadline",
            str(renew),
            "--leader-election-retry-period",
            str(retry),
            "--workers",
            str(self.workers),
            "--image-registry",
            "registry.invalid/kaito",
            "--metrics-bind-address",
            f"127.0.0.1:{metrics}",
            "--health-probe-bind-address",
            f"127.0.0.1:{probe}",
            "--log-format",
            "json",
        ]
        p = await self._spawn(identity, argv, metrics, probe)
        self.replicas[slot] = p
        return p

    async def start_provisioner(self) -> Proc:
        metrics, probe = free_port(), free_port()
        argv = [
            sys.executable,
            "-m",
            "provisioner",
            "--cloud",
            "kwok",
            "--kubeconfig",
            str(self.cluster.kubeconfig),
            "--no-leader-elect",
            "--bind-address",
            "127.0.0.1",
            "--metrics-port",
            str(metrics),
            "--probe-port",
            str(probe),
            "--gc-interval",
            "0",
            "--log-format",
            "json",
        ]
        return await self._spawn("provisioner", argv, metrics, probe)

    def by_identity(self, identity: str) -> tuple[str, Proc] | None:
        for slot, p in self.replicas.items():
            if p.name == identity:
                return slot, p
        return None

    async def kill(self, p: Proc) -> None:
        p.killed = True
        if p.alive():
            p.proc.kill()  # SIGKILL: no lease release, no cleanup
        await p.proc.wait()

    async def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.alive():
                p.killed = True
                p.proc.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                await asyncio.wait_for(p.proc.wait(), 20)
            except TimeoutError:
                p.proc.kill()
                await p.proc.wait()


# ------------------------------------------------------------------------------------------- audit


@dataclass
class Audit:
    """Watches Workspaces and Machines for the whole run and records every duplicate and orphan as it
    happens, keyed by object (one entry per offending object, with the evidence)."""

    workspaces: Informer
    machines: Informer
    deleted_rv: dict[str, int] = field(default_factory=dict)  # workspace -> resourceVersion at its deletion
    # workspace -> its final state in the DELETED event (evidence for a finding)
    deleted_state: dict[str, Obj] = field(default_factory=dict)
    history: dict[str, list[str]] = field(default_factory=dict)  # workspace -> the bench's own writes
    duplicates: dict[str, str] = field(default_factory=dict)  # object -> what is wrong
    orphans: dict[str, str] = field(default_factory=dict)  # Machine -> why it outlived its workspace
    machine_names_seen: set[str] = field(default_factory=set)
    phase: str = "start"  # what the bench was doing (set by the run; recorded with each finding)

    def install(self) -> None:
        self.workspaces.add_event_handler(EventHandler(on_delete=self._ws_deleted))
        self.machines.add_event_handler(
            EventHandler(on_add=self._machine, on_update=lambda _old, new: self._machine(new))
        )

    def _ws_deleted(self, obj: Obj) -> None:
        meta = obj["metadata"]
        self.deleted_rv[meta["name"]] = rv(obj)
        self.deleted_state[meta["name"]] = meta

    def note(self, ws: str, what: str, obj: Obj | None) -> None:
        """Remember a write the bench made to workspace ``ws`` (the API's answer, for evidence)."""
        meta = (obj or {}).get("metadata") or {}
        now = time.time()
        self.history.setdefault(ws, []).append(
            f"{time.strftime('%H:%M:%S', time.gmtime(now))}.{int(now * 1000) % 1000:03d} {what} -> rv "
            f"{meta.get('resourceVersion')} finalizers {meta.get('finalizers')}"
        )

    def evidence(self, ws: str) -> str:
        """The bench's writes to ``ws`` and its state in the DELETED event, with a likely cause."""
        final = self.deleted_state.get(ws)
        text = f"workspace writes: {'; '.join(self.history.get(ws, [])) or 'none recorded'}"
        if final is None:
            return text + "; no DELETED event seen"
        text += (
            f"; DELETED event at rv {rv({'metadata': final})}: finalizers {final.get('finalizers')},"
            f" deletionTimestamp {final.get('deletionTimestamp')}"
        )
        if final.get("finalizers") and not final.get("deletionTimestamp"):
            text += (
                " => the apiserver removed the workspace although its finalizer was added concurrently"
                " (delete/add-finalizer race, kubernetes/kubernetes#77988): the controller's finalizer patch"
                " succeeded, so it created the Machine, but the workspace was already being removed"
            )
        elif not final.get("finalizers"):
            text += " => the workspace was removed without the controller's finalizer"
        else:
            text += " => the finalizer was removed while the Machine still existed"
        return text

    def _duplicate(self, key: str, text: str) -> None:
        if key not in self.duplicates:
            self.duplicates[key] = f"{text} [during {self.phase}]"
            log(f"DUPLICATE: {self.duplicates[key]}")

    def orphan(self, machine: str, ws: str, text: str) -> None:
        """Record ``machine`` as outliving workspace ``ws`` (once)."""
        if machine not in self.orphans:
            self.orphans[machine] = (
                f"machine {machine} of deleted workspace {ws}: {text} [during {self.phase}]; {self.evidence(ws)}"
            )
            log(f"ORPHAN: {self.orphans[machine]}")

    def _machine(self, m: Obj) -> None:
        meta = m.get("metadata") or {}
        name = str(meta.get("name"))
        self.machine_names_seen.add(name)
        labels = meta.get("labels") or {}
        ns, ws, slot = (
            labels.get(LABEL_WORKSPACE_NAMESPACE),
            labels.get(LABEL_WORKSPACE_NAME),
            labels.get(LABEL_SLOT),
        )
        if ns != NS or ws is None:
            self._duplicate(name, f"machine {name} names no workspace of ours (labels {labels})")
            return
        try:
            s = int(slot or "")
        except ValueError:
            self._duplicate(name, f"machine {name} of {ws} has slot label {slot!r}")
            return
        if s >= COUNT:
            self._duplicate(name, f"machine {name} of {ws} has slot {s} >= resource.count {COUNT}")
        if name != machine_name(ns, ws, s):
            self._duplicate(name, f"machine {name} of {ws} slot {s} is not {machine_name(ns, ws, s)}")
        gone = self.deleted_rv.get(ws)
        if gone is not None and not meta.get("deletionTimestamp") and rv(m) > gone:
            self.orphan(
                name,
                ws,
                f"created {meta.get('creationTimestamp')}, written alive (no deletionTimestamp) at rv {rv(m)}"
                f" after the workspace's deletion at rv {gone}",
            )


# -------------------------------------------------------------------------------------------- load


@dataclass
class Load:
    """Creates a workspace every ``interval`` seconds and deletes some, until stopped."""

    client: KubeClient
    interval: float
    max_live: int
    delete_every: int
    rng: random.Random
    audit: Audit
    min_delete_age: float
    live: list[str] = field(default_factory=list)
    born: dict[str, float] = field(default_factory=dict)  # workspace -> when the bench created it
    protected: set[str] = field(default_factory=set)  # probe workspaces not measured yet
    deleted: list[str] = field(default_factory=list)
    created: int = 0
    errors: int = 0
    _tick: int = 0

    async def create(self, name: str) -> None:
        for attempt in range(20):
            try:
                self.audit.note(name, "create", await self.client.create(WORKSPACES, workspace(name), NS))
                break
            except ApiError as e:
                if e.already_exists:
                    break
                self.errors += 1
                await asyncio.sleep(0.2 * (attempt + 1))
        self.live.append(name)
        self.born[name] = time.monotonic()
        self.created += 1

    async def delete_one(self, oldest: bool) -> None:
        old_enough = time.monotonic() - self.min_delete_age
        candidates = [w for w in self.live if w not in self.protected and self.born[w] <= old_enough]
        if not candidates:
            return
        name = candidates[0] if oldest else self.rng.choice(candidates)
        self.live.remove(name)
        self.deleted.append(name)
        try:
            self.audit.note(name, "delete", await self.client.delete(WORKSPACES, name, NS))
        except ApiError as e:
            if not e.not_found:
                self.errors += 1

    async def run(self) -> None:
        while True:
            self._tick += 1
            await self.create(f"ws-{self._tick:05d}")
            if len(self.live) > self.max_live:
                # Probe workspaces (one per failover) count too: shed down to the cap, oldest first.
                for _ in range(len(self.live) - self.max_live):
                    await self.delete_one(oldest=True)
            elif self.delete_every and self._tick % self.delete_every == 0:
                await self.delete_one(oldest=False)
            await asyncio.sleep(self.interval)


# ---------------------------------------------------------------------------------------- failover


@dataclass
class Sample:
    """One failover's measurements (seconds from the kill)."""

    index: int
    killed: str
    successor: str
    takeover_s: float | None = None
    takeover_observed_s: float | None = None
    first_reconcile_s: float | None = None
    probe_machine_s: float | None = None
    standby_ready_s: float | None = None  # kill -> the restarted slot answers /readyz
    note: str = ""


async def lease(client: KubeClient) -> Obj | None:
    try:
        return await client.get_or_none(LEASES, LEASE, ELECTION_NS)
    except (ApiError, OSError, TimeoutError):
        return None


def holder(lease_obj: Obj | None) -> str:
    return str(((lease_obj or {}).get("spec") or {}).get("holderIdentity") or "")


@dataclass
class Run:
    """State of one bench run."""

    args: argparse.Namespace
    cluster: LocalCluster
    client: KubeClient
    fleet: Fleet
    load: Load
    audit: Audit
    samples: list[Sample] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)

    def check_crashes(self) -> None:
        """Record (with the log tail) and restart any replica that exited without being killed."""
        for p in list(self.fleet.replicas.values()):
            if not p.alive() and not p.killed:
                p.killed = True  # record once
                text = f"{p.name} exited with status {p.proc.returncode}; log tail:\n{p.tail(15)}"
                self.crashes.append(text)
                log(f"CRASH: {text}")

    async def restart_dead(self) -> None:
        for slot, p in list(self.fleet.replicas.items()):
            if not p.alive():
                await self.fleet.start_replica(slot)

    async def steady(self, timeout: float) -> tuple[str, Proc, Proc] | None:
        """Wait until the Lease names a live replica and the other replica is ready; (slot, leader, standby)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_crashes()
            await self.restart_dead()
            found = self.fleet.by_identity(holder(await lease(self.client)))
            if found is not None:
                slot, leader = found
                other = next(p for s, p in self.fleet.replicas.items() if s != slot)
                if leader.alive() and await other.ready():
                    return slot, leader, other
            await asyncio.sleep(0.2)
        return None

    async def failover(self, k: int) -> bool:
        """One kill -9 and its measurements; False when the run cannot go on (no steady state / stuck)."""
        state = await self.steady(self.args.lease_duration * 4 + 120)
        if state is None:
            self.stuck.append(f"failover {k}: no leader + ready standby within the deadline")
            return False
        slot, leader, standby = state
        # Land the kill anywhere in the leader's renew cycle, not always right after the standby's start.
        await asyncio.sleep(self.load.rng.uniform(0, self.args.kill_jitter))
        if not (leader.alive() and holder(await lease(self.client)) == leader.name):
            return await self.failover(k)  # the lease moved meanwhile (a crash): find the leader again
        base = await standby.reconciles()
        probe = f"fo-{k:04d}"
        probe_machine = machine_name(NS, probe, 0)
        self.load.protected.add(probe)
        t0, wall0 = time.monotonic(), time.time()
        self.audit.phase = f"failover {k}: {leader.name} killed, {standby.name} not leading yet"
        await self.fleet.kill(leader)
        sample = Sample(k, leader.name, standby.name)
        await self.load.create(probe)

        async def took_over() -> bool:
            obj = await lease(self.client)
            if holder(obj) != standby.name:
                return False
            sample.takeover_observed_s = time.monotonic() - t0
            acquired = micro_time(((obj or {}).get("spec") or {}).get("acquireTime"))
            sample.takeover_s = (acquired - wall0) if acquired is not None else sample.takeover_observed_s
            return True

        async def reconciled() -> bool:
            n = await standby.reconciles()
            if n is None or n <= (base or 0.0):  # a standby that never led has reconciled nothing
                return False
            sample.first_reconcile_s = time.monotonic() - t0
            return True

        async def machine_exists() -> bool:
            try:
                found = await self.client.get_or_none(MACHINES, probe_machine)
            except (ApiError, OSError, TimeoutError):
                return False
            if found is None:
                return False
            sample.probe_machine_s = time.monotonic() - t0
            return True

        limit = self.args.lease_duration * 3 + 60
        ok = all(
            await asyncio.gather(
                wait_for(f"failover {k}: {standby.name} to hold the lease", took_over, limit, 0.1),
                wait_for(f"failover {k}: {standby.name} to reconcile", reconciled, limit, 0.1),
            )
        )
        self.audit.phase = f"failover {k}: {standby.name} leading, {slot} restarting"
        # Restart the killed slot as the new standby while the probe's Machine is awaited.
        restarted = await self.fleet.start_replica(slot)
        ok = (
            await asyncio.gather(
                wait_for(f"failover {k}: machine {probe_machine}", machine_exists, limit + 60, 0.1),
                wait_for(f"failover {k}: {restarted.name} ready", restarted.ready, 120, 0.2),
            )
        )[0] and ok
        if await restarted.ready():
            sample.standby_ready_s = time.monotonic() - t0
        self.load.protected.discard(probe)
        self.audit.phase = f"load after failover {k} ({standby.name} leading)"
        if not standby.alive():
            sample.note = f"successor {standby.name} died (status {standby.proc.returncode})"
        self.samples.append(sample)
        log(
            f"failover {k}: killed {leader.name}; {standby.name} took over in {sample.takeover_s and round(sample.takeover_s, 2)} s"
            f" (seen {sample.takeover_observed_s and round(sample.takeover_observed_s, 2)} s), first reconcile"
            f" {sample.first_reconcile_s and round(sample.first_reconcile_s, 2)} s, probe machine"
            f" {sample.probe_machine_s and round(sample.probe_machine_s, 2)} s; live workspaces {len(self.load.live)}"
        )
        if not ok:
            tails = f"\n--- {standby.name} ---\n{standby.tail(20)}"
            self.stuck.append(
                f"failover {k}: killed {leader.name}, successor {standby.name}: {sample}{tails}"
            )
        return ok


# ------------------------------------------------------------------------------------------- checks


async def final_checks(run: Run, timeout: float) -> dict[str, Any]:
    """Let deletions settle, wait for Ready, then count Machines, Deployments and Services."""
    client, audit = run.client, run.audit
    wss = audit.workspaces
    deleted = set(run.load.deleted)

    async def deletions_settled() -> bool:
        return not any(wss.store.get(f"{NS}/{n}") for n in deleted)

    await wait_for("deleted workspaces to go", deletions_settled, timeout, 1.0)
    live = {str(w["metadata"]["name"]) for w in wss.store.list()}

    async def all_ready() -> bool:
        return all(workspace_ready(w) for w in wss.store.list())

    ready_ok = await wait_for(f"{len(live)} workspaces Ready", all_ready, timeout, 1.0)
    not_ready = sorted(str(w["metadata"]["name"]) for w in wss.store.list() if not workspace_ready(w))

    def machines_of_deleted() -> list[tuple[str, str]]:
        out = []
        for m in audit.machines.store.list():
            ws = str((m["metadata"].get("labels") or {}).get(LABEL_WORKSPACE_NAME))
            if ws not in live:
                out.append((str(m["metadata"]["name"]), ws))
        return out

    async def no_new_orphans() -> bool:
        # Machines already known to have outlived their workspace are not waited for: nothing removes them.
        return all(name in audit.orphans for name, _ in machines_of_deleted())

    await wait_for("machines of deleted workspaces to go", no_new_orphans, timeout, 1.0)
    for name, ws in machines_of_deleted():
        audit.orphan(name, ws, "still exists after deletions settled")
    duplicates: list[str] = list(audit.duplicates.values())
    by_ws: dict[str, list[str]] = {}
    for m in audit.machines.store.list():
        labels = m["metadata"].get("labels") or {}
        by_ws.setdefault(str(labels.get(LABEL_WORKSPACE_NAME)), []).append(m["metadata"]["name"])
    for ws in sorted(live):
        want = sorted(machine_name(NS, ws, s) for s in range(COUNT))
        got = sorted(by_ws.get(ws, []))
        if got != want:
            duplicates.append(f"workspace {ws}: machines {got}, want {want}")

    # Deployments and Services: exactly the controller's per live workspace, none for a deleted one
    # (the garbage collector removes those by ownerReference; give it the same deadline).
    def child_problems(objs: list[Obj]) -> list[str]:
        owned: dict[str, set[tuple[str, str]]] = {}
        problems = []
        for o in objs:
            owners = [r for r in o["metadata"].get("ownerReferences") or [] if r.get("kind") == "Workspace"]
            if not owners:
                continue
            for r in owners:
                key = (str(o.get("kind")), str(o["metadata"]["name"]))
                owned.setdefault(str(r.get("name")), set()).add(key)
        for ws, kids in sorted(owned.items()):
            if ws not in live:
                problems.append(f"{sorted(kids)} still owned by deleted workspace {ws}")
        for ws in sorted(live):
            want = expected_children(ws)
            got = owned.get(ws, set())
            if got != want:
                problems.append(f"workspace {ws}: children {sorted(got)}, want {sorted(want)}")
        return problems

    async def children() -> list[Obj]:
        out: list[Obj] = []
        for res, kind in ((DEPLOYMENTS, "Deployment"), (SERVICES, "Service")):
            for o in (await client.list(res, NS)).get("items") or []:
                o["kind"] = kind
                out.append(o)
        return out

    async def children_clean() -> bool:
        return not child_problems(await children())

    await wait_for("Deployments/Services to settle", children_clean, timeout, 2.0)
    duplicates += child_problems(await children())
    return {
        "live_workspaces": len(live),
        "all_ready": ready_ok,
        "not_ready": not_ready[:20],
        "duplicates": duplicates,
        "orphans": list(audit.orphans.values()),
        "orphans_at_end": [name for name, _ in machines_of_deleted()],
        "machines_seen": len(audit.machine_names_seen),
    }


async def inject_duplicate(client: KubeClient, load: Load) -> None:
    """Create a second Machine for a live workspace under another name (checks that the audit fails)."""
    ws = load.live[-1]
    m = MachineEncoding().build(
        namespace=NS, workspace=ws, slot=0, instance_type=INSTANCE, match_labels=LABEL, storage="0"
    )
    m["metadata"]["name"] = f"dup-{ws}"
    m["spec"]["machineTemplateRef"]["name"] = f"dup-{ws}"
    await client.create(MACHINES, m)
    log(f"injected duplicate machine dup-{ws} for workspace {ws}")


# -------------------------------------------------------------------------------------------- main


async def bench(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    configure_logging(False, "warning")  # the bench's own informers: quiet, and never on stdout
    timings = (args.lease_duration, args.renew_deadline, args.retry_period)
    log_dir = Path(args.log_dir)
    log(f"logs in {log_dir}; lease {timings[0]} s, renew deadline {timings[1]} s, retry {timings[2]} s")
    cluster = start_cluster(NS, ELECTION_NS)
    fleet = Fleet(cluster, log_dir, timings, args.workers)
    t_start = time.monotonic()
    try:
        async with ApiClient(cluster.client_configuration()) as api:
            client = KubeClient(api)
            audit = Audit(Informer(client, WORKSPACES, namespace=NS), Informer(client, MACHINES))
            audit.install()
            for inf in (audit.workspaces, audit.machines):
                inf.start()
            load = Load(
                client,
                args.create_interval,
                args.max_live,
                args.delete_every,
                random.Random(args.seed),
                audit,
                args.min_delete_age,
            )
            run = Run(args, cluster, client, fleet, load, audit)
            load_task: asyncio.Task[None] | None = None
            try:
                for inf in (audit.workspaces, audit.machines):
                    if not await inf.wait_for_sync(60):
                        raise TimeoutError(f"informer on {inf.resource} did not sync")
                prov = await fleet.start_provisioner()
                await fleet.start_replica("a")
                await fleet.start_replica("b")
                for p in fleet.procs:
                    if not await wait_for(f"{p.name} /readyz", p.ready, 120):
                        raise RuntimeError(f"{p.name} not ready:\n{p.tail()}")
                audit.phase = "load before failover 1"
                load_task = asyncio.create_task(load.run(), name="load")
                await asyncio.sleep(args.warmup)  # some workspaces in flight before the first kill
                for k in range(1, args.failovers + 1):
                    if load_task.done():
                        await load_task  # surfaces the load generator's error
                    if not await run.failover(k):
                        break
                    if not prov.alive():
                        run.crashes.append(f"provisioner exited {prov.proc.returncode}:\n{prov.tail(15)}")
                        break
            finally:
                if load_task is not None:
                    load_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await load_task
            t_failovers = time.monotonic() - t_start
            log(f"{len(run.samples)} failovers in {t_failovers:.0f} s; load stopped, checking")
            run.check_crashes()
            if args.inject_duplicate:
                await inject_duplicate(client, load)
            checks = await final_checks(run, args.settle_timeout)
            for inf in (audit.workspaces, audit.machines):
                await inf.stop()
    finally:
        await fleet.stop_all()
        cluster.stop()

    (log_dir / "failover-samples.json").write_text(json.dumps([s.__dict__ for s in run.samples], indent=1))
    takeover = [s.takeover_s for s in run.samples if s.takeover_s is not None]
    first = [s.first_reconcile_s for s in run.samples if s.first_reconcile_s is not None]
    probe = [s.probe_machine_s for s in run.samples if s.probe_machine_s is not None]
    default = timings == DEFAULT_TIMINGS
    slow = [s.index for s in run.samples if max(s.takeover_s or 0.0, s.first_reconcile_s or 0.0) > TARGET_S]
    result: dict[str, Any] = {
        "failovers": len(run.samples),
        "failovers_requested": args.failovers,
        "lease_duration_s": timings[0],
        "renew_deadline_s": timings[1],
        "retry_period_s": timings[2],
        "takeover_s": summary(takeover),
        "first_reconcile_s": summary(first),
        "probe_machine_s": summary(probe),
        "over_20s": slow,
        "duplicates": len(checks["duplicates"]),
        "duplicate_details": checks["duplicates"][:20],
        "orphaned_machines": len(checks["orphans"]),
        "orphaned_machines_at_end": checks["orphans_at_end"][:20],
        "crashes": len(run.crashes),
        "stuck": len(run.stuck),
        "workspaces_created": load.created,
        "workspaces_deleted": len(load.deleted),
        "workspaces_live_at_end": checks["live_workspaces"],
        "all_ready_at_end": checks["all_ready"],
        "not_ready_at_end": checks["not_ready"],
        "machines_seen": checks["machines_seen"],
        "api_errors_in_load": load.errors,
        "wall_s": round(time.monotonic() - t_start, 1),
        "log_dir": str(log_dir),
    }
    for text in run.crashes + run.stuck + checks["duplicates"] + checks["orphans"]:
        print(f"finding: {text}", file=sys.stderr)
    ok = (
        not checks["duplicates"]
        and not checks["orphans"]
        and not run.crashes
        and not run.stuck
        and checks["all_ready"]
        and len(run.samples) == args.failovers
        and not (default and slow)
    )
    return result, ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--failovers", type=int, default=100)
    p.add_argument("--lease-duration", type=float, default=4.0)
    p.add_argument("--renew-deadline", type=float, default=3.0)
    p.add_argument("--retry-period", type=float, default=1.0)
    p.add_argument(
        "--default-timings",
        action="store_true",
        help="the controller's defaults (15 s lease, 10 s renew deadline, 2 s retry): the 20 s target applies",
    )
    p.add_argument("--workers", type=int, default=5, help="controller workers per replica")
    p.add_argument("--create-interval", type=float, default=1.0, help="seconds between workspace creations")
    p.add_argument("--max-live", type=int, default=25, help="delete the oldest workspace past this many")
    p.add_argument("--delete-every", type=int, default=3, help="also delete a random one every Nth tick")
    p.add_argument(
        "--min-delete-age",
        type=float,
        default=3.0,
        help="delete only workspaces at least this old (0 also deletes ones the controller is just finalizing)",
    )
    p.add_argument(
        "--kill-jitter",
        type=float,
        default=1.0,
        help="random 0..N s wait before each kill (renew-cycle phase)",
    )
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the first kill")
    p.add_argument("--settle-timeout", type=float, default=180.0, help="deadline of each final wait")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--inject-duplicate",
        action="store_true",
        help="self-check: add a second Machine for one workspace before the final checks (must exit 1)",
    )
    p.add_argument(
        "--log-dir", default="", help="process logs and per-failover samples (default: a temp dir)"
    )
    args = p.parse_args()
    if args.default_timings:
        args.lease_duration, args.renew_deadline, args.retry_period = DEFAULT_TIMINGS
    if args.failovers < 1:
        p.error("--failovers must be at least 1")
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="kaito-failover-")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    result, ok = asyncio.run(bench(args))
    t, f, m = result["takeover_s"], result["first_reconcile_s"], result["probe_machine_s"]
    print(
        f"election timings: lease {result['lease_duration_s']} s, renew deadline {result['renew_deadline_s']} s,"
        f" retry {result['retry_period_s']} s"
    )
    print(f"failovers: {result['failovers']}/{result['failovers_requested']} (kill -9 of the leader)")
    print(f"takeover (kill -> standby holds the lease): p50 {t['p50']} s, p95 {t['p95']} s, max {t['max']} s")
    print(
        f"first reconcile (kill -> standby's reconcile counter moves): p50 {f['p50']} s, p95 {f['p95']} s,"
        f" max {f['max']} s (target <= 20 with default timings)"
    )
    print(
        f"probe workspace's Machine (kill -> created): p50 {m['p50']} s, p95 {m['p95']} s, max {m['max']} s"
    )
    print(
        f"load: {result['workspaces_created']} workspaces created, {result['workspaces_deleted']} deleted,"
        f" {result['workspaces_live_at_end']} left, all Ready at the end: {result['all_ready_at_end']}"
    )
    print(f"duplicates (Machines, Deployments, Services): {result['duplicates']} (target 0)")
    print(f"orphaned Machines (outlived their deleted workspace): {result['orphaned_machines']} (target 0)")
    print(f"replica crashes: {result['crashes']}, stuck failovers: {result['stuck']}")
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
