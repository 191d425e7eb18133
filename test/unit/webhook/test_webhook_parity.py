"""Admission parity with upstream v0.4.6 (issue 16), rule by rule, with the controller's flags.

Each class of difference has accepted and rejected cases on create and on update; upstream's own
verdicts come from ``api/v1alpha1/workspace_validation.go`` and its tests at v0.4.6. The same classes
run through the real apiserver in ``test/integration/webhook/test_webhook_admission.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import yaml
from kubernetes_asyncio.client import ApiClient, Configuration

from kaito.api.workspace import RuntimeName, Workspace
from kaito.cmd import admission_policy, parse_args, webhook_validator
from kaito.presets.registry import PresetRegistry
from kaito.presets.skus import SkuCatalog
from kaito.webhook import userconfig
from kaito.webhook.userconfig import MAX_DOCUMENT_BYTES
from kaito.webhook.validation import AdmissionPolicy, Result, WorkspaceValidator
from test.unit.webhook.workspaces import BASE as INFERENCE
from test.unit.webhook.workspaces import TUNING, build

SMALL_MULTI_GPU = "Standard_NC12s_v3"  # 2 x 16Gi V100

ADAPTER = {"source": {"name": "a1", "image": "myregistry.azurecr.io/a1:1"}}

CONFIGMAPS: dict[tuple[str, str], dict[str, str]] = {
    ("ns", "with-max-model-len"): {"inference_config.yaml": "vllm:\n  max-model-len: 2048\n"},
    ("ns", "without-max-model-len"): {"inference_config.yaml": "vllm:\n  gpu-memory-utilization: 0.9\n"},
    ("ns", "empty-vllm"): {"inference_config.yaml": "vllm: {}\n"},
    ("ns", "no-vllm"): {"inference_config.yaml": "max_probe_steps: 6\n"},
    ("ns", "missing-key"): {"other_key": "some value"},
}


async def read_configmap(namespace: str, name: str) -> dict[str, str] | None:
    return CONFIGMAPS.get((namespace, name))


def validator(**policy: Any) -> WorkspaceValidator:
    return WorkspaceValidator(
        PresetRegistry.load(), SkuCatalog.load(), AdmissionPolicy(**policy), configmaps=read_configmap
    )


def make(base: dict[str, Any], **changes: Any) -> Workspace:
    """A copy of ``base`` with ``a__b`` paths set (None deletes), as a Workspace."""
    return Workspace.model_validate(build(base, **changes))


def annotated(base: dict[str, Any], runtime: str, **changes: Any) -> Workspace:
    return make(
        base,
        metadata={"name": "ws", "namespace": "ns", "annotations": {"kaito.sh/runtime": runtime}},
        **changes,
    )


def rejected(result: Result, *fragments: str) -> bool:
    return not result.allowed and any(all(f in e for f in fragments) for e in result.errors)


VLLM = validator(default_runtime=RuntimeName.VLLM)
TRANSFORMERS = validator()


# ------------------------------------------------------------------------------- 1. unlisted Azure SKUs


@pytest.mark.parametrize(
    "instance", ["Standard_D4ds_v4", "Standard_NC6s_v4", "Standard_Nsku", "Standard_Dsku"]
)
async def test_unlisted_azure_sizes_are_admitted_with_a_warning(instance: str) -> None:
    for obj in (
        make(INFERENCE, resource__instanceType=instance),
        make(
            INFERENCE,
            resource__instanceType=instance,
            inference={"template": {"spec": {"containers": [{"name": "c", "image": "nginx:1"}]}}},
        ),
        make(TUNING, resource__instanceType=instance),
    ):
        for v in (TRANSFORMERS, validator(cloud_provider="azure")):
            result = await v.validate_create(obj)
            assert result.allowed, result.errors
            assert any(
                w.startswith(f"resource.instanceType: {instance!r} is not in")
                and "without the GPU count and memory checks" in w
                for w in result.warnings
            ), result.warnings


async def test_unlisted_azure_size_warning_suggests_a_close_match() -> None:
    result = await TRANSFORMERS.validate_create(make(INFERENCE, resource__instanceType="Standard_NC6s_v4"))
    assert any("did you mean Standard_NC6s_v3" in w for w in result.warnings), result.warnings


@pytest.mark.parametrize(
    ("policy", "instance"),
    [({}, "Standard_invalid_sku"), ({}, "Standard_HB120rs_v3"), ({"cloud_provider": "aws"}, "Standard_D4s_v3"),
     ({"cloud_provider": "aws"}, "Standard_NC6s_v3"), ({}, "standard_nc6s_v4")],
)  # fmt: skip
async def test_other_unknown_sizes_are_refused(policy: dict[str, Any], instance: str) -> None:
    result = await validator(**policy).validate_create(make(INFERENCE, resource__instanceType=instance))
    assert rejected(result, "resource.instanceType: unknown instance type", "kaito.sh/bypass-resource-checks")


async def test_listed_sizes_still_get_the_gpu_fit_check() -> None:
    result = await TRANSFORMERS.validate_create(make(INFERENCE, inference__preset={"name": "falcon-40b"}))
    assert rejected(result, "resource.instanceType: Standard_NC6s_v3", "too small for preset falcon-40b")


# ------------------------------------------------------------------- 2 + 3. image references (tuning)


@pytest.mark.parametrize(
    ("field", "image", "problem"),
    [
        ("input", "kaito.azurecr.io/INPUT:0.0.0", "repository name (INPUT) must be lowercase"),
        ("output", "kaito.azurecr.io/OUTPUT:0.0.0", "repository name (OUTPUT) must be lowercase"),
        ("output", "ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1", "(IMAGE_NAME_HERE) must be lowercase"),
        ("input", "!ValidImage", "must be lowercase"),
        ("output", "<your_image>", "invalid reference format"),
    ],
)
async def test_bad_tuning_images_are_refused_on_create_and_update(
    field: str, image: str, problem: str
) -> None:
    spec = {"urls": None, "image": image} if field == "input" else {"image": image, "imagePushSecret": "push"}
    new = make(TUNING, **{f"tuning__{field}": spec})
    for result in (
        await TRANSFORMERS.validate_create(new),
        await TRANSFORMERS.validate_update(make(TUNING), new),
    ):
        assert rejected(result, f"tuning.{field}.image: {image!r} is not a valid image reference", problem,
                        "e.g. myregistry.azurecr.io/my-model:0.0.1")  # fmt: skip


@pytest.mark.parametrize(
    "image", ["data-image:latest", "aimodels.azurecr.io/data-image", "aimodels.azurecr.io/data-image:latest"]
)
async def test_docker_defaults_apply_to_tuning_images_on_create_and_update(image: str) -> None:
    for new in (
        make(TUNING, tuning__input={"image": image}),
        make(TUNING, tuning__output={"image": image, "imagePushSecret": "push"}),
    ):
        assert (await TRANSFORMERS.validate_create(new)).allowed
        assert (await TRANSFORMERS.validate_update(make(TUNING), new)).allowed


async def test_upper_case_adapter_images_warn_and_bad_ones_are_refused() -> None:
    upper = make(
        INFERENCE,
        inference__adapters=[
            {"source": {"name": "a", "image": "ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1"}}
        ],
    )
    for result in (
        await TRANSFORMERS.validate_create(upper),
        await TRANSFORMERS.validate_update(make(INFERENCE), upper),
    ):
        assert result.allowed and any("must be lowercase" in w for w in result.warnings)
    bad = make(INFERENCE, inference__adapters=[{"source": {"name": "a", "image": "<YOUR_IMAGE>"}}])
    for result in (
        await TRANSFORMERS.validate_create(bad),
        await TRANSFORMERS.validate_update(make(INFERENCE), bad),
    ):
        assert rejected(
            result, "inference.adapters[0].source.image: '<YOUR_IMAGE>' is not a valid image reference"
        )


# ------------------------------------------------------------------- 4. vLLM on small multi-GPU nodes


@pytest.mark.parametrize(
    ("instance", "config", "ok"),
    [
        (SMALL_MULTI_GPU, None, False),  # the default config has no max-model-len
        (SMALL_MULTI_GPU, "with-max-model-len", True),
        (SMALL_MULTI_GPU, "without-max-model-len", False),
        (SMALL_MULTI_GPU, "empty-vllm", False),
        (SMALL_MULTI_GPU, "no-vllm", False),
        ("Standard_NV12", "without-max-model-len", False),  # upstream's 2 x 8Gi case
        ("Standard_NC6s_v3", "without-max-model-len", True),  # one GPU
        ("Standard_NC6s_v3", None, True),
        ("Standard_NC48ads_A100_v4", "without-max-model-len", True),  # 2 x 80Gi
        ("Standard_NC48ads_A100_v4", None, True),
    ],
)
async def test_vllm_on_small_multi_gpu_nodes_needs_max_model_len(
    instance: str, config: str | None, ok: bool
) -> None:
    ws = make(INFERENCE, resource__instanceType=instance, inference__config=config)
    result = await VLLM.validate_create(ws)
    if ok:
        assert result.allowed, result.errors
    else:
        assert rejected(result, "inference.config: ", "vllm.max-model-len", "max-model-len: 4096",
                        "kaito.sh/runtime: transformers")  # fmt: skip
    # Transformers never reads the config: the same workspaces are admitted.
    assert (await TRANSFORMERS.validate_create(ws)).allowed


async def test_vllm_config_rule_on_update_when_the_config_or_runtime_changes() -> None:
    old = make(INFERENCE, resource__instanceType=SMALL_MULTI_GPU, inference__config="with-max-model-len")
    new = make(INFERENCE, resource__instanceType=SMALL_MULTI_GPU, inference__config="without-max-model-len")
    assert rejected(await VLLM.validate_update(old, new), "inference.config: ", "vllm.max-model-len")
    assert (await VLLM.validate_update(new, old)).allowed
    # Switching a running workspace to vllm by annotation re-checks the config it would now read.
    plain = make(INFERENCE, resource__instanceType=SMALL_MULTI_GPU)
    to_vllm = annotated(INFERENCE, "vllm", resource__instanceType=SMALL_MULTI_GPU)
    assert rejected(await TRANSFORMERS.validate_update(plain, to_vllm), "inference.config: ", "max-model-len")


# --------------------------------------------------------------------------- 5. adapter strength on vLLM


@pytest.mark.parametrize(
    ("strength", "ok"), [(None, True), ("1.0", True), ("1", True), ("0.5", False), ("0", False)]
)
async def test_vllm_refuses_adapter_strength_other_than_default(strength: str | None, ok: bool) -> None:
    adapter = {**ADAPTER, **({"strength": strength} if strength is not None else {})}
    new = make(INFERENCE, inference__adapters=[adapter])
    for result in (await VLLM.validate_create(new), await VLLM.validate_update(make(INFERENCE), new)):
        if ok:
            assert result.allowed, result.errors
        else:
            assert rejected(result, "inference.adapters[0].strength: the vllm runtime cannot apply an adapter strength",
                            'remove strength (or set "1.0")')  # fmt: skip
    assert (await TRANSFORMERS.validate_create(new)).allowed


# ------------------------------------------------------------------ 6. inference.config and the runtime


async def test_config_key_is_needed_only_by_vllm() -> None:
    ws = make(INFERENCE, inference__config="missing-key")
    assert (await TRANSFORMERS.validate_create(ws)).allowed
    assert (await TRANSFORMERS.validate_update(make(INFERENCE), ws)).allowed
    for result in (await VLLM.validate_create(ws), await VLLM.validate_update(make(INFERENCE), ws)):
        assert rejected(
            result, "inference.config: ConfigMap 'missing-key' must have the key inference_config.yaml"
        )
    for v in (TRANSFORMERS, VLLM):  # a ConfigMap that does not exist cannot be mounted either way
        assert rejected(await v.validate_create(make(INFERENCE, inference__config="nope")), "not found")


# ---------------------------------------------------------------- 7. the runtime the controller will use


async def test_runtime_rules_follow_annotation_else_default() -> None:
    strength = {"inference__adapters": [{**ADAPTER, "strength": "0.5"}]}
    assert not (await VLLM.validate_create(make(INFERENCE, **strength))).allowed
    assert (await VLLM.validate_create(annotated(INFERENCE, "transformers", **strength))).allowed
    assert (await TRANSFORMERS.validate_create(make(INFERENCE, **strength))).allowed
    assert not (await TRANSFORMERS.validate_create(annotated(INFERENCE, "vllm", **strength))).allowed
    # falcon-7b cannot load LoRA adapters on vllm: refused on the default vllm, fine on transformers.
    falcon = {"inference__preset": {"name": "falcon-7b"}, "inference__adapters": [ADAPTER]}
    assert rejected(
        await VLLM.validate_create(make(INFERENCE, **falcon)),
        "inference.adapters: preset falcon-7b cannot load LoRA",
    )
    assert (await TRANSFORMERS.validate_create(make(INFERENCE, **falcon))).allowed


async def test_default_vllm_falls_back_for_presets_it_cannot_serve() -> None:
    """A preset without vLLM parameters runs on transformers under a vllm default (as the controller does)."""
    llama = make(INFERENCE, resource__instanceType=SMALL_MULTI_GPU, inference__preset={
        "name": "llama-2-7b", "accessMode": "private", "presetOptions": {"image": "my.io/llama-2-7b:1"}},
        inference__adapters=[{**ADAPTER, "strength": "0.5"}])  # fmt: skip
    assert (await VLLM.validate_create(llama)).allowed
    explicit = annotated(INFERENCE, "vllm", inference__preset=llama.to_dict()["inference"]["preset"])
    assert rejected(await TRANSFORMERS.validate_create(explicit),
                    "metadata.annotations[kaito.sh/runtime]: preset llama-2-7b cannot run on vllm")  # fmt: skip


async def test_controller_flags_reach_the_one_validator_assembly() -> None:
    args = parse_args(["--provisioning", "byo", "--default-runtime", "vllm", "--cloud-provider", "aws"])
    assert admission_policy(args) == AdmissionPolicy(
        cloud_provider="aws", provisioning="byo", default_runtime=RuntimeName.VLLM, tuning_enabled=False
    )
    async with ApiClient(Configuration(host="http://127.0.0.1:1")) as api:
        v = webhook_validator(parse_args(["--enable-tuning"]), api)
    assert v.policy.tuning_enabled and v.configmaps is not None


# ----------------------------------------------------------------------------- tuning when it is off


async def test_tuning_is_refused_when_the_controller_does_not_run_it() -> None:
    off = validator(tuning_enabled=False)
    assert rejected(await off.validate_create(make(TUNING)), "tuning: this KAITO controller does not run tuning",
                    "--enable-tuning")  # fmt: skip
    # Existing tuning workspaces can still be changed (finalizers) and deleted.
    assert (
        await off.validate_update(make(TUNING), make(TUNING, metadata={"name": "ws", "finalizers": ["x"]}))
    ).allowed
    assert (await off.validate_create(make(INFERENCE))).allowed


# ------------------------------------------------------------------------- messages name fix and field


async def test_adding_or_removing_inference_says_delete_and_recreate() -> None:
    result = await TRANSFORMERS.validate_update(make(INFERENCE), make(TUNING))
    assert rejected(
        result, "inference: inference and tuning cannot be added or removed", "delete the workspace"
    )


# ------------------------------------------------------------- user YAML: size cap, parsed off the loop


def large_inference_config(size: int) -> str:
    # Flow sequences cost the most parsing time per byte: the worst a user can send under the cap.
    lines, i = ["vllm:", "  max-model-len: 2048", "padding:"], 0
    while sum(len(x) + 1 for x in lines) < size:
        lines.append(f"  k{i}: [1,2,3,4,5,6,7,8,9]")
        i += 1
    return "\n".join(lines) + "\n"


async def test_oversized_config_documents_are_refused_with_the_limit() -> None:
    big = large_inference_config(MAX_DOCUMENT_BYTES + 1024)
    v = WorkspaceValidator(PresetRegistry.load(), SkuCatalog.load(), AdmissionPolicy(default_runtime=RuntimeName.VLLM),
                           configmaps=lambda ns, name: _const({"inference_config.yaml": big}))  # fmt: skip
    result = await v.validate_create(make(INFERENCE, inference__config="big"))
    assert rejected(
        result, "inference.config: inference_config.yaml of ConfigMap 'big' is 65 KiB, over the 64 KiB limit"
    )
    training = {"training_config.yaml": "training_config:\n  LoraConfig:\n" + "    # padding\n" * 7000}
    v.configmaps = lambda ns, name: _const(training)
    result = await v.validate_create(make(TUNING, tuning__config="big"))
    assert rejected(
        result, "tuning.config: training_config.yaml of ConfigMap 'big' is", "over the 64 KiB limit"
    )


async def _const(value: dict[str, str]) -> dict[str, str]:
    return value


async def test_event_loop_keeps_ticking_while_a_large_document_is_validated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A document just under the cap, parsed with the slow pure-Python loader: a heartbeat task (as the
    Lease renewal is) must keep running; parsed on the loop, it would stall for the whole parse."""
    monkeypatch.setattr(userconfig, "_LOADER", yaml.SafeLoader)
    doc = large_inference_config(MAX_DOCUMENT_BYTES - 512)
    v = WorkspaceValidator(PresetRegistry.load(), SkuCatalog.load(), AdmissionPolicy(default_runtime=RuntimeName.VLLM),
                           configmaps=lambda ns, name: _const({"inference_config.yaml": doc}))  # fmt: skip
    gaps: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    try:
        await asyncio.sleep(0.05)
        started = time.monotonic()
        result = await v.validate_create(
            make(INFERENCE, resource__instanceType=SMALL_MULTI_GPU, inference__config="big")
        )
        took = time.monotonic() - started
    finally:
        stop.set()
        await beat
    assert result.allowed, result.errors
    assert took > 0.3, f"the parse took {took:.2f}s: too fast to show anything"
    # Thread switches happen every 5 ms; allow a loaded 2-core machine plenty beyond that.
    assert max(gaps) < took / 2, f"the loop stalled {max(gaps):.2f}s during a {took:.2f}s validation"
