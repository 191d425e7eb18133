"""Workspaces end to end: kaito-controller + gpu-provisioner (kwok cloud) as processes, full cluster.

The phi-3 flow and the kill-the-controller test run with Machines and with NodeClaims (``--node-api``).
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest
import yaml

from kaito.machine import encoding_for
from test.e2e.workspace.conftest import NODE_APIS, SAMPLES, Operator
from test.waiting import eventually


def kget(op: Operator, *args: str) -> Any:
    out = op.cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def conditions(ws: Any) -> dict[str, str]:
    return {c["type"]: c["status"] for c in ((ws or {}).get("status") or {}).get("conditions") or []}


async def wait_condition(op: Operator, name: str, type_: str, status: str, timeout: float = 90) -> Any:
    async def check() -> Any:
        ws = kget(op, "workspace", name, "-n", op.namespace)
        assert all(p.healthy() for p in op.procs), op.dump()
        return ws if conditions(ws).get(type_) == status else None

    return await eventually(check, timeout, f"{name} {type_}={status}", interval=0.3)


def machines_of(op: Operator, name: str) -> list[Any]:
    """The workspace's Machines (or NodeClaims, whichever the operator creates)."""
    out = kget(op, op.requests, "-l", f"kaito.sh/workspace={name},kaito.sh/workspacenamespace={op.namespace}")
    return list((out or {}).get("items") or [])


def request_name(op: Operator, name: str, slot: int) -> str:
    """The deterministic Machine/NodeClaim name of a workspace's node slot."""
    return encoding_for(op.node_api).name_for(op.namespace, name, slot)


def apply_sample(op: Operator, file: str, mutate: Any = None) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((SAMPLES / file).read_text())
    if mutate is not None:
        mutate(doc)
    op.cluster.kubectl("apply", "-n", op.namespace, "-f", "-", input=yaml.safe_dump(doc))
    return doc


async def delete_and_check_clean(op: Operator, name: str, node_names: list[str]) -> None:
    op.cluster.kubectl("delete", "workspace", name, "-n", op.namespace, "--wait=false")

    async def gone() -> bool:
        ws = kget(op, "workspace", name, "-n", op.namespace)
        nodes = [n for n in node_names if kget(op, "node", n) is not None]
        return ws is None and not machines_of(op, name) and not nodes

    await eventually(gone, 90, f"{name}, its Machines and Nodes to be deleted", interval=0.3)


@pytest.mark.parametrize("node_api", NODE_APIS)
async def test_phi3_sample_becomes_ready_and_cleans_up(operator: Operator) -> None:
    """The seed's phi-3 manifest: Machine (or NodeClaim) -> kwok node -> Deployment -> WorkspaceReady;
    kubectl output matches the seed; deletion leaves no Machine/NodeClaim or Node."""
    op = operator
    apply_sample(op, "kaito_workspace_phi_3.yaml")
    ws = await wait_condition(op, "workspace-phi-3-mini", "WorkspaceReady", "True")
    assert conditions(ws) | {} == {
        "ResourceReady": "True",
        f"{op.request_kind}Ready": "True",
        "InferenceReady": "True",
        "WorkspaceSucceeded": "True",
        "WorkspaceReady": "True",
    }
    assert ws["status"]["state"] == "Ready"
    assert ws["metadata"]["finalizers"] == ["workspace.finalizer.kaito.sh"]  # it owns a Machine
    assert ws["status"]["observedGeneration"] == ws["metadata"]["generation"]
    (machine,) = machines_of(op, "workspace-phi-3-mini")
    assert machine["metadata"]["name"] == request_name(op, "workspace-phi-3-mini", 0)
    assert machine["kind"] == op.request_kind
    assert machine["spec"]["resources"]["requests"]["storage"] == "80Gi"
    workers = ws["status"]["workerNodes"]
    assert workers == [machine["status"]["nodeName"]]
    node = kget(op, "node", workers[0])
    assert node["metadata"]["labels"]["apps"] == "phi-3"

    table = op.cluster.kubectl("get", "workspace", "-n", op.namespace).stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "INSTANCE",
        "RESOURCEREADY",
        "INFERENCEREADY",
        "WORKSPACEREADY",
        "AGE",
    ]
    assert table[1].split()[:5] == ["workspace-phi-3-mini", "Standard_NC6s_v3", "True", "True", "True"]
    svc = op.cluster.kubectl("get", "svc", "workspace-phi-3-mini", "-n", op.namespace).stdout.splitlines()
    assert svc[0].split()[:5] == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"]
    assert svc[1].split()[1] == "ClusterIP" and svc[1].split()[4] == "80/TCP,29500/TCP"
    dep = kget(op, "deployment", "workspace-phi-3-mini", "-n", op.namespace)
    assert dep["metadata"]["ownerReferences"][0]["kind"] == "Workspace"
    pods = kget(op, "pods", "-n", op.namespace, "-l", "kaito.sh/workspace=workspace-phi-3-mini")["items"]
    assert [p["spec"]["nodeName"] for p in pods] == workers

    # The Event is sent alongside the status write and the metric reads the informer cache: both may
    # trail the status we just read by a moment.
    async def ready_event() -> Any:
        out = kget(op, "events", "-n", op.namespace, "--field-selector", "involvedObject.kind=Workspace")
        events = out["items"] if out else []
        reasons = {e["reason"] for e in events}
        return (
            next((e for e in events if e["reason"] == "workspaceReady"), None)
            if f"{op.request_kind}Created" in reasons
            else None
        )

    event = await eventually(ready_event, 20, f"{op.request_kind}Created and workspaceReady Events")
    assert "InferenceReady=True" in event["message"] and event["type"] == "Normal"

    async def ready_metric() -> bool:
        metrics = await asyncio.to_thread(op.procs[0].metrics)
        return 'kaito_workspace_count{state="Ready"} 1.0' in metrics

    await eventually(ready_metric, 20, "kaito_workspace_count{state=Ready} 1")

    await delete_and_check_clean(op, "workspace-phi-3-mini", workers)


async def test_adapters_sample_init_containers_and_strengths(operator: Operator) -> None:
    """The seed's adapter manifest: one kaito_oci pull init container per adapter, strength as env; changing the
    adapters rolls the Deployment (surge) while the workspace stays ready."""
    op = operator

    # An existing node with spare GPUs (pods request the SKU's GPU count, 1): room for the surge pod.
    node = f"byo-{op.namespace[-6:]}"
    op.cluster.create_kwok_node(
        node,
        labels={"apps": "phi-3-adapter", "node.kubernetes.io/instance-type": "Standard_NC6s_v3"},
        gpus=2,
        taints=[{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
    )
    apply_sample(op, "kaito_workspace_phi_3_with_adapters.yaml")
    name = "workspace-phi-3-mini-adapter"
    ws = await wait_condition(op, name, "WorkspaceReady", "True")
    assert ws["status"]["workerNodes"] == [node]
    assert machines_of(op, name) == []  # the existing node was enough
    dep = kget(op, "deployment", name, "-n", op.namespace)
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["name"] == "phi-3-adapter"
    assert init["command"][-3:] == [
        "pull",
        "ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1",
        "/mnt/adapter/phi-3-adapter",
    ]
    assert pod["containers"][0]["env"] == [{"name": "phi-3-adapter", "value": "1.0"}]
    old_hash = dep["metadata"]["annotations"]["kaito.sh/spec-hash"]

    patch = {
        "inference": {
            "adapters": [
                {
                    "source": {
                        "name": "phi-3-adapter",
                        "image": "ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1",
                    },
                    "strength": "0.5",
                }
            ]
        }
    }
    op.cluster.kubectl(
        "patch", "workspace", name, "-n", op.namespace, "--type=merge", "-p", json.dumps(patch)
    )

    async def rolled() -> bool:
        d = kget(op, "deployment", name, "-n", op.namespace)
        ws = kget(op, "workspace", name, "-n", op.namespace)
        # Never a moment without a ready replica (surge), and the workspace keeps saying so.
        assert int(d["status"].get("readyReplicas") or 0) >= 1
        assert conditions(ws)["InferenceReady"] == "True"
        env = d["spec"]["template"]["spec"]["containers"][0].get("env")
        st = d["status"]
        return bool(
            env == [{"name": "phi-3-adapter", "value": "0.5"}]
            and d["metadata"]["annotations"]["kaito.sh/spec-hash"] != old_hash
            and st.get("updatedReplicas") == 1
            and st.get("replicas") == 1
            and st.get("observedGeneration") == d["metadata"]["generation"]
        )

    await eventually(rolled, 60, "the adapter change to roll out", interval=0.2)
    op.cluster.kubectl("delete", "workspace", name, "-n", op.namespace)
    op.cluster.kubectl("delete", "node", node)


async def test_crashlooping_pods_show_reason(operator: Operator) -> None:
    """Pods that crash-loop (kwok simulation) make InferenceReady False with the pod's reason."""
    op = operator

    def template(doc: dict[str, Any]) -> None:
        doc["metadata"]["name"] = "crashy"
        doc["inference"] = {
            "template": {
                "metadata": {"annotations": {"kwok.kaito.sh/simulate": "CrashLoopBackOff"}},
                "spec": {
                    "containers": [
                        {
                            "name": "srv",
                            "image": "registry.invalid/srv:1",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ]
                },
            }
        }

    apply_sample(op, "kaito_workspace_phi_3.yaml", template)
    await wait_condition(op, "crashy", "InferenceReady", "False")

    # The pod may first be Pending (Unschedulable) while its fresh node still carries the not-ready
    # taint; the reason must settle on what the container reports.
    async def crashlooping() -> dict[str, Any] | None:
        ws: dict[str, Any] = kget(op, "workspace", "crashy", "-n", op.namespace) or {}
        return ws if (ws.get("status") or {}).get("reason") == "CrashLoopBackOff" else None

    ws = await eventually(crashlooping, 30, "the workspace reason to become CrashLoopBackOff")
    assert conditions(ws)["InferenceReady"] == "False"
    assert conditions(ws)["ResourceReady"] == "True"
    assert conditions(ws)["WorkspaceReady"] == "False"
    assert (ws["status"]["state"], ws["status"]["reason"]) == ("NotReady", "CrashLoopBackOff")
    msg = next(c["message"] for c in ws["status"]["conditions"] if c["type"] == "InferenceReady")
    assert "CrashLoopBackOff" in msg and "container srv" in msg

    async def warning() -> bool:
        out = kget(op, "events", "-n", op.namespace, "--field-selector", "involvedObject.name=crashy")
        return any(
            e["type"] == "Warning" and "CrashLoopBackOff" in e["message"]
            for e in (out or {}).get("items", [])
        )

    await eventually(warning, 20, "a Warning Event naming CrashLoopBackOff")


@pytest.mark.parametrize("node_api", NODE_APIS)
async def test_controller_killed_while_provisioning_creates_no_duplicate(operator: Operator) -> None:
    """kill -9 the controller after it created Machines (or NodeClaims), restart it: the same ones are
    adopted, none is duplicated."""
    op = operator
    ctrl, prov = op.procs[0], op.procs[1]
    prov.stop()  # nothing turns Machines into nodes until the controller has been restarted

    def two_nodes(doc: dict[str, Any]) -> None:
        doc["resource"]["count"] = 2

    apply_sample(op, "kaito_workspace_phi_3.yaml", two_nodes)
    name = "workspace-phi-3-mini"

    async def two_machines() -> bool:
        return len(machines_of(op, name)) == 2

    await eventually(two_machines, 60, "two Machines")
    ctrl.stop(signal.SIGKILL)
    restarted = op.start_controller()
    await op.ready(restarted)
    op.start_provisioner()
    ws = await wait_condition(op, name, "WorkspaceReady", "True", timeout=120)
    names = sorted(m["metadata"]["name"] for m in machines_of(op, name))
    assert names == sorted(request_name(op, name, s) for s in (0, 1))
    assert len(ws["status"]["workerNodes"]) == 2
    await delete_and_check_clean(op, name, ws["status"]["workerNodes"])


async def test_webhook_rejects_unknown_preset(operator: Operator) -> None:
    """The controller's admission webhook answers the apiserver (https://127.0.0.1) with a clean error."""
    op = operator
    doc: dict[str, Any] = yaml.safe_load((SAMPLES / "kaito_workspace_phi_3.yaml").read_text())
    doc["inference"]["preset"]["name"] = "phi-3-mini-4k-instruct-typo"
    out = op.cluster.kubectl("apply", "-n", op.namespace, "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert out.returncode != 0
    assert "admission webhook" in out.stderr and "phi-3-mini-4k-instruct" in out.stderr
