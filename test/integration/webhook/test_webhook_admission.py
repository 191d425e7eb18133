"""Table-driven admission through a real kube-apiserver with the webhook registered.

Each manifest is applied with the version-matched kubectl, exactly as a user would; the test asserts
accept/reject and the message kubectl prints (from the CRD schema, its CEL rules or the webhook).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio.client import CoreV1Api, CustomObjectsApi

from kaito.cmd import parse_args, webhook_validator
from test.integration.webhook.helpers import WEBHOOK_LABEL, WebhookEnv, kubectl

SAMPLES = Path(__file__).resolve().parents[3] / "config" / "samples"

LABELS = {"matchLabels": {"apps": "test"}}


def ws(
    name: str,
    instance: str | None = "Standard_NC12s_v3",
    inference: dict[str, Any] | None = None,
    tuning: dict[str, Any] | None = None,
    api_version: str = "kaito.sh/v1alpha1",
    annotations: dict[str, str] | None = None,
    **resource: Any,
) -> dict[str, Any]:
    res: dict[str, Any] = {"labelSelector": copy.deepcopy(LABELS), **resource}
    if instance is not None:
        res["instanceType"] = instance
    obj: dict[str, Any] = {"apiVersion": api_version, "kind": "Workspace", "metadata": {"name": name}}
    if annotations:
        obj["metadata"]["annotations"] = annotations
    obj["resource"] = res
    if inference is not None:
        obj["inference"] = inference
    if tuning is not None:
        obj["tuning"] = tuning
    return obj


def preset(name: str, **extra: Any) -> dict[str, Any]:
    return {"preset": {"name": name, **extra}}


def tuning_spec(
    preset_name: str = "phi-3-mini-4k-instruct", method: str = "qlora", **extra: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "preset": {"name": preset_name},
        "method": method,
        "input": {"urls": ["https://example.com/data/train.parquet"]},
        "output": {"image": "myregistry.azurecr.io/adapters/phi-3:0.0.1", "imagePushSecret": "push-secret"},
    }
    spec.update(extra)
    return spec


ADAPTER = {
    "source": {"name": "phi-3-adapter", "image": "myregistry.azurecr.io/phi-3-adapter:0.0.1"},
    "strength": "0.5",
}


@dataclass
class Case:
    """One manifest; ``update`` (optional) is applied after it. ``expect`` None means accepted."""

    name: str
    manifest: dict[str, Any] | str
    expect: list[str] | None = None
    update: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    second_namespace: bool = False  # the seed reuses names; its tuning manifests go to a second namespace
    parity: int | None = None  # the issue-16 class (1-7) of upstream differences the case pins down

    @property
    def kind(self) -> tuple[str, str]:
        """("create" or "update", "accept" or "reject")."""
        return (
            "update" if self.update is not None else "create",
            "accept" if self.expect is None else "reject",
        )


def sample(file: str) -> str:
    return (SAMPLES / file).read_text()


def filled_in(file: str) -> dict[str, Any]:
    """A seed sample with its output-image placeholder replaced, as its user is told to do."""
    doc: dict[str, Any] = yaml.safe_load(sample(file))
    doc["tuning"]["output"]["image"] = "myregistry.azurecr.io/phi-3-adapter:0.0.1"
    return doc


VERBOSE = bool(os.environ.get("KAITO_TEST_VERBOSE"))
WEBHOOK = 'admission webhook "validation.workspace.kaito.sh" denied the request'

CASES: list[Case] = [
    # ------------------------------------------------------------------ valid manifests
    Case("seed-phi-3", sample("kaito_workspace_phi_3.yaml")),
    Case("seed-tuning-phi-3-with-its-image", filled_in("kaito_workspace_tuning_phi_3.yaml"), second_namespace=True,
         warnings=["usually needs 72Gi"]),
    Case("seed-phi-3-adapters", sample("kaito_workspace_phi_3_with_adapters.yaml"),
         warnings=["inference.adapters[0].source.image", "must be lowercase"]),
    Case("seed-tuning-phi-3-adapter-with-its-image", filled_in("kaito_workspace_tuning_phi_3_adapter.yaml"),
         second_namespace=True),
    Case("falcon-7b", ws("falcon-7b", inference=preset("falcon-7b"))),
    Case("falcon-7b-aws", ws("falcon-7b-aws", "g5.4xlarge", inference=preset("falcon-7b"))),
    Case("falcon-40b-a100", ws("falcon-40b", "Standard_NC96ads_A100_v4", inference=preset("falcon-40b"))),
    Case("mistral-instruct", ws("mistral", inference=preset("mistral-7b-instruct"))),
    Case("phi-2", ws("phi-2", "Standard_NC6s_v3", inference=preset("phi-2"))),
    Case("phi-3-medium", ws("phi-3-medium", "Standard_NC24ads_A100_v4", inference=preset("phi-3-medium-4k-instruct"))),
    Case("phi-3-5", ws("phi-3-5", inference=preset("phi-3.5-mini-instruct"))),
    Case("phi-4", ws("phi-4", "Standard_NC24ads_A100_v4", inference=preset("phi-4"))),
    Case("qwen-coder", ws("qwen", "Standard_NC24ads_A100_v4", inference=preset("qwen2.5-coder-7b-instruct"))),
    Case("llama-2-private", ws("llama-2-7b", inference=preset(
        "llama-2-7b", accessMode="private", presetOptions={"image": "myregistry.azurecr.io/llama-2-7b:0.0.4",
                                                           "imagePullSecrets": ["pull"]}))),
    Case("llama-2-70b-two-nodes", ws("llama-2-70b", "Standard_NC96ads_A100_v4", count=2, inference=preset(
        "llama-2-70b-chat", accessMode="private", presetOptions={"image": "myregistry.azurecr.io/llama:0.0.4"}))),
    Case("llama-3-1-token", ws("llama-3-1", "Standard_NC24ads_A100_v4", inference=preset(
        "llama-3.1-8b-instruct", presetOptions={"modelAccessSecret": "hf-token"}))),
    Case("deepseek-config", ws("deepseek", "Standard_NC24ads_A100_v4",
                               inference={**preset("deepseek-r1-distill-qwen-14b"), "config": "ds-inference-params"})),
    Case("v1beta1", ws("beta", inference=preset("phi-3-mini-4k-instruct"), api_version="kaito.sh/v1beta1")),
    Case("template", ws("template", inference={"template": {"spec": {"containers": [
        {"name": "server", "image": "nginx:1.27"}]}}})),
    Case("bypass-unknown-sku", ws("bypass", "my-gpu-box", inference=preset("phi-2"),
                                  annotations={"kaito.sh/bypass-resource-checks": "true"}),
         warnings=["unknown instance type 'my-gpu-box'"]),
    Case("tuning-config", ws("tuning-config", "Standard_NC24ads_A100_v4",
                             tuning=tuning_spec(config="my-qlora-params"))),
    Case("tuning-mixed-case-method", ws("tuning-case", "Standard_NC24ads_A100_v4", tuning=tuning_spec(method="QLoRA"))),
    Case("adapters-defaults", ws("defaults", instance=None, inference={**preset("falcon-7b"), "adapters": [
        {"source": {"name": "a1", "image": "myregistry.azurecr.io/a1:1"}}]})),
    # ------------------------------------------------------------------ rejected by the CRD schema / CEL
    Case("both", ws("both", inference=preset("phi-2"), tuning=tuning_spec()),
         ["tuning: Forbidden: inference and tuning cannot both be set in one workspace"]),
    Case("neither", ws("neither"),
         ["inference: Required value: set either inference (to serve a model) or tuning (to fine-tune one)"]),
    Case("count-zero", ws("count-zero", count=0, inference=preset("phi-2")),
         ["resource.count", "should be greater than or equal to 1"]),
    Case("match-expressions-only", {**ws("expr", inference=preset("phi-2")), "resource": {
        "instanceType": "Standard_NC12s_v3",
        "labelSelector": {"matchExpressions": [{"key": "apps", "operator": "In", "values": ["x"]}]}}},
         ["resource.labelSelector", "labelSelector.matchLabels must name at least one label"]),
    Case("no-selector", {**ws("nosel", inference=preset("phi-2")), "resource": {"instanceType": "Standard_NC12s_v3"}},
         ["resource.labelSelector: Required value: resource.labelSelector is required", "matchLabels: {apps: phi-3}"]),
    Case("no-resource", {k: v for k, v in ws("nores", inference=preset("phi-2")).items() if k != "resource"},
         ["resource: Required value: resource is required: the nodes to run on"]),
    Case("no-preset-name", ws("noname", inference={"preset": {"accessMode": "public"}}),
         ["inference.preset.name: Required value: preset.name is required", "phi-3-mini-4k-instruct"]),
    Case("tuning-no-method", ws("nomethod", tuning={k: v for k, v in tuning_spec().items() if k != "method"}),
         ["tuning.method: Required value: tuning.method is required: lora or qlora"]),
    Case("eleven-adapters", ws("eleven", inference={**preset("phi-2"), "adapters": [
        {"source": {"name": f"a{i}", "image": f"r.io/a{i}:1"}} for i in range(11)]}),
         ["inference.adapters", "must have at most 10 items"]),
    Case("name-not-label", ws("phi.3", inference=preset("phi-2")),
         ["metadata.name: Invalid value", "metadata.name must be a DNS-1123 label", "e.g. workspace-phi-3-mini"]),
    Case("method-unknown", ws("dora", tuning=tuning_spec(method="dora")), ["tuning.method must be lora or qlora"]),
    Case("tuning-two-nodes", ws("tuning-two", count=2, tuning=tuning_spec()),
         ["tuning runs on one node: set resource.count to 1"]),
    Case("tuning-no-output", ws("no-output", tuning={k: v for k, v in tuning_spec().items() if k != "output"}),
         ["tuning.output: Required value: tuning.output is required", "imagePushSecret"]),
    Case("preset-and-template", ws("both-kinds", inference={**preset("phi-2"), "template": {"spec": {}}}),
         ["inference needs exactly one of preset (a catalog model) or template (a custom pod)"]),
    Case("unknown-field", {**ws("typo", inference=preset("phi-2")), "resource": {
        "instanceType": "Standard_NC12s_v3", "gpus": 2, "labelSelector": LABELS}}, ['unknown field "resource.gpus"']),
    Case("access-mode-enum", ws("mode", inference=preset("phi-2", accessMode="secret")),
         ["inference.preset.accessMode", 'Unsupported value: "secret"', '"public", "private"']),
    # ------------------------------------------------------------------ rejected by the webhook
    Case("unknown-preset", ws("unknown", inference=preset("phi-3-mini")),
         [WEBHOOK, "inference.preset.name: unknown preset 'phi-3-mini'; did you mean",
          "supported presets: deepseek-r1-distill-llama-8b"]),
    Case("too-small", ws("too-small", "Standard_NC6s_v3", inference=preset("falcon-40b")),
         [WEBHOOK, "resource.instanceType: Standard_NC6s_v3 (1x NVIDIA V100, 16Gi GPU memory) is too small for preset "
          "falcon-40b", "insufficient total GPU memory", "use an instance type that fits, e.g. Standard_NC48ads_A100_v4",
          "kaito.sh/bypass-resource-checks"]),
    Case("unknown-sku", ws("unknown-sku", "Standard_HC6s_v3", inference=preset("phi-2")),
         [WEBHOOK, "resource.instanceType: unknown instance type 'Standard_HC6s_v3'", "did you mean Standard_NC6s_v3",
          "use a known SKU that fits phi-2, e.g. Standard_NC16as_T4_v3"]),
    Case("private-needed", ws("private", inference=preset("llama-2-7b")),
         [WEBHOOK, "inference.preset.accessMode: preset llama-2-7b has no public image; set accessMode: private"]),
    Case("private-no-image", ws("private-noimg", inference=preset("llama-2-7b", accessMode="private")),
         [WEBHOOK, "inference.preset.presetOptions.image: required when accessMode is private"]),
    Case("adapter-no-source", ws("adapter-nosrc", inference={**preset("phi-2"), "adapters": [{"strength": "0.5"}]}),
         [WEBHOOK, "inference.adapters[0].source: required: set source.name and source.image"]),
    Case("adapter-strength", ws("adapter-strength", inference={**preset("phi-2"), "adapters": [
        {**ADAPTER, "strength": "1.5"}]}), [WEBHOOK, "inference.adapters[0].strength: '1.5' must be a number between"]),
    Case("adapter-duplicate", ws("adapter-dup", inference={**preset("phi-2"), "adapters": [ADAPTER, ADAPTER]}),
         [WEBHOOK, "inference.adapters[1].source.name: duplicate adapter name 'phi-3-adapter'"]),
    Case("adapter-no-image", ws("adapter-noimg", inference={**preset("phi-2"), "adapters": [
        {"source": {"name": "x"}}]}), [WEBHOOK, "inference.adapters[0].source.image: required"]),
    Case("untunable", ws("untunable", tuning=tuning_spec("falcon-7b-instruct")),
         [WEBHOOK, "tuning.preset.name: preset falcon-7b-instruct cannot be tuned; presets that support tuning:"]),
    Case("tuning-llama-2", ws("tuning-llama", tuning=tuning_spec("llama-2-7b")),
         [WEBHOOK, "preset llama-2-7b cannot be tuned"]),
    Case("tuning-push-secret", ws("push", tuning=tuning_spec(output={"image": "myregistry.azurecr.io/a:1"})),
         [WEBHOOK, "tuning.output.imagePushSecret: required with output.image"]),
    Case("tuning-two-inputs", ws("two-inputs", tuning=tuning_spec(input={
        "urls": ["https://example.com/a"], "image": "myregistry.azurecr.io/data:1"})),
         [WEBHOOK, "tuning.input: set exactly one of urls or image (got urls, image)"]),
    Case("tuning-volume", ws("volume", tuning=tuning_spec(input={"volumeSource": {"emptyDir": {}}})),
         [WEBHOOK, "tuning.input.volumeSource: volumes are not supported yet"]),
    Case("tuning-ftp", ws("ftp", tuning=tuning_spec(input={"urls": ["ftp://example.com/data"]})),
         [WEBHOOK, "tuning.input.urls[0]: 'ftp://example.com/data' is not an http(s) URL"]),
    Case("tuning-config-missing", ws("cfg-missing", tuning=tuning_spec(config="nope")),
         [WEBHOOK, "tuning.config: ConfigMap 'nope' not found in namespace"]),
    Case("tuning-lora-quantized", ws("lora-4bit", tuning=tuning_spec(method="lora", config="lora-4bit")),
         [WEBHOOK, "lora does not quantize"]),
    Case("inference-config-missing", ws("inf-cfg", inference={**preset("phi-2"), "config": "nope"}),
         [WEBHOOK, "inference.config: ConfigMap 'nope' not found"]),
    Case("runtime-annotation", ws("runtime", inference=preset("phi-2"), annotations={"kaito.sh/runtime": "tgi"}),
         [WEBHOOK, "metadata.annotations[kaito.sh/runtime]: unknown runtime 'tgi'; use transformers or vllm"]),
    Case("gated-no-token", ws("gated", "Standard_NC24ads_A100_v4", inference=preset("llama-3.1-8b-instruct")),
         [WEBHOOK, "inference.preset.presetOptions.modelAccessSecret"]),
    Case("token-for-packaged-weights", ws("token", inference=preset("phi-2", presetOptions={"modelAccessSecret": "hf"}),
                                           api_version="kaito.sh/v1beta1"),
         [WEBHOOK, "inference.preset.presetOptions.modelAccessSecret: preset phi-2 ships its weights in the model "
          "image", "remove modelAccessSecret"]),
    Case("template-no-containers", ws("tpl", inference={"template": {"spec": {"containers": []}}}),
         [WEBHOOK, "inference.template.spec.containers: a pod template needs at least one container"]),
    Case("image-not-a-reference", ws("badimg", tuning=tuning_spec(output={"image": "adapter:", "imagePushSecret": "s"})),
         [WEBHOOK, "tuning.output.image: 'adapter:' is not a valid image reference: invalid reference format",
          "use [registry/]repository[:tag]"]),
    # ------------------------------------------------------------------ updates
    Case("update-instance-type", ws("u-instance", inference=preset("phi-2")),
         ["resource.instanceType is immutable"], update=ws("u-instance", "Standard_NC24s_v3", inference=preset("phi-2"))),
    Case("update-count", ws("u-count", inference=preset("phi-2")),
         ["resource.count is immutable"], update=ws("u-count", count=2, inference=preset("phi-2"))),
    Case("update-preset", ws("u-preset", inference=preset("phi-2")),
         ["inference.preset is immutable"], update=ws("u-preset", inference=preset("phi-3-mini-4k-instruct"))),
    Case("update-selector", ws("u-sel", inference=preset("phi-2")), ["resource.labelSelector is immutable"],
         update={**ws("u-sel", inference=preset("phi-2")), "resource": {
             "instanceType": "Standard_NC12s_v3", "labelSelector": {"matchLabels": {"apps": "other"}}}}),
    Case("update-toggle", ws("u-toggle", inference=preset("phi-2")),
         ["inference: Forbidden: inference cannot be added or removed after creation",
          "tuning: Forbidden: tuning cannot be added or removed", "delete the workspace and create a new one"],
         update=ws("u-toggle", tuning=tuning_spec())),
    Case("update-template-to-preset", ws("u-tpl", inference={"template": {"spec": {"containers": [
        {"name": "server", "image": "nginx:1.27"}]}}}),
         ["inference.preset and inference.template cannot be added or removed after creation; delete the workspace"],
         update=ws("u-tpl", inference=preset("phi-2"))),
    Case("update-method", ws("u-method", tuning=tuning_spec()), ["tuning.method is immutable"],
         update=ws("u-method", tuning=tuning_spec(method="lora"))),
    Case("update-preferred-nodes", ws("u-nodes", inference=preset("phi-2")),
         update=ws("u-nodes", inference=preset("phi-2"), preferredNodes=["node-a", "node-b"])),
    Case("update-adapters", ws("u-adapters", inference=preset("phi-2")),
         update=ws("u-adapters", inference={**preset("phi-2"), "adapters": [ADAPTER]})),
    Case("update-bad-adapter", ws("u-bad-adapter", inference=preset("phi-2")),
         [WEBHOOK, "inference.adapters[0].source.image: '<YOUR_IMAGE>' is not a valid image reference"],
         update=ws("u-bad-adapter", inference={**preset("phi-2"), "adapters": [{"source": {"name": "a", "image": "<YOUR_IMAGE>"}}]})),
]  # fmt: skip


TEMPLATE = {"template": {"spec": {"containers": [{"name": "server", "image": "nginx:1.27"}]}}}
SMALL_GPUS = "Standard_NC12s_v3"  # 2 x 16Gi: vLLM needs max-model-len there
ONE_GPU = "Standard_NC6s_v3"
VLLM = {"kaito.sh/runtime": "vllm"}
TRANSFORMERS = {"kaito.sh/runtime": "transformers"}


def adapters(*strengths: str | None) -> list[dict[str, Any]]:
    return [{"source": {"name": f"a{i}", "image": f"myregistry.azurecr.io/a{i}:1"},
             **({"strength": st} if st is not None else {})} for i, st in enumerate(strengths)]  # fmt: skip


def tuning_images(input_image: str | None = None, output_image: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if input_image is not None:
        extra["input"] = {"image": input_image}
    if output_image is not None:
        extra["output"] = {"image": output_image, "imagePushSecret": "push-secret"}
    return tuning_spec(**extra)


# Issue 16's classes of difference from upstream v0.4.6, on the controller as shipped (transformers default).
PARITY_CASES: list[Case] = [
    # 1. Azure sizes outside the catalog that start with Standard_N / Standard_D: admitted, with a warning.
    Case("azure-unlisted-d-template", ws("az-d", "Standard_D4ds_v4", inference=TEMPLATE), parity=1,
         warnings=["resource.instanceType: 'Standard_D4ds_v4' is not in the SKU catalog",
                   "without the GPU count and memory checks"]),
    Case("azure-unlisted-n-preset", ws("az-n", "Standard_NC6s_v4", inference=preset("phi-2")), parity=1,
         warnings=["did you mean Standard_NC6s_v3", "make sure it has the GPUs that preset phi-2 needs"]),
    Case("azure-unlisted-tuning", ws("az-tuning", "Standard_ND40rs_v2", tuning=tuning_spec()), parity=1,
         warnings=["'Standard_ND40rs_v2' is not in the SKU catalog"]),
    Case("unlisted-not-n-or-d", ws("az-h", "Standard_HB120rs_v3", inference=preset("phi-2")), parity=1,
         expect=[WEBHOOK, "resource.instanceType: unknown instance type 'Standard_HB120rs_v3'",
                 'kaito.sh/bypass-resource-checks: "true"']),
    Case("azure-unlisted-update-template", ws("az-upd", "Standard_D4ds_v4", inference=TEMPLATE), parity=1,
         update=ws("az-upd", "Standard_D4ds_v4", inference={"template": {"spec": {"containers": [
             {"name": "server", "image": "nginx:1.28"}]}}})),
    Case("azure-unlisted-update-instance", ws("az-upd2", "Standard_D4ds_v4", inference=TEMPLATE), parity=1,
         expect=["resource.instanceType is immutable; delete and re-create the workspace"],
         update=ws("az-upd2", "Standard_D8s_v3", inference=TEMPLATE)),
    # 2. Upper-case repository names in tuning images: refused, as upstream does.
    Case("seed-tuning-phi-3-placeholder", sample("kaito_workspace_tuning_phi_3.yaml"), parity=2, expect=[
        WEBHOOK, "tuning.output.image: 'ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1' is not a valid image "
        "reference: repository name (IMAGE_NAME_HERE) must be lowercase", "replace any placeholder"]),
    Case("tuning-input-upper", ws("in-upper", tuning=tuning_images("kaito.azurecr.io/INPUT:0.0.0")), parity=2,
         expect=[WEBHOOK, "tuning.input.image: 'kaito.azurecr.io/INPUT:0.0.0' is not a valid image reference: "
                 "repository name (INPUT) must be lowercase"]),
    Case("tuning-input-lower", ws("in-lower", tuning=tuning_images("kaito.azurecr.io/input:0.0.0")), parity=2),
    Case("tuning-output-upper-on-update", ws("out-upper", tuning=tuning_spec()), parity=2,
         expect=[WEBHOOK, "tuning.output.image: 'kaito.azurecr.io/OUTPUT:0.0.0' is not a valid image reference"],
         update=ws("out-upper", tuning=tuning_images(output_image="kaito.azurecr.io/OUTPUT:0.0.0"))),
    Case("tuning-output-lower-on-update", ws("out-lower", tuning=tuning_spec()), parity=2,
         update=ws("out-lower", tuning=tuning_images(output_image="kaito.azurecr.io/output:0.0.1"))),
    # 3. The distribution reference grammar with Docker's defaults, on create and on update.
    Case("image-docker-defaults", ws("img-defaults", tuning=tuning_images(
        "data-image:latest", "myregistry.io/data-image")), parity=3),
    Case("image-bad-grammar", ws("img-bad", tuning=tuning_images("<your_image>")), parity=3,
         expect=[WEBHOOK, "tuning.input.image: '<your_image>' is not a valid image reference: invalid reference format"]),
    Case("image-docker-defaults-on-update", ws("img-upd", tuning=tuning_spec()), parity=3,
         update=ws("img-upd", tuning=tuning_images("data-image:latest", "aimodels.azurecr.io/data-image"))),
    Case("image-bad-grammar-on-update", ws("img-upd-bad", tuning=tuning_spec()), parity=3,
         expect=[WEBHOOK, "tuning.output.image: 'myregistry.io/data-image:' is not a valid image reference"],
         update=ws("img-upd-bad", tuning=tuning_images(output_image="myregistry.io/data-image:"))),
    # 4. vLLM on several GPUs of < 20Gi with no max-model-len (explicit annotation; the default is below).
    Case("vllm-small-gpus-annotated", ws("v-small", SMALL_GPUS, inference=preset("phi-2"), annotations=VLLM),
         parity=4, expect=[WEBHOOK, "inference.config: Standard_NC12s_v3 has 2 GPUs with less than 20Gi each",
                           "vllm.max-model-len", "kaito.sh/runtime: transformers"]),
    Case("transformers-small-gpus", ws("t-small", SMALL_GPUS, inference=preset("phi-2")), parity=4),
    Case("vllm-small-gpus-annotation-added", ws("v-small-upd", SMALL_GPUS, inference=preset("phi-2")), parity=4,
         expect=[WEBHOOK, "inference.config: Standard_NC12s_v3 has 2 GPUs", "vllm.max-model-len"],
         update=ws("v-small-upd", SMALL_GPUS, inference=preset("phi-2"), annotations=VLLM)),
    Case("vllm-small-gpus-config-added", ws("v-small-cfg", SMALL_GPUS, inference=preset("phi-2")), parity=4,
         update=ws("v-small-cfg", SMALL_GPUS, inference={**preset("phi-2"), "config": "small-gpu-params"},
                   annotations=VLLM)),
    # 5. Adapter strength under vLLM (annotation here; the default below).
    Case("vllm-strength-annotated", ws("v-strength", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters("0.5")},
                                       annotations=VLLM), parity=5,
         expect=[WEBHOOK, "inference.adapters[0].strength: the vllm runtime cannot apply an adapter strength",
                 'remove strength (or set "1.0")']),
    Case("vllm-default-strength-annotated", ws("v-strength-ok", ONE_GPU, inference={
        **preset("phi-2"), "adapters": adapters(None, "1.0")}, annotations=VLLM), parity=5),
    # 6. inference.config under transformers needs no inference_config.yaml key; under vLLM it does.
    Case("transformers-config-without-key", ws("t-nokey", inference={**preset("phi-2"), "config": "no-key-params"}),
         parity=6),
    Case("vllm-config-without-key", ws("v-nokey", ONE_GPU, inference={**preset("phi-2"), "config": "no-key-params"},
                                       annotations=VLLM), parity=6,
         expect=[WEBHOOK, "inference.config: ConfigMap 'no-key-params' must have the key inference_config.yaml"]),
    Case("transformers-config-without-key-on-update", ws("t-nokey-upd", inference=preset("phi-2")), parity=6,
         update=ws("t-nokey-upd", inference={**preset("phi-2"), "config": "no-key-params"})),
    Case("vllm-config-without-key-on-update", ws("v-nokey-upd", ONE_GPU, inference=preset("phi-2"), annotations=VLLM),
         parity=6, expect=[WEBHOOK, "must have the key inference_config.yaml"],
         update=ws("v-nokey-upd", ONE_GPU, inference={**preset("phi-2"), "config": "no-key-params"}, annotations=VLLM)),
    # 7. The runtime is the annotation, else --default-runtime (transformers here).
    Case("default-transformers-strength", ws("d-strength", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters("0.5")}),
         parity=7),
    Case("annotation-vllm-strength", ws("a-strength", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters("0.5")},
                                        annotations=VLLM), parity=7,
         expect=[WEBHOOK, "inference.adapters[0].strength: the vllm runtime cannot apply an adapter strength"]),
    Case("annotation-switched-to-vllm", ws("sw-vllm", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters("0.5")}),
         parity=7, expect=[WEBHOOK, "inference.adapters[0].strength: the vllm runtime cannot apply"],
         update=ws("sw-vllm", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters("0.5")}, annotations=VLLM)),
    Case("annotation-switched-to-transformers", ws("sw-tf", ONE_GPU, inference=preset("phi-2"), annotations=VLLM),
         parity=7, update=ws("sw-tf", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters("0.5")},
                             annotations=TRANSFORMERS)),
]  # fmt: skip

# The same classes with ``--default-runtime vllm`` (upstream's default runtime): no annotation needed.
VLLM_DEFAULT_CASES: list[Case] = [
    Case("small-gpus-no-config", ws("small", SMALL_GPUS, inference=preset("phi-2")), parity=4,
         expect=[WEBHOOK, "inference.config: Standard_NC12s_v3 has 2 GPUs with less than 20Gi each",
                 "the default inference config the controller generates does not set",
                 "'vllm: {max-model-len: 4096}'"]),
    Case("small-gpus-max-model-len", ws("small-cfg", SMALL_GPUS, inference={**preset("phi-2"), "config": "small-gpu-params"}),
         parity=4),
    Case("one-gpu-no-config", ws("one-gpu", ONE_GPU, inference=preset("phi-2")), parity=4),
    Case("big-gpus-no-config", ws("big-gpus", "Standard_NC48ads_A100_v4", inference=preset("phi-2")), parity=4),
    Case("small-gpus-config-loses-max-model-len", ws("small-upd", SMALL_GPUS, inference={
        **preset("phi-2"), "config": "small-gpu-params"}), parity=4,
         expect=[WEBHOOK, "inference.config: Standard_NC12s_v3 has 2 GPUs", "ConfigMap 'no-max-model-len-params'"],
         update=ws("small-upd", SMALL_GPUS, inference={**preset("phi-2"), "config": "no-max-model-len-params"})),
    Case("small-gpus-config-swapped", ws("small-swap", SMALL_GPUS, inference={
        **preset("phi-2"), "config": "small-gpu-params"}), parity=4,
         update=ws("small-swap", SMALL_GPUS, inference={**preset("phi-2"), "config": "small-gpu-params-2"})),
    Case("strength", ws("strength", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters("0.5")}), parity=5,
         expect=[WEBHOOK, "inference.adapters[0].strength: the vllm runtime cannot apply an adapter strength "
                 "('0.5' would be ignored)", "kaito.sh/runtime: transformers"]),
    Case("strength-defaulted", ws("strength-ok", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters(None)}),
         parity=5),
    Case("strength-added", ws("strength-upd", ONE_GPU, inference=preset("phi-2")), parity=5,
         expect=[WEBHOOK, "inference.adapters[1].strength: the vllm runtime cannot apply"],
         update=ws("strength-upd", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters(None, "0.3")})),
    Case("adapter-added", ws("adapter-upd", ONE_GPU, inference=preset("phi-2")), parity=5,
         update=ws("adapter-upd", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters(None)})),
    Case("config-without-key", ws("nokey", ONE_GPU, inference={**preset("phi-2"), "config": "no-key-params"}),
         parity=6, expect=[WEBHOOK, "must have the key inference_config.yaml"]),
    Case("annotation-transformers-wins", ws("tf-wins", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters("0.5")},
                                            annotations=TRANSFORMERS), parity=7),
    Case("falcon-lora-on-default-vllm", ws("falcon-lora", ONE_GPU, inference={**preset("falcon-7b"), "adapters": adapters(None)}),
         parity=7, expect=[WEBHOOK, "inference.adapters: preset falcon-7b cannot load LoRA adapters with the vllm runtime"]),
    Case("llama-2-falls-back-to-transformers", ws("llama-fallback", SMALL_GPUS, inference=preset(
        "llama-2-7b", accessMode="private", presetOptions={"image": "myregistry.azurecr.io/llama-2-7b:0.0.4"})),
         parity=7),
    Case("annotation-removed", ws("ann-removed", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters("0.5")},
                                  annotations=TRANSFORMERS), parity=7,
         expect=[WEBHOOK, "inference.adapters[0].strength: the vllm runtime cannot apply"],
         update=ws("ann-removed", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters("0.5")})),
    Case("annotation-added", ws("ann-added", ONE_GPU, inference=preset("phi-2")), parity=7,
         update=ws("ann-added", ONE_GPU, inference={**preset("phi-2"), "adapters": adapters("0.5")},
                   annotations=TRANSFORMERS)),
]  # fmt: skip


def as_yaml(manifest: dict[str, Any] | str) -> str:
    return manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)


async def create_configmaps(api_client: Any, namespace: str) -> None:
    core = CoreV1Api(api_client)
    data = {
        "ds-inference-params": {
            "inference_config.yaml": "max_probe_steps: 6\nvllm:\n  gpu-memory-utilization: 0.95\n  max-model-len: 131072\n"
        },
        "my-qlora-params": {
            "training_config.yaml": yaml.safe_dump(
                {
                    "training_config": {
                        "ModelConfig": {"torch_dtype": "bfloat16"},
                        "QuantizationConfig": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
                        "LoraConfig": {"r": 8},
                        "TrainingArguments": {"output_dir": "/mnt/results"},
                    }
                }
            )
        },
        "lora-4bit": {
            "training_config.yaml": "training_config:\n  QuantizationConfig:\n    load_in_4bit: true\n"
        },
        "small-gpu-params": {"inference_config.yaml": "vllm:\n  max-model-len: 2048\n"},
        "small-gpu-params-2": {"inference_config.yaml": "vllm:\n  max-model-len: 4096\n"},
        "no-max-model-len-params": {"inference_config.yaml": "vllm:\n  gpu-memory-utilization: 0.9\n"},
        "no-key-params": {"other_key": "some value"},
    }
    for name, content in data.items():
        await core.create_namespaced_config_map(namespace, {"metadata": {"name": name}, "data": content})


async def run_cases(cases: list[Case], crds: Any, namespace: str, second: str | None = None) -> list[str]:
    """Apply every case with kubectl; the failures, one line each (empty: all as expected)."""
    failures: list[str] = []
    for case in cases:
        ns = second if case.second_namespace and second else namespace
        first = await kubectl(crds, "apply", "-n", ns, "-f", "-", input=as_yaml(case.manifest))
        final = first
        if case.update is not None:
            if first.returncode != 0:
                failures.append(f"{case.name}: initial create failed: {first.stderr.strip()}")
                continue
            final = await kubectl(crds, "apply", "-n", ns, "-f", "-", input=as_yaml(case.update))
        output = final.stderr + final.stdout
        if VERBOSE:
            print(f"--- {case.name} rc={final.returncode}\n{output.strip()}")
        if case.expect is None:
            if final.returncode != 0:
                failures.append(f"{case.name}: expected accept, got: {output.strip()}")
            for warning in case.warnings:
                if warning not in final.stderr:
                    failures.append(f"{case.name}: expected warning {warning!r}, got: {final.stderr.strip()}")
        else:
            if final.returncode == 0:
                failures.append(f"{case.name}: expected reject, was accepted: {output.strip()}")
                continue
            missing = [m for m in case.expect if m not in output]
            if missing:
                failures.append(f"{case.name}: message lacks {missing}: {output.strip()}")
    return failures


async def test_admission_table(webhook: WebhookEnv, crds: Any, api_client: Any) -> None:
    assert len(CASES) >= 40
    assert sum(1 for c in CASES if c.expect is None) >= 15 and sum(1 for c in CASES if c.expect) >= 25
    await create_configmaps(api_client, webhook.namespace)
    second = f"{webhook.namespace}-2"
    await CoreV1Api(api_client).create_namespace(
        {"metadata": {"name": second, "labels": {WEBHOOK_LABEL: webhook.token}}}
    )
    failures = await run_cases(CASES, crds, webhook.namespace, second)
    assert not failures, "\n".join(failures)


def test_parity_table_covers_every_class_both_ways_on_create_and_update() -> None:
    """Issue 16: each class of upstream difference, accepted and rejected, on create and on update."""
    by_class: dict[int, set[tuple[str, str]]] = {}
    for case in PARITY_CASES + VLLM_DEFAULT_CASES:
        if case.parity is not None:
            by_class.setdefault(case.parity, set()).add(case.kind)
    every = {(op, verdict) for op in ("create", "update") for verdict in ("accept", "reject")}
    assert sorted(by_class) == [1, 2, 3, 4, 5, 6, 7]
    missing = {cls: sorted(every - kinds) for cls, kinds in by_class.items() if kinds != every}
    assert not missing, missing


@pytest.mark.parametrize(
    ("flags", "cases"),
    [([], PARITY_CASES), (["--default-runtime", "vllm"], VLLM_DEFAULT_CASES)],
    ids=["shipped-default", "vllm-default"],
)
async def test_parity_with_upstream(
    flags: list[str], cases: list[Case], webhook: WebhookEnv, crds: Any, api_client: Any
) -> None:
    """The controller as shipped (transformers by default), then with ``--default-runtime vllm`` (upstream's
    default): the runtime rules follow the annotation, else the flag."""
    webhook.server.validator = webhook_validator(parse_args(["--enable-tuning", *flags]), api_client)
    await create_configmaps(api_client, webhook.namespace)
    failures = await run_cases(cases, crds, webhook.namespace)
    assert not failures, "\n".join(failures)


async def test_tuning_refused_when_the_controller_does_not_run_it(
    webhook: WebhookEnv, crds: Any, api_client: Any
) -> None:
    """Without --enable-tuning the workspace would be admitted and never get a status: refuse it."""
    webhook.server.validator = webhook_validator(parse_args([]), api_client)
    proc = await kubectl(crds, "apply", "-n", webhook.namespace, "-f", "-",
                         input=as_yaml(ws("no-tuning", tuning=tuning_spec())))  # fmt: skip
    assert proc.returncode != 0
    assert "tuning: this KAITO controller does not run tuning workspaces" in proc.stderr, proc.stderr
    assert "--enable-tuning" in proc.stderr
    ok = await kubectl(crds, "apply", "-n", webhook.namespace, "-f", "-",
                       input=as_yaml(ws("still-serving", inference=preset("phi-2"))))  # fmt: skip
    assert ok.returncode == 0, ok.stderr


async def test_defaults_are_stored(webhook: WebhookEnv, crds: Any, api_client: Any) -> None:
    """count 1, adapter strength "1.0", accessMode public end up in the stored object."""
    ns = webhook.namespace
    manifest = ws("stored-defaults", instance=None, inference={**preset("falcon-7b"), "adapters": [
        {"source": {"name": "a1", "image": "myregistry.azurecr.io/a1:1"}}]})  # fmt: skip
    del manifest["resource"]["labelSelector"]
    manifest["resource"]["labelSelector"] = {"matchLabels": {"apps": "d"}}
    proc = await kubectl(crds, "apply", "-n", ns, "-f", "-", input=yaml.safe_dump(manifest))
    assert proc.returncode == 0, proc.stderr
    stored = await CustomObjectsApi(api_client).get_namespaced_custom_object(
        "kaito.sh", "v1alpha1", ns, "workspaces", "stored-defaults"
    )
    assert stored["resource"]["count"] == 1
    assert stored["resource"]["instanceType"] == "Standard_NC12s_v3"
    assert stored["inference"]["preset"]["accessMode"] == "public"
    assert stored["inference"]["adapters"][0]["strength"] == "1.0"


async def test_columns_and_short_names(webhook: WebhookEnv, crds: Any) -> None:
    ns = webhook.namespace
    proc = await kubectl(crds, "apply", "-n", ns, "-f", str(SAMPLES / "kaito_workspace_phi_3.yaml"))
    assert proc.returncode == 0, proc.stderr
    for resource in ("workspace", "workspaces", "wk", "wks"):
        got = await kubectl(crds, "get", resource, "-n", ns)
        assert got.returncode == 0, got.stderr
        header, row = got.stdout.splitlines()[:2]
        assert header.split() == [
            "NAME",
            "INSTANCE",
            "RESOURCEREADY",
            "INFERENCEREADY",
            "WORKSPACEREADY",
            "AGE",
        ]
        assert row.split()[:2] == ["workspace-phi-3-mini", "Standard_NC6s_v3"]
    wide = await kubectl(crds, "get", "wk", "-n", ns, "-o", "wide")
    assert wide.stdout.splitlines()[0].split() == [
        "NAME", "INSTANCE", "RESOURCEREADY", "INFERENCEREADY", "WORKSPACEREADY",
        "JOBSTARTED", "WORKSPACESUCCEEDED", "STATE", "AGE",
    ]  # fmt: skip
    # Status goes through the subresource and shows up in the columns.
    status = {
        "status": {
            "state": "Ready",
            "conditions": [
                {
                    "type": t,
                    "status": "True",
                    "reason": "Ok",
                    "message": "",
                    "lastTransitionTime": "2025-01-01T00:00:00Z",
                }
                for t in ("ResourceReady", "InferenceReady", "WorkspaceReady")
            ],
        }
    }
    patched = await kubectl(
        crds, "patch", "wk", "workspace-phi-3-mini", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )  # fmt: skip
    assert patched.returncode == 0, patched.stderr
    got = await kubectl(crds, "get", "wk", "-n", ns, "-o", "wide")
    # JOBSTARTED and WORKSPACESUCCEEDED are unset (blank), so the row reads: ... True True True Ready AGE.
    assert got.stdout.splitlines()[1].split()[2:6] == ["True", "True", "True", "Ready"]
