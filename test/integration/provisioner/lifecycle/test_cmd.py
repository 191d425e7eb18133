"""The entry point's failure modes, as a real process: clear errors, exit status 1, no secret in the output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hack.localcluster import LocalCluster

REPO = Path(__file__).resolve().parents[4]
SECRET = "s3cr3t-client-secret-value"


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provisioner", *args, "--log-format", "json", "--no-leader-elect"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARM_", "AZURE_", "KUBECONFIG"))}
    env.pop("CLOUD_PROVIDER", None)
    return env


def test_missing_azure_settings_exit_1_naming_them_without_leaking_the_secret(
    control_plane: LocalCluster,
) -> None:
    env = base_env()
    env.update({"AZURE_CLIENT_SECRET": SECRET, "AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c"})
    proc = run(["--cloud", "azure", "--kubeconfig", str(control_plane.kubeconfig)], env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "ARM_SUBSCRIPTION_ID" in out and "AZURE_CLUSTER_NAME" in out
    assert SECRET not in out


def test_unreadable_kubeconfig_exit_1(tmp_path: Path) -> None:
    proc = run(["--cloud", "kwok", "--kubeconfig", str(tmp_path / "missing")], base_env())
    assert proc.returncode == 1
    assert "cannot load the Kubernetes client configuration" in proc.stdout + proc.stderr


def test_bad_flag_exit_2() -> None:
    proc = run(["--cloud", "gce"], base_env())
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
