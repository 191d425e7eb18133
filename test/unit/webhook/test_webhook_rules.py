"""Validator and defaulting rules, called directly (the HTTP and apiserver paths are tested elsewhere)."""

from __future__ import annotations

from typing import Any

import pytest

from kaito.api.workspace import Workspace
from kaito.presets.registry import PresetRegistry
from kaito.presets.skus import SkuCatalog
from kaito.webhook.defaulting import apply_patch, default_patch
from kaito.webhook.validation import AdmissionPolicy, WorkspaceValidator
from test.unit.webhook.workspaces import BASE, TUNING, build

CONFIGMAPS: dict[tuple[str, str], dict[str, str]] = {
    ("ns", "good-qlora"): {
        "training_config.yaml": "training_config:\n  QuantizationConfig:\n    load_in_4bit: true\n"
        "  TrainingArguments:\n    output_dir: results\n"
    },
    ("ns", "escape"): {
        "training_config.yaml": "training_config:\n  TrainingArguments:\n    output_dir: ../etc\n"
    },
    ("ns", "unknown-section"): {"training_config.yaml": "training_config:\n  Foo: {}\n"},
    ("ns", "no-key"): {"other": "x"},
    ("ns", "inference-ok"): {"inference_config.yaml": "vllm:\n  gpu-memory-utilization: 0.9\n"},
}


async def read_configmap(namespace: str, name: str) -> dict[str, str] | None:
    return CONFIGMAPS.get((namespace, name))


@pytest.fixture(scope="module")
def validator() -> WorkspaceValidator:
    return WorkspaceValidator(PresetRegistry.load(), SkuCatalog.load(), configmaps=read_configmap)


CREATE_CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("seed inference", BASE, None),
    ("seed tuning", TUNING, None),
    ("unknown preset", build(BASE, inference__preset={"name": "phi-3-mini-4k"}), "inference.preset.name: unknown preset 'phi-3-mini-4k'; did you mean phi-3-mini-4k-instruct"),
    ("too small", build(BASE, inference__preset={"name": "falcon-40b"}), "resource.instanceType: Standard_NC6s_v3 (1x NVIDIA V100, 16Gi GPU memory) is too small for preset falcon-40b"),
    ("unknown sku", build(BASE, resource__instanceType="Standard_HB120rs_v3"), "resource.instanceType: unknown instance type 'Standard_HB120rs_v3'"),
    ("unknown sku, upstream's case", build(BASE, resource__instanceType="Standard_invalid_sku"), "resource.instanceType: unknown instance type 'Standard_invalid_sku'"),
    ("private preset", build(BASE, inference__preset={"name": "llama-2-7b"}, resource__instanceType="Standard_NC12s_v3"), "inference.preset.accessMode: preset llama-2-7b has no public image"),
    ("private without image", build(BASE, inference__preset={"name": "llama-2-7b", "accessMode": "private"}, resource__instanceType="Standard_NC12s_v3"), "inference.preset.presetOptions.image: required when accessMode is private"),
    ("adapter without source", build(BASE, inference__adapters=[{"strength": "0.5"}]), "inference.adapters[0].source: required"),
    ("adapter strength", build(BASE, inference__adapters=[{"source": {"name": "a", "image": "r.io/a:1"}, "strength": "2"}]), "inference.adapters[0].strength: '2' must be a number between"),
    ("duplicate adapters", build(BASE, inference__adapters=[{"source": {"name": "a", "image": "r.io/a:1"}}, {"source": {"name": "a", "image": "r.io/b:1"}}]), "inference.adapters[1].source.name: duplicate adapter name 'a'"),
    ("adapter bad image", build(BASE, inference__adapters=[{"source": {"name": "a", "image": "<YOUR_IMAGE>"}}]), "inference.adapters[0].source.image: '<YOUR_IMAGE>' is not a valid image reference"),
    ("adapter image with docker defaults", build(BASE, inference__adapters=[{"source": {"name": "a", "image": "noslash"}}]), None),
    ("both", build(BASE, tuning=TUNING["tuning"]), "inference: inference and tuning cannot both be set"),
    ("neither", build(BASE, inference=None), "inference: set exactly one of inference"),
    ("match expressions only", build(BASE, resource__labelSelector={"matchExpressions": [{"key": "a", "operator": "Exists"}]}), "resource.labelSelector.matchLabels: required"),
    ("bad name", build(BASE, metadata={"name": "Bad_Name", "namespace": "ns"}), "metadata.name: 'Bad_Name' must be a DNS-1123 label"),
    ("untunable", build(TUNING, tuning__preset={"name": "falcon-7b-instruct"}), "tuning.preset.name: preset falcon-7b-instruct cannot be tuned; presets that support tuning: falcon-40b"),
    ("tuning method", build(TUNING, tuning__method="dora"), "tuning.method: 'dora' is not supported; use lora or qlora"),
    ("tuning count", build(TUNING, resource__count=2), "resource.count: tuning runs on one node"),
    ("tuning input none", build(TUNING, tuning__input={}), "tuning.input: set exactly one of urls or image (got none)"),
    ("tuning input volume", build(TUNING, tuning__input={"volumeSource": {"emptyDir": {}}}), "tuning.input.volumeSource: volumes are not supported yet"),
    ("tuning url", build(TUNING, tuning__input={"urls": ["ftp://x/y"]}), "tuning.input.urls[0]: 'ftp://x/y' is not an http(s) URL"),
    ("tuning push secret", build(TUNING, tuning__output={"image": "r.io/a:1"}), "tuning.output.imagePushSecret: required with output.image"),
    ("tuning config ok", build(TUNING, tuning__config="good-qlora"), None),
    ("tuning config missing", build(TUNING, tuning__config="nope"), "tuning.config: ConfigMap 'nope' not found in namespace 'ns'"),
    ("tuning config escape", build(TUNING, tuning__config="escape"), "must be a directory under /mnt"),
    ("tuning config section", build(TUNING, tuning__config="unknown-section"), "unrecognized section 'Foo'"),
    ("tuning qlora quantization", build(TUNING, tuning__config="escape", tuning__method="qlora"), "qlora needs a QuantizationConfig"),
    ("inference config ok", build(BASE, inference__config="inference-ok"), None),
    ("inference config key not needed by transformers", build(BASE, inference__config="no-key"), None),
    ("inference config must exist under transformers too", build(BASE, inference__config="nope"), "inference.config: ConfigMap 'nope' not found in namespace 'ns'"),
    ("template ok", build(BASE, inference={"template": {"spec": {"containers": [{"name": "c", "image": "nginx:1"}]}}}), None),
    ("template empty", build(BASE, inference={"template": {"spec": {}}}), "inference.template.spec.containers: a pod template needs at least one container"),
    ("runtime annotation", build(BASE, metadata={"name": "ws", "namespace": "ns", "annotations": {"kaito.sh/runtime": "tgi"}}), "metadata.annotations[kaito.sh/runtime]: unknown runtime 'tgi'"),
    ("distributed count ok", build(BASE, inference__preset={"name": "llama-2-13b-chat", "accessMode": "private", "presetOptions": {"image": "my.io/llama-2-13b-chat:1"}}, resource__count=2), None),
    ("distributed count", build(BASE, inference__preset={"name": "llama-2-13b-chat", "accessMode": "private", "presetOptions": {"image": "my.io/llama-2-13b-chat:1"}}, resource__count=3), "resource.count: preset llama-2-13b-chat runs as 2 torch ranks, which 3 nodes cannot share evenly; use one of 1, 2"),
    ("token for packaged weights", build(BASE, inference__preset={"name": "phi-3-mini-4k-instruct", "presetOptions": {"modelAccessSecret": "hf"}}), "inference.preset.presetOptions.modelAccessSecret: preset phi-3-mini-4k-instruct ships its weights in the model image"),
    ("gated download", build(BASE, inference__preset={"name": "llama-3.1-8b-instruct"}, resource__instanceType="Standard_NC24ads_A100_v4"), "inference.preset.presetOptions.modelAccessSecret: preset llama-3.1-8b-instruct downloads gated weights"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "obj", "expected"), CREATE_CASES, ids=[c[0] for c in CREATE_CASES])
async def test_create_rules(
    validator: WorkspaceValidator, name: str, obj: dict[str, Any], expected: str | None
) -> None:
    result = await validator.validate_create(Workspace.model_validate(obj))
    if expected is None:
        assert result.allowed, result.errors
    else:
        assert not result.allowed
        assert any(expected in e for e in result.errors), result.errors


async def test_bypass_annotation_turns_fit_errors_into_warnings(validator: WorkspaceValidator) -> None:
    meta = {"name": "ws", "namespace": "ns", "annotations": {"kaito.sh/bypass-resource-checks": "true"}}
    for obj in (
        build(BASE, metadata=meta, inference__preset={"name": "falcon-40b"}),
        build(BASE, metadata=meta, resource__instanceType="my-own-gpu-node"),
    ):
        result = await validator.validate_create(Workspace.model_validate(obj))
        assert result.allowed, result.errors
        assert result.warnings and all(w.startswith("resource.instanceType:") for w in result.warnings)


async def test_byo_mode_accepts_unknown_instance_types() -> None:
    byo = WorkspaceValidator(PresetRegistry.load(), SkuCatalog.load(), AdmissionPolicy(provisioning="byo"))
    result = await byo.validate_create(
        Workspace.model_validate(build(BASE, resource__instanceType="my-node-type"))
    )
    assert result.allowed and result.warnings == [
        "resource.instanceType: unknown instance type 'my-node-type': GPU fit not checked"
    ]
    # Known SKUs are still checked.
    small = await byo.validate_create(
        Workspace.model_validate(build(BASE, inference__preset={"name": "falcon-40b"}))
    )
    assert not small.allowed


async def test_placeholder_images_warn(validator: WorkspaceValidator) -> None:
    obj = build(
        BASE,
        inference__adapters=[
            {"source": {"name": "a", "image": "ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1"}}
        ],
    )
    result = await validator.validate_create(Workspace.model_validate(obj))
    assert result.allowed
    assert any("must be lowercase" in w for w in result.warnings)


async def test_cloud_provider_restricts_skus() -> None:
    aws = WorkspaceValidator(PresetRegistry.load(), SkuCatalog.load(), AdmissionPolicy(cloud_provider="aws"))
    result = await aws.validate_create(Workspace.model_validate(BASE))
    assert any("not in the aws SKU catalog" in e for e in result.errors)
    ok = await aws.validate_create(Workspace.model_validate(build(BASE, resource__instanceType="g5.4xlarge")))
    assert ok.allowed
    with pytest.raises(ValueError, match="unknown cloud provider"):
        AdmissionPolicy(cloud_provider="gcp")


async def test_configmap_without_client_is_a_clear_error() -> None:
    v = WorkspaceValidator(PresetRegistry.load(), SkuCatalog.load())
    result = await v.validate_create(Workspace.model_validate(build(TUNING, tuning__config="x")))
    assert any("no Kubernetes client" in e for e in result.errors)


UPDATE_CASES: list[tuple[str, dict[str, Any], dict[str, Any], str | None]] = [
    ("preferred nodes mutable", BASE, build(BASE, resource__preferredNodes=["n1"]), None),
    ("adapters mutable", BASE, build(BASE, inference__adapters=[{"source": {"name": "a", "image": "r.io/a:1"}}]), None),
    ("instance type", BASE, build(BASE, resource__instanceType="Standard_NC12s_v3"), "resource.instanceType: is immutable"),
    ("count", BASE, build(BASE, resource__count=2), "resource.count: is immutable"),
    ("selector", BASE, build(BASE, resource__labelSelector={"matchLabels": {"apps": "x"}}), "resource.labelSelector: is immutable"),
    ("preset", BASE, build(BASE, inference__preset={"name": "phi-2"}), "inference.preset: is immutable"),
    ("toggle", BASE, TUNING, "inference and tuning cannot be added or removed"),
    ("bad adapter on update", BASE, build(BASE, inference__adapters=[{"strength": "1"}]), "inference.adapters[0].source: required"),
    ("method", TUNING, build(TUNING, tuning__method="lora"), "tuning.method: is immutable"),
    ("method case", TUNING, build(TUNING, tuning__method="QLoRA"), None),
    ("input name", build(TUNING, tuning__input={"name": "a", "urls": ["https://x.io/a"]}), build(TUNING, tuning__input={"name": "b", "urls": ["https://x.io/a"]}), "tuning.input.name: is immutable"),
    ("metadata-only update of an old bad object", build(BASE, inference__adapters=[{"strength": "7"}]), build(BASE, inference__adapters=[{"strength": "7"}], metadata={"name": "ws", "namespace": "ns", "finalizers": ["workspace.finalizer.kaito.sh"]}), None),
    ("tuning output change checked", TUNING, build(TUNING, tuning__output={"image": "r.io/a:1"}), "tuning.output.imagePushSecret: required"),
    ("deleting skips checks", BASE, build(BASE, resource__instanceType="changed", metadata={"name": "ws", "deletionTimestamp": "2025-01-01T00:00:00Z"}), None),
]  # fmt: skip


@pytest.mark.parametrize(("name", "old", "new", "expected"), UPDATE_CASES, ids=[c[0] for c in UPDATE_CASES])
async def test_update_rules(
    validator: WorkspaceValidator, name: str, old: dict[str, Any], new: dict[str, Any], expected: str | None
) -> None:
    result = await validator.validate_update(Workspace.model_validate(old), Workspace.model_validate(new))
    if expected is None:
        assert result.allowed, result.errors
    else:
        assert any(expected in e for e in result.errors), result.errors


def test_defaulting_adds_only_missing_fields() -> None:
    obj = {
        "resource": {"labelSelector": {"matchLabels": {"a": "b"}}},
        "inference": {
            "preset": {"name": "phi-2"},
            "adapters": [{"source": {"name": "a"}}, {"source": {"name": "b"}, "strength": "0.3"}],
        },
    }
    ops = default_patch(obj)
    assert {"op": "add", "path": "/resource/count", "value": 1} in ops
    assert {"op": "add", "path": "/inference/preset/accessMode", "value": "public"} in ops
    assert {"op": "add", "path": "/inference/adapters/0/strength", "value": "1.0"} in ops
    assert len(ops) == 3
    patched = apply_patch(obj, ops)
    assert patched["inference"]["adapters"][1]["strength"] == "0.3"
    assert default_patch(patched) == []
    tuning = {"resource": {"count": 1}, "tuning": {"preset": {"name": "phi-2", "accessMode": "private"}}}
    assert default_patch(tuning) == []
