"""CPU nodes as a target, end to end on the full local cluster: kaito-controller + gpu-provisioner (kwok
cloud) as processes, the admission webhook served to the apiserver.

* A CPU instance type (``Standard_D4s_v3``): the Machine asks for it, the kwok cloud makes a node with the
  VM size's CPU and memory and no ``nvidia.com/gpu``, the Deployment's pod requests no GPU and gets its CPU,
  memory and ``--torch_threads`` from the VM size, the real scheduler places it, WORKSPACEREADY turns True.
* Bring your own: an existing Ready node labelled with a CPU instance type is used as it is (no Machine).
* Admission through the apiserver: too little memory, and qlora on a CPU node, are refused with the fix.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml

from kaito.workspace.manifests import command_line
from test.e2e.workspace.conftest import SAMPLES, Operator
from test.e2e.workspace.test_inference_e2e import (
    apply_sample,
    conditions,
    delete_and_check_clean,
    kget,
    machines_of,
    wait_condition,
)

CPU_SAMPLE = "kaito_workspace_cpu_phi_3.yaml"
CPU_NAME = "workspace-phi-3-mini-cpu"


def flags(container: dict[str, Any]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in command_line(container) if a.startswith("--") and "=" in a)


def the_container(op: Operator, name: str) -> dict[str, Any]:
    dep = kget(op, "deployment", name, "-n", op.namespace)
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dict(container)


async def test_cpu_sku_gets_a_cpu_node_and_a_pod_without_gpus(operator: Operator) -> None:
    op = operator
    apply_sample(op, CPU_SAMPLE)
    ws = await wait_condition(op, CPU_NAME, "WorkspaceReady", "True", timeout=120)
    assert conditions(ws)["ResourceReady"] == "True" and conditions(ws)["InferenceReady"] == "True"
    (machine,) = machines_of(op, CPU_NAME)
    assert {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["Standard_D4s_v3"]} in (
        machine["spec"]["requirements"]
    )
    (worker,) = ws["status"]["workerNodes"]
    node = kget(op, "node", worker)
    assert "nvidia.com/gpu" not in node["status"]["capacity"]
    assert (node["status"]["capacity"]["cpu"], node["status"]["capacity"]["memory"]) == ("4", "16Gi")
    assert node["metadata"]["labels"]["kaito.sh/machine-type"] == "cpu"

    container = the_container(op, CPU_NAME)
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "12Gi"},
        "limits": {"cpu": "3400m", "memory": "14540Mi"},
    }
    f = flags(container)
    assert (f["torch_threads"], f["device_map"], f["torch_dtype"]) == ("3", "cpu", "bfloat16")
    pods = kget(op, "pods", "-n", op.namespace, "-l", f"kaito.sh/workspace={CPU_NAME}")["items"]
    assert [p["spec"]["nodeName"] for p in pods] == [worker]
    table = op.cluster.kubectl("get", "workspace", CPU_NAME, "-n", op.namespace).stdout.splitlines()
    assert table[1].split()[:5] == [CPU_NAME, "Standard_D4s_v3", "True", "True", "True"]
    await delete_and_check_clean(op, CPU_NAME, [worker])


BYO_NODE = "byo-cpu-node-1"
BYO_LABEL = "tiny-cpu-byo"


@pytest.fixture
async def byo_cpu_node(operator: Operator) -> AsyncIterator[str]:
    """A Ready node somebody else made (kwok keeps it Ready): a D2s_v3-labelled CPU node, no GPUs."""
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": BYO_NODE,
            "labels": {
                "apps": BYO_LABEL,
                "node.kubernetes.io/instance-type": "Standard_D2s_v3",
                "kubernetes.io/hostname": BYO_NODE,
                "kubernetes.io/os": "linux",
                "type": "kwok",
            },
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "status": {
            "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
        },
    }
    operator.cluster.kubectl("delete", "node", BYO_NODE, "--ignore-not-found", check=False)
    operator.cluster.kubectl("create", "-f", "-", input=yaml.safe_dump(node))
    try:
        yield BYO_NODE
    finally:
        operator.cluster.kubectl("delete", "node", BYO_NODE, "--ignore-not-found", check=False)


async def test_existing_cpu_node_is_used_without_a_machine(operator: Operator, byo_cpu_node: str) -> None:
    op = operator
    name = "tiny-cpu"

    def tiny(doc: dict[str, Any]) -> None:
        doc["metadata"]["name"] = name
        doc["resource"]["instanceType"] = "Standard_D2s_v3"
        doc["resource"]["labelSelector"]["matchLabels"] = {"apps": BYO_LABEL}
        doc["inference"]["preset"]["name"] = "tiny-llama"

    apply_sample(op, CPU_SAMPLE, tiny)
    ws = await wait_condition(op, name, "WorkspaceReady", "True", timeout=120)
    assert ws["status"]["workerNodes"] == [byo_cpu_node]
    assert machines_of(op, name) == []
    assert "finalizers" not in ws["metadata"] or not ws["metadata"]["finalizers"]  # owns no Machine
    container = the_container(op, name)
    assert container["image"] == "registry.invalid/kaito/kaito-tiny-llama:0.0.1"
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert container["resources"]["requests"] == {"cpu": "700m", "memory": "512Mi"}
    assert flags(container)["torch_threads"] == "1" and flags(container)["served_model_name"] == "tiny-llama"
    pods = kget(op, "pods", "-n", op.namespace, "-l", f"kaito.sh/workspace={name}")["items"]
    assert [p["spec"]["nodeName"] for p in pods] == [byo_cpu_node]
    op.cluster.kubectl("delete", "workspace", name, "-n", op.namespace, "--timeout=60s")
    assert kget(op, "node", byo_cpu_node) is not None  # never ours to delete


async def test_webhook_explains_cpu_misfits(operator: Operator) -> None:
    op = operator
    doc: dict[str, Any] = yaml.safe_load((SAMPLES / CPU_SAMPLE).read_text())
    doc["resource"]["instanceType"] = "Standard_F4s_v2"
    out = op.cluster.kubectl("apply", "-n", op.namespace, "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert out.returncode != 0
    assert "Standard_F4s_v2 has 8 GiB, phi-3-mini-4k-instruct needs 12 GiB on CPU; pick Standard_F8s_v2" in (
        out.stderr
    )
    tuning: dict[str, Any] = yaml.safe_load((SAMPLES / "kaito_workspace_tuning_phi_3.yaml").read_text())
    tuning["resource"]["instanceType"] = "Standard_D8s_v3"
    tuning["tuning"]["method"] = "qlora"
    out = op.cluster.kubectl(
        "apply", "-n", op.namespace, "-f", "-", input=yaml.safe_dump(tuning), check=False
    )
    assert out.returncode != 0
    assert "qlora quantizes the base model with bitsandbytes, which needs an NVIDIA GPU" in out.stderr
    assert kget(op, "workspace", CPU_NAME, "-n", op.namespace) is None
