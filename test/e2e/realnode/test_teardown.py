"""The real node leaves nothing on the machine: no process, mount, bridge, netfilter table or chain,
cgroup, sysctl change or host directory -- after a clean stop, and after the run that owned it was
killed with SIGKILL (the next start sweeps what it left). Real processes, real kernel state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hack import images, realnode
from hack.localcluster import LocalCluster
from hack.realnode import HOST_DIRS, SYSCTLS, RealNode
from test.e2e.realnode.helpers import get_json, new_namespace, pod, pod_condition

pytestmark = pytest.mark.timeout(600)


def sysctls() -> dict[str, str]:
    return {k: Path("/proc/sys", k).read_text().strip() for k in SYSCTLS}


def assert_clean(before_sysctls: dict[str, str], absent_before: list[str]) -> None:
    left = realnode.leftovers()
    assert left == {
        "processes": [],
        "mounts": [],
        "bridge": False,
        "nft_tables": [],
        "kube_chains": [],
        "cgroups": [],
        "state_dir": False,
    }, left
    assert sysctls() == before_sysctls
    assert [d for d in absent_before if Path(d).exists()] == []


def wait_running(cluster: LocalCluster, ns: str, name: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while pod_condition(get_json(cluster, "pod", name, "-n", ns), "Ready").get("status") != "True":
        assert time.monotonic() < deadline, f"pod {ns}/{name} not Ready in {timeout}s"
        time.sleep(0.2)


def test_clean_stop_leaves_nothing_behind(node_cluster: LocalCluster, project_images: dict[str, str]) -> None:
    before, absent = sysctls(), [d for d in HOST_DIRS if not Path(d).exists()]
    with RealNode(node_cluster) as node:
        ns = new_namespace(node_cluster, "rn-teardown")
        web = pod("web", node.pause_ref, ["/pause"])
        node_cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(web))
        wait_running(node_cluster, ns, "web")
        # The probes see what a running node holds (so the clean result below is not vacuous).
        left = realnode.leftovers()
        assert left["bridge"] and left["nft_tables"] and left["mounts"] and left["processes"], left
        assert left["cgroups"] and left["kube_chains"] and left["state_dir"], left
        assert sysctls() != before or all(v == "1" for v in before.values())
    assert_clean(before, absent)


def test_a_killed_run_is_swept_by_the_next_start(node_cluster: LocalCluster) -> None:
    before, absent = sysctls(), [d for d in HOST_DIRS if not Path(d).exists()]
    pause_ref = images.build(["pause"])["pause"]
    manifest = json.dumps(pod("survivor", pause_ref, ["/pause"]))
    script = (
        f"kubectl apply -f - <<'EOF'\n{manifest}\nEOF\n"
        "kubectl wait --for=condition=Ready pod/survivor --timeout=120s && echo READY && sleep 600"
    )
    repo = Path(realnode.__file__).resolve().parents[1]
    launcher = subprocess.Popen(
        [
            sys.executable,
            "hack/localcluster.py",
            "run",
            "--profile",
            "full",
            "--real-node",
            "--",
            "sh",
            "-c",
            script,
        ],
        cwd=repo,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert launcher.stdout is not None
        lines = []
        for line in launcher.stdout:
            lines.append(line)
            if line.strip() == "READY":
                break
        assert lines and lines[-1].strip() == "READY", lines
    finally:
        # The whole run dies at once, as when CI kills a job: no teardown code runs.
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
    # Its kubelet, containerd and kube-proxy die with it (parent-death signal); the rest stays.
    deadline = time.monotonic() + 30
    while realnode._pids_mentioning(str(realnode.state_dir() / "kubelet")):
        assert time.monotonic() < deadline, "the killed run's kubelet outlived it"
        time.sleep(0.2)
    left = realnode.leftovers()
    assert left["bridge"] and left["mounts"] and left["nft_tables"] and left["processes"], left

    # The next start sweeps it all, then runs normally; its own stop leaves nothing.
    with RealNode(node_cluster) as node:
        assert node.images() >= {pause_ref}
        ns = new_namespace(node_cluster, "rn-after-crash")
        node_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest)
        wait_running(node_cluster, ns, "survivor")
    assert_clean(before, absent)
