"""Manifest builders: pure functions from (workspace, preset, nodes, options) to dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kaito.api.workspace import Workspace
from kaito.presets.registry import PresetRegistry
from kaito.presets.skus import SkuCatalog
from kaito.workspace import manifests as mf

SAMPLES = Path(__file__).resolve().parents[3] / "config" / "samples"


def workspace(raw: dict[str, Any] | None = None, **meta: Any) -> Workspace:
    base = raw or yaml.safe_load((SAMPLES / "kaito_workspace_phi_3.yaml").read_text())
    base = {**base, "metadata": {**base["metadata"], "namespace": "ns1", "uid": "uid-1", **meta}}
    return Workspace.model_validate(base)


def sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((SAMPLES / name).read_text())
    return data


def build(ws: Workspace, registry: PresetRegistry, skus: SkuCatalog, **kw: Any) -> mf.Workload:
    assert ws.inference is not None
    preset = registry.get(ws.inference.preset.name) if ws.inference.preset else None
    opts = kw.pop("options", mf.ManifestOptions(registry="example.io/kaito"))
    return mf.build_inference(
        ws, preset, opts, sku=skus.get(ws.resource.instance_type), nodes=kw.pop("nodes", ["node-a"]), **kw
    )


def test_phi3_deployment_shape(registry: PresetRegistry, skus: SkuCatalog) -> None:
    wl = build(workspace(), registry, skus)
    dep = wl.workload
    assert wl.kind == "Deployment"
    assert dep["metadata"]["name"] == "workspace-phi-3-mini"
    assert dep["metadata"]["namespace"] == "ns1"
    ref = dep["metadata"]["ownerReferences"][0]
    assert ref == {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "name": "workspace-phi-3-mini",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["selector"] == {"matchLabels": {"kaito.sh/workspace": "workspace-phi-3-mini"}}
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "example.io/kaito/kaito-phi-3-mini-4k-instruct:0.1.1"
    assert c["resources"] == {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    assert c["ports"][0]["containerPort"] == 5000
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": 5000, "scheme": "HTTP"}
    assert c["livenessProbe"]["initialDelaySeconds"] == 600
    # Rolls (an adapter or strength change) fail no request: the old pod serves until the Service let go.
    assert c["lifecycle"] == {"preStop": {"sleep": {"seconds": mf.PRESTOP_SLEEP_SECONDS}}}
    assert 0 < mf.PRESTOP_SLEEP_SECONDS < 30  # inside the default terminationGracePeriodSeconds
    assert {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    exprs = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]["matchExpressions"]
    assert exprs == [
        {"key": "apps", "operator": "In", "values": ["phi-3"]},
        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"]},
    ]
    assert "podAntiAffinity" not in pod["affinity"]  # replicas of a Deployment may share a big node
    # One GPU: no /dev/shm volume; the inference config is mounted from the owned ConfigMap.
    assert {v["name"] for v in pod["volumes"]} == {"config-volume"}
    assert wl.config_map is not None
    assert wl.config_map["metadata"]["name"] == "workspace-phi-3-mini-inference-params"
    assert "vllm" in yaml.safe_load(wl.config_map["data"]["inference_config.yaml"])


def test_transformers_command_is_sorted_and_stable(registry: PresetRegistry, skus: SkuCatalog) -> None:
    wl = build(workspace(), registry, skus)
    line = mf.command_line(wl.workload["spec"]["template"]["spec"]["containers"][0])
    assert line == [
        "accelerate",
        "launch",
        "--gpu_ids=all",
        "--machine_rank=0",
        "--num_machines=1",
        "--num_processes=1",
        "/workspace/tfs/inference_api.py",
        "--pipeline=text-generation",
        "--served_model_name=phi-3-mini-4k-instruct",
        "--torch_dtype=auto",
        "--trust_remote_code",
    ]
    again = build(workspace(), registry, skus)
    assert mf.spec_hash(again.workload) == mf.spec_hash(wl.workload)


def test_vllm_runtime_by_annotation(registry: PresetRegistry, skus: SkuCatalog) -> None:
    ws = workspace(annotations={"kaito.sh/runtime": "vllm"})
    raw = ws.model_dump(by_alias=True, exclude_none=True, mode="json")
    raw["resource"]["instanceType"] = "Standard_NC12s_v3"  # 2 GPUs
    ws = Workspace.model_validate(raw)
    wl = build(ws, registry, skus)
    pod = wl.workload["spec"]["template"]["spec"]
    line = mf.command_line(pod["containers"][0])
    assert line[:2] == ["python3", "/workspace/vllm/inference_api.py"]
    assert "--dtype=float16" in line
    assert "--served-model-name=phi-3-mini-4k-instruct" in line
    assert "--tensor-parallel-size=2" in line
    assert "--kaito-config-file=/mnt/config/inference_config.yaml" in line
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]


def test_unknown_runtime_is_a_manifest_error(registry: PresetRegistry, skus: SkuCatalog) -> None:
    with pytest.raises(mf.ManifestError) as e:
        build(workspace(annotations={"kaito.sh/runtime": "tensorrt"}), registry, skus)
    assert e.value.reason == "UnsupportedRuntime"


def test_service_ports_and_loadbalancer(registry: PresetRegistry, skus: SkuCatalog) -> None:
    (svc,) = build(workspace(), registry, skus).services
    assert svc["metadata"]["name"] == "workspace-phi-3-mini"
    assert svc["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(80, 5000), (29500, 29500)]
    # Requests reach ready pods only: not one still loading its model or shutting down in a roll.
    assert svc["spec"]["publishNotReadyAddresses"] is False
    (lb,) = build(workspace(annotations={"kaito.sh/enablelb": "True"}), registry, skus).services
    assert lb["spec"]["type"] == "LoadBalancer"


def test_adapters_init_containers_and_strengths(registry: PresetRegistry, skus: SkuCatalog) -> None:
    raw = sample("kaito_workspace_phi_3_with_adapters.yaml")
    raw["inference"]["adapters"].append(
        {"source": {"name": "second", "image": "r.io/a/b:1", "imagePullSecrets": ["s1"]}}
    )
    ws = workspace(raw)
    ws.inference.adapters[1].strength = None  # type: ignore[union-attr,index]
    pod = build(ws, registry, skus).workload["spec"]["template"]["spec"]
    inits = pod["initContainers"]
    assert [c["name"] for c in inits] == ["phi-3-adapter", "second"]
    # kaito_oci from the preset image reads what the tuning Job pushes (the oras CLI would skip it).
    assert inits[0]["image"] == pod["containers"][0]["image"]
    assert inits[0]["command"] == [
        "python3", "-m", "kaito_oci", "pull",
        "ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1", "/mnt/adapter/phi-3-adapter",
    ]  # fmt: skip
    assert inits[1]["command"][4:6] == ["--docker-config", "/tmp/.docker/adapter-second"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env == {"phi-3-adapter": "1.0", "second": "1.0"}  # omitted strength defaults to 1.0
    assert {"name": "adapter-volume", "mountPath": "/mnt/adapter"} in pod["containers"][0]["volumeMounts"]
    assert {"name": "s1"} in pod["imagePullSecrets"]


def test_adapter_or_node_change_moves_the_hash(registry: PresetRegistry, skus: SkuCatalog) -> None:
    base = build(workspace(), registry, skus)
    other_nodes = build(workspace(), registry, skus, nodes=["node-b"])
    assert mf.spec_hash(base.workload) != mf.spec_hash(other_nodes.workload)
    assert base.workload["metadata"]["annotations"][mf.ANNOTATION_SPEC_HASH] == mf.spec_hash(base.workload)
    # The Service does not depend on nodes: no churn there.
    assert mf.spec_hash(base.services[0]) == mf.spec_hash(other_nodes.services[0])


def test_distributed_preset_gets_statefulset_and_headless_service(
    registry: PresetRegistry, skus: SkuCatalog
) -> None:
    raw = sample("kaito_workspace_phi_3.yaml")
    raw["resource"]["count"] = 2
    raw["resource"]["instanceType"] = "Standard_NC12s_v3"
    raw["inference"]["preset"] = {
        "name": "llama-2-13b",
        "accessMode": "private",
        "presetOptions": {"image": "my.io/llama-2-13b:1", "imagePullSecrets": ["pull"]},
    }
    wl = build(workspace(raw), registry, skus, nodes=["n1", "n2"])
    assert wl.kind == "StatefulSet"
    sts = wl.workload["spec"]
    assert sts["serviceName"] == "workspace-phi-3-mini-headless"
    assert sts["podManagementPolicy"] == "Parallel"
    assert [s["metadata"]["name"] for s in wl.services] == [
        "workspace-phi-3-mini",
        "workspace-phi-3-mini-headless",
    ]
    assert wl.services[1]["spec"]["clusterIP"] == "None"
    assert (
        wl.services[0]["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "workspace-phi-3-mini-0"
    )
    pod = sts["template"]["spec"]
    line = mf.command_line(pod["containers"][0])
    assert "--nnodes=2" in line and "--master_port=29500" in line
    assert any(
        a.startswith("--rdzv_endpoint=workspace-phi-3-mini-0.workspace-phi-3-mini-headless.ns1") for a in line
    )
    assert pod["containers"][0]["image"] == "my.io/llama-2-13b:1"
    assert pod["imagePullSecrets"] == [{"name": "pull"}]
    # One rank per selected node, pinned to them.
    assert pod["affinity"]["podAntiAffinity"] == {
        "requiredDuringSchedulingIgnoredDuringExecution": [
            {
                "labelSelector": {"matchLabels": {"kaito.sh/workspace": "workspace-phi-3-mini"}},
                "topologyKey": "kubernetes.io/hostname",
            }
        ]
    }
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1", "n2"]} in terms[
        "nodeSelectorTerms"
    ][0]["matchExpressions"]


def test_llama2_torchrun_lines_carry_only_the_llama2_server_flags(
    registry: PresetRegistry, skus: SkuCatalog
) -> None:
    """The llama-2 images' server parses its flags strictly: no --served_model_name (KAITO's runtime only)."""
    master = "workspace-phi-3-mini-0.workspace-phi-3-mini-headless.ns1.svc.cluster.local"
    raw = sample("kaito_workspace_phi_3.yaml")
    raw["resource"]["count"] = 2
    raw["resource"]["instanceType"] = "Standard_NC6s_v3"
    raw["inference"]["preset"] = {
        "name": "llama-2-13b-chat",
        "accessMode": "private",
        "presetOptions": {"image": "my.io/llama-2-13b-chat:1"},
    }
    wl = build(workspace(raw), registry, skus, nodes=["n1", "n2"])
    (container,) = wl.workload["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["/bin/sh", "-c"]
    # One shell line: the pod's shell computes the node rank from its hostname (<ws>-<ordinal>).
    assert container["command"][2] == " ".join(
        [
            "cd /workspace/llama/llama-2 && torchrun",
            "--master_addr=" + master,
            "--master_port=29500",
            "--max_restarts=3",
            "--nnodes=2",
            "--node_rank=$(echo $HOSTNAME | grep -o '[^-]*$')",
            "--nproc_per_node=1",
            "--rdzv_backend=c10d",
            "--rdzv_endpoint=" + master + ":29500",
            "--rdzv_id=rdzv_id",
            "inference_api.py",
            "--max_batch_size=8",
            "--max_seq_len=512",
        ]
    )
    raw["resource"]["count"] = 1
    raw["inference"]["preset"]["name"] = "llama-2-7b"
    one = build(workspace(raw), registry, skus)
    assert one.kind == "Deployment"
    line = mf.command_line(one.workload["spec"]["template"]["spec"]["containers"][0])
    assert line[line.index("inference_api.py") :] == [
        "inference_api.py",
        "--max_batch_size=8",
        "--max_seq_len=512",
    ]


def test_distributed_preset_on_a_node_count_that_does_not_divide_its_ranks_is_an_error(
    registry: PresetRegistry, skus: SkuCatalog
) -> None:
    """llama-2-70b is 8 shards, one per torch rank: 3 nodes would start 6 or 9 ranks and never load."""
    raw = sample("kaito_workspace_phi_3.yaml")
    raw["resource"]["count"] = 3
    raw["resource"]["instanceType"] = "Standard_NC24s_v3"
    raw["inference"]["preset"] = {
        "name": "llama-2-70b",
        "accessMode": "private",
        "presetOptions": {"image": "my.io/llama-2-70b:1"},
    }
    with pytest.raises(mf.ManifestError) as e:
        build(workspace(raw), registry, skus, nodes=["n1", "n2", "n3"])
    assert e.value.reason == "UnsupportedNodeCount"
    assert "8 torch ranks" in e.value.message and "one of 1, 2, 4, 8" in e.value.message
    raw["resource"]["count"] = 2
    wl = build(workspace(raw), registry, skus, nodes=["n1", "n2"])
    line = wl.workload["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert "--nnodes=2 " in line and "--nproc_per_node=4 " in line  # 2 nodes x 4 GPUs = 8 ranks


def test_private_preset_without_image_is_an_error(registry: PresetRegistry, skus: SkuCatalog) -> None:
    raw = sample("kaito_workspace_phi_3.yaml")
    raw["inference"]["preset"] = {"name": "llama-2-7b"}
    with pytest.raises(mf.ManifestError) as e:
        build(workspace(raw), registry, skus)
    assert e.value.reason == "PrivateImageMissing"


def test_template_workspace(registry: PresetRegistry, skus: SkuCatalog) -> None:
    raw = sample("kaito_workspace_phi_3.yaml")
    raw["inference"] = {
        "template": {
            "spec": {
                "containers": [{"name": "srv", "image": "nginx:1"}],
                "tolerations": [{"key": "x", "operator": "Exists"}],
            }
        }
    }
    wl = build(workspace(raw), registry, skus)
    assert wl.kind == "Deployment" and wl.config_map is None
    tmpl = wl.workload["spec"]["template"]
    assert tmpl["metadata"]["labels"]["kaito.sh/workspace"] == "workspace-phi-3-mini"
    assert tmpl["spec"]["containers"] == [{"name": "srv", "image": "nginx:1"}]
    assert tmpl["spec"]["tolerations"][0] == {"key": "x", "operator": "Exists"}
    assert len(tmpl["spec"]["tolerations"]) == 3


def test_gpu_count_fallbacks(registry: PresetRegistry, skus: SkuCatalog) -> None:
    preset = registry.get("phi-3-mini-4k-instruct")
    assert mf.gpus_per_node(preset, skus.get("Standard_NC24ads_A100_v4")) == 1
    assert mf.gpus_per_node(preset, None, [0, 4]) == 4
    assert mf.gpus_per_node(preset, None, []) == preset.gpu_count


def test_user_config_map_is_mounted_not_created(registry: PresetRegistry, skus: SkuCatalog) -> None:
    raw = sample("kaito_workspace_phi_3.yaml")
    raw["inference"]["config"] = "my-config"
    wl = build(workspace(raw), registry, skus)
    assert wl.config_map is None
    vols = wl.workload["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config-volume", "configMap": {"name": "my-config"}} in vols
