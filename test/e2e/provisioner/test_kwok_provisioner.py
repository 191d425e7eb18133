"""The provisioner as a real process with the kwok cloud on the full local cluster (kwok keeps Nodes Ready)."""

from __future__ import annotations

import secrets
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient, CoordinationV1Api, CoreV1Api, CustomObjectsApi, PolicyV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from hack.localcluster import LocalCluster
from test.e2e.provisioner.helpers import ProvisionerProcess, gpu_machine, start_provisioner
from test.waiting import eventually

GROUP, VERSION, PLURAL = "karpenter.sh", "v1alpha5", "machines"


async def http_get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.text()


async def wait_ready(p: ProvisionerProcess) -> None:
    async def ready() -> bool:
        assert p.proc.poll() is None, f"provisioner exited {p.proc.returncode}:\n{p.log_tail()}"
        try:
            status, _ = await http_get(p.probe_port, "/readyz")
        except aiohttp.ClientError:
            return False
        return status == 200

    await eventually(ready, 60, "the provisioner's /readyz to answer 200")


async def write_requests(port: int) -> dict[str, float]:
    """``rest_client_requests_total`` of POST/PATCH/DELETE by label set: the lifecycle's writes (the
    leader elector renews its Lease with PUT, which is excluded)."""
    _, text = await http_get(port, "/metrics")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("rest_client_requests_total{") and any(
            f'method="{m}"' in line for m in ("POST", "PATCH", "DELETE")
        ):
            labels, _, value = line.rpartition(" ")
            out[labels] = float(value)
    return out


async def reconcile_count(port: int) -> float:
    """How many reconciles the provisioner's lifecycle controller finished (any result)."""
    _, text = await http_get(port, "/metrics")
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("controller_runtime_reconcile_total{") and 'controller="machine-lifecycle"' in line
    )


async def reconciled_after(p: ProvisionerProcess, before: float, what: str) -> float:
    """Wait until the lifecycle controller reconciled again after ``what``; the new count."""

    async def more() -> float:
        n = await reconcile_count(p.metrics_port)
        assert n > before, f"{n} reconciles, {before} before"
        return n

    return await eventually(more, 30, f"the provisioner to reconcile {what}")


def condition(machine: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (machine.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


async def test_machine_becomes_ready_and_deletion_removes_node(
    provisioner: ProvisionerProcess, api_client: ApiClient, namespace: str
) -> None:
    """A Machine gets a kwok GPU Node, links it and turns Ready; deleting it deletes the Node and the Machine."""
    await wait_ready(provisioner)

    async def leading() -> str | None:
        try:
            lease = await CoordinationV1Api(api_client).read_namespaced_lease(
                "gpu-provisioner-leader-election", namespace
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return str(lease.spec.holder_identity or "") or None

    await eventually(leading, 30, "the provisioner to hold its Lease")
    crd, core = CustomObjectsApi(api_client), CoreV1Api(api_client)
    name = "e2e" + secrets.token_hex(4)
    await crd.create_cluster_custom_object(
        GROUP, VERSION, PLURAL, gpu_machine(name, provisioner.selector_labels)
    )

    async def ready_machine() -> dict[str, Any] | None:
        assert provisioner.proc.poll() is None, provisioner.log_tail()
        m: dict[str, Any] = await crd.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        c = condition(m, "Ready")
        return m if c and c["status"] == "True" else None

    machine = await eventually(ready_machine, 60, f"machine {name} to be Ready")
    status = machine["status"]
    for type_ in ("MachineLaunched", "MachineRegistered", "MachineInitialized"):
        assert (condition(machine, type_) or {}).get("status") == "True", machine
    assert "karpenter.sh/termination" in machine["metadata"]["finalizers"]
    node_name = status["nodeName"]
    assert node_name.startswith(f"aks-{name}-")
    assert status["providerID"] == f"kwok://{node_name}"
    assert status["allocatable"]["nvidia.com/gpu"] == "2"

    node = await core.read_node(node_name)
    assert node.spec.provider_id == status["providerID"]
    assert node.metadata.labels["karpenter.sh/registered"] == "true"
    assert node.metadata.labels["karpenter.sh/initialized"] == "true"
    assert node.metadata.labels["kaito.sh/workspace"] == "falcon"
    assert any(t.key == "sku" and t.effect == "NoSchedule" for t in node.spec.taints)
    assert any(r.kind == "Machine" and r.name == name for r in node.metadata.owner_references)

    code, text = await http_get(provisioner.metrics_port, "/metrics")
    assert code == 200
    ours = "\n".join(line for line in text.splitlines() if line.startswith("kaito_"))
    assert 'kaito_machine_phase{phase="Ready"} 1.0' in ours, ours
    assert "kaito_machine_launch_duration_seconds_count 1.0" in ours, ours
    assert "kaito_machine_initialization_duration_seconds_count 1.0" in ours, ours
    assert 'kaito_cloud_request_duration_seconds_count{operation="create",provider="kwok"}' in ours, ours

    # Idle: a Ready Machine costs no writes. kwok heartbeats only every few minutes, so the window makes
    # the events itself: a Node heartbeat (what kwok and the kubelet write) and a touch of the Machine's
    # metadata (a re-delivered Machine, as after a relist with a new resourceVersion). Each must reach
    # the provisioner (its reconcile count rises) and reconcile to "nothing changed".
    before = await write_requests(provisioner.metrics_port)
    reconciles = await reconcile_count(provisioner.metrics_port)
    # A heartbeat within the second of kwok's own would change nothing (no event): one second later.
    current = await core.read_node(node_name)
    beats = [c.last_heartbeat_time for c in current.status.conditions or [] if c.type == "Ready"]
    beat = max([datetime.now(UTC), *(b + timedelta(seconds=1) for b in beats if b)])
    patched = await core.patch_node_status(
        node_name,
        {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "lastHeartbeatTime": beat.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                ]
            }
        },
    )
    assert patched.metadata.resource_version != current.metadata.resource_version
    reconciles = await reconciled_after(provisioner, reconciles, "the Node heartbeat")
    await crd.patch_cluster_custom_object(
        GROUP,
        VERSION,
        PLURAL,
        name,
        {"metadata": {"annotations": {"e2e.kaito.sh/touched": "1"}}},
        _content_type="application/merge-patch+json",
    )
    await reconciled_after(provisioner, reconciles, "the Machine touch")
    assert await write_requests(provisioner.metrics_port) == before

    await crd.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)

    async def gone() -> bool:
        try:
            await crd.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
            return False
        except ApiException as e:
            if e.status != 404:
                raise
        try:
            await core.read_node(node_name)
            return False
        except ApiException as e:
            return e.status == 404

    await eventually(gone, 60, f"machine {name} and node {node_name} to be deleted")
    assert provisioner.terminate() == 0, provisioner.log_tail()


async def test_restart_before_node_appears_neither_leaks_nor_duplicates(
    machine_crd: LocalCluster, api_client: ApiClient, tmp_path: Path
) -> None:
    """SIGKILL while kwok's Node is still pending (that creation dies with the process): the next
    provisioner launches again at once, and exactly one Node exists for the Machine."""
    first = start_provisioner(machine_crd, tmp_path / "first.log", "--kwok-node-delay", "30")
    crd, core = CustomObjectsApi(api_client), CoreV1Api(api_client)
    name = "rk" + secrets.token_hex(4)
    second: ProvisionerProcess | None = None
    try:
        await wait_ready(first)
        await crd.create_cluster_custom_object(
            GROUP, VERSION, PLURAL, gpu_machine(name, first.selector_labels)
        )

        async def launched() -> bool:
            m: dict[str, Any] = await crd.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
            return (condition(m, "MachineLaunched") or {}).get("status") == "True"

        await eventually(launched, 30, f"machine {name} to be launched")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)

        # Same run label, so the new process serves the same Machine.
        second = start_provisioner(
            machine_crd, tmp_path / "second.log", "--kwok-node-delay", "1", run=first.run
        )

        async def ready() -> dict[str, Any] | None:
            assert second is not None and second.proc.poll() is None, second.log_tail() if second else ""
            m: dict[str, Any] = await crd.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
            return m if (condition(m, "Ready") or {}).get("status") == "True" else None

        # Well within the 15-minute registration timeout: the lost creation is noticed, not waited out.
        m = await eventually(ready, 60, f"machine {name} to be Ready after the restart")
        selector = f"agentpool={name},kubernetes.azure.com/agentpool={name}"
        nodes = (await core.list_node(label_selector=selector)).items
        assert [n.metadata.name for n in nodes] == [m["status"]["nodeName"]]

        await crd.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)

        async def gone() -> bool:
            return not (await core.list_node(label_selector=selector)).items and not [
                i
                for i in (await crd.list_cluster_custom_object(GROUP, VERSION, PLURAL))["items"]
                if i["metadata"]["name"] == name
            ]

        await eventually(gone, 60, f"machine {name} and its node to be deleted")
        assert second.terminate() == 0, second.log_tail()
    finally:
        for p in (first, second):
            if p is not None and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()


async def test_deletion_drains_node_honouring_disruption_budget(
    provisioner: ProvisionerProcess, api_client: ApiClient, namespace: str
) -> None:
    """Deleting a Machine cordons its Node and evicts its pods; a PodDisruptionBudget holds the Node (and
    the Machine) until it allows the eviction."""
    await wait_ready(provisioner)
    crd, core, policy = CustomObjectsApi(api_client), CoreV1Api(api_client), PolicyV1Api(api_client)
    name = "dr" + secrets.token_hex(4)
    await crd.create_cluster_custom_object(
        GROUP, VERSION, PLURAL, gpu_machine(name, provisioner.selector_labels)
    )

    async def ready_node() -> str | None:
        m: dict[str, Any] = await crd.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        return m["status"]["nodeName"] if (condition(m, "Ready") or {}).get("status") == "True" else None

    node_name = await eventually(ready_node, 60, f"machine {name} to be Ready")
    labels = {"app": f"drain-{name}"}
    await policy.create_namespaced_pod_disruption_budget(
        namespace,
        {"metadata": {"name": "keep"}, "spec": {"minAvailable": 1, "selector": {"matchLabels": labels}}},
    )
    await core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "model", "labels": labels},
            "spec": {
                "nodeName": node_name,
                "tolerations": [{"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
                "containers": [{"name": "srv", "image": "registry.invalid/model:1"}],
            },
        },
    )

    async def pod_ready() -> bool:
        pod = await core.read_namespaced_pod("model", namespace)
        return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])

    await eventually(pod_ready, 60, "the model pod to be Ready on the machine's node")

    await crd.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)

    async def blocked() -> bool:
        events = await core.list_namespaced_event("default", field_selector=f"involvedObject.name={name}")
        return any(e.reason == "EvictionBlocked" for e in events.items)

    await eventually(blocked, 60, "an EvictionBlocked event on the machine")
    node = await core.read_node(node_name)
    assert node.spec.unschedulable is True  # cordoned
    assert node.metadata.deletion_timestamp is None  # but kept while the budget holds
    still: dict[str, Any] = await crd.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    assert "karpenter.sh/termination" in still["metadata"]["finalizers"]
    assert (await core.read_namespaced_pod("model", namespace)).metadata.deletion_timestamp is None

    await policy.delete_namespaced_pod_disruption_budget("keep", namespace)

    async def all_gone() -> bool:
        for read in (
            lambda: crd.get_cluster_custom_object(GROUP, VERSION, PLURAL, name),
            lambda: core.read_node(node_name),
            lambda: core.read_namespaced_pod("model", namespace),
        ):
            try:
                await read()
                return False
            except ApiException as e:
                if e.status != 404:
                    raise
        return True

    await eventually(all_gone, 60, "the pod to be evicted and the node and machine deleted")
