"""Both controllers as real processes under their own ServiceAccount tokens, with only config/ RBAC.

Each process is started through ``hack/run-as-sa.py run``: it applies config/ Namespace + RBAC, gets a
token from the TokenRequest API and hands the process a kubeconfig holding only that token -- the admin
kubeconfig never reaches them. The controller runs as in the Deployment (leader election in
kaito-system, webhook with its self-issued certificate, all namespaces); the provisioner uses the kwok
cloud. The webhook configurations are the ones in config/, with two local changes: the apiserver calls
the controller on loopback (there is no Service routing here) and only for this module's namespace, so
other suites sharing the cluster are never affected.
"""

from __future__ import annotations

import asyncio
import copy
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

from hack.localcluster import LocalCluster, free_port
from test.integration.install.helpers import REPO, crd_files, kubectl_path, render_kustomize
from test.waiting import eventually

RUN_AS_SA = REPO / "hack" / "run-as-sa.py"
WEBHOOK_CONFIG_NAMES = ("validation.workspace.kaito.sh", "mutation.workspace.kaito.sh")


@dataclass
class Proc:
    """A controller process (run-as-sa wrapper + child) and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    probe_port: int
    metrics_port: int
    webhook_port: int = 0

    def tail(self, lines: int = 80) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def get(self, port: int, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status), r.read().decode()

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            # run-as-sa passes SIGTERM on to the controller, which shuts down gracefully.
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@dataclass
class Installed:
    """The running installation for this module."""

    cluster: LocalCluster
    namespace: str
    webhook_port: int
    procs: dict[str, Proc] = field(default_factory=dict)

    def dump(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.tail()}" for p in self.procs.values())


def start_as(
    cluster: LocalCluster, sa: str, argv: list[str], log_path: Path, probe: int, metrics: int
) -> Proc:
    """Start ``argv`` through hack/run-as-sa.py as ServiceAccount ``sa`` of kaito-system."""
    env = {**cluster.env(), "KUBECTL": str(kubectl_path())}
    # The child must find its kubeconfig only through run-as-sa's KUBECONFIG (never the admin's).
    cmd = [
        sys.executable,
        str(RUN_AS_SA),
        "--kubeconfig",
        str(cluster.kubeconfig),
        "run",
        "--sa",
        sa,
        "--",
        *argv,
    ]
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    return Proc(sa, proc, log_path, probe, metrics)


def local_webhook_configurations(namespace: str, port: int) -> list[dict[str, Any]]:
    """config/'s webhook configurations, calling https://127.0.0.1:<port> and only for ``namespace``."""
    out = []
    for obj in render_kustomize():
        if not obj["kind"].endswith("WebhookConfiguration"):
            continue
        cfg = copy.deepcopy(obj)
        for hook in cfg["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}"}
            hook["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
        out.append(cfg)
    assert {c["metadata"]["name"] for c in out} == set(WEBHOOK_CONFIG_NAMES)
    return out


async def wait_ready(p: Proc, timeout: float = 90.0) -> None:
    """Until /readyz answers 200 (caches synced; the webhook is served by then)."""

    async def check() -> bool:
        assert p.alive(), f"{p.name} exited ({p.proc.returncode}):\n{p.tail()}"
        try:
            status, _ = await asyncio.to_thread(p.get, p.probe_port, "/readyz")
        except OSError:
            return False
        return status == 200

    await eventually(check, timeout, f"{p.name} /readyz", interval=0.2)


async def wait_webhook_enforced(api_client: ApiClient, namespace: str, timeout: float = 60.0) -> None:
    """Until the apiserver reaches the webhook (caBundle patched in by the controller): a dry-run create
    of a Workspace naming an unknown preset is denied with the webhook's own message."""
    probe = {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": "install-webhook-probe"},
        "resource": {"instanceType": "Standard_NC6s_v3", "labelSelector": {"matchLabels": {"a": "b"}}},
        "inference": {"preset": {"name": "install-probe-preset"}},
    }
    objects = CustomObjectsApi(api_client)

    async def denied_by_webhook() -> bool:
        try:
            await objects.create_namespaced_custom_object(
                "kaito.sh", "v1alpha1", namespace, "workspaces", probe, dry_run="All"
            )
        except ApiException as e:
            return "install-probe-preset" in (e.body or "") and "denied the request" in (e.body or "")
        return False

    await eventually(denied_by_webhook, timeout, "the webhook to be called by the apiserver", interval=0.3)


def start_controller(cluster: LocalCluster, replica: str, webhook_port: int, tmp: Path) -> Proc:
    """One kaito-workspace replica (``python -m kaito``) as the kaito-workspace ServiceAccount."""
    probe, metrics = free_port(), free_port()
    proc = start_as(
        cluster,
        "kaito-workspace",
        [
            sys.executable,
            "-m",
            "kaito",
            "--leader-elect",
            "--enable-tuning",
            "--metrics-bind-address",
            f"127.0.0.1:{metrics}",
            "--health-probe-bind-address",
            f"127.0.0.1:{probe}",
            "--webhook-host",
            "127.0.0.1",
            "--webhook-port",
            str(webhook_port),
            "--webhook-ip",
            "127.0.0.1",
            "--image-registry",
            "registry.invalid/kaito",
            "--log-format",
            "json",
        ],
        tmp / f"{replica}.log",
        probe,
        metrics,
    )
    proc.name = replica
    proc.webhook_port = webhook_port
    return proc


@pytest.fixture(scope="module")
def installed_base(
    full_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installed]:
    """CRDs, a namespace, config/'s webhook configurations (local) and both controllers as their SAs."""
    cluster = full_cluster
    for crd in crd_files():
        cluster.kubectl(
            "apply", "--server-side", "--force-conflicts", "--field-manager=kaito-crds", "-f", str(crd)
        )
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/workspaces.kaito.sh",
        "crd/machines.karpenter.sh",
        "crd/nodeclaims.karpenter.sh",
    )
    namespace = f"t-install-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", namespace)
    inst = Installed(cluster, namespace, free_port())
    tmp = tmp_path_factory.mktemp("install-e2e")
    try:
        for cfg in local_webhook_configurations(namespace, inst.webhook_port):
            cluster.apply(cfg)
        probe, metrics = free_port(), free_port()
        inst.procs["gpu-provisioner"] = start_as(
            cluster,
            "gpu-provisioner",
            [
                sys.executable,
                "-m",
                "provisioner",
                "--cloud",
                "kwok",
                "--leader-elect",
                "--bind-address",
                "127.0.0.1",
                "--metrics-port",
                str(metrics),
                "--probe-port",
                str(probe),
                # Only this module's Machines; no orphan sweep (other suites' kwok nodes are theirs).
                "--machine-selector",
                f"kaito.sh/workspacenamespace={namespace}",
                "--gc-interval",
                "0",
                "--kwok-node-delay",
                "1",
                # Both kinds, as config/manager runs it: the installed RBAC must allow both informers.
                "--node-api",
                "machine,nodeclaim",
                "--log-format",
                "json",
            ],
            tmp / "gpu-provisioner.log",
            probe,
            metrics,
        )
        # Two replicas, as the Deployment runs them: one leads, both serve the webhook and probes.
        for replica, port in (("kaito-workspace", inst.webhook_port), ("kaito-workspace-2", free_port())):
            inst.procs[replica] = start_controller(cluster, replica, port, tmp)
        yield inst
    finally:
        cluster.kubectl("delete", "workspaces", "--all", "-n", namespace, "--wait=false", check=False)
        for name in WEBHOOK_CONFIG_NAMES:
            for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
                cluster.kubectl("delete", f"{kind}/{name}", "--ignore-not-found", check=False)
        if os.environ.get("KAITO_SHOW_LOGS"):
            print(inst.dump())
        for p in inst.procs.values():
            p.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture
async def installed(installed_base: Installed, api_client: ApiClient) -> AsyncIterator[Installed]:
    """The installation, ready: both processes answer /readyz and the webhook is enforced."""
    for p in installed_base.procs.values():
        await wait_ready(p)
    await wait_webhook_enforced(api_client, installed_base.namespace)
    yield installed_base
    for p in installed_base.procs.values():
        assert p.alive(), f"{p.name} exited during the test:\n{p.tail()}"
