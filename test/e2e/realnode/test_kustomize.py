"""The plain kustomize manifests (config/default) installed on a real node the way a user would with
``kubectl apply``: the CRDs, then the rendered objects with the images overridden to the locally built
ones (as config/default's own comment says to, with an overlay), ``imagePullPolicy: Never``, the real
node's placement and the kwok cloud. Both Deployments roll out in real containers and the pods serve
the admission webhook; deleting the manifests removes the pods."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hack.localcluster import LocalCluster
from hack.realnode import NODE_NAME, RealNode, pod_placement
from test.e2e.realnode.helpers import aget_json, get_json
from test.integration.install.helpers import (
    CONFIG,
    REPO,
    crd_files,
    prometheus_operator_crds,
    render_kustomize,
)
from test.waiting import eventually

pytestmark = pytest.mark.timeout(600)

NAMESPACE = "kaito-system"
IMAGES = {"kaito-workspace": "controller", "gpu-provisioner": "provisioner"}


def localize(objs: list[dict[str, Any]], images: dict[str, str]) -> list[dict[str, Any]]:
    """What an overlay would change: images, pull policy, placement on the real node, the kwok cloud."""
    for obj in objs:
        if obj["kind"] != "Deployment":
            continue
        spec = obj["spec"]["template"]["spec"]
        container = spec["containers"][0]
        container["image"] = images[IMAGES[obj["metadata"]["name"]]]
        container["imagePullPolicy"] = "Never"
        if obj["metadata"]["name"] == "gpu-provisioner":
            container["args"] = ["--cloud=kwok" if a.startswith("--cloud=") else a for a in container["args"]]
        placement = pod_placement()
        spec["nodeSelector"] = {**spec.get("nodeSelector", {}), **placement["nodeSelector"]}
        spec["tolerations"] = [*spec.get("tolerations", []), *placement["tolerations"]]
    return objs


async def test_kustomize_install_on_a_real_node(
    node_cluster: LocalCluster, real_node: RealNode, project_images: dict[str, str]
) -> None:
    cluster = node_cluster
    for crd in [*crd_files(), *prometheus_operator_crds()]:
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    objs = localize(render_kustomize(CONFIG / "default"), project_images)
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": objs})
    cluster.kubectl("apply", "--server-side", "-f", "-", input=manifest)

    async def available() -> bool:
        for name in IMAGES:
            dep = await aget_json(cluster, "deployment", name, "-n", NAMESPACE)
            if dep["status"].get("readyReplicas") != dep["spec"]["replicas"]:
                return False
        return True

    await eventually(available, timeout=180, what="both Deployments ready", interval=0.5)
    pods = get_json(cluster, "pods", "-n", NAMESPACE)["items"]
    assert {p["spec"]["nodeName"] for p in pods} == {NODE_NAME}
    assert sorted(p["spec"]["containers"][0]["image"] for p in pods) == sorted(
        [project_images["provisioner"], project_images["controller"], project_images["controller"]]
    )

    bad = (
        (REPO / "config/samples/kaito_workspace_phi_3.yaml").read_text().replace("Standard_NC6s_v3", "Nope_1")
    )
    out = cluster.kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-", input=bad, check=False)
    assert 'admission webhook "validation.workspace.kaito.sh" denied the request' in out.stderr, out.stderr

    cluster.kubectl("delete", "-f", "-", "--wait=true", input=manifest, timeout=180)

    async def pods_gone() -> bool:
        return not (await aget_json(cluster, "pods", "-n", NAMESPACE))["items"]

    await eventually(pods_gone, timeout=90, what="the controllers' pods gone")
