"""The workspace reconciler in-process against a real kube-apiserver (no controller-manager, no kwok):
byo mode, stuck Machine deletion, minimal writes, preferredNodes rollout. Machine failure reasons come
from the real provisioner in test_workspace_with_provisioner.py.

Without a controller-manager nothing makes Deployments ready or collects garbage, so the tests play
those parts by writing the status subresources the real controllers would write.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient

from hack.localcluster import LocalCluster
from kaito.machine import MACHINES, machine_name
from kaito.presets.registry import default_registry
from kaito.presets.skus import default_sku_catalog
from kaito.runtime.kube import CONFIGMAPS, DEPLOYMENTS, EVENTS, JOBS, NODES, SERVICES, KubeClient
from kaito.runtime.manager import Manager, ManagerOptions
from kaito.runtime.metrics import REST_CLIENT_REQUESTS
from kaito.workspace.reconciler import WORKSPACES, ReconcilerOptions, WorkspaceReconciler, register
from test.waiting import eventually

REPO = Path(__file__).resolve().parents[3]


@dataclass
class Env:
    client: KubeClient
    rec: WorkspaceReconciler
    namespace: str

    async def ws(self, name: str) -> dict[str, Any] | None:
        return await self.client.get_or_none(WORKSPACES, name, self.namespace)

    async def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        ws = await self.ws(name)
        for c in ((ws or {}).get("status") or {}).get("conditions") or []:
            if c["type"] == type_:
                return dict(c)
        return None


async def run_operator(
    api_client: ApiClient, namespace: str, options: ReconcilerOptions
) -> AsyncIterator[Env]:
    client = KubeClient(api_client)
    mgr = Manager(client, ManagerOptions(name="it-workspace", probe_port=None, metrics_port=None))
    rec, _ = register(
        mgr,
        client,
        registry=default_registry(),
        skus=default_sku_catalog(),
        options=options,
        namespace=namespace,
    )
    task = asyncio.create_task(mgr.run())
    try:
        await eventually(lambda: asyncio.sleep(0, mgr.is_leader), 30, "manager started")
        yield Env(client, rec, namespace)
    finally:
        mgr.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)


@pytest.fixture
async def byo(crds: LocalCluster, api_client: ApiClient, namespace: str) -> AsyncIterator[Env]:
    async for env in run_operator(api_client, namespace, ReconcilerOptions(provisioning="byo", tuning=True)):
        yield env


@pytest.fixture
async def machines(crds: LocalCluster, api_client: ApiClient, namespace: str) -> AsyncIterator[Env]:
    opts = ReconcilerOptions(provisioning="machine", machine_deletion_timeout=2.0, deletion_requeue=0.5)
    async for env in run_operator(api_client, namespace, opts):
        yield env


def phi3(name: str, labels: dict[str, str], **resource: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": name},
        "resource": {
            "instanceType": "Standard_NC6s_v3",
            "labelSelector": {"matchLabels": labels},
            **resource,
        },
        "inference": {"preset": {"name": "phi-3-mini-4k-instruct"}},
    }


async def make_node(client: KubeClient, name: str, labels: dict[str, str], ready: bool = True) -> None:
    await client.create(
        NODES,
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "node.kubernetes.io/instance-type": "Standard_NC6s_v3",
                    "kubernetes.io/hostname": name,
                    **labels,
                },
            },
        },
    )
    status = {
        "conditions": [
            {"type": "Ready", "status": "True" if ready else "False", "reason": "test", "message": ""}
        ],
        "capacity": {"nvidia.com/gpu": "1", "pods": "10"},
        "allocatable": {"nvidia.com/gpu": "1", "pods": "10"},
    }
    await client.merge_patch_status(NODES, name, status)


async def test_byo_reports_missing_nodes_then_uses_new_node(byo: Env) -> None:
    """byo never creates Machines; it names what is missing, and picks up a node that appears."""
    labels = {"apps": f"byo-{byo.namespace[-6:]}"}
    await byo.client.create(WORKSPACES, phi3("ws", labels), byo.namespace)

    async def missing() -> Any:
        c = await byo.condition("ws", "ResourceReady")
        return c if c and c["status"] == "False" else None

    cond = await eventually(missing, 20, "ResourceReady=False")
    assert "found 0" in cond["message"] and f"apps={labels['apps']}" in cond["message"]
    ws = await byo.ws("ws")
    assert ws is not None and (ws["status"]["state"], ws["status"]["reason"]) == ("NotReady", "NodesMissing")
    # No Machine will ever be needed in byo mode: no finalizer, ownerReferences are enough.
    assert "finalizers" not in ws["metadata"]
    assert (await byo.client.list(MACHINES, label_selector=f"kaito.sh/workspacenamespace={byo.namespace}"))[
        "items"
    ] == []

    node = f"n-{byo.namespace[-6:]}"
    await make_node(byo.client, node, labels)

    async def deployed() -> Any:
        return await byo.client.get_or_none(DEPLOYMENTS, "ws", byo.namespace)

    dep = await eventually(deployed, 20, "the Deployment once a node qualifies")
    terms = dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]} in terms[
        "nodeSelectorTerms"
    ][0]["matchExpressions"]

    async def resource_ready() -> Any:
        c = await byo.condition("ws", "ResourceReady")
        return c if c and c["status"] == "True" else None

    await eventually(resource_ready, 20, "ResourceReady=True")
    # Play the deployment controller: one ready replica -> the workspace becomes ready.
    await byo.client.merge_patch_status(DEPLOYMENTS, "ws", {"replicas": 1, "readyReplicas": 1}, byo.namespace)

    async def ready() -> Any:
        c = await byo.condition("ws", "WorkspaceReady")
        return c if c and c["status"] == "True" else None

    await eventually(ready, 20, "WorkspaceReady=True")
    await byo.client.delete(NODES, node)


def writes() -> float:
    total = 0.0
    for metric in REST_CLIENT_REQUESTS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("method") in (
                "POST",
                "PUT",
                "PATCH",
                "DELETE",
            ):
                total += sample.value
    return total


async def test_reconcile_without_change_writes_nothing(byo: Env) -> None:
    """Once ready, reconciling again (any number of times) sends no write to the apiserver."""
    labels = {"apps": f"idle-{byo.namespace[-6:]}"}
    node = f"idle-{byo.namespace[-6:]}"
    await make_node(byo.client, node, labels)
    await byo.client.create(WORKSPACES, phi3("idle", labels), byo.namespace)
    await eventually(lambda: byo.client.get_or_none(DEPLOYMENTS, "idle", byo.namespace), 20, "Deployment")
    await byo.client.merge_patch_status(
        DEPLOYMENTS, "idle", {"replicas": 1, "readyReplicas": 1}, byo.namespace
    )

    async def ready_in_cache() -> bool:
        ws = byo.rec.workspaces.store.get_by_name("idle", byo.namespace)
        conds = ((ws or {}).get("status") or {}).get("conditions") or []
        return any(c["type"] == "WorkspaceReady" and c["status"] == "True" for c in conds)

    await eventually(ready_in_cache, 20, "WorkspaceReady=True in the cache")
    before = writes()
    for _ in range(5):
        await byo.rec.reconcile(f"{byo.namespace}/idle")
    assert writes() == before
    await byo.client.delete(NODES, node)


async def test_preferred_nodes_change_rolls_the_deployment(byo: Env) -> None:
    """Changing preferredNodes moves the workload: the Deployment is updated in place (new hash)."""
    labels = {"apps": f"pref-{byo.namespace[-6:]}"}
    a, b = f"pa-{byo.namespace[-6:]}", f"pb-{byo.namespace[-6:]}"
    await make_node(byo.client, a, labels)
    await make_node(byo.client, b, labels)
    await byo.client.create(WORKSPACES, phi3("pref", labels, preferredNodes=[a]), byo.namespace)

    def hosts(dep: dict[str, Any]) -> list[str]:
        terms = dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
        exprs = terms["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
            "matchExpressions"
        ]
        return next(e["values"] for e in exprs if e["key"] == "kubernetes.io/hostname")

    async def on(node: str) -> Any:
        dep = await byo.client.get_or_none(DEPLOYMENTS, "pref", byo.namespace)
        return dep if dep is not None and hosts(dep) == [node] else None

    first = await eventually(lambda: on(a), 20, f"Deployment pinned to {a}")
    await byo.client.patch(WORKSPACES, "pref", {"resource": {"preferredNodes": [b]}}, byo.namespace)
    second = await eventually(lambda: on(b), 20, f"Deployment moved to {b}")
    assert second["metadata"]["uid"] == first["metadata"]["uid"]  # updated in place, not recreated
    assert second["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}

    async def workers_b() -> bool:
        ws = await byo.ws("pref")
        return ws is not None and ws["status"].get("workerNodes") == [b]

    await eventually(workers_b, 20, f"status.workerNodes == [{b}]")
    for n in (a, b):
        await byo.client.delete(NODES, n)


async def test_deletion_completes_when_a_machine_is_stuck(machines: Env) -> None:
    """A Machine that never goes away does not block deletion forever: after the timeout the finalizer
    is removed and a Warning Event names the Machine."""
    env = machines
    labels = {"apps": f"stuck-{env.namespace[-6:]}"}
    await env.client.create(WORKSPACES, phi3("stuck", labels), env.namespace)
    mname = machine_name(env.namespace, "stuck", 0)
    await eventually(lambda: env.client.get_or_none(MACHINES, mname), 20, "the Machine")
    await env.client.patch(MACHINES, mname, {"metadata": {"finalizers": ["test.kaito.sh/stuck"]}})
    await env.client.delete(WORKSPACES, "stuck", env.namespace)

    async def gone() -> bool:
        return await env.ws("stuck") is None

    await eventually(gone, 30, "the workspace to be deleted despite the stuck Machine")
    m = await env.client.get(MACHINES, mname)
    assert m["metadata"].get("deletionTimestamp")  # the controller did ask for its deletion
    events = (await env.client.list(EVENTS, env.namespace, field_selector="involvedObject.name=stuck"))[
        "items"
    ]
    stuck = [e for e in events if e["reason"] == "MachineDeletionStuck"]
    assert stuck and stuck[0]["type"] == "Warning" and mname in stuck[0]["message"]
    await env.client.patch(MACHINES, mname, {"metadata": {"finalizers": None}})


async def test_deletion_finds_a_machine_the_cache_has_not_seen(machines: Env) -> None:
    """A workspace deleted right after its Machine was created: the Machine cache can lag behind the
    controller's own create, so the finalizer must be removed on what the apiserver says, or the
    Machine (and its GPU node) is orphaned. The lag is made deterministic: the Machine informer is
    stopped and the Machine dropped from its cache before the delete."""
    env = machines
    labels = {"apps": f"lag-{env.namespace[-6:]}"}
    await env.client.create(WORKSPACES, phi3("lag", labels), env.namespace)
    mname = machine_name(env.namespace, "lag", 0)
    await eventually(lambda: env.client.get_or_none(MACHINES, mname), 20, "the Machine")
    assert env.rec.machines is not None
    await env.rec.machines.stop()
    env.rec.machines.store.delete(mname)  # cluster-scoped: the key is the name
    assert not env.rec._machines_of(f"{env.namespace}/lag")

    await env.client.delete(WORKSPACES, "lag", env.namespace)

    async def gone() -> bool:
        return await env.ws("lag") is None

    await eventually(gone, 30, "the workspace to be deleted")
    m = await env.client.get_or_none(MACHINES, mname)
    assert m is None or m["metadata"].get("deletionTimestamp"), "the Machine was orphaned"


async def test_a_machine_whose_workspace_is_gone_is_deleted(machines: Env) -> None:
    """A Machine labelled for a workspace that does not exist (what the apiserver's finalizer race,
    kubernetes/kubernetes#77988, leaves behind) is deleted when its watch event arrives; a Machine of a
    live workspace is left alone."""
    env = machines
    labels = {"apps": f"reap-{env.namespace[-6:]}"}
    await env.client.create(WORKSPACES, phi3("live", labels), env.namespace)
    live = machine_name(env.namespace, "live", 0)
    original = await eventually(lambda: env.client.get_or_none(MACHINES, live), 20, "the live Machine")
    ghost = machine_name(env.namespace, "ghost", 0)
    body = {
        "apiVersion": original["apiVersion"],
        "kind": original["kind"],
        "metadata": {
            "name": ghost,
            "labels": {
                **original["metadata"]["labels"],
                "kaito.sh/workspace": "ghost",
                "kaito.sh/workspacenamespace": env.namespace,
            },
        },
        "spec": original["spec"],
    }
    await env.client.create(MACHINES, body)

    async def reaped() -> bool:
        m = await env.client.get_or_none(MACHINES, ghost)
        return m is None or bool(m["metadata"].get("deletionTimestamp"))

    await eventually(reaped, 20, "the orphaned Machine deleted")
    still = await env.client.get(MACHINES, live)
    assert not still["metadata"].get("deletionTimestamp"), "the live workspace's Machine was touched"


async def test_name_taken_by_a_foreign_object_is_reported_not_taken_over(byo: Env) -> None:
    """A Service of the workspace's name that the workspace does not own is left alone and reported."""
    labels = {"apps": f"taken-{byo.namespace[-6:]}"}
    node = f"taken-{byo.namespace[-6:]}"
    await make_node(byo.client, node, labels)
    foreign = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "taken"},
        "spec": {"ports": [{"port": 8080}], "selector": {"app": "mine"}},
    }
    await byo.client.create(SERVICES, foreign, byo.namespace)
    await byo.client.create(WORKSPACES, phi3("taken", labels), byo.namespace)

    async def conflict() -> Any:
        ws = await byo.ws("taken")
        return ws if ((ws or {}).get("status") or {}).get("reason") == "ChildConflict" else None

    ws = await eventually(conflict, 20, "state reason ChildConflict")
    assert ws["status"]["state"] == "NotReady"
    c = await byo.condition("taken", "InferenceReady")
    assert c is not None and c["status"] == "False" and "does not belong to this workspace" in c["message"]
    svc = await byo.client.get(SERVICES, "taken", byo.namespace)
    assert svc["spec"]["ports"][0]["port"] == 8080 and "ownerReferences" not in svc["metadata"]
    await byo.client.delete(NODES, node)


def tuning_ws(name: str, labels: dict[str, str], **tuning: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": name},
        "resource": {"instanceType": "Standard_NC6s_v3", "labelSelector": {"matchLabels": labels}},
        "tuning": {
            "preset": {"name": "phi-3-mini-4k-instruct"},
            "method": "qlora",
            "input": {"urls": ["https://example.com/data/train.parquet"]},
            "output": {"image": "registry.example/adapter:0.1", "imagePushSecret": "push-secret"},
            **tuning,
        },
    }


async def _job_status(env: Env, name: str, done: str, reason: str = "", message: str = "") -> None:
    """Play the Job controller: the terminal conditions the apiserver accepts for a finished Job."""
    now = "2026-01-01T00:00:00Z"
    interim = "SuccessCriteriaMet" if done == "Complete" else "FailureTarget"
    conds = [
        {
            "type": interim,
            "status": "True",
            "reason": reason or interim,
            "message": message,
            "lastProbeTime": now,
            "lastTransitionTime": now,
        },
        {
            "type": done,
            "status": "True",
            "reason": reason or done,
            "message": message,
            "lastProbeTime": now,
            "lastTransitionTime": now,
        },
    ]
    status: dict[str, Any] = {"conditions": conds, "startTime": now}
    if done == "Complete":
        status |= {"completionTime": now, "succeeded": 1}
    else:
        status |= {"failed": 1}
    await env.client.merge_patch_status(JOBS, name, status, env.namespace)


async def test_tuning_workspace_gets_job_and_reports_its_result(byo: Env) -> None:
    """A tuning workspace on a ready node: default ConfigMap + Job; Job Complete -> Succeeded."""
    labels = {"apps": f"tune-{byo.namespace[-6:]}"}
    node = f"tune-{byo.namespace[-6:]}"
    await make_node(byo.client, node, labels)
    await byo.client.create(WORKSPACES, tuning_ws("tune", labels), byo.namespace)
    job = await eventually(lambda: byo.client.get_or_none(JOBS, "tune", byo.namespace), 20, "the Job")
    assert job is not None
    assert job["spec"]["backoffLimit"] == 0
    assert job["metadata"]["ownerReferences"][0]["kind"] == "Workspace"
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"][0]["configMap"]["name"] == "qlora-params-template"
    cm = await byo.client.get_or_none(CONFIGMAPS, "qlora-params-template", byo.namespace)
    assert cm is not None and "training_config.yaml" in cm["data"]

    async def running() -> Any:
        ws = await byo.ws("tune")
        st = (ws or {}).get("status") or {}
        return st if st.get("state") == "Running" else None

    await eventually(running, 20, "state Running")
    started = await byo.condition("tune", "JobStarted")
    assert started is not None and started["status"] == "True"

    await _job_status(byo, "tune", "Complete")

    async def succeeded() -> Any:
        ws = await byo.ws("tune")
        st = (ws or {}).get("status") or {}
        return st if st.get("state") == "Succeeded" else None

    await eventually(succeeded, 20, "state Succeeded")
    for type_ in ("WorkspaceSucceeded", "WorkspaceReady"):
        c = await byo.condition("tune", type_)
        assert c is not None and c["status"] == "True", c
    # A finished Job is the result: reconciling again neither replaces nor re-creates it.
    uid = job["metadata"]["uid"]
    await byo.rec.reconcile(f"{byo.namespace}/tune")
    again = await byo.client.get_or_none(JOBS, "tune", byo.namespace)
    assert again is not None and again["metadata"]["uid"] == uid
    # Nor does removing the finished Job bring a second run.
    await byo.client.delete(JOBS, "tune", byo.namespace)
    await eventually(
        lambda: asyncio.sleep(
            0, byo.rec.jobs is not None and byo.rec.jobs.store.get_by_name("tune", byo.namespace) is None
        ),
        20,
        "the Job gone from the cache",
    )
    await byo.rec.reconcile(f"{byo.namespace}/tune")
    assert await byo.client.get_or_none(JOBS, "tune", byo.namespace) is None
    ws = await byo.ws("tune")
    assert ws is not None and ws["status"]["state"] == "Succeeded"
    await byo.client.delete(NODES, node)


async def test_default_tuning_config_is_owned_by_every_workspace_using_it(byo: Env) -> None:
    """Two tuning workspaces share one default template ConfigMap; both own it (neither controls it),
    so garbage collection keeps it until the last of them is deleted."""
    labels = {"apps": f"share-{byo.namespace[-6:]}"}
    node = f"share-{byo.namespace[-6:]}"
    await make_node(byo.client, node, labels)
    for name in ("share-a", "share-b"):
        await byo.client.create(WORKSPACES, tuning_ws(name, labels), byo.namespace)
    for name in ("share-a", "share-b"):
        await eventually(lambda n=name: byo.client.get_or_none(JOBS, n, byo.namespace), 20, f"Job {name}")
    uids = {str(((await byo.ws(n)) or {})["metadata"]["uid"]) for n in ("share-a", "share-b")}

    async def owners() -> Any:
        cm = await byo.client.get_or_none(CONFIGMAPS, "qlora-params-template", byo.namespace)
        refs = ((cm or {}).get("metadata") or {}).get("ownerReferences") or []
        return refs if {r["uid"] for r in refs} == uids else None

    refs = await eventually(owners, 20, "both workspaces owning the shared ConfigMap")
    assert len(refs) == 2 and not any(r.get("controller") for r in refs)
    await byo.client.delete(NODES, node)


async def test_tuning_job_failure_is_reported_with_reason(byo: Env) -> None:
    """Job Failed (BackoffLimitExceeded) -> state Failed, WorkspaceSucceeded False with the reason."""
    labels = {"apps": f"tfail-{byo.namespace[-6:]}"}
    node = f"tfail-{byo.namespace[-6:]}"
    await make_node(byo.client, node, labels)
    await byo.client.create(WORKSPACES, tuning_ws("tfail", labels, method="lora"), byo.namespace)
    await eventually(lambda: byo.client.get_or_none(JOBS, "tfail", byo.namespace), 20, "the Job")
    await _job_status(
        byo, "tfail", "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    )

    async def failed() -> Any:
        ws = await byo.ws("tfail")
        st = (ws or {}).get("status") or {}
        return st if st.get("state") == "Failed" else None

    st = await eventually(failed, 20, "state Failed")
    assert st["reason"] == "BackoffLimitExceeded"
    c = await byo.condition("tfail", "WorkspaceSucceeded")
    assert c is not None and c["status"] == "False" and "BackoffLimitExceeded" in c["message"]
    await byo.client.delete(NODES, node)


async def test_tuning_missing_user_config_is_reported(byo: Env) -> None:
    """tuning.config naming a ConfigMap that does not exist: no Job, a Failed state that names it."""
    labels = {"apps": f"tcfg-{byo.namespace[-6:]}"}
    node = f"tcfg-{byo.namespace[-6:]}"
    await make_node(byo.client, node, labels)
    await byo.client.create(WORKSPACES, tuning_ws("tcfg", labels, config="nope"), byo.namespace)

    async def failed() -> Any:
        ws = await byo.ws("tcfg")
        st = (ws or {}).get("status") or {}
        return st if st.get("state") == "Failed" else None

    st = await eventually(failed, 20, "state Failed")
    assert st["reason"] == "ConfigMapNotFound"
    assert await byo.client.get_or_none(JOBS, "tcfg", byo.namespace) is None
    await byo.client.delete(NODES, node)


async def test_machine_no_longer_needed_is_released_and_its_lingering_node_not_reused(machines: Env) -> None:
    """preferredNodes now cover the workspace: its Machine is deleted (no idle GPU node left behind), and
    while the Machine's node lingers Ready during deletion it is neither selected nor a reason to create
    another Machine."""
    env = machines
    suffix = env.namespace[-6:]
    labels = {"apps": f"surplus-{suffix}"}
    await env.client.create(WORKSPACES, phi3("surplus", labels), env.namespace)
    mname = machine_name(env.namespace, "surplus", 0)
    await eventually(lambda: env.client.get_or_none(MACHINES, mname), 20, "the Machine")
    # Play the provisioner: a node carrying the Machine's labels, then the Machine Ready and linked. A
    # finalizer keeps the Machine (and so its node) around once deleted, as a draining provisioner would.
    made = f"made-{suffix}"
    await make_node(
        env.client,
        made,
        {**labels, "kaito.sh/workspace": "surplus", "kaito.sh/workspacenamespace": env.namespace},
    )
    await env.client.patch(MACHINES, mname, {"metadata": {"finalizers": ["test.kaito.sh/draining"]}})
    await env.client.merge_patch_status(
        MACHINES,
        mname,
        {
            "nodeName": made,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": ""}],
        },
    )

    async def workers(want: list[str]) -> bool:
        ws = await env.ws("surplus")
        return ws is not None and ws["status"].get("workerNodes") == want

    await eventually(lambda: workers([made]), 20, f"status.workerNodes == [{made}]")

    byo = f"byo-{suffix}"
    await make_node(env.client, byo, labels)
    await env.client.patch(WORKSPACES, "surplus", {"resource": {"preferredNodes": [byo]}}, env.namespace)
    await eventually(lambda: workers([byo]), 20, f"status.workerNodes == [{byo}]")

    async def deleting() -> bool:
        m = await env.client.get_or_none(MACHINES, mname)
        return m is not None and bool(m["metadata"].get("deletionTimestamp"))

    await eventually(deleting, 20, "the surplus Machine to be deleted")
    # Reconcile again once the cache shows the Machine deleting while its node lingers Ready: no new
    # Machine, and the workload stays on the preferred node.
    key = f"{env.namespace}/surplus"

    async def cached_deleting() -> bool:
        assert env.rec.machines is not None
        m = env.rec.machines.store.get(mname)
        return m is not None and bool(m["metadata"].get("deletionTimestamp"))

    await eventually(cached_deleting, 20, "the informer to see the Machine deleting")
    await env.rec.reconcile(key)
    dep = await env.client.get(DEPLOYMENTS, "surplus", env.namespace)
    exprs = dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"][0]["matchExpressions"]
    assert {"key": "kubernetes.io/hostname", "operator": "In", "values": [byo]} in exprs
    assert await workers([byo])
    events = (await env.client.list(EVENTS, env.namespace, field_selector="involvedObject.name=surplus"))[
        "items"
    ]
    assert any(e["reason"] == "MachineDeleted" and mname in e["message"] for e in events)
    items = (await env.client.list(MACHINES, label_selector=f"kaito.sh/workspacenamespace={env.namespace}"))[
        "items"
    ]
    assert [i["metadata"]["name"] for i in items] == [mname]
    await env.client.patch(MACHINES, mname, {"metadata": {"finalizers": None}})
    for n in (made, byo):
        await env.client.delete(NODES, n)
