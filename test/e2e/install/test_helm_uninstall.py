"""``helm install`` then ``helm uninstall`` of the chart on a full local cluster of its own (kwok), and
nothing of ours is left but the CRDs (as Helm does).

The pods are "Running" on a kwok node (kwok plays their kubelet; no container starts), so what the
controllers create at run time is created here by the controllers' own code, as they would: the
webhook certificate Secret and the caBundle (``CertManager.ensure``) and both leader-election Leases
(``LeaderElector.try_acquire_or_renew``). The chart creates the Secret and the Leases empty so that
they are the release's; this test fails if one of them is created outside the release instead.

The kwok node carries a NoSchedule taint and a label of its own: the chart's ``tolerations`` and
``nodeSelector`` values put the pods there, with ``pullPolicy: Never`` and local image tags.

Its own cluster: the shared one holds config/'s RBAC applied by other suites (not Helm's), which
``helm install`` would rightly refuse to adopt.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient

from hack.localcluster import LocalCluster
from kaito.runtime.kube import KubeClient
from kaito.runtime.leader_election import LeaderElectionConfig, LeaderElector
from kaito.webhook.certs import CertManager
from test.conftest import local_cluster
from test.integration.install.helpers import CHART, prometheus_operator_crds, tools_dir
from test.waiting import eventually

NAMESPACE = "kaito-system"
RELEASE = "kaito"
NODE = "uninstall-node"
TAINT = {"key": "kaito.test/dedicated", "value": "controllers", "effect": "NoSchedule"}
WEBHOOKS = ("validation.workspace.kaito.sh", "mutation.workspace.kaito.sh")
# The CRDs stay after an uninstall (Helm never deletes a chart's crds/), and with them the local
# APIServices the apiserver registers for their groups.
KEPT_CRDS = {"workspaces.kaito.sh", "machines.karpenter.sh"}
KEPT_GROUPS = {crd.split(".", 1)[1] for crd in KEPT_CRDS}
# Names that are ours wherever they appear.
OUR_NAMES = ("kaito", "gpu-provisioner", "workspace-webhook")

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    yield from local_cluster("full")


def helm(cluster: LocalCluster, *args: str) -> str:
    """Run helm against the cluster (admin kubeconfig); fail with its stderr."""
    out = subprocess.run(
        [str(tools_dir() / "helm"), f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, f"helm {' '.join(args)}: {out.stderr}"
    return out.stdout


def get_json(cluster: LocalCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def is_ours(obj: dict[str, Any]) -> bool:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    return (
        labels.get("app.kubernetes.io/part-of") == "kaito"
        or labels.get("app.kubernetes.io/managed-by") in ("Helm", "kaito")
        or annotations.get("meta.helm.sh/release-name") == RELEASE
        or labels.get("owner") == "helm"  # Helm's release records
        or any(n in str(meta.get("name") or "") for n in OUR_NAMES)
    )


def leftovers(cluster: LocalCluster) -> list[str]:
    """Every object of every listable kind, namespaced or not, that is ours (see :func:`is_ours`).

    Not counted: the CRDs (kept by design) and their groups' local APIServices, the release Namespace itself (``--create-namespace``
    makes it outside the release, so Helm leaves it, empty of ours), and Events (records of what
    happened, expired by the apiserver's TTL, never owned by an installer).
    """
    kinds = cluster.kubectl("api-resources", "--verbs=list", "-o", "name").stdout.split()
    kinds = [k for k in kinds if k not in ("events", "events.events.k8s.io")]
    items = get_json(cluster, ",".join(kinds), "--all-namespaces")["items"]
    found = []
    for obj in items:
        meta = obj["metadata"]
        if obj["kind"] == "CustomResourceDefinition" and meta["name"] in KEPT_CRDS:
            continue
        spec = obj.get("spec") or {}
        if obj["kind"] == "APIService" and spec.get("group") in KEPT_GROUPS and not spec.get("service"):
            continue
        if obj["kind"] == "Namespace" and meta["name"] == NAMESPACE:
            continue
        if is_ours(obj):
            found.append(f"{obj['kind']} {meta.get('namespace', '')}/{meta['name']}".replace(" /", " "))
    return sorted(found)


async def act_as_the_controllers(cluster: LocalCluster) -> None:
    """What the pods would do at start, with their code: the webhook key pair, caBundle, Leases."""
    async with ApiClient(cluster.client_configuration()) as api:
        certs = CertManager(
            api,
            namespace=NAMESPACE,
            cert_dir=cluster.workdir / "webhook-certs",
            validating_webhooks=[WEBHOOKS[0]],
            mutating_webhooks=[WEBHOOKS[1]],
        )
        bundle = await certs.ensure()
        client = KubeClient(api)
        for lease in ("kaito-workspace", "gpu-provisioner-leader-election"):
            elector = LeaderElector(client, LeaderElectionConfig(lease, NAMESPACE, identity=f"{lease}-pod"))
            assert await elector.try_acquire_or_renew(), lease
    # They landed in the objects the release owns, which kept Helm's ownership.
    secret = get_json(cluster, "secret", "workspace-webhook-cert", "-n", NAMESPACE)
    assert base64.b64decode(secret["data"]["tls.crt"]) == bundle.cert
    leases = [
        get_json(cluster, "lease", n, "-n", NAMESPACE)
        for n in ("kaito-workspace", "gpu-provisioner-leader-election")
    ]
    assert [lease["spec"]["holderIdentity"] for lease in leases] == [
        "kaito-workspace-pod",
        "gpu-provisioner-leader-election-pod",
    ]
    for obj in (secret, *leases):
        annotations = obj["metadata"].get("annotations") or {}
        assert annotations.get("meta.helm.sh/release-name") == RELEASE, (
            f"{obj['kind']} {obj['metadata']['name']} was created outside the release: uninstall would leave it"
        )
    for kind, name in zip(
        ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"), WEBHOOKS, strict=True
    ):
        cfg = get_json(cluster, kind, name)
        assert base64.b64decode(cfg["webhooks"][0]["clientConfig"]["caBundle"]) == bundle.ca_bundle


async def test_uninstall_leaves_nothing_of_ours_but_the_crds(cluster: LocalCluster) -> None:
    for crd in prometheus_operator_crds():
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    cluster.create_kwok_node(NODE, labels={"kaito.test/pool": "controllers"}, taints=[TAINT])
    assert leftovers(cluster) == [], "the fresh cluster already holds objects that look like ours"

    values = [
        "image.registry=localhost",
        "image.pullPolicy=Never",
        "workspace.image.tag=dev",
        "provisioner.image.tag=dev",
        "provisioner.cloud=kwok",
        "nodeSelector.kaito\\.test/pool=controllers",
        f"tolerations[0].key={TAINT['key']},tolerations[0].operator=Equal,"
        f"tolerations[0].value={TAINT['value']},tolerations[0].effect={TAINT['effect']}",
    ]
    helm(
        cluster,
        "install", RELEASE, str(CHART),
        "--namespace", NAMESPACE, "--create-namespace",
        *[a for v in values for a in ("--set", v)],
        "--wait", "--timeout", "180s",
    )  # fmt: skip
    try:
        for name in ("kaito-workspace", "gpu-provisioner"):
            dep = get_json(cluster, "deployment", name, "-n", NAMESPACE)
            available = {c["type"]: c["status"] for c in dep["status"].get("conditions", [])}
            assert available.get("Available") == "True", (name, dep["status"])
            assert dep["status"]["readyReplicas"] == dep["spec"]["replicas"]
        pods = get_json(cluster, "pods", "-n", NAMESPACE)["items"]
        assert len(pods) == 3 and all(p["status"]["phase"] == "Running" for p in pods)
        assert {p["spec"]["nodeName"] for p in pods} == {NODE}
        assert all(c["imagePullPolicy"] == "Never" for p in pods for c in p["spec"]["containers"])

        await act_as_the_controllers(cluster)
        ours_while_installed = leftovers(cluster)
        for expected in (
            "Secret kaito-system/workspace-webhook-cert",
            "Lease kaito-system/kaito-workspace",
            "Lease kaito-system/gpu-provisioner-leader-election",
            "PrometheusRule kaito-system/kaito",
            "ValidatingWebhookConfiguration validation.workspace.kaito.sh",
        ):
            assert expected in ours_while_installed, (expected, ours_while_installed)
    finally:
        helm(cluster, "uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", "--timeout", "120s")

    # Pods, ReplicaSets and EndpointSlices go through the garbage collector: wait for it, then list.
    async def nothing_left() -> bool:
        left = leftovers(cluster)
        assert left == [], f"left behind: {left}"
        return True

    await eventually(nothing_left, timeout=60, what="every object of ours but the CRDs gone", interval=1.0)
    crds = {c["metadata"]["name"] for c in get_json(cluster, "crd")["items"]}
    assert crds >= KEPT_CRDS


def test_is_ours_recognises_what_the_chart_and_the_controllers_label() -> None:
    """The leftover filter is not vacuous: it matches labels, annotations and names of ours only."""
    assert is_ours({"metadata": {"name": "x", "labels": {"app.kubernetes.io/part-of": "kaito"}}})
    assert is_ours({"metadata": {"name": "x", "labels": {"app.kubernetes.io/managed-by": "kaito"}}})
    assert is_ours({"metadata": {"name": "x", "annotations": {"meta.helm.sh/release-name": "kaito"}}})
    assert is_ours({"metadata": {"name": "sh.helm.release.v1.kaito.v1", "labels": {"owner": "helm"}}})
    assert is_ours({"metadata": {"name": "kaito-workspace-7d9f-abcde"}})
    assert not is_ours({"metadata": {"name": "kube-root-ca.crt", "labels": {"app": "other"}}})
