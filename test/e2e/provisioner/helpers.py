"""Helpers for the provisioner e2e tests: the provisioner as a child process, and Machine manifests."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hack.localcluster import LocalCluster, free_port

REPO = Path(__file__).resolve().parents[3]


@dataclass
class ProvisionerProcess:
    """A running ``python -m provisioner`` serving the Machines labelled ``kaito.test/run=<run>``."""

    proc: subprocess.Popen[bytes]
    run: str
    metrics_port: int
    probe_port: int
    log_path: Path

    @property
    def selector_labels(self) -> dict[str, str]:
        return {"kaito.test/run": self.run}

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def start_provisioner(
    cluster: LocalCluster,
    log_path: Path,
    *extra: str,
    lease_namespace: str | None = None,
    run: str | None = None,
) -> ProvisionerProcess:
    """Start the provisioner (kwok cloud) as a child process scoped to a fresh run label.

    With ``lease_namespace`` it runs with leader election, holding its Lease there.
    """
    election = (
        ["--leader-elect", "--leader-election-namespace", lease_namespace]
        if lease_namespace
        else ["--no-leader-elect"]
    )
    run = run or secrets.token_hex(4)
    metrics_port, probe_port = free_port(), free_port()
    env = cluster.env()
    env["KAITO_LOG_FORMAT"] = "json"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "provisioner",
            "--cloud",
            "kwok",
            "--kubeconfig",
            str(cluster.kubeconfig),
            *election,
            "--bind-address",
            "127.0.0.1",
            "--metrics-port",
            str(metrics_port),
            "--probe-port",
            str(probe_port),
            "--machine-selector",
            f"kaito.test/run={run}",
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    return ProvisionerProcess(proc, run, metrics_port, probe_port, log_path)


def gpu_machine(name: str, labels: dict[str, str], sku: str = "Standard_NC12s_v3") -> dict[str, Any]:
    """A Machine shaped like the ones the workspace controller creates."""
    return {
        "apiVersion": "karpenter.sh/v1alpha5",
        "kind": "Machine",
        "metadata": {
            "name": name,
            "labels": {
                "karpenter.sh/provisioner-name": "default",
                "kaito.sh/workspace": "falcon",
                "kaito.sh/workspacenamespace": "default",
                **labels,
            },
        },
        "spec": {
            "machineTemplateRef": {"name": name},
            "requirements": [
                {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": [sku]},
                {"key": "karpenter.sh/provisioner-name", "operator": "In", "values": ["default"]},
                {"key": "kaito.sh/machine-type", "operator": "In", "values": ["gpu"]},
                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
            ],
            "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
            "resources": {"requests": {"storage": "120Gi"}},
        },
    }
