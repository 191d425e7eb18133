"""The operator installed for real: ``helm install`` of config/helm/kaito on a cluster with a real node.

The images are built here from the repository (hack/images.py) and loaded into the node's containerd;
the chart's values place both Deployments on the real node (its label and taint) with
``pullPolicy: Never``. One scenario, in the order a user lives it, each step timed:

1. ``helm install``: ``kaito-workspace`` (2 replicas) and ``gpu-provisioner`` (cloud=kwok) Available,
   in real containers under the production security context (checked inside the container);
2. the admission webhook, served by the pods through its Service, rejects a bad Workspace with our message;
3. the seed's phi-3 Workspace reaches WorkspaceReady: Machine -> kwok GPU node -> inference Deployment,
   driven by the controllers in the pods; the inference pod lands on the kwok node, not the real one;
4. the leader pod is deleted and the other replica reconciles a new Workspace within 20 s;
5. a real Prometheus (hack/prometheus.py) discovers the pods the way the chart's ServiceMonitors
   select them: all three targets up, ``kaito_workspace_count`` from both workspace pods;
6. ``helm upgrade`` to a changed controller image rolls the pods; the Workspace keeps its Machine,
   Deployment and readiness;
7. ``helm uninstall`` leaves nothing of ours but the CRDs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from hack.localcluster import LocalCluster
from hack.prometheus import PrometheusServer, scrape_configs_from_servicemonitors
from hack.realnode import NODE_NAME, TOLERATION, RealNode
from test.e2e.install.test_helm_uninstall import KEPT_CRDS, leftovers
from test.e2e.realnode.helpers import aget_json, get_json
from test.integration.install.helpers import CHART, REPO, prometheus_operator_crds, tools_dir
from test.waiting import eventually

pytestmark = pytest.mark.timeout(900)

NAMESPACE = "kaito-system"
RELEASE = "kaito"
SAMPLE = REPO / "config" / "samples" / "kaito_workspace_phi_3.yaml"
WORKSPACE = "workspace-phi-3-mini"
FAILOVER_BUDGET_S = 20.0


def split_ref(ref: str) -> tuple[str, str]:
    """``localhost/kaito-py/kaito-controller:TAG`` -> (``localhost/kaito-py``, ``TAG``)."""
    name, tag = ref.rsplit(":", 1)
    return name.rsplit("/", 1)[0], tag


def chart_values(images: dict[str, str]) -> list[str]:
    """``--set`` values: local images never pulled, both Deployments on the real node, the kwok cloud."""
    registry, controller_tag = split_ref(images["controller"])
    _, provisioner_tag = split_ref(images["provisioner"])
    t = TOLERATION
    return [
        f"image.registry={registry}",
        "image.pullPolicy=Never",
        f"workspace.image.tag={controller_tag}",
        f"provisioner.image.tag={provisioner_tag}",
        "provisioner.cloud=kwok",
        "nodeSelector.kaito\\.sh/real-node=true",
        f"tolerations[0].key={t['key']},tolerations[0].operator={t['operator']},"
        f"tolerations[0].value={t['value']},tolerations[0].effect={t['effect']}",
    ]


async def helm(cluster: LocalCluster, *args: str) -> str:
    """Run helm against the cluster (admin kubeconfig); fail with its stderr."""
    proc = await asyncio.create_subprocess_exec(
        str(tools_dir() / "helm"),
        f"--kubeconfig={cluster.kubeconfig}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    assert proc.returncode == 0, f"helm {' '.join(args)}: {err.decode()}"
    return out.decode()


def condition(obj: dict[str, Any], kind: str) -> str | None:
    return next((c["status"] for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


async def pods(cluster: LocalCluster, app: str) -> list[dict[str, Any]]:
    items = (await aget_json(cluster, "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/name={app}"))[
        "items"
    ]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


async def wait_rolled_out(
    cluster: LocalCluster, name: str, image: str | None = None, timeout: float = 180
) -> None:
    """The Deployment's pods are all updated, ready, Running (and on ``image``), none terminating."""

    async def done() -> bool:
        dep = await aget_json(cluster, "deployment", name, "-n", NAMESPACE)
        st, want = dep["status"], dep["spec"]["replicas"]
        if not (
            st.get("observedGeneration") == dep["metadata"]["generation"]
            and st.get("updatedReplicas") == want
            and st.get("readyReplicas") == want
            and st.get("replicas") == want
        ):
            return False
        running = await pods(cluster, name)
        return len(running) == want and all(
            p["status"].get("phase") == "Running"
            and (image is None or p["spec"]["containers"][0]["image"] == image)
            for p in running
        )

    await eventually(done, timeout=timeout, what=f"deployment {name} rolled out", interval=0.5)


def check_security_context(cluster: LocalCluster, pod: dict[str, Any]) -> None:
    """The production security context, as the kernel applies it to a process in the container."""
    name = pod["metadata"]["name"]
    status = cluster.kubectl("exec", "-n", NAMESPACE, name, "--", "cat", "/proc/self/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == "65532", fields["Uid"]
    assert fields["CapEff"].strip() == "0000000000000000", fields["CapEff"]
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # filter mode: RuntimeDefault
    touch = cluster.kubectl("exec", "-n", NAMESPACE, name, "--", "touch", "/x", check=False)
    assert touch.returncode != 0 and "Read-only file system" in touch.stderr, touch.stderr
    limit = cluster.kubectl(
        "exec", "-n", NAMESPACE, name, "--", "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"
    ).stdout.strip()
    assert limit == str(512 * 1024 * 1024), limit


async def workspace_ready(cluster: LocalCluster, name: str) -> dict[str, Any]:
    ws = await aget_json(cluster, "workspace", name, "-n", "default")
    return ws if condition(ws, "WorkspaceReady") == "True" else {}


async def test_chart_on_a_real_node(
    node_cluster: LocalCluster, real_node: RealNode, project_images: dict[str, str], tmp_path: Path
) -> None:
    cluster = node_cluster
    timings: dict[str, float] = {}
    for crd in prometheus_operator_crds():
        cluster.kubectl("apply", "--server-side", "-f", str(crd))

    # 1. install -----------------------------------------------------------------------------------
    t0 = time.monotonic()
    values = chart_values(project_images)
    await helm(
        cluster,
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace",
        *[a for v in values for a in ("--set", v)],
    )  # fmt: skip
    await wait_rolled_out(cluster, "kaito-workspace", project_images["controller"])
    await wait_rolled_out(cluster, "gpu-provisioner", project_images["provisioner"])
    timings["install_to_available_s"] = time.monotonic() - t0
    workspace_pods = await pods(cluster, "kaito-workspace")
    provisioner_pods = await pods(cluster, "gpu-provisioner")
    assert len(workspace_pods) == 2 and len(provisioner_pods) == 1
    for p in workspace_pods + provisioner_pods:
        assert p["spec"]["nodeName"] == NODE_NAME
        assert p["spec"]["containers"][0]["imagePullPolicy"] == "Never"
        await asyncio.to_thread(check_security_context, cluster, p)

    # 2. the webhook, served by the pods through its Service -----------------------------------------
    bad = SAMPLE.read_text().replace("Standard_NC6s_v3", "Standard_Bogus_v9")
    out = cluster.kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-", input=bad, check=False)
    assert out.returncode != 0
    assert 'admission webhook "validation.workspace.kaito.sh" denied the request' in out.stderr, out.stderr
    assert "unknown instance type 'Standard_Bogus_v9'" in out.stderr, out.stderr

    # 3. the seed's phi-3 Workspace, driven by the controllers in the pods -------------------------
    t0 = time.monotonic()
    cluster.kubectl("apply", "-n", "default", "-f", str(SAMPLE))
    ws = await eventually(
        lambda: workspace_ready(cluster, WORKSPACE), timeout=180, what="phi-3 WorkspaceReady"
    )
    timings["phi3_apply_to_ready_s"] = time.monotonic() - t0
    machines = get_json(cluster, "machines")["items"]
    assert len(machines) == 1, [m["metadata"]["name"] for m in machines]
    machine = machines[0]
    gpu_node = get_json(cluster, "node", machine["status"]["nodeName"])
    assert gpu_node["metadata"]["annotations"].get("kwok.x-k8s.io/node") == "fake"
    inference = get_json(cluster, "pods", "-n", "default", "-l", "kaito.sh/workspace=" + WORKSPACE)["items"]
    assert inference and {p["spec"]["nodeName"] for p in inference} == {gpu_node["metadata"]["name"]}
    deployment_uid = get_json(cluster, "deployment", WORKSPACE, "-n", "default")["metadata"]["uid"]

    # 4. leader failover -------------------------------------------------------------------------------
    lease = get_json(cluster, "lease", "kaito-workspace", "-n", NAMESPACE)
    holder = lease["spec"]["holderIdentity"]
    (leader,) = [p for p in workspace_pods if holder.startswith(p["metadata"]["name"] + "_")]
    t_kill = time.monotonic()
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, leader["metadata"]["name"], "--wait=false")
    second = (
        SAMPLE.read_text().replace(WORKSPACE, "workspace-failover").replace("apps: phi-3", "apps: failover")
    )
    cluster.kubectl("apply", "-n", "default", "-f", "-", input=second)

    async def reconciled_by_new_leader() -> bool:
        ws2 = await aget_json(cluster, "workspace", "workspace-failover", "-n", "default")
        return bool(ws2.get("status", {}).get("conditions"))

    await eventually(reconciled_by_new_leader, timeout=60, what="the second replica reconciling")
    timings["leader_delete_to_reconcile_s"] = time.monotonic() - t_kill
    new_holder = get_json(cluster, "lease", "kaito-workspace", "-n", NAMESPACE)["spec"]["holderIdentity"]
    assert not new_holder.startswith(leader["metadata"]["name"] + "_")
    assert timings["leader_delete_to_reconcile_s"] < FAILOVER_BUDGET_S, timings
    await eventually(
        lambda: workspace_ready(cluster, "workspace-failover"), timeout=180, what="second Workspace ready"
    )
    await wait_rolled_out(cluster, "kaito-workspace")

    # 5. Prometheus, discovering what the ServiceMonitors select ------------------------------------
    monitors = get_json(cluster, "servicemonitors", "-n", NAMESPACE)["items"]
    jobs = scrape_configs_from_servicemonitors(monitors, cluster.kubeconfig, scrape_interval="1s")
    t0 = time.monotonic()
    with PrometheusServer(jobs, workdir=tmp_path / "prometheus") as prom:
        targets = await asyncio.to_thread(prom.wait_targets_up, 3, timeout=90)
        scraped = {t["labels"].get("pod") for t in targets}
        expected = {p["metadata"]["name"] for p in await pods(cluster, "kaito-workspace")}
        expected |= {p["metadata"]["name"] for p in provisioner_pods}
        assert scraped == expected, (scraped, expected)
        series = await asyncio.to_thread(prom.wait_query, 'kaito_workspace_count{state="Ready"}', timeout=60)
        from_pods = {s["metric"].get("pod") for s in series}
        assert from_pods == {p["metadata"]["name"] for p in await pods(cluster, "kaito-workspace")}, series
        assert all(s["value"][1] == "2" for s in series), series
    timings["prometheus_targets_up_s"] = time.monotonic() - t0

    # 6. helm upgrade to a changed image ---------------------------------------------------------------
    before = {m["metadata"]["name"]: m["metadata"]["uid"] for m in get_json(cluster, "machines")["items"]}
    registry, tag = split_ref(project_images["controller"])
    upgraded = f"{registry}/kaito-controller:{tag}-upgrade"
    await asyncio.to_thread(real_node.load, project_images["controller"], [upgraded])
    t0 = time.monotonic()
    await helm(
        cluster,
        "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, "--reuse-values",
        "--set", f"workspace.image.tag={tag}-upgrade",
    )  # fmt: skip
    await wait_rolled_out(cluster, "kaito-workspace", upgraded)
    timings["upgrade_rollout_s"] = time.monotonic() - t0
    for name in (WORKSPACE, "workspace-failover"):
        assert await workspace_ready(cluster, name), f"{name} lost readiness across the upgrade"
    after = {m["metadata"]["name"]: m["metadata"]["uid"] for m in get_json(cluster, "machines")["items"]}
    assert after == before
    assert get_json(cluster, "deployment", WORKSPACE, "-n", "default")["metadata"]["uid"] == deployment_uid
    assert (
        ws["metadata"]["uid"] == get_json(cluster, "workspace", WORKSPACE, "-n", "default")["metadata"]["uid"]
    )

    # 7. uninstall ------------------------------------------------------------------------------------
    # Workspaces go first, while their controllers run (their finalizer releases the Machines).
    cluster.kubectl("delete", "workspaces", "--all", "-n", "default", "--wait=true", timeout=180)

    async def machines_gone() -> bool:
        return not (await aget_json(cluster, "machines"))["items"]

    await eventually(machines_gone, timeout=120, what="the Machines released")
    t0 = time.monotonic()
    await helm(cluster, "uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", "--timeout", "120s")

    async def nothing_left() -> bool:
        left = await asyncio.to_thread(leftovers, cluster)
        assert left == [], f"left behind: {left}"
        return True

    await eventually(nothing_left, timeout=90, what="every object of ours but the CRDs gone", interval=1.0)
    timings["uninstall_s"] = time.monotonic() - t0
    crds = {c["metadata"]["name"] for c in get_json(cluster, "crd")["items"]}
    assert crds >= KEPT_CRDS
    print("chart on a real node:", {k: round(v, 1) for k, v in timings.items()})
