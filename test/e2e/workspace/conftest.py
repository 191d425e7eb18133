"""The workspace controller and the gpu-provisioner as real processes on the full local cluster.

Each test gets its own namespace; the controller watches only that namespace, the provisioner (kwok
cloud) serves only Machines (or NodeClaims) labelled with it, and the admission webhooks (served by the controller on
``https://127.0.0.1:<port>``) only apply to it -- so nothing leaks into other suites sharing the cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hack.localcluster import LocalCluster, free_port
from test.waiting import eventually

REPO = Path(__file__).resolve().parents[3]
CRDS = [
    REPO / "config" / "crd" / "kaito.sh_workspaces.yaml",
    REPO / "config" / "crd" / "karpenter.sh_machines.yaml",
    REPO / "config" / "crd" / "karpenter.sh_nodeclaims.yaml",
]
SAMPLES = REPO / "config" / "samples"
SYSTEM_NS = "kaito-system"


def install_crds(cluster: LocalCluster) -> None:
    """Workspace, Machine and NodeClaim CRDs (server-side apply: idempotent beside other suites) and the
    system namespace."""
    for crd in CRDS:
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
    if cluster.kubectl("get", "namespace", SYSTEM_NS, check=False).returncode != 0:
        cluster.kubectl("create", "namespace", SYSTEM_NS, check=False)


@pytest.fixture(scope="session")
def crds(full_cluster: LocalCluster) -> LocalCluster:
    """The session's full cluster with :func:`install_crds` done."""
    install_crds(full_cluster)
    return full_cluster


@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    probe_port: int = 0
    metrics_port: int = 0
    stopped: bool = False  # stopped on purpose (a test killing it), not crashed

    def tail(self, lines: int = 80) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def healthy(self) -> bool:
        """Running, or stopped on purpose."""
        return self.stopped or self.alive()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())


def _spawn(name: str, argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)


def webhook_configurations(namespace: str, port: int) -> list[dict[str, Any]]:
    """Validating + mutating configurations calling the controller on loopback, for one namespace only."""
    base = {
        "clientConfig": {"url": ""},
        "rules": [
            {
                "apiGroups": ["kaito.sh"],
                "apiVersions": ["v1alpha1", "v1beta1"],
                "operations": ["CREATE", "UPDATE"],
                "resources": ["workspaces"],
            }
        ],
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "failurePolicy": "Fail",
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": 10,
    }
    out = []
    for kind, name, path in (
        ("ValidatingWebhookConfiguration", "validation.workspace.kaito.sh", "/validate/workspace.kaito.sh"),
        ("MutatingWebhookConfiguration", "mutation.workspace.kaito.sh", "/mutate/workspace.kaito.sh"),
    ):
        hook = json.loads(json.dumps(base))
        hook["name"] = name
        hook["clientConfig"]["url"] = f"https://127.0.0.1:{port}{path}"
        out.append(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": kind,
                "metadata": {"name": name},
                "webhooks": [hook],
            }
        )
    return out


@dataclass
class Operator:
    """Starts/stops the controller and the provisioner for one test namespace."""

    cluster: LocalCluster
    namespace: str
    tmp: Path
    webhook: bool = True
    webhook_port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    controllers: int = 0
    node_api: str = "machine"  # --node-api of both processes: machine or nodeclaim

    @property
    def requests(self) -> str:
        """The plural of the node-request kind in play, for kubectl (``machines`` / ``nodeclaims``)."""
        return "nodeclaims" if self.node_api == "nodeclaim" else "machines"

    @property
    def request_kind(self) -> str:
        """``Machine`` / ``NodeClaim``: the kind in condition types (``<Kind>Ready``) and Event reasons."""
        return "NodeClaim" if self.node_api == "nodeclaim" else "Machine"

    def start_controller(self, *extra: str) -> Proc:
        self.controllers += 1
        probe, metrics = free_port(), free_port()
        argv = [
            sys.executable,
            "-m",
            "kaito",
            "--kubeconfig",
            str(self.cluster.kubeconfig),
            "--namespace",
            self.namespace,
            "--metrics-bind-address",
            f"127.0.0.1:{metrics}",
            "--health-probe-bind-address",
            f"127.0.0.1:{probe}",
            "--log-format",
            "json",
            "--image-registry",
            "registry.invalid/kaito",
            "--node-api",
            self.node_api,
            *extra,
        ]
        if self.webhook:
            argv += [
                "--webhook-port",
                str(self.webhook_port),
                "--webhook-host",
                "127.0.0.1",
                "--webhook-ip",
                "127.0.0.1",
                "--webhook-service",
                "",
                "--webhook-namespace",
                SYSTEM_NS,
                "--webhook-cert-dir",
                str(self.tmp / f"certs-{self.controllers}"),
            ]
        else:
            argv.append("--no-webhook")
        log = self.tmp / f"controller-{self.controllers}.log"
        p = Proc("controller", _spawn("controller", argv, self.cluster.env(), log), log, probe, metrics)
        self.procs.append(p)
        return p

    def start_provisioner(self, *extra: str) -> Proc:
        probe, metrics = free_port(), free_port()
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
            "--machine-selector",
            f"kaito.sh/workspacenamespace={self.namespace}",
            "--gc-interval",
            "0",
            "--log-format",
            "json",
            "--node-api",
            self.node_api,
            *extra,
        ]
        log = self.tmp / f"provisioner-{len(self.procs)}.log"
        p = Proc("provisioner", _spawn("provisioner", argv, self.cluster.env(), log), log, probe, metrics)
        self.procs.append(p)
        return p

    async def ready(self, p: Proc, timeout: float = 60.0) -> None:
        """Wait until the process answers /readyz (caches synced, webhook listening)."""

        def probe() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{p.probe_port}/readyz", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        async def check() -> bool:
            assert p.alive(), f"{p.name} exited:\n{p.tail()}"
            return await asyncio.to_thread(probe)

        await eventually(check, timeout, f"{p.name} /readyz", interval=0.2)

    def install_webhooks(self) -> None:
        for cfg in webhook_configurations(self.namespace, self.webhook_port):
            self.cluster.apply(cfg)

    def remove_webhooks(self) -> None:
        self.cluster.kubectl(
            "delete",
            "validatingwebhookconfiguration/validation.workspace.kaito.sh",
            "mutatingwebhookconfiguration/mutation.workspace.kaito.sh",
            "--ignore-not-found",
            check=False,
        )

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def dump(self) -> str:
        return "\n".join(f"===== {p.name} ({p.log_path.name}) =====\n{p.tail()}" for p in self.procs)


@pytest.fixture
def node_api() -> str:
    """The node API the operator runs with; a test runs under both with
    ``@pytest.mark.parametrize("node_api", NODE_APIS)``."""
    return "machine"


NODE_APIS = ["machine", "nodeclaim"]


@pytest.fixture
async def operator(
    crds: LocalCluster, namespace: str, tmp_path: Path, request: pytest.FixtureRequest, node_api: str
) -> AsyncIterator[Operator]:
    """Controller (with webhook) + provisioner running for the test's namespace, creating and serving
    Machines or (``node_api == "nodeclaim"``) NodeClaims."""
    op = Operator(crds, namespace, tmp_path, node_api=node_api)
    op.install_webhooks()
    try:
        ctrl = op.start_controller("--enable-tuning")  # the test runs as admin: Jobs are allowed
        prov = op.start_provisioner()
        await op.ready(ctrl)
        await op.ready(prov)
        yield op
    finally:
        failed = getattr(request.node, "rep_call", None)
        # Delete what the test left while both processes still run, so the finalizer is honoured and
        # the provisioner removes the Machines' Nodes (nothing leaks into later tests).
        crds.kubectl(
            "delete", "workspaces", "--all", "-n", namespace, "--timeout=60s", check=False, timeout=90
        )
        op.remove_webhooks()
        if os.environ.get("KAITO_SHOW_LOGS") or (failed is not None and failed.failed):
            print(op.dump())
        op.stop_all()
