"""A real node in the local cluster: containers of locally built images, ``kubectl logs``/``exec``/
``port-forward`` through the apiserver, the apiserver and a ClusterIP Service reached from inside a
pod, and the taint + label that keep pods meant for kwok GPU nodes and pods meant for the real node
apart. Real containerd, runc, bridge CNI, kubelet and kube-proxy (hack/realnode.py)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request

import pytest

from hack.localcluster import LocalCluster
from hack.realnode import NODE_IP, NODE_NAME, POD_CIDR, TAINT, RealNode
from test.e2e.realnode.helpers import aget_json, get_json, new_namespace, pod, pod_condition
from test.waiting import eventually

pytestmark = pytest.mark.timeout(300)

# Prints the apiserver's version as seen through the `kubernetes` Service, then the body of the
# ClusterIP Service in $WEB: both with nothing but the pod's own network and service account.
IN_POD_CHECK = """
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
req = urllib.request.Request(f"https://{host}:{port}/version",
                             headers={"Authorization": "Bearer " + open(sa + "/token").read()})
print("apiserver", host, json.load(urllib.request.urlopen(req, context=ctx, timeout=10))["gitVersion"])
print("web", urllib.request.urlopen("http://" + os.environ["WEB"] + "/hello.txt", timeout=10).read().decode())
"""


def apply(cluster: LocalCluster, ns: str, obj: dict[str, object]) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))


async def wait_ready(cluster: LocalCluster, ns: str, name: str, timeout: float = 90) -> float:
    t0 = time.monotonic()

    async def ready() -> bool:
        p = await aget_json(cluster, "pod", name, "-n", ns)
        return pod_condition(p, "Ready").get("status") == "True"

    await eventually(ready, timeout=timeout, what=f"pod {ns}/{name} Ready", interval=0.2)
    return time.monotonic() - t0


def test_node_registers_ready_with_taint_label_and_bridge_address(
    node_cluster: LocalCluster, real_node: RealNode
) -> None:
    node = get_json(node_cluster, "node", NODE_NAME)
    assert TAINT in [{k: t[k] for k in ("key", "value", "effect")} for t in node["spec"].get("taints", [])]
    assert node["metadata"]["labels"]["kaito.sh/real-node"] == "true"
    assert "kwok.x-k8s.io/node" not in node["metadata"].get("annotations", {})
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == NODE_IP
    assert node["spec"]["podCIDR"] == POD_CIDR
    conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conditions["Ready"] == "True"


async def test_pod_logs_exec_port_forward_apiserver_and_service(
    node_cluster: LocalCluster, real_node: RealNode, project_images: dict[str, str]
) -> None:
    ns = new_namespace(node_cluster, "rn-pod")
    image = project_images["base"]
    web = pod(
        "web",
        image,
        ["sh", "-c", "mkdir -p /tmp/www && echo hello-from-pod > /tmp/www/hello.txt && "
         "cd /tmp/www && exec python3 -m http.server 8080"],
        ready_port=8080,
    )  # fmt: skip
    apply(node_cluster, ns, web)
    took = await wait_ready(node_cluster, ns, "web")
    print(f"first pod on the real node Ready in {took:.1f}s (from apply)")
    p = get_json(node_cluster, "pod", "web", "-n", ns)
    assert p["spec"]["nodeName"] == NODE_NAME
    assert p["status"]["podIP"].startswith(POD_CIDR.rsplit(".", 1)[0] + ".")

    # logs: the kubelet's readiness probes, as the server logged them.
    logs = (
        node_cluster.kubectl("logs", "-n", ns, "web").stdout
        + node_cluster.kubectl("logs", "-n", ns, "web").stderr
    )
    assert re.search(r'"GET / HTTP/1\.1" 200', logs), logs
    # exec: runs in the container's namespaces (its hostname is the pod's name).
    out = node_cluster.kubectl(
        "exec", "-n", ns, "web", "--", "python3", "-c", "import socket; print(socket.gethostname())"
    )
    assert out.stdout.strip() == "web"
    # port-forward: a local port to the pod's 8080, through apiserver and kubelet.
    pf = await asyncio.create_subprocess_exec(
        str(node_cluster.kubectl_path),
        f"--kubeconfig={node_cluster.kubeconfig}",
        "port-forward", "-n", ns, "pod/web", ":8080",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert pf.stdout is not None
        line = (await asyncio.wait_for(pf.stdout.readline(), timeout=30)).decode()
        match = re.search(r"127\.0\.0\.1:(\d+) -> 8080", line)
        assert match, line
        url = f"http://127.0.0.1:{match.group(1)}/hello.txt"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        assert body == b"hello-from-pod\n"
    finally:
        pf.terminate()
        await pf.wait()

    # From inside a pod: the apiserver through the `kubernetes` Service, and a ClusterIP Service.
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    apply(node_cluster, ns, svc)
    cluster_ip = get_json(node_cluster, "service", "web", "-n", ns)["spec"]["clusterIP"]
    check = pod("check", image, ["python3", "-c", IN_POD_CHECK], restart="Never", env={"WEB": cluster_ip})
    apply(node_cluster, ns, check)

    async def done() -> str:
        p = await aget_json(node_cluster, "pod", "check", "-n", ns)
        phase = p["status"].get("phase")
        assert phase != "Failed", node_cluster.kubectl("logs", "-n", ns, "check", check=False).stdout
        return str(phase == "Succeeded") and phase == "Succeeded"  # type: ignore[return-value]

    await eventually(done, timeout=60, what="the in-pod check to finish", interval=0.5)
    out = node_cluster.kubectl("logs", "-n", ns, "check").stdout.splitlines()
    assert out == ["apiserver 10.0.0.1 v1.37.2", "web hello-from-pod"], out


async def test_taint_and_label_keep_kwok_pods_and_real_node_pods_apart(
    node_cluster: LocalCluster, real_node: RealNode, project_images: dict[str, str]
) -> None:
    ns = new_namespace(node_cluster, "rn-apart")
    node_cluster.create_kwok_node("kwok-gpu-apart", labels={"apps": "apart"}, gpus=1)
    image = project_images["base"]
    # A pod with no placement at all (as a workload for a kwok GPU node): never the real node.
    apply(node_cluster, ns, pod("anywhere", image, ["sleep", "3600"], on_real_node=False))
    # A pod that selects the real node but does not tolerate its taint: never scheduled.
    picky = pod("select-only", image, ["sleep", "3600"], on_real_node=False)
    picky["spec"]["nodeSelector"] = {"kaito.sh/real-node": "true"}  # type: ignore[index]
    apply(node_cluster, ns, picky)

    async def scheduled_on_kwok() -> bool:
        p = await aget_json(node_cluster, "pod", "anywhere", "-n", ns)
        return bool(p["spec"].get("nodeName"))

    await eventually(scheduled_on_kwok, timeout=30, what="pod 'anywhere' scheduled")
    assert get_json(node_cluster, "pod", "anywhere", "-n", ns)["spec"]["nodeName"] == "kwok-gpu-apart"

    async def unschedulable() -> bool:
        p = await aget_json(node_cluster, "pod", "select-only", "-n", ns)
        cond = pod_condition(p, "PodScheduled")
        return cond.get("reason") == "Unschedulable" and "untolerated taint" in cond.get("message", "")

    await eventually(unschedulable, timeout=30, what="pod 'select-only' Unschedulable for the taint")
    assert not get_json(node_cluster, "pod", "select-only", "-n", ns)["spec"].get("nodeName")
