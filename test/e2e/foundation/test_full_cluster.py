"""Smoke test of the full local cluster: real scheduler, controller-manager and kwok nodes."""

from __future__ import annotations

import secrets

from kubernetes_asyncio.client import ApiClient, AppsV1Api, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from hack.localcluster import LocalCluster
from test.waiting import eventually


async def test_deployment_pod_scheduled_on_kwok_node_and_gc(
    full_cluster: LocalCluster, api_client: ApiClient, namespace: str
) -> None:
    """A Deployment's pod is bound by kube-scheduler to a kwok GPU node and becomes Ready; deleting the
    Deployment garbage-collects its ReplicaSet (and pods) through the real garbage collector."""
    node = f"kwok-gpu-{secrets.token_hex(3)}"
    full_cluster.create_kwok_node(
        node,
        labels={"node.kubernetes.io/instance-type": "Standard_NC6s_v3", "apps": "smoke"},
        gpus=1,
        taints=[{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
    )
    core, apps = CoreV1Api(api_client), AppsV1Api(api_client)

    async def node_ready() -> bool:
        n = await core.read_node(node)
        return any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))

    await eventually(node_ready, 30, f"kwok to mark {node} Ready")

    labels = {"app": "smoke"}
    await apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "smoke"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "nodeSelector": {"apps": "smoke"},
                        "tolerations": [
                            {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}
                        ],
                        "containers": [
                            {
                                "name": "srv",
                                "image": "registry.invalid/smoke:1",
                                "resources": {"limits": {"nvidia.com/gpu": "1"}},
                            }
                        ],
                    },
                },
            },
        },
    )

    async def pod_ready_on_node() -> bool:
        pods = (await core.list_namespaced_pod(namespace, label_selector="app=smoke")).items
        return any(
            p.spec.node_name == node
            and any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
            for p in pods
        )

    await eventually(pod_ready_on_node, 60, "the smoke pod to be Ready on the kwok node")

    async def deployment_available() -> bool:
        d = await apps.read_namespaced_deployment("smoke", namespace)
        return (d.status.available_replicas or 0) == 1

    await eventually(deployment_available, 30, "the Deployment to report 1 available replica")
    rs = (await apps.list_namespaced_replica_set(namespace, label_selector="app=smoke")).items
    assert len(rs) == 1 and rs[0].metadata.owner_references[0].kind == "Deployment"

    await apps.delete_namespaced_deployment("smoke", namespace, propagation_policy="Background")

    async def rs_and_pods_gone() -> bool:
        rs = (await apps.list_namespaced_replica_set(namespace, label_selector="app=smoke")).items
        pods = (await core.list_namespaced_pod(namespace, label_selector="app=smoke")).items
        return not rs and not pods

    await eventually(rs_and_pods_gone, 60, "the garbage collector to delete the ReplicaSet and pods")
    try:
        await core.delete_node(node)
    except ApiException as e:  # pragma: no cover
        assert e.status == 404
