"""What the bench scripts share: a full local cluster with the operator's CRDs, child processes that
die with the script, patient API calls, and reading a process's /metrics and a workspace's readiness."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from hack.localcluster import LocalCluster

REPO = Path(__file__).resolve().parent.parent
CRDS = ("kaito.sh_workspaces.yaml", "karpenter.sh_machines.yaml")


def start_cluster(*namespaces: str) -> LocalCluster:
    """A fresh full local cluster with the Workspace and Machine CRDs established and ``namespaces``."""
    cluster = LocalCluster(profile="full")
    cluster.start(timeout=120)
    try:
        for crd in CRDS:
            cluster.kubectl("apply", "--server-side", "-f", str(REPO / "config" / "crd" / crd))
        cluster.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/workspaces.kaito.sh",
            "crd/machines.karpenter.sh",
        )
        for ns in namespaces:
            cluster.kubectl("create", "namespace", ns)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def die_with_parent() -> None:
    """``preexec_fn`` for child processes: the child goes when the bench goes, however it ends."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


async def retrying(fn: Callable[[], Awaitable[Any]], tries: int = 20) -> Any:
    """The script's own calls: a busy apiserver may refuse one now and then, so retry a little."""
    for attempt in range(tries):
        try:
            return await fn()
        except Exception:
            if attempt == tries - 1:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))  # backoff between attempts
    return None


def scrape(port: int) -> str:
    """A local process's /metrics text (blocking; call it in a thread from async code)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def workspace_ready(ws: Mapping[str, Any]) -> bool:
    """``WorkspaceReady=True``."""
    return any(
        c.get("type") == "WorkspaceReady" and c.get("status") == "True"
        for c in (ws.get("status") or {}).get("conditions") or []
    )
