"""Fault injection (SPEC §10): both controllers behind a proxy that fails API calls and cuts watches.

On a fresh full local cluster (etcd, apiserver, controller-manager, scheduler, kwok), the workspace
controller (``python -m kaito --provisioning machine --no-webhook``) and the gpu-provisioner (``python -m
provisioner --cloud kwok``) run as real processes whose kubeconfig points at ``bench/fault_proxy.py``: a
TLS reverse proxy in front of the apiserver that fails a fraction ``p`` (default 10%) of non-watch
requests -- evenly 500, 429 (``Retry-After: 1``) or a connection reset after the apiserver served the
request (a lost response) -- and cuts every watch after a random 1-10 s (half a clean end, half a reset).
kwok, the controller-manager, the scheduler and this script talk to the apiserver directly.

The script applies N workspaces (phi-3 on Standard_NC6s_v3 with a labelSelector, so each needs a
Machine -> kwok node; the first ``--multi`` of them with ``resource.count: 2``) and measures:

* time until every workspace is ``WorkspaceReady=True`` (deadline ``--timeout``);
* no duplicate children: exactly one Deployment, Service and ConfigMap owned by each workspace, exactly
  ``count`` Machines per workspace (by its workspace labels) with the deterministic names, no other
  Machine, and exactly one kwok Node per Machine;
* after deleting every workspace: time until no Workspace, Machine or kwok Node (= agent pool) made for
  them is left (deadline ``--delete-timeout``);
* faults injected by kind, the controllers' own error/retry counters, how long their informers sat
  out after list/watch errors (their caches are stale meanwhile), and that neither process died.

Workspaces that do not converge are still checked for duplicates (nothing may exist twice), and the
report shows their Ready reason, their Machines' conditions and the log lines naming those Machines.

With ``--compare`` the same run is repeated at p = 0 (watches still cut unless ``--no-cut-watches``)
in a new namespace with new controller processes, so the cost of the faults is visible.

Usage: python bench/chaos.py [--n 50] [--multi 2] [--p 0.1] [--compare] [--seed 1] [--timeout 600]
Targets: every workspace converges, no duplicate children, delete leaves nothing behind (exit 1 if not).
Logs of each process go to ``--log-dir`` (default /tmp/chaos-<pid>).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import re
import signal
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubernetes_asyncio.client import ApiClient

from bench.common import REPO, die_with_parent, retrying, start_cluster, workspace_ready
from bench.fault_proxy import FaultProxy
from hack.localcluster import LocalCluster, free_port
from kaito.api.workspace import LABEL_WORKSPACE_NAME, LABEL_WORKSPACE_NAMESPACE
from kaito.machine.machine import MACHINES, machine_name
from kaito.runtime.kube import CONFIGMAPS, DEPLOYMENTS, NAMESPACES, NODES, SERVICES, KubeClient
from kaito.workspace.reconciler import WORKSPACES

INSTANCE = "Standard_NC6s_v3"
PRESET = "phi-3-mini-4k-instruct"
LABEL = {"apps": "chaos"}
AGENTPOOL_LABEL = "agentpool"
METRICS_OF_INTEREST = (
    "controller_runtime_reconcile_errors_total",
    "controller_runtime_reconcile_panics_total",
    "kaito_informer_watch_restarts_total",
    "kaito_informer_relists_total",
)

Obj = dict[str, Any]


def workspace(namespace: str, i: int, count: int) -> Obj:
    """Workspace ``i``: phi-3 on ``count`` NC6s_v3 nodes the controller must ask Machines for."""
    return {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": f"ws-{i:04d}", "namespace": namespace},
        "resource": {
            "count": count,
            "instanceType": INSTANCE,
            "labelSelector": {"matchLabels": LABEL},
        },
        "inference": {"preset": {"name": PRESET}},
    }


@dataclass
class Proc:
    """A controller process with its log and its probe/metrics ports."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    probe_port: int
    metrics_port: int

    def alive(self) -> bool:
        return self.proc.returncode is None

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def mentioning(self, text: str) -> list[str]:
        """Log lines containing ``text``."""
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [line for line in log.splitlines() if text in line]

    def backoffs(self) -> list[float]:
        """Every informer list/watch backoff delay the process logged (its cache is stale meanwhile)."""
        out = []
        for line in self.mentioning("backing off"):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                out.append(float(json.loads(line)["delay"]))
        return out

    def problems(self, limit: int = 30) -> list[str]:
        """Log lines at error level or above, and tracebacks (the evidence a report needs)."""
        out = []
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        for line in text.splitlines():
            if "Traceback" in line or re.search(r'"level": ?"(error|critical)"', line):
                out.append(line)
        return out[-limit:] if limit else out

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def spawn(name: str, argv: list[str], env: dict[str, str], log_path: Path) -> Proc:
    """Start ``argv`` (its output to ``log_path``); the ports are read back from the argv."""
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    probe = metrics = 0
    for flag, value in itertools.pairwise(argv):
        if flag in ("--health-probe-bind-address", "--probe-port"):
            probe = int(value.rsplit(":", 1)[-1])
        if flag in ("--metrics-bind-address", "--metrics-port"):
            metrics = int(value.rsplit(":", 1)[-1])
    return Proc(name, proc, log_path, probe, metrics)


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return int(r.status), str(r.read().decode())


async def wait_ready(p: Proc, timeout: float) -> float:
    """Wait until the process answers /readyz (caches synced through the proxy); the seconds it took."""
    t0 = time.monotonic()
    while True:
        if not p.alive():
            raise RuntimeError(f"{p.name} exited with {p.proc.returncode} before ready:\n{p.tail()}")
        with contextlib.suppress(OSError):
            status, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{p.probe_port}/readyz", 2.0)
            if status == 200:
                return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{p.name} not ready after {timeout}s:\n{p.tail()}")
        await asyncio.sleep(0.2)


async def scrape(p: Proc) -> dict[str, float]:
    """The process's counters of interest, summed over labels; ``rest_client_requests_total`` by code."""
    try:
        _, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{p.metrics_port}/metrics", 10.0)
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        head, value = line.rsplit(" ", 1)
        name = head.split("{", 1)[0]
        if name == "rest_client_requests_total":
            code = re.search(r'code="([^"]*)"', head)
            name = f"rest_client_requests_total{{code={code.group(1) if code else '?'}}}"
        elif name not in METRICS_OF_INTEREST:
            continue
        out[name] = out.get(name, 0.0) + float(value)
    return out


def owner_workspace(obj: Obj) -> str | None:
    """The name of the Workspace owning ``obj``, if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Workspace":
            return str(ref.get("name"))
    return None


@dataclass
class Phase:
    """One run: a namespace, a proxy at probability ``p``, both controllers, N workspaces."""

    cluster: LocalCluster
    client: KubeClient
    args: argparse.Namespace
    namespace: str
    p: float
    log_dir: Path
    procs: list[Proc] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        """Record a failed check (printed by :func:`report`)."""
        self.failures.append(msg)

    def counts(self) -> dict[str, int]:
        """Nodes per workspace: ``--multi`` of them 2, the rest 1."""
        return {f"ws-{i:04d}": (2 if i < self.args.multi else 1) for i in range(self.args.n)}

    async def start_controllers(self, kubeconfig: Path) -> None:
        env = self.cluster.env()
        env["KUBECONFIG"] = str(kubeconfig)
        ctrl = [
            sys.executable,
            "-m",
            "kaito",
            "--kubeconfig",
            str(kubeconfig),
            "--provisioning",
            "machine",
            "--no-webhook",
            "--namespace",
            self.namespace,
            "--workers",
            str(self.args.workers),
            "--image-registry",
            "registry.invalid/kaito",
            "--metrics-bind-address",
            f"127.0.0.1:{free_port()}",
            "--health-probe-bind-address",
            f"127.0.0.1:{free_port()}",
            "--log-format",
            "json",
            "--log-level",
            self.args.log_level,
        ]
        prov = [
            sys.executable,
            "-m",
            "provisioner",
            "--cloud",
            "kwok",
            "--kubeconfig",
            str(kubeconfig),
            "--no-leader-elect",
            "--bind-address",
            "127.0.0.1",
            "--metrics-port",
            str(free_port()),
            "--probe-port",
            str(free_port()),
            "--machine-selector",
            f"{LABEL_WORKSPACE_NAMESPACE}={self.namespace}",
            # No orphan sweeps: a Node left behind must show up here, not be swept up later.
            "--gc-interval",
            "0",
            "--log-format",
            "json",
            "--log-level",
            self.args.log_level,
        ]
        self.procs.append(
            await spawn("controller", ctrl, env, self.log_dir / f"{self.namespace}-controller.log")
        )
        self.procs.append(
            await spawn("provisioner", prov, env, self.log_dir / f"{self.namespace}-provisioner.log")
        )
        for p in self.procs:
            took = await wait_ready(p, 120)
            print(f"  [{self.namespace}] {p.name} ready after {took:.1f} s", file=sys.stderr)

    def check_alive(self) -> None:
        for p in self.procs:
            if not p.alive():
                raise RuntimeError(
                    f"{p.name} exited with {p.proc.returncode} (log {p.log_path}):\n{p.tail()}"
                )

    async def wait_until(
        self, what: str, fn: Callable[[], Awaitable[tuple[bool, str]]], timeout: float
    ) -> float | None:
        """Poll ``fn`` (done, progress) every 0.5 s until done; the seconds it took, None on timeout."""
        t0 = time.monotonic()
        last = ""
        while True:
            self.check_alive()
            done, progress = await fn()
            if progress != last:
                print(
                    f"  [{self.namespace}] {what}: {progress} ({time.monotonic() - t0:.1f} s)",
                    file=sys.stderr,
                )
                last = progress
            if done:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                self.fail(f"{what}: not done after {timeout}s ({progress})")
                return None
            await asyncio.sleep(0.5)

    async def machines(self) -> list[Obj]:
        """Every Machine labelled for this namespace."""
        items: list[Obj] = await retrying(
            lambda: self.client.list_all(
                MACHINES, label_selector=f"{LABEL_WORKSPACE_NAMESPACE}={self.namespace}"
            )
        )
        return items

    def expected_machines(self) -> dict[str, str]:
        """Machine name -> workspace name, for every Machine this phase's workspaces should have."""
        return {machine_name(self.namespace, ws, s): ws for ws, c in self.counts().items() for s in range(c)}

    async def nodes(self) -> list[Obj]:
        """Every kwok Node made for a Machine of this namespace.

        The provisioner copies the Machine's labels onto its Node; a Node whose agent pool is one of our
        Machine names counts too, so one that lost its labels is still found.
        """
        items: list[Obj] = await retrying(lambda: self.client.list_all(NODES))
        expected = self.expected_machines()
        out = []
        for node in items:
            labels = (node.get("metadata") or {}).get("labels") or {}
            if not str((node.get("spec") or {}).get("providerID") or "").startswith("kwok://"):
                continue
            if (
                labels.get(LABEL_WORKSPACE_NAMESPACE) == self.namespace
                or labels.get(AGENTPOOL_LABEL) in expected
            ):
                out.append(node)
        return out

    async def check_children(self, ready_names: set[str]) -> None:
        """No duplicates: one Deployment/Service/ConfigMap per workspace, ``count`` Machines, one Node each.

        Exact counts for the workspaces in ``ready_names``; for the others (not converged) only that
        nothing exists twice.
        """
        counts = self.counts()

        def check(what: str, got: int, want: int, ws: str) -> None:
            if got > want or (got != want and ws in ready_names):
                self.fail(f"{what}: {got} (want {want})")

        for res in (DEPLOYMENTS, SERVICES, CONFIGMAPS):
            items: list[Obj] = await retrying(functools.partial(self.client.list_all, res, self.namespace))
            per: Counter[str] = Counter()
            for obj in items:
                owner = owner_workspace(obj)
                labelled = ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_WORKSPACE_NAME)
                if owner is None and labelled is None:
                    continue  # not ours (kube-root-ca.crt)
                if owner is None:
                    self.fail(
                        f"{res.kind} {obj['metadata']['name']} is labelled for {labelled} but has no owner"
                    )
                    continue
                per[owner] += 1
            for name in counts:
                check(f"workspace {name}: {res.kind}s", per[name], 1, name)
            for name in set(per) - set(counts):
                self.fail(f"{per[name]} {res.kind}s owned by unknown workspace {name}")

        machines = await self.machines()
        expected = self.expected_machines()
        per_ws: Counter[str] = Counter()
        for m in machines:
            name = str(m["metadata"]["name"])
            ws = ((m.get("metadata") or {}).get("labels") or {}).get(LABEL_WORKSPACE_NAME)
            per_ws[str(ws)] += 1
            if expected.get(name) != ws:
                self.fail(f"unexpected Machine {name} (labelled for workspace {ws})")
        for ws, c in counts.items():
            check(f"workspace {ws}: Machines", per_ws[ws], c, ws)
        # Machines that lost their labels would escape the selector: every Machine must be known.
        everything: list[Obj] = await retrying(lambda: self.client.list_all(MACHINES))
        for m in everything:
            labels = (m.get("metadata") or {}).get("labels") or {}
            if LABEL_WORKSPACE_NAMESPACE not in labels:
                self.fail(f"Machine {m['metadata']['name']} without a workspace namespace label")

        nodes = await self.nodes()
        per_pool = Counter(
            str(((n.get("metadata") or {}).get("labels") or {}).get(AGENTPOOL_LABEL)) for n in nodes
        )
        for name, ws in expected.items():
            check(f"Machine {name} (workspace {ws}): Nodes", per_pool[name], 1, ws)
        for pool in set(per_pool) - set(expected):
            self.fail(f"{per_pool[pool]} Node(s) for unexpected agent pool {pool}")

    async def explain_not_ready(self) -> None:
        """Record, for each workspace not ready, its reason, its Machines' state and what the logs say."""
        items: list[Obj] = await retrying(lambda: self.client.list_all(WORKSPACES, self.namespace))
        machines = await self.machines()
        for w in items:
            if workspace_ready(w):
                continue
            name = w["metadata"]["name"]
            ready_cond: Obj = next(
                (
                    c
                    for c in (w.get("status") or {}).get("conditions") or []
                    if c.get("type") == "WorkspaceReady"
                ),
                {},
            )
            self.fail(f"workspace {name} not ready: {ready_cond.get('reason')}: {ready_cond.get('message')}")
            for m in machines:
                if ((m.get("metadata") or {}).get("labels") or {}).get(LABEL_WORKSPACE_NAME) != name:
                    continue
                mname = m["metadata"]["name"]
                conds = {
                    c.get("type"): f"{c.get('status')}/{c.get('reason')}"
                    for c in (m.get("status") or {}).get("conditions") or []
                }
                self.fail(f"  its Machine {mname}: {conds}")
                for p in self.procs:
                    for line in p.mentioning(mname)[-6:]:
                        self.fail(f"    {p.name} log: {compact(line)}")

    async def run(self, proxy: FaultProxy) -> dict[str, Any]:
        ns, args = self.namespace, self.args
        await retrying(lambda: self.client.create(NAMESPACES, {"metadata": {"name": ns}}))
        proxy.p = self.p
        proxy.faults.clear()
        kubeconfig = proxy.write_kubeconfig(self.cluster.kubeconfig, self.log_dir / f"{ns}-kubeconfig")
        await self.start_controllers(kubeconfig)
        counts = self.counts()

        # ---- apply and converge ------------------------------------------------------------------
        t0 = time.monotonic()
        sem = asyncio.Semaphore(10)

        async def create(i: int, c: int) -> None:
            async with sem:
                await retrying(lambda: self.client.create(WORKSPACES, workspace(ns, i, c), ns))

        await asyncio.gather(*(create(i, c) for i, c in enumerate(counts.values())))

        async def all_ready() -> tuple[bool, str]:
            items: list[Obj] = await retrying(lambda: self.client.list_all(WORKSPACES, ns))
            n_ready = sum(1 for w in items if workspace_ready(w))
            return n_ready == len(counts), f"{n_ready}/{len(counts)} WorkspaceReady"

        t_ready = await self.wait_until("converge", all_ready, args.timeout)
        faults_ready = proxy.fault_counts()
        if t_ready is not None:
            t_ready = time.monotonic() - t0
        else:
            await self.explain_not_ready()
        wss: list[Obj] = await retrying(lambda: self.client.list_all(WORKSPACES, ns))
        await self.check_children({w["metadata"]["name"] for w in wss if workspace_ready(w)})

        # ---- delete and clean up -----------------------------------------------------------------
        t1 = time.monotonic()

        async def delete(name: str) -> None:
            async with sem:
                await retrying(functools.partial(self.client.delete, WORKSPACES, name, ns))

        await asyncio.gather(*(delete(name) for name in counts))

        async def all_gone() -> tuple[bool, str]:
            wss = await retrying(lambda: self.client.list_all(WORKSPACES, ns))
            machines = await self.machines()
            nodes = await self.nodes()
            left = len(wss) + len(machines) + len(nodes)
            return left == 0, f"{len(wss)} Workspaces, {len(machines)} Machines, {len(nodes)} Nodes left"

        t_delete = await self.wait_until("delete", all_gone, args.delete_timeout)
        if t_delete is not None:
            t_delete = time.monotonic() - t1
        else:
            for m in await self.machines():
                self.fail(f"Machine {m['metadata']['name']} left: {json.dumps(m.get('status') or {})[:400]}")
            for n in await self.nodes():
                self.fail(
                    f"Node {n['metadata']['name']} left (deletionTimestamp {n['metadata'].get('deletionTimestamp')})"
                )

        metrics = {p.name: await scrape(p) for p in self.procs}
        problems = {p.name: p.problems() for p in self.procs}
        return {
            "p": self.p,
            "namespace": ns,
            "all_ready_s": round(t_ready, 2) if t_ready is not None else None,
            "delete_s": round(t_delete, 2) if t_delete is not None else None,
            "faults_until_ready": faults_ready,
            "faults_total": proxy.fault_counts(),
            "proxied_requests": proxy.faults["requests"],
            "proxied_watches": proxy.faults["watches"],
            "controller_metrics": metrics,
            "error_log_lines": {k: len(v) for k, v in problems.items()},
            "informer_backoffs": {p.name: backoff_summary(p.backoffs()) for p in self.procs},
            "failures": list(self.failures),
            "_problems": problems,
        }

    async def stop(self) -> None:
        for p in reversed(self.procs):
            await p.stop()


def backoff_summary(delays: list[float]) -> dict[str, float]:
    """How often and how long an informer sat out after a list/watch error."""
    return {
        "count": len(delays),
        "over_20s": sum(1 for d in delays if d > 20),
        "max_s": round(max(delays), 1) if delays else 0.0,
    }


def compact(line: str) -> str:
    """A JSON log line without its bookkeeping fields, for a report."""
    try:
        rec = json.loads(line)
    except ValueError:
        return line[:300]
    ts = str(rec.pop("timestamp", ""))[11:23]
    level, msg = rec.pop("level", ""), rec.pop("msg", "")
    for key in ("reconcile_id", "namespace", "key", "name", "controller"):
        rec.pop(key, None)
    return f"{ts} {level} {msg} {json.dumps(rec)}"[:300]


def report(r: dict[str, Any]) -> None:
    tag = f"p={r['p']}"
    print(f"[{tag}] time to all {r['n']} WorkspaceReady: {r['all_ready_s']} s")
    print(f"[{tag}] time until no Workspace/Machine/Node is left after delete: {r['delete_s']} s")
    print(f"[{tag}] faults injected until all ready: {r['faults_until_ready']}")
    print(
        f"[{tag}] faults injected in all: {r['faults_total']} over {r['proxied_requests']} requests, {r['proxied_watches']} watches"
    )
    for name, m in r["controller_metrics"].items():
        print(f"[{tag}] {name} counters: {m}")
    for name, b in r["informer_backoffs"].items():
        print(
            f"[{tag}] {name} informer backoffs after list/watch errors: {b['count']}, "
            f"{b['over_20s']} over 20 s, longest {b['max_s']} s (the cache is stale meanwhile)"
        )
    for name, lines in r.pop("_problems").items():
        if lines:
            print(f"[{tag}] {name}: {len(lines)} error log lines, last ones:")
            for line in lines[-5:]:
                print(f"    {compact(line)}")
    failed = len(r["failures"])
    print(f"[{tag}] checks: {f'{failed} FAILED' if failed else 'ok'}")
    for f in r["failures"][:100]:
        print(f"    {f}")


async def run_phases(cluster: LocalCluster, args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """The fault run (and the p = 0 run with ``--compare``) against one cluster, through one proxy."""
    proxy = FaultProxy.for_cluster(
        cluster,
        p=args.p,
        cut_watches=not args.no_cut_watches,
        seed=args.seed,
    )
    results: list[dict[str, Any]] = []
    await proxy.start()
    try:
        async with ApiClient(cluster.client_configuration()) as api:
            client = KubeClient(api)
            plan = [("chaos", args.p)] + ([("chaos-p0", 0.0)] if args.compare else [])
            for ns, p in plan:
                print(
                    f"run p={p}: {args.n} workspaces in namespace {ns} (logs in {log_dir})", file=sys.stderr
                )
                phase = Phase(cluster, client, args, ns, p, log_dir)
                try:
                    r = await phase.run(proxy)
                except (RuntimeError, TimeoutError) as e:
                    # A controller died or never became ready: a finding, reported with its log.
                    phase.fail(str(e))
                    r = {
                        "p": p,
                        "namespace": ns,
                        "all_ready_s": None,
                        "delete_s": None,
                        "faults_until_ready": {},
                        "faults_total": proxy.fault_counts(),
                        "proxied_requests": proxy.faults["requests"],
                        "proxied_watches": proxy.faults["watches"],
                        "controller_metrics": {},
                        "error_log_lines": {},
                        "informer_backoffs": {q.name: backoff_summary(q.backoffs()) for q in phase.procs},
                        "failures": list(phase.failures),
                        "_problems": {q.name: q.problems() for q in phase.procs},
                    }
                finally:
                    await phase.stop()
                results.append({"n": args.n, **r})
                report(results[-1])
    finally:
        await proxy.stop()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50, help="workspaces")
    ap.add_argument("--multi", type=int, default=2, help="how many of them have resource.count 2")
    ap.add_argument("--p", type=float, default=0.10, help="probability a non-watch request fails")
    ap.add_argument("--compare", action="store_true", help="also run at p=0 (watches still cut)")
    ap.add_argument("--no-cut-watches", action="store_true", help="pass watches through uncut")
    ap.add_argument("--seed", type=int, default=None, help="the proxy's random seed")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for every workspace to be ready")
    ap.add_argument("--delete-timeout", type=float, default=300.0)
    ap.add_argument("--workers", type=int, default=5, help="controller workers")
    ap.add_argument("--log-level", default="info", help="of both controllers")
    ap.add_argument("--log-dir", default=f"/tmp/chaos-{os.getpid()}")
    args = ap.parse_args()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)

    cluster = start_cluster()
    try:
        results = asyncio.run(run_phases(cluster, args, log_dir))
    finally:
        cluster.stop()

    ok = all(not r["failures"] for r in results)
    summary: dict[str, Any] = {"n": args.n, "multi": args.multi, "seed": args.seed, "ok": ok}
    for r in results:
        key = "faults" if r["p"] > 0 else "p0"
        summary[f"{key}_p"] = r["p"]
        summary[f"{key}_all_ready_s"] = r["all_ready_s"]
        summary[f"{key}_delete_s"] = r["delete_s"]
        summary[f"{key}_injected"] = r["faults_total"]
        summary[f"{key}_failures"] = len(r["failures"])
        summary[f"{key}_longest_informer_backoff_s"] = max(
            (b["max_s"] for b in r["informer_backoffs"].values()), default=0.0
        )
    if len(results) == 2 and results[0]["all_ready_s"] and results[1]["all_ready_s"]:
        summary["ready_ratio_faults_vs_p0"] = round(results[0]["all_ready_s"] / results[1]["all_ready_s"], 2)
    print(f"all checks: {'ok' if ok else 'FAILED'}")
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
