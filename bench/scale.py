"""Workspace controller at scale (SPEC §10): N workspaces on pre-existing kwok GPU nodes.

Two runs, each on a fresh full local cluster (etcd, apiserver, controller-manager, scheduler, kwok) with
the same pre-existing kwok GPU nodes (8 GPUs each; workspace ``i`` names node ``i // 8`` in
``preferredNodes``):

* **bare**: a script creates each workspace's children (Service, ConfigMap, Deployment -- the very
  manifests the controller builds, without ownerReferences) directly, and waits until every Deployment
  has a ready replica;
* **operator**: ``kaito-controller --provisioning byo`` runs as a process; the script creates the N
  Workspaces and waits until every one reports ``WorkspaceReady=True``.

Then, on the operator run: create -> Deployment latency at idle (workspaces created one at a time, the
Deployment's ADDED event timed on a watch), write requests per minute at idle (the controller's own
``rest_client_requests_total`` for POST/PUT/PATCH/DELETE over ``--idle-seconds``) and controller RSS.

Usage: python bench/scale.py [--n 1000] [--workers 5] [--idle-seconds 60] [--latency-samples 50]
Targets: ratio <= 1.5, idle writes 0/min, RSS <= 200 MB, latency p50 <= 50 ms, p99 <= 250 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import statistics
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubernetes_asyncio.client import ApiClient

from bench.common import REPO, die_with_parent, retrying, scrape, start_cluster, workspace_ready
from hack.localcluster import LocalCluster, free_port
from kaito.api.workspace import Workspace
from kaito.presets.registry import default_registry
from kaito.presets.skus import default_sku_catalog
from kaito.runtime.informer import Informer
from kaito.runtime.kube import CONFIGMAPS, DEPLOYMENTS, NAMESPACES, SERVICES, KubeClient, Resource
from kaito.workspace import manifests as mf
from kaito.workspace.reconciler import WORKSPACES

GPUS_PER_NODE = 8
NS = "bench"
INSTANCE = "Standard_NC6s_v3"
LABEL = {"apps": "bench"}


def workspace(i: int) -> dict[str, Any]:
    """Workspace ``i`` (phi-3, one node, preferring its pre-existing kwok node)."""
    return {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": f"ws-{i:05d}", "namespace": NS},
        "resource": {
            "instanceType": INSTANCE,
            "labelSelector": {"matchLabels": LABEL},
            "preferredNodes": [f"bench-node-{i // GPUS_PER_NODE:04d}"],
        },
        "inference": {"preset": {"name": "phi-3-mini-4k-instruct"}},
    }


def bare_children(i: int) -> list[tuple[Any, dict[str, Any]]]:
    """The controller's manifests for workspace ``i``, without ownerReferences (no owner exists)."""
    raw = workspace(i)
    raw["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    ws = Workspace.model_validate(raw)
    preset = default_registry().get("phi-3-mini-4k-instruct")
    wl = mf.build_inference(
        ws,
        preset,
        mf.ManifestOptions(registry="registry.invalid/kaito"),
        sku=default_sku_catalog().get(INSTANCE),
        nodes=raw["resource"]["preferredNodes"],
    )
    out = []
    for obj in wl.objects():
        obj["metadata"].pop("ownerReferences", None)
        res = {"Service": SERVICES, "ConfigMap": CONFIGMAPS, "Deployment": DEPLOYMENTS}[obj["kind"]]
        out.append((res, obj))
    return out


async def bounded(n: int, concurrency: int, fn: Callable[[int], Awaitable[None]]) -> None:
    """Run ``fn(0..n-1)`` with at most ``concurrency`` in flight."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await fn(i)

    await asyncio.gather(*(one(i) for i in range(n)))


def start_bench_cluster(n: int) -> LocalCluster:
    """The shared cluster plus the bench namespace and enough 8-GPU kwok nodes for ``n`` workspaces."""
    cluster = start_cluster(NS)
    nodes = (n + GPUS_PER_NODE - 1) // GPUS_PER_NODE
    for j in range(nodes):
        cluster.create_kwok_node(
            f"bench-node-{j:04d}",
            labels={**LABEL, "node.kubernetes.io/instance-type": INSTANCE},
            gpus=GPUS_PER_NODE,
            taints=[{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
        )
    cluster.kubectl("wait", "--for=condition=Ready", "--timeout=120s", "nodes", "-l", "apps=bench")
    return cluster


# Progress is read from informers (one LIST, then a watch), never by polling LISTs: a LIST of 1,000
# objects every 250 ms costs the apiserver more than the work being measured, and costs the operator
# run (which would need two) more than the bare run.


async def count_ready_deployments(deployments: Informer) -> int:
    return sum(
        1 for d in deployments.store.list() if int((d.get("status") or {}).get("readyReplicas") or 0) >= 1
    )


DEPLOYMENTS_SEEN: list[tuple[float, int]] = []


async def count_ready_workspaces(workspaces: Informer, deployments: Informer) -> int:
    # Also note how many Deployments exist: shows whether the controller or the pipeline after it lags.
    DEPLOYMENTS_SEEN.append((time.monotonic(), len(deployments.store.list())))
    return sum(1 for w in workspaces.store.list() if workspace_ready(w))


@contextlib.asynccontextmanager
async def informers(client: KubeClient, *resources: Resource) -> AsyncIterator[list[Informer]]:
    """Synced informers on ``resources`` in the bench namespace, stopped on exit."""
    infs = [Informer(client, res, namespace=NS) for res in resources]
    for inf in infs:
        inf.start()
    try:
        for inf in infs:
            if not await inf.wait_for_sync(60):
                raise TimeoutError(f"informer on {inf.resource} did not sync")
        yield infs
    finally:
        for inf in infs:
            await inf.stop()


def apiserver_profile(cluster: LocalCluster, seconds: int, path: str) -> None:
    """Save the apiserver's CPU profile over the next ``seconds`` (pprof, read with ``go tool pprof``)."""
    req = urllib.request.Request(f"{cluster.server}/debug/pprof/profile?seconds={seconds}")
    req.add_header("Authorization", f"Bearer {cluster.token}")
    with urllib.request.urlopen(req, context=cluster._ssl_context(), timeout=seconds + 60) as r:
        Path(path).write_bytes(r.read())


def start_profile(cluster: LocalCluster, args: argparse.Namespace, run: str) -> asyncio.Task[None] | None:
    """With ``--apiserver-profile``: the apiserver's CPU profile of this run, taken in a thread."""
    if not args.apiserver_profile:
        return None
    path = f"{args.apiserver_profile}.{run}"
    return asyncio.create_task(
        asyncio.to_thread(apiserver_profile, cluster, args.apiserver_profile_seconds, path)
    )


def component_cpu(cluster: LocalCluster) -> dict[str, float]:
    """CPU seconds (user + system) each cluster process has used so far."""
    out: dict[str, float] = {}
    for name, comp in cluster.components.items():
        if comp.proc is not None and comp.proc.poll() is None:
            out[name] = cpu_seconds(comp.proc.pid)
    out["bench"] = cpu_seconds(os.getpid())
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 1) for k in after}


async def wait_count(what: str, fn: Callable[[], Awaitable[int]], n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        got = await fn()
        if got != last:
            print(f"  {what}: {got}/{n}", file=sys.stderr)
            last = got
        if got >= n:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {got}/{n} after {timeout}s")
        await asyncio.sleep(0.25)


async def bare_run(n: int, args: argparse.Namespace) -> float:
    concurrency, timeout = args.concurrency, args.timeout
    cluster = start_bench_cluster(n)
    try:
        async with ApiClient(cluster.client_configuration()) as api:
            client = KubeClient(api)
            children = [bare_children(i) for i in range(n)]
            async with informers(client, DEPLOYMENTS) as (deployments,):
                cpu0 = component_cpu(cluster)
                profiling = start_profile(cluster, args, "bare")
                t0 = time.monotonic()

                async def create(i: int) -> None:
                    for res, obj in children[i]:
                        await retrying(lambda res=res, obj=obj: client.create(res, obj, NS))

                await bounded(n, concurrency, create)
                print(f"  bare: all created after {time.monotonic() - t0:.2f} s", file=sys.stderr)
                await wait_count(
                    "bare: deployments ready", lambda: count_ready_deployments(deployments), n, timeout
                )
                elapsed = time.monotonic() - t0
                cpu = cpu_delta(cpu0, component_cpu(cluster))
                if profiling is not None:
                    await profiling
            print(f"  bare: CPU seconds by process: {cpu}", file=sys.stderr)
            print(f"  bare: apiserver writes by resource: {apiserver_writes(cluster)}", file=sys.stderr)
            print(f"  bare: watch events by resource: {apiserver_watch_events(cluster)}", file=sys.stderr)
            return elapsed
    finally:
        cluster.stop()


def apiserver_watch_events(cluster: LocalCluster) -> dict[str, float]:
    """Watch events the apiserver sent, by resource (to every watcher: controllers, kwok, the script)."""
    _, text = cluster.request("GET", "/metrics", timeout=30)
    out: dict[str, float] = {}
    for line in str(text).splitlines():
        if line.startswith("apiserver_watch_events_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            key = labels.get("resource", "?")
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def apiserver_writes(cluster: LocalCluster) -> dict[str, float]:
    """Mutating requests the apiserver served, by resource (everyone's: controllers, kwok, the script)."""
    _, text = cluster.request("GET", "/metrics", timeout=30)
    out: dict[str, float] = {}
    for line in str(text).splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if labels.get("verb") in ("POST", "PUT", "PATCH", "DELETE", "CREATE", "UPDATE", "APPLY"):
            key = (
                f"{labels.get('resource')}{'/' + labels['subresource'] if labels.get('subresource') else ''}"
            )
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def writes(metrics: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        m = re.match(
            r'rest_client_requests_total\{code="[^"]*",host="[^"]*",method="(\w+)"\} ([0-9.e+]+)', line
        )
        if m and m.group(1) in ("POST", "PUT", "PATCH", "DELETE"):
            total += float(m.group(2))
    return total


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def latency_samples(client: KubeClient, samples: int, start: int) -> list[float]:
    """Create workspaces one at a time; time POST -> the Deployment's ADDED event on a watch."""
    seen: dict[str, float] = {}
    arrived: dict[str, asyncio.Event] = {}
    rv = (await client.list(DEPLOYMENTS, NS, limit=1)).get("metadata", {}).get("resourceVersion")
    resp = await client.open_stream(
        DEPLOYMENTS.path(NS), query={"watch": True, "resourceVersion": rv, "allowWatchBookmarks": False}
    )

    async def watch() -> None:
        async for line in resp.content:
            if not line.strip():
                continue
            ev = json.loads(line)
            if ev.get("type") == "ADDED":
                name = ev["object"]["metadata"]["name"]
                seen.setdefault(name, time.monotonic())
                arrived.setdefault(name, asyncio.Event()).set()

    task = asyncio.create_task(watch())
    out: list[float] = []
    try:
        for k in range(samples):
            i = start + k
            name = f"ws-{i:05d}"
            t0 = time.monotonic()
            await client.create(WORKSPACES, workspace(i), NS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.setdefault(name, asyncio.Event()).wait(), 30)
            if name in seen:
                out.append(seen[name] - t0)
            await asyncio.sleep(0.2)  # idle between samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        resp.close()
    return out


async def operator_run(n: int, args: argparse.Namespace) -> dict[str, Any]:
    total = n + args.latency_samples
    cluster = start_bench_cluster(total)
    metrics_port, probe_port = free_port(), free_port()
    log = open(Path(args.log_dir) / "bench-controller.log", "wb")  # noqa: SIM115, ASYNC230
    proc = await asyncio.create_subprocess_exec(
        *[
            *shlex.split(args.controller_wrapper),
            sys.executable,
            "-m",
            "kaito",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--provisioning",
            "byo",
            "--no-webhook",
            "--workers",
            str(args.workers),
            "--metrics-bind-address",
            f"127.0.0.1:{metrics_port}",
            "--health-probe-bind-address",
            f"127.0.0.1:{probe_port}",
            "--log-level",
            args.controller_log_level,
            "--log-format",
            "json",
        ],
        cwd=REPO,
        env=cluster.env(),
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    try:
        async with ApiClient(cluster.client_configuration()) as api:
            client = KubeClient(api)
            for _ in range(300):
                try:
                    scrape(metrics_port)
                    break
                except OSError:
                    await asyncio.sleep(0.2)
            async with informers(client, WORKSPACES, DEPLOYMENTS) as (wss, deployments):
                cpu0 = {**component_cpu(cluster), "controller": cpu_seconds(proc.pid)}
                profiling = start_profile(cluster, args, "operator")
                t0 = time.monotonic()
                await bounded(
                    n,
                    args.concurrency,
                    lambda i: retrying(lambda: client.create(WORKSPACES, workspace(i), NS)),
                )
                print(f"  operator: all created after {time.monotonic() - t0:.2f} s", file=sys.stderr)
                await wait_count(
                    "operator: workspaces ready",
                    lambda: count_ready_workspaces(wss, deployments),
                    n,
                    args.timeout,
                )
                t_all = time.monotonic() - t0
                cpu_all = cpu_seconds(proc.pid)
                cpu = cpu_delta(cpu0, {**component_cpu(cluster), "controller": cpu_all})
                if profiling is not None:
                    await profiling
                all_created = next((t - t0 for t, c in DEPLOYMENTS_SEEN if c >= n), None)
                print(f"  operator: all {n} Deployments existed after {all_created} s", file=sys.stderr)
                print(f"  operator: CPU seconds by process: {cpu}", file=sys.stderr)
                print(
                    f"  operator: apiserver writes by resource: {apiserver_writes(cluster)}", file=sys.stderr
                )
                print(
                    f"  operator: watch events by resource: {apiserver_watch_events(cluster)}",
                    file=sys.stderr,
                )
                await asyncio.sleep(5)  # let the last events settle before measuring idle
                lat = await latency_samples(client, args.latency_samples, n)
                await wait_count(
                    "operator: workspaces ready",
                    lambda: count_ready_workspaces(wss, deployments),
                    total,
                    120,
                )
            await asyncio.sleep(5)
            w0 = writes(scrape(metrics_port))
            await asyncio.sleep(args.idle_seconds)
            final = scrape(metrics_port)
            w1 = writes(final)
            (Path(args.log_dir) / "bench-controller-metrics.txt").write_text(final)
            rss = rss_mb(proc.pid)
            lat_ms = sorted(x * 1000 for x in lat)
            return {
                "operator_all_ready_s": round(t_all, 2),
                "idle_writes_per_min": round((w1 - w0) * 60 / args.idle_seconds, 2),
                "controller_rss_mb": round(rss, 1),
                "controller_cpu_s_until_all_ready": round(cpu["controller"], 2),
                "create_to_deployment_ms_p50": round(statistics.median(lat_ms), 1) if lat_ms else None,
                "create_to_deployment_ms_p99": round(lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))], 1)
                if lat_ms
                else None,
                "latency_samples": len(lat_ms),
            }
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # a wrapper (py-spy) writes its output on SIGINT
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        log.close()
        cluster.stop()


async def amain() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument(
        "--workers",
        type=int,
        default=50,
        help="controller workers (default: as many as the bare script's requests in flight, a fair share)",
    )
    p.add_argument("--concurrency", type=int, default=50, help="client requests in flight while creating")
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--latency-samples", type=int, default=50)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--log-dir", default="/tmp")
    p.add_argument("--controller-log-level", default="warning")
    p.add_argument(
        "--controller-wrapper",
        default="",
        help="command prefix for the controller process, e.g. 'py-spy record -f raw -o /tmp/c.txt --'",
    )
    p.add_argument(
        "--apiserver-profile", default="", help="save apiserver CPU profiles to PATH.bare/.operator"
    )
    p.add_argument("--apiserver-profile-seconds", type=int, default=25)
    p.add_argument("--skip-bare", action="store_true", help="only the operator run (ratio not computed)")
    args = p.parse_args()
    _ = NAMESPACES  # the bench namespace is created by kubectl in start_cluster
    print(f"bare run: {args.n} workspaces' children", file=sys.stderr)
    t_bare = 0.0 if args.skip_bare else await bare_run(args.n, args)
    print(f"operator run: {args.n} workspaces", file=sys.stderr)
    result = await operator_run(args.n, args)
    result = {
        "n": args.n,
        "bare_all_ready_s": round(t_bare, 2),
        **result,
        "ratio": round(result["operator_all_ready_s"] / t_bare, 3) if t_bare else None,
    }
    print(
        f"time to all ready: operator {result['operator_all_ready_s']} s, bare {result['bare_all_ready_s']} s, "
        f"ratio {result['ratio']} (target <= 1.5)"
    )
    print(f"idle write requests/min: {result['idle_writes_per_min']} (target 0)")
    print(f"controller RSS: {result['controller_rss_mb']} MB (target <= 200)")
    print(
        f"create -> Deployment at idle: p50 {result['create_to_deployment_ms_p50']} ms, "
        f"p99 {result['create_to_deployment_ms_p99']} ms over {result['latency_samples']} samples "
        "(targets 50 / 250)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(amain()))
