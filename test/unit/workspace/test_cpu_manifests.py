"""CPU nodes as a target: the inference workload and the tuning Job on a CPU instance type (pure builders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kaito.api.workspace import Workspace
from kaito.presets.registry import PresetRegistry
from kaito.presets.skus import SkuCatalog
from kaito.workspace import manifests as mf
from test.unit.workspace.test_tuning import job_for as job

SAMPLES = Path(__file__).resolve().parents[3] / "config" / "samples"
OPTIONS = mf.ManifestOptions(registry="example.io/kaito")


def inference_ws(instance_type: str, preset: str = "phi-3-mini-4k-instruct", **annotations: str) -> Workspace:
    raw = yaml.safe_load((SAMPLES / "kaito_workspace_cpu_phi_3.yaml").read_text())
    raw["metadata"].update(namespace="ns1", uid="uid-1", annotations=annotations)
    raw["resource"]["instanceType"] = instance_type
    raw["inference"]["preset"]["name"] = preset
    return Workspace.model_validate(raw)


def build(ws: Workspace, registry: PresetRegistry, skus: SkuCatalog, **kw: Any) -> mf.Workload:
    assert ws.inference is not None and ws.inference.preset is not None
    return mf.build_inference(
        ws,
        registry.get(ws.inference.preset.name),
        kw.pop("options", OPTIONS),
        sku=skus.get(ws.resource.instance_type),
        nodes=kw.pop("nodes", ["cpu-node"]),
        **kw,
    )


def container(wl: mf.Workload) -> dict[str, Any]:
    (c,) = wl.workload["spec"]["template"]["spec"]["containers"]
    return dict(c)


def flags(c: dict[str, Any]) -> dict[str, str]:
    line = mf.command_line(c)
    return dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in line if a.startswith("--"))


def test_phi3_on_a_d4_asks_for_no_gpu_and_sizes_cpu_and_memory(
    registry: PresetRegistry, skus: SkuCatalog
) -> None:
    wl = build(inference_ws("Standard_D4s_v3"), registry, skus)
    c = container(wl)
    assert "nvidia.com/gpu" not in str(c["resources"])
    # D4s_v3: 4 vCPUs, 16 GiB; 3.4 cores and 14540Mi are what pods can have; half the CPU is requested
    # (raised to the preset's minCPUs, 2) so a rolling update's surge pod fits beside the old one.
    assert c["resources"] == {
        "requests": {"cpu": "2000m", "memory": "12Gi"},
        "limits": {"cpu": "3400m", "memory": "14540Mi"},
    }
    line = mf.command_line(c)
    assert line[:2] == ["python3", "/workspace/tfs/inference_api.py"]  # no accelerate on CPU
    f = flags(c)
    assert f["torch_threads"] == "3"  # whole cores of the CPU limit
    assert f["device_map"] == "cpu" and f["torch_dtype"] == "bfloat16"
    assert f["served_model_name"] == "phi-3-mini-4k-instruct" and f["pipeline"] == "text-generation"
    assert "gpu_ids" not in f and "num_processes" not in f
    # Same image, probes and Service as on a GPU.
    assert c["image"] == "example.io/kaito/kaito-phi-3-mini-4k-instruct:0.1.1"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert wl.kind == "Deployment" and wl.services[0]["spec"]["ports"][0]["targetPort"] == 5000


def test_gpu_sku_is_unchanged(registry: PresetRegistry, skus: SkuCatalog) -> None:
    c = container(build(inference_ws("Standard_NC6s_v3"), registry, skus))
    assert c["resources"] == {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    assert mf.command_line(c)[:2] == ["accelerate", "launch"]
    assert "torch_threads" not in flags(c) and flags(c)["torch_dtype"] == "auto"


def test_tiny_preset_on_the_smallest_d_size(registry: PresetRegistry, skus: SkuCatalog) -> None:
    c = container(build(inference_ws("Standard_D2s_v3", "tiny-llama"), registry, skus))
    assert c["image"] == "example.io/kaito/kaito-tiny-llama:0.0.1"
    assert c["resources"] == {
        "requests": {"cpu": "700m", "memory": "512Mi"},
        "limits": {"cpu": "1400m", "memory": "6758Mi"},
    }
    f = flags(c)
    assert (
        f["torch_threads"] == "1" and f["torch_dtype"] == "float32" and f["served_model_name"] == "tiny-llama"
    )


def test_threads_follow_the_cpu_limit_across_sizes(registry: PresetRegistry, skus: SkuCatalog) -> None:
    seen = {}
    for name in ("Standard_D8s_v3", "Standard_D16s_v3", "Standard_D64s_v3", "m5.4xlarge", "Standard_E8s_v5"):
        c = container(build(inference_ws(name), registry, skus))
        limit = int(c["resources"]["limits"]["cpu"].removesuffix("m"))
        request = int(c["resources"]["requests"]["cpu"].removesuffix("m"))
        threads = int(flags(c)["torch_threads"])
        assert threads == limit // 1000 and request <= limit // 2 + 100 and request >= 2000, name
        seen[name] = threads
    assert seen["Standard_D8s_v3"] < seen["Standard_D16s_v3"] < seen["Standard_D64s_v3"]


def test_vllm_on_cpu(registry: PresetRegistry, skus: SkuCatalog) -> None:
    # The operator's default runtime falls back to transformers; an explicit annotation is an error.
    opts = mf.ManifestOptions(registry="example.io/kaito", default_runtime=mf.RuntimeName.VLLM)
    c = container(build(inference_ws("Standard_D4s_v3"), registry, skus, options=opts))
    assert mf.command_line(c)[1] == "/workspace/tfs/inference_api.py"
    with pytest.raises(mf.ManifestError) as err:
        build(inference_ws("Standard_D4s_v3", **{"kaito.sh/runtime": "vllm"}), registry, skus)
    assert err.value.reason == "UnsupportedRuntime" and "needs a GPU" in err.value.message


def test_preset_without_cpu_section_on_a_cpu_sku_is_a_typed_error(
    registry: PresetRegistry, skus: SkuCatalog
) -> None:
    # Admission refuses this unless the bypass annotation is set; the builder must not emit a GPU pod.
    with pytest.raises(mf.ManifestError) as err:
        build(inference_ws("Standard_D64s_v3", "phi-4"), registry, skus)
    assert err.value.reason == "PresetNotCPUCapable" and "phi-4" in err.value.message


def test_unknown_instance_type_on_a_byo_node_without_gpus(registry: PresetRegistry, skus: SkuCatalog) -> None:
    # Unknown to the catalog (admitted with a warning): CPU when the selected node has no GPUs and the
    # name is not a GPU family's; the preset's needs are the whole sizing (no SKU to size from).
    c = container(build(inference_ws("Standard_D2ads_v9", "tiny-llama"), registry, skus, node_gpus=[0]))
    assert c["resources"] == {
        "requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"},
    }
    assert flags(c)["torch_threads"] == "1"
    # A GPU family's node whose device plugin has not registered yet keeps the GPU shape.
    gpu = container(build(inference_ws("Standard_NC6ads_v9", "tiny-llama"), registry, skus, node_gpus=[0]))
    assert gpu["resources"]["requests"] == {"nvidia.com/gpu": "1"}
    # A node with GPUs: GPU shape.
    gpu = container(build(inference_ws("Standard_D2ads_v9", "tiny-llama"), registry, skus, node_gpus=[2]))
    assert gpu["resources"]["requests"] == {"nvidia.com/gpu": "2"}


def test_cpu_hash_moves_with_the_sku(registry: PresetRegistry, skus: SkuCatalog) -> None:
    a = build(inference_ws("Standard_D4s_v3"), registry, skus).workload
    b = build(inference_ws("Standard_D8s_v3"), registry, skus).workload
    assert mf.spec_hash(a) != mf.spec_hash(b)
    assert mf.spec_hash(a) == mf.spec_hash(build(inference_ws("Standard_D4s_v3"), registry, skus).workload)


# ------------------------------------------------------------------------------------------ tuning


def tuning_ws(instance_type: str, method: str, preset: str = "tiny-llama") -> Workspace:
    raw = yaml.safe_load((SAMPLES / "kaito_workspace_tuning_phi_3.yaml").read_text())
    raw["metadata"].update(namespace="ns1", uid="uid-1")
    raw["resource"]["instanceType"] = instance_type
    raw["tuning"]["method"] = method
    raw["tuning"]["preset"]["name"] = preset
    return Workspace.model_validate(raw)


def test_lora_job_on_cpu(registry: PresetRegistry, skus: SkuCatalog) -> None:
    j = job(tuning_ws("Standard_D4s_v3", "lora"), registry, skus)
    (trainer,) = j["spec"]["template"]["spec"]["containers"]
    assert trainer["resources"] == {
        "requests": {"cpu": "1700m", "memory": "1Gi"},  # tiny-llama's tuningMemory
        "limits": {"cpu": "3400m", "memory": "14540Mi"},
    }
    assert {"name": "OMP_NUM_THREADS", "value": "3"} in trainer["env"]
    assert trainer["command"][2].startswith("python3 /workspace/tfs/fine_tuning.py && ")
    # phi-3-mini: tuning memory defaults to twice the serving memory.
    j = job(tuning_ws("Standard_D8s_v3", "lora", "phi-3-mini-4k-instruct"), registry, skus)
    (trainer,) = j["spec"]["template"]["spec"]["containers"]
    assert trainer["resources"]["requests"]["memory"] == "24Gi"


def test_qlora_on_cpu_is_refused(registry: PresetRegistry, skus: SkuCatalog) -> None:
    with pytest.raises(mf.ManifestError) as err:
        job(tuning_ws("Standard_D4s_v3", "qlora"), registry, skus)
    assert err.value.reason == "MethodNeedsGPU" and "use method lora" in err.value.message
    # The same preset tunes with qlora on a GPU SKU.
    j = job(tuning_ws("Standard_NC6s_v3", "qlora"), registry, skus)
    (trainer,) = j["spec"]["template"]["spec"]["containers"]
    assert trainer["resources"]["limits"] == {"nvidia.com/gpu": "1"}
