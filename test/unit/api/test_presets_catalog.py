"""Preset registry and SKU catalog loaded from presets/models and presets/skus."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from kaito.presets.catalog import ENV_CATALOG_DIR, CatalogError, catalog_dir, parse_duration
from kaito.presets.registry import PresetRegistry, UnknownPresetError, check_fit, check_tuning_fit
from kaito.presets.skus import SkuCatalog

UPSTREAM_V04 = [
    "falcon-7b", "falcon-7b-instruct", "falcon-40b", "falcon-40b-instruct", "mistral-7b", "mistral-7b-instruct",
    "phi-2", "phi-3-mini-4k-instruct", "phi-3-mini-128k-instruct", "phi-3-medium-4k-instruct",
    "phi-3-medium-128k-instruct", "phi-3.5-mini-instruct", "llama-2-7b", "llama-2-13b", "llama-2-70b",
    "llama-2-7b-chat", "llama-2-13b-chat", "llama-2-70b-chat",
]  # fmt: skip
LATER = [
    "phi-4", "phi-4-mini-instruct", "qwen2.5-coder-7b-instruct", "qwen2.5-coder-32b-instruct",
    "deepseek-r1-distill-llama-8b", "deepseek-r1-distill-qwen-14b", "llama-3.1-8b-instruct",
]  # fmt: skip


def test_every_preset_present(registry: PresetRegistry) -> None:
    assert set(UPSTREAM_V04 + LATER) <= set(registry.names())


def test_preset_fields(registry: PresetRegistry) -> None:
    phi3 = registry.get("phi-3-mini-4k-instruct")
    assert phi3.gpu_count == 1 and phi3.total_gpu_memory_gib == 9 and phi3.per_gpu_memory_gib == 0
    assert phi3.image_ref() == "mcr.microsoft.com/aks/kaito/kaito-phi-3-mini-4k-instruct:0.1.1"
    assert phi3.readiness_timeout == timedelta(minutes=30)
    assert phi3.supports_tuning and not phi3.distributed_inference
    assert phi3.runtime.transformers is not None
    assert phi3.runtime.transformers.model_run_params == {
        "torch_dtype": "auto",
        "pipeline": "text-generation",
        "trust_remote_code": "",
    }
    assert phi3.runtime.vllm is not None and phi3.vllm_model_name == "phi-3-mini-4k-instruct"
    # A preset's *Params map replaces the family default (phi-2 has no trust_remote_code).
    phi2 = registry.get("phi-2").runtime.transformers
    assert phi2 is not None and phi2.model_run_params == {
        "torch_dtype": "float16",
        "pipeline": "text-generation",
    }
    falcon = registry.get("falcon-7b")
    assert falcon.runtime.vllm is not None and falcon.runtime.vllm.disable_tensor_parallelism
    assert falcon.runtime.vllm.disallow_lora and "chat-template" in falcon.runtime.vllm.model_run_params
    assert falcon.tuning is not None and falcon.tuning.accelerate_params["gpu_ids"] == "all"
    assert falcon.tuning.per_gpu_memory_by_method == {"qlora": "16Gi"}
    assert registry.get("falcon-40b").disk_storage == "280Gi"
    llama = registry.get("llama-2-70b")
    assert llama.is_private and llama.distributed_inference and llama.world_size == 8
    assert llama.readiness_timeout == timedelta(minutes=30) and registry.get(
        "llama-2-7b"
    ).readiness_timeout == timedelta(minutes=10)
    assert llama.runtime.vllm is None and not llama.supports_tuning
    assert registry.get("deepseek-r1-distill-llama-8b").total_gpu_memory_gib == Decimal("16.5")
    l31 = registry.get("llama-3.1-8b-instruct")
    assert l31.download_at_runtime and l31.image_ref().endswith("/kaito-base:0.0.2")
    for name in (
        "falcon-7b-instruct",
        "mistral-7b-instruct",
        "deepseek-r1-distill-qwen-14b",
        "llama-3.1-8b-instruct",
    ):
        assert not registry.get(name).supports_tuning, name
    for name in ("phi-4", "qwen2.5-coder-32b-instruct", "mistral-7b", "phi-3.5-mini-instruct"):
        assert registry.get(name).supports_tuning, name


def test_unknown_preset_suggests(registry: PresetRegistry) -> None:
    with pytest.raises(UnknownPresetError) as err:
        registry.get("phi-3-mini-4k")
    assert "phi-3-mini-4k-instruct" in err.value.suggestions
    assert "did you mean" in str(err.value)
    assert registry.get("Falcon-7B").name == "falcon-7b"


def test_sku_catalog(skus: SkuCatalog) -> None:
    assert set(skus.clouds()) == {"azure", "aws", "arc"}
    nc6 = skus.get("Standard_NC6s_v3")
    assert (
        nc6 is not None and nc6.gpu_count == 1 and nc6.gpu_memory_gib == 16 and nc6.gpu_model == "NVIDIA V100"
    )
    assert skus.get("standard_nc6s_v3") is nc6
    assert skus.get("Standard_NC6s_v3", cloud="aws") is None
    amsr = skus.get("Standard_ND96amsr_A100_v4")
    assert amsr is not None and amsr.gpu_memory_gib == 640  # upstream v0.4.0 said 80
    g5 = skus.get("g5.4xlarge")
    assert g5 is not None and g5.cloud == "aws" and g5.per_gpu_memory_gib == 24
    assert skus.get("Standard_NC999") is None
    assert "Standard_NC6s_v3" in skus.suggest("Standard_NC6s_v4")
    assert len(skus.list("azure")) >= 29 and len(skus.list("aws")) >= 50


def test_fit_check(registry: PresetRegistry, skus: SkuCatalog) -> None:
    def sku(name: str):  # type: ignore[no-untyped-def]
        found = skus.get(name)
        assert found is not None
        return found

    assert check_fit(registry.get("phi-3-mini-4k-instruct"), sku("Standard_NC6s_v3")) == []
    problems = check_fit(registry.get("falcon-40b"), sku("Standard_NC6s_v3"))
    assert {p.kind for p in problems} == {"gpu-count", "total-gpu-memory"}
    assert "requires at least 90Gi" in problems[1].message
    # Non-distributed presets do not pool GPUs across nodes (upstream multiplied by count).
    assert check_fit(registry.get("falcon-40b"), sku("Standard_NC12s_v3"), count=3)
    # Distributed presets do.
    assert check_fit(registry.get("llama-2-13b"), sku("Standard_NC24ads_A100_v4"), count=2) == []
    assert [p.kind for p in check_fit(registry.get("llama-2-70b"), sku("Standard_NC12s_v3"))] == [
        "gpu-count",
        "per-gpu-memory",
        "total-gpu-memory",
    ]
    per_gpu = check_fit(registry.get("llama-2-7b"), sku("Standard_NV12"))
    assert "per-gpu-memory" in {p.kind for p in per_gpu}
    fitting = registry.fitting_skus(registry.get("falcon-40b"), skus, "azure")
    assert fitting and all(not check_fit(registry.get("falcon-40b"), s) for s in fitting)
    assert fitting[0].gpu_memory_gib <= fitting[-1].gpu_memory_gib
    advice = check_tuning_fit(registry.get("phi-3-mini-4k-instruct"), sku("Standard_NC6s_v3"), "qlora")
    assert advice and "72Gi" in advice[0].message


def test_catalog_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "skus").mkdir()
    (tmp_path / "models" / "tiny.yaml").write_text(
        "family: Tiny\npresets:\n  - {name: tiny-1, tag: '1', diskStorage: 1Gi, gpuCount: 1, totalGPUMemory: 1Gi}\n"
    )
    (tmp_path / "skus" / "local.yaml").write_text(
        "cloud: azure\nskus:\n  - {name: Standard_Tiny, gpuCount: 1, gpuMemory: 2Gi, gpuModel: fake}\n"
    )
    monkeypatch.setenv(ENV_CATALOG_DIR, str(tmp_path))
    assert catalog_dir() == tmp_path
    assert PresetRegistry.load().names() == ["tiny-1"]
    assert [s.name for s in SkuCatalog.load().list()] == ["Standard_Tiny"]
    (tmp_path / "models" / "bad.yaml").write_text("family: Bad\npresets:\n  - {name: bad, tag: '1'}\n")
    with pytest.raises(CatalogError, match=r"bad\.yaml"):
        PresetRegistry.load()


def test_durations() -> None:
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration(45) == timedelta(seconds=45)
    with pytest.raises(ValueError):
        parse_duration("30 minutes")
