#!/usr/bin/env python3
"""Admission webhook latency: N AdmissionReview requests over HTTPS, p50/p90/p99/max printed.

The webhook server runs in its own process (as in the controller) with a certificate from our own
CA; the client sends a mix of CREATE reviews (valid, too-small SKU, unknown preset, adapters) and
UPDATE reviews over keep-alive TLS connections and times each round trip.

    python bench/webhook.py [--requests 1000] [--concurrency 1] [--mutate]

With ``--apiserver`` it also starts the local kube-apiserver (hack/localcluster.py), registers both
webhooks there (caBundle from our CA) and times dry-run Workspace creates in a namespace the webhooks
select against one they do not: the admission cost a user sees through ``kubectl apply``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import structlog

from kaito.webhook.certs import CertPolicy, plan_bundle, write_cert_dir
from kaito.webhook.server import MUTATE_PATH, VALIDATE_PATH, WebhookServer
from kaito.webhook.validation import build_validator

CRD_DIR = Path(__file__).resolve().parents[1] / "config" / "crd"
KIND = {"group": "kaito.sh", "version": "v1alpha1", "kind": "Workspace"}


def workspace(name: str, instance: str, preset: str, adapters: int = 0) -> dict[str, Any]:
    inference: dict[str, Any] = {"preset": {"name": preset}}
    if adapters:
        inference["adapters"] = [
            {"source": {"name": f"a{i}", "image": f"myregistry.azurecr.io/a{i}:0.0.1"}, "strength": "0.5"}
            for i in range(adapters)
        ]
    return {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": name, "namespace": "bench", "uid": "00000000-0000-0000-0000-000000000000"},
        "resource": {"count": 1, "instanceType": instance, "labelSelector": {"matchLabels": {"apps": name}}},
        "inference": inference,
    }


def reviews() -> list[bytes]:
    """The request mix, pre-serialised so the client measures the server, not json.dumps."""
    objects = [
        ("CREATE", workspace("phi-3", "Standard_NC6s_v3", "phi-3-mini-4k-instruct"), None),
        ("CREATE", workspace("falcon-40b", "Standard_NC6s_v3", "falcon-40b"), None),  # denied: too small
        ("CREATE", workspace("typo", "Standard_NC12s_v3", "phi-3-mini"), None),  # denied: unknown preset
        ("CREATE", workspace("adapters", "Standard_NC12s_v3", "phi-3-mini-128k-instruct", adapters=5), None),
        (
            "UPDATE",
            workspace("adapters", "Standard_NC12s_v3", "phi-3-mini-128k-instruct", adapters=6),
            workspace("adapters", "Standard_NC12s_v3", "phi-3-mini-128k-instruct", adapters=5),
        ),
    ]
    out = []
    for i, (op, obj, old) in enumerate(objects):
        request: dict[str, Any] = {
            "uid": f"bench-{i}",
            "kind": KIND,
            "operation": op,
            "namespace": "bench",
            "object": obj,
        }
        if old is not None:
            request["oldObject"] = old
        out.append(
            json.dumps(
                {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
            ).encode()
        )
    return out


async def serve(cert_dir: Path) -> None:
    """Child process: run the webhook server until stdin closes.

    Logs (info level, as in production) go to stderr, so stdout carries only the "ready" line.
    """
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    server = WebhookServer(build_validator(), host="127.0.0.1", port=0, cert_dir=cert_dir)
    await server.start()
    print(f"ready {server.port}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # parent closes stdin to stop us
    await server.stop()


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    index = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


async def run(requests: int, concurrency: int, path: str, verbose: bool = False) -> dict[str, float]:
    """Start the server process, warm up, send ``requests`` reviews, return latency stats in ms."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = plan_bundle(None, ["localhost"], ["127.0.0.1"], CertPolicy())
        assert bundle is not None
        write_cert_dir(Path(tmp), bundle)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            tmp,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # The server logs every denial at info level, as in production; shown only with --verbose.
            stderr=None if verbose else asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None and proc.stdin is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
            if not line or line[0] != "ready":
                raise RuntimeError(f"webhook server did not start: {line}")
            url = f"https://127.0.0.1:{line[1]}{path}"
            ctx = ssl.create_default_context(cadata=bundle.ca_bundle.decode())
            bodies = reviews()
            latencies: list[float] = []
            connector = aiohttp.TCPConnector(ssl=ctx, limit=concurrency)
            async with aiohttp.ClientSession(connector=connector) as session:

                async def one(i: int) -> None:
                    body = bodies[i % len(bodies)]
                    start = time.perf_counter()
                    async with session.post(
                        url, data=body, headers={"Content-Type": "application/json"}
                    ) as r:
                        payload = await r.read()
                    elapsed = time.perf_counter() - start
                    if r.status != 200 or b'"response"' not in payload:
                        raise RuntimeError(f"bad response {r.status}: {payload[:200]!r}")
                    latencies.append(elapsed * 1000)

                for i in range(50):  # warm-up: TLS handshakes, first-call caches
                    await one(i)
                latencies.clear()
                queue: asyncio.Queue[int] = asyncio.Queue()
                for i in range(requests):
                    queue.put_nowait(i)

                async def worker() -> None:
                    while True:
                        try:
                            i = queue.get_nowait()
                        except asyncio.QueueEmpty:
                            return
                        await one(i)

                started = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                wall = time.perf_counter() - started
        finally:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    return _stats(latencies, wall)


def _stats(latencies: list[float], wall: float) -> dict[str, float]:
    values = sorted(latencies)
    return {
        "requests": float(len(values)),
        "p50_ms": percentile(values, 50),
        "p90_ms": percentile(values, 90),
        "p99_ms": percentile(values, 99),
        "max_ms": values[-1],
        "mean_ms": statistics.fmean(values),
        "throughput_rps": len(values) / wall,
    }


async def run_through_apiserver(requests: int) -> dict[str, dict[str, float]]:
    """Dry-run creates through a real kube-apiserver, with and without the webhooks in the path."""
    import base64

    from kubernetes_asyncio.client import (
        AdmissionregistrationV1Api,
        ApiClient,
        CoreV1Api,
        CustomObjectsApi,
    )
    from kubernetes_asyncio.client.exceptions import ApiException

    from hack.localcluster import LocalCluster

    cluster = LocalCluster(profile="apiserver")
    await asyncio.to_thread(cluster.start, 120.0)
    try:
        await asyncio.to_thread(cluster.kubectl, "apply", "--server-side", "-f", str(CRD_DIR))
        await asyncio.to_thread(
            cluster.kubectl, "wait", "--for=condition=Established", "--timeout=60s", "crd/workspaces.kaito.sh"
        )
        with tempfile.TemporaryDirectory() as tmp:
            bundle = plan_bundle(None, ["localhost"], ["127.0.0.1"], CertPolicy())
            assert bundle is not None
            write_cert_dir(Path(tmp), bundle)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--serve",
                tmp,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            assert proc.stdout is not None and proc.stdin is not None
            try:
                line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
                port = int(line[1])
                async with ApiClient(cluster.client_configuration()) as api:
                    core, objects = CoreV1Api(api), CustomObjectsApi(api)
                    for ns, labels in (("with-webhook", {"bench": "webhook"}), ("without-webhook", {})):
                        await core.create_namespace({"metadata": {"name": ns, "labels": labels}})
                    ca = base64.b64encode(bundle.ca_bundle).decode()
                    rules = [
                        {
                            "apiGroups": ["kaito.sh"],
                            "apiVersions": ["*"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["workspaces"],
                        }
                    ]

                    def hook(name: str, path: str) -> dict[str, Any]:
                        return {
                            "name": name,
                            "admissionReviewVersions": ["v1"],
                            "sideEffects": "None",
                            "failurePolicy": "Fail",
                            "clientConfig": {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca},
                            "rules": rules,
                            "namespaceSelector": {"matchLabels": {"bench": "webhook"}},
                        }

                    admission = AdmissionregistrationV1Api(api)
                    await admission.create_validating_webhook_configuration(
                        {
                            "metadata": {"name": "bench"},
                            "webhooks": [hook("validation.workspace.kaito.sh", VALIDATE_PATH)],
                        }
                    )
                    await admission.create_mutating_webhook_configuration(
                        {
                            "metadata": {"name": "bench"},
                            "webhooks": [hook("mutation.workspace.kaito.sh", MUTATE_PATH)],
                        }
                    )
                    bodies = [json.loads(b)["request"]["object"] for b in reviews() if b'"CREATE"' in b]
                    for body in bodies:
                        body["metadata"] = {"name": body["metadata"]["name"]}

                    async def create(ns: str, body: dict[str, Any]) -> str:
                        try:
                            await objects.create_namespaced_custom_object(
                                "kaito.sh", "v1alpha1", ns, "workspaces", body, dry_run="All"
                            )
                        except ApiException as e:
                            return e.body or ""
                        return ""

                    # The apiserver picks webhook configurations up asynchronously: wait until it calls us.
                    deadline = time.monotonic() + 30
                    while "admission webhook" not in await create("with-webhook", bodies[2]):
                        if time.monotonic() > deadline:
                            raise RuntimeError("the apiserver never called the webhook")
                        await asyncio.sleep(0.1)
                    results = {}
                    for ns in ("without-webhook", "with-webhook"):
                        for i in range(50):
                            await create(ns, bodies[i % len(bodies)])
                        latencies = []
                        started = time.perf_counter()
                        for i in range(requests):
                            t0 = time.perf_counter()
                            await create(ns, bodies[i % len(bodies)])
                            latencies.append((time.perf_counter() - t0) * 1000)
                        results[ns] = _stats(latencies, time.perf_counter() - started)
                    return results
            finally:
                proc.stdin.close()
                await proc.wait()
    finally:
        await asyncio.to_thread(cluster.stop)


def main() -> int:
    """Parse flags, run the benchmark, print the result."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--mutate", action="store_true", help="benchmark the mutating path instead")
    parser.add_argument("--verbose", action="store_true", help="show the server's logs")
    parser.add_argument(
        "--apiserver", action="store_true", help="also time dry-run creates through a local kube-apiserver"
    )
    parser.add_argument("--serve", metavar="CERT_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(Path(args.serve)))
        return 0
    stats = asyncio.run(
        run(args.requests, args.concurrency, MUTATE_PATH if args.mutate else VALIDATE_PATH, args.verbose)
    )
    path = "mutate" if args.mutate else "validate"
    print(
        f"webhook {path}: {int(stats['requests'])} requests, concurrency {args.concurrency}: "
        f"p50 {stats['p50_ms']:.2f} ms, p90 {stats['p90_ms']:.2f} ms, p99 {stats['p99_ms']:.2f} ms, "
        f"max {stats['max_ms']:.2f} ms, {stats['throughput_rps']:.0f} req/s"
    )
    print(json.dumps({"path": path, "concurrency": args.concurrency, **stats}))
    if args.apiserver:
        through = asyncio.run(run_through_apiserver(args.requests))
        for ns, st in through.items():
            print(
                f"apiserver dry-run create ({ns}): {int(st['requests'])} requests: p50 {st['p50_ms']:.2f} ms, "
                f"p99 {st['p99_ms']:.2f} ms, max {st['max_ms']:.2f} ms"
            )
        print(json.dumps({"apiserver": through}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
