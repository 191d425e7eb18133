"""The CPU side of the catalogs: CPU SKUs, presets' ``cpu:`` sections, the CPU fit check and pod sizing."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from kaito.presets import cpu
from kaito.presets.catalog import ENV_CATALOG_DIR, CatalogError
from kaito.presets.registry import PresetRegistry, check_fit
from kaito.presets.skus import Sku, SkuCatalog


def get(skus: SkuCatalog, name: str) -> Sku:
    found = skus.get(name)
    assert found is not None, name
    return found


def test_cpu_skus_of_both_clouds(skus: SkuCatalog) -> None:
    d2 = get(skus, "Standard_D2s_v3")
    assert d2.is_cpu and d2.cloud == "azure" and d2.vcpus == 2 and d2.memory_gib == 8
    assert d2.gpu_count == 0 and d2.per_gpu_memory_gib == 0 and d2.gpu_memory_gib == 0
    assert d2.describe() == "CPU only: 2 vCPUs, 8 GiB memory"
    for name, vcpus, gib in [
        ("Standard_D64s_v3", 64, 256), ("Standard_D16as_v5", 16, 64), ("Standard_E8s_v5", 8, 64),
        ("Standard_F16s_v2", 16, 32), ("m5.large", 2, 8), ("c6i.4xlarge", 16, 32), ("r5.2xlarge", 8, 64),
        ("m6i.32xlarge", 128, 512), ("c5.9xlarge", 36, 72),
    ]:  # fmt: skip
        sku = get(skus, name)
        assert (sku.is_cpu, sku.vcpus, sku.memory_gib) == (True, vcpus, gib), name
    assert get(skus, "m5.large").cloud == "aws"
    assert not get(skus, "Standard_NC6s_v3").is_cpu
    assert {s.cloud for s in skus.cpu_skus()} == {"azure", "aws"}
    assert all(s.is_cpu for s in skus.cpu_skus("azure")) and len(skus.cpu_skus("azure")) >= 40
    # GPU-only code paths never offer a CPU SKU.
    assert all(
        not s.is_cpu for s in PresetRegistry.load().fitting_skus(PresetRegistry.load().get("phi-2"), skus)
    )


def test_presets_cpu_sections(registry: PresetRegistry) -> None:
    phi3 = registry.get("phi-3-mini-4k-instruct")
    assert phi3.supports_cpu and phi3.cpu is not None
    assert (phi3.cpu.memory, phi3.cpu.min_cpus, phi3.cpu.dtype) == ("12Gi", 2, "bfloat16")
    for big in (
        "phi-4",
        "falcon-40b",
        "llama-2-70b",
        "qwen2.5-coder-32b-instruct",
        "phi-3-medium-4k-instruct",
    ):
        assert not registry.get(big).supports_cpu, big
    tiny = registry.get("tiny-llama")
    assert tiny.cpu is not None and tiny.cpu.min_cpus == Decimal("0.5") and tiny.cpu.dtype == "float32"
    assert tiny.image_ref("localhost:5000") == "localhost:5000/kaito-tiny-llama:0.0.1"
    assert tiny.supports_tuning and tiny.tuning is not None and "lora" in tiny.tuning.methods


def test_catalog_rejects_incomplete_or_impossible_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "skus").mkdir()
    monkeypatch.setenv(ENV_CATALOG_DIR, str(tmp_path))
    sku_file = tmp_path / "skus" / "x.yaml"
    sku_file.write_text("cloud: azure\nskus:\n  - {name: Standard_D2x, vcpus: 2}\n")
    with pytest.raises(CatalogError, match=r"a CPU SKU \(gpuCount 0\) needs vcpus and memory"):
        SkuCatalog.load()
    sku_file.write_text("cloud: azure\nskus:\n  - {name: Standard_NCx, gpuCount: 1}\n")
    with pytest.raises(CatalogError, match="a GPU SKU needs gpuMemory and gpuModel"):
        SkuCatalog.load()
    model = tmp_path / "models" / "m.yaml"
    entry = "{name: m, tag: '1', diskStorage: 1Gi, gpuCount: 1, totalGPUMemory: 1Gi, "
    model.write_text(f"family: M\npresets:\n  - {entry}cpu: {{memory: 1Gi, dtype: float16}}}}\n")
    with pytest.raises(CatalogError, match="no float16 on CPU"):
        PresetRegistry.load()
    model.write_text(f"family: M\npresets:\n  - {entry}distributedInference: true, cpu: {{memory: 1Gi}}}}\n")
    with pytest.raises(CatalogError, match="a distributed preset cannot have a cpu section"):
        PresetRegistry.load()


def test_cpu_fit(registry: PresetRegistry, skus: SkuCatalog) -> None:
    phi3 = registry.get("phi-3-mini-4k-instruct")
    assert cpu.check_cpu_fit(phi3, get(skus, "Standard_D4s_v3")) == []
    assert [p.kind for p in cpu.check_cpu_fit(phi3, get(skus, "Standard_F4s_v2"))] == ["memory"]
    assert [p.kind for p in cpu.check_cpu_fit(phi3, get(skus, "Standard_D2s_v3"))] == ["cpu-count", "memory"]
    assert [p.kind for p in cpu.check_cpu_fit(registry.get("phi-4"), get(skus, "Standard_E96s_v5"))] == [
        "cpu-unsupported"
    ]
    # The node keeps some memory for itself: 12 GiB of RAM do not serve a 12 GiB preset.
    (mem,) = cpu.check_cpu_fit(
        phi3, get(skus, "Standard_E2s_v5").model_copy(update={"vcpus": 4, "memory": "12Gi"})
    )
    assert "has 12 GiB (1.6 GiB of it is kept for the node itself)" in mem.message
    # A CPU SKU never passes the GPU check, so GPU suggestions stay GPU ones.
    assert check_fit(phi3, get(skus, "Standard_D64s_v3"))
    assert [s.name for s in cpu.fitting_cpu_skus(phi3, skus, "azure")][:1] == [
        "Standard_D4_v3"
    ]  # 16 GiB, fewest vCPUs
    assert cpu.family_of("Standard_D16as_v5") == "Standard_D#as_v5" and cpu.family_of("m6i.large") == "m6i"


def test_tuning_fit_on_cpu(registry: PresetRegistry, skus: SkuCatalog) -> None:
    tiny = registry.get("tiny-llama")
    d2 = get(skus, "Standard_D2s_v3")
    assert cpu.check_cpu_tuning_fit(tiny, d2, "lora") == []
    assert [p.kind for p in cpu.check_cpu_tuning_fit(tiny, d2, "qlora")] == ["method-needs-gpu"]


def test_pod_sizing(registry: PresetRegistry, skus: SkuCatalog) -> None:
    phi3 = registry.get("phi-3-mini-4k-instruct")
    d16 = cpu.cpu_resources(phi3, get(skus, "Standard_D16s_v3"))
    assert (d16.cpu_request_millis, d16.cpu_limit_millis, d16.threads) == (7500, 15100, 15)
    assert (d16.memory_request, d16.memory_limit) == ("12Gi", "61235Mi")
    # Unknown SKU: the preset's needs are requests and limits.
    byo = cpu.cpu_resources(phi3, None)
    assert byo.as_container_resources() == {
        "requests": {"cpu": "2000m", "memory": "12Gi"},
        "limits": {"cpu": "2000m", "memory": "12Gi"},
    }
    assert byo.threads == 2
    with pytest.raises(ValueError, match="no cpu section"):
        cpu.cpu_resources(registry.get("phi-4"), None)
