"""Admission on CPU instance types: the fit check, its explanation, and tuning methods (validator called directly)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kaito.api.workspace import Workspace
from kaito.presets.registry import PresetRegistry
from kaito.presets.skus import SkuCatalog
from kaito.webhook.validation import WorkspaceValidator

INFERENCE: dict[str, Any] = {
    "apiVersion": "kaito.sh/v1alpha1",
    "kind": "Workspace",
    "metadata": {"name": "ws", "namespace": "ns"},
    "resource": {"instanceType": "Standard_D4s_v3", "labelSelector": {"matchLabels": {"apps": "phi-3"}}},
    "inference": {"preset": {"name": "phi-3-mini-4k-instruct"}},
}
TUNING: dict[str, Any] = {
    **{k: v for k, v in INFERENCE.items() if k != "inference"},
    "tuning": {
        "preset": {"name": "tiny-llama"},
        "method": "lora",
        "input": {"urls": ["https://example.com/data.parquet"]},
        "output": {"image": "myregistry.azurecr.io/adapter:0.0.1", "imagePushSecret": "push"},
    },
}
BYPASS = {"kaito.sh/bypass-resource-checks": "true"}


@pytest.fixture(scope="module")
def validator() -> WorkspaceValidator:
    return WorkspaceValidator(PresetRegistry.load(), SkuCatalog.load())


def ws(base: dict[str, Any], instance_type: str, *, preset: str | None = None, **extra: Any) -> Workspace:
    obj = copy.deepcopy(base)
    obj["resource"]["instanceType"] = instance_type
    section = "inference" if "inference" in obj else "tuning"
    if preset is not None:
        obj[section]["preset"]["name"] = preset
    if "method" in extra:
        obj["tuning"]["method"] = extra.pop("method")
    if "annotations" in extra:
        obj["metadata"]["annotations"] = extra.pop("annotations")
    return Workspace.model_validate(obj)


@pytest.mark.parametrize(
    "instance_type", ["Standard_D4s_v3", "Standard_D8as_v5", "Standard_E4s_v5", "m5.xlarge", "r6i.xlarge"]
)
async def test_cpu_capable_preset_on_a_big_enough_cpu_sku_is_admitted(
    validator: WorkspaceValidator, instance_type: str
) -> None:
    result = await validator.validate_create(ws(INFERENCE, instance_type))
    assert result.allowed and not result.warnings, (result.errors, result.warnings)


async def test_too_little_memory_names_both_numbers_and_the_next_size(validator: WorkspaceValidator) -> None:
    result = await validator.validate_create(ws(INFERENCE, "Standard_F4s_v2"))
    assert result.errors == [
        "resource.instanceType: Standard_F4s_v2 has 8 GiB, phi-3-mini-4k-instruct needs 12 GiB on CPU; pick "
        'Standard_F8s_v2 or larger; or add the annotation kaito.sh/bypass-resource-checks: "true" to skip '
        "this check"
    ]
    result = await validator.validate_create(ws(INFERENCE, "Standard_D2s_v3"))
    (error,) = result.errors
    assert "Standard_D2s_v3 has 8 GiB, phi-3-mini-4k-instruct needs 12 GiB on CPU" in error
    assert "pick Standard_D4s_v3 or larger" in error


async def test_preset_that_cannot_run_on_cpu_points_at_gpus(validator: WorkspaceValidator) -> None:
    result = await validator.validate_create(ws(INFERENCE, "Standard_D64s_v3", preset="phi-4"))
    (error,) = result.errors
    assert error.startswith("resource.instanceType: preset phi-4 cannot run on CPU")
    assert "pick a GPU instance type such as Standard_" in error


async def test_bypass_turns_a_cpu_misfit_into_a_warning(validator: WorkspaceValidator) -> None:
    result = await validator.validate_create(ws(INFERENCE, "Standard_D2s_v3", annotations=BYPASS))
    assert result.allowed
    (warning,) = result.warnings
    assert "needs 12 GiB on CPU" in warning and "(ignored: kaito.sh/bypass-resource-checks)" in warning


async def test_gpu_skus_are_checked_as_before(validator: WorkspaceValidator) -> None:
    result = await validator.validate_create(ws(INFERENCE, "Standard_NC6s_v3", preset="falcon-40b"))
    (error,) = result.errors
    assert "Standard_NC6s_v3 (1x NVIDIA V100, 16Gi GPU memory) is too small for preset falcon-40b" in error


async def test_lora_on_cpu_is_admitted_and_qlora_refused(validator: WorkspaceValidator) -> None:
    assert (await validator.validate_create(ws(TUNING, "Standard_D2s_v3"))).allowed
    result = await validator.validate_create(ws(TUNING, "Standard_D2s_v3", method="qlora"))
    (error,) = result.errors
    assert "qlora quantizes the base model with bitsandbytes, which needs an NVIDIA GPU" in error
    assert "use method lora on this instance type, or pick a GPU instance type such as" in error
    # qlora of the same preset on a GPU SKU is fine.
    assert (await validator.validate_create(ws(TUNING, "Standard_NC6s_v3", method="qlora"))).allowed


async def test_lora_on_cpu_checks_tuning_memory(validator: WorkspaceValidator) -> None:
    result = await validator.validate_create(ws(TUNING, "Standard_D4s_v3", preset="phi-3-mini-4k-instruct"))
    (error,) = result.errors
    assert "Standard_D4s_v3 has 16 GiB, phi-3-mini-4k-instruct needs 24 GiB to tune with lora" in error
    assert "pick Standard_D8s_v3 or larger" in error
    tunable_not_on_cpu = await validator.validate_create(ws(TUNING, "Standard_D64s_v3", preset="phi-4"))
    assert any("preset phi-4 cannot run on CPU" in e for e in tunable_not_on_cpu.errors)
