"""Workspace (``kaito.sh/v1alpha1``, also served as ``v1beta1``): pydantic types that are the API.

Upstream's shape is kept on purpose (SPEC §4): there is no ``spec:``; ``resource``, ``inference`` and
``tuning`` sit next to ``metadata`` and ``status``. The CRD in ``config/crd/`` is generated from these
classes (``kaito.api.crdgen``), including the CEL rules attached through ``json_schema_extra``, so the
schema, the defaults and the immutability rules hold even when the admission webhook is down.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Final, Literal

from pydantic import Field

from kaito.api.conditions import Condition, WorkspaceState
from kaito.api.meta import (
    DNS1123_LABEL,
    KubeModel,
    LabelSelector,
    ObjectMeta,
    cel,
    immutable,
    required,
    with_rules,
)

GROUP = "kaito.sh"
VERSION = "v1alpha1"
SERVED_VERSIONS = ("v1alpha1", "v1beta1")
STORAGE_VERSION = "v1alpha1"
KIND: Final = "Workspace"
PLURAL = "workspaces"
API_VERSION: Final = "kaito.sh/v1alpha1"

# Labels, annotations and finalizer: upstream names (reference §1.7) so existing scripts keep working.
LABEL_WORKSPACE_NAME = "kaito.sh/workspace"
LABEL_WORKSPACE_NAMESPACE = "kaito.sh/workspacenamespace"
ANNOTATION_ENABLE_LB = "kaito.sh/enablelb"
ANNOTATION_RUNTIME = "kaito.sh/runtime"
ANNOTATION_BYPASS_RESOURCE_CHECKS = "kaito.sh/bypass-resource-checks"
ANNOTATION_REVISION = "workspace.kaito.io/revision"
ANNOTATION_HASH = "workspace.kaito.io/hash"
LABEL_REVISION_WORKSPACE = "workspace.kaito.io/name"
FINALIZER = "workspace.finalizer.kaito.sh"
MAX_ADAPTERS = 10
DEFAULT_INSTANCE_TYPE = "Standard_NC12s_v3"
DEFAULT_ADAPTER_STRENGTH = "1.0"


class ModelImageAccessMode(StrEnum):
    """Whether the preset's model image is public (registry of the operator) or private (user-supplied)."""

    PUBLIC = "public"
    PRIVATE = "private"


class TuningMethod(StrEnum):
    """Fine-tuning methods; matched case-insensitively like upstream."""

    LORA = "lora"
    QLORA = "qlora"


class RuntimeName(StrEnum):
    """Values of the ``kaito.sh/runtime`` annotation."""

    TRANSFORMERS = "transformers"
    VLLM = "vllm"


class ResourceSpec(KubeModel):
    """GPU nodes the workload runs on."""

    model_config = with_rules(
        required(
            "labelSelector",
            "resource.labelSelector is required: the labels of the nodes to use (and to put on the "
            "nodes it provisions), e.g. labelSelector: {matchLabels: {apps: phi-3}}",
        )
    )

    count: int = Field(
        default=1,
        ge=1,
        description="Number of GPU nodes. Immutable.",
        json_schema_extra=immutable("resource.count"),
    )
    instance_type: str = Field(
        default=DEFAULT_INSTANCE_TYPE,
        min_length=1,
        max_length=128,
        description="Node SKU: a GPU size, e.g. Standard_NC24ads_A100_v4 or g5.4xlarge, or a CPU size, e.g. "
        "Standard_D4s_v3 or m5.2xlarge, for presets that run on CPU. Immutable.",
        json_schema_extra=immutable("resource.instanceType"),
    )
    label_selector: LabelSelector = Field(
        description="Labels that select (and are put on) the GPU nodes. matchLabels is required. Immutable.",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.matchLabels) && size(self.matchLabels) > 0",
                    "labelSelector.matchLabels must name at least one label (e.g. apps: phi-3); "
                    "matchExpressions alone cannot select GPU nodes",
                ),
                cel(
                    "self == oldSelf",
                    "resource.labelSelector is immutable; delete and re-create the workspace to change it",
                ),
            ]
        },
    )
    preferred_nodes: list[str] | None = Field(
        default=None,
        max_length=1000,
        description="Existing nodes to use before provisioning new ones. Mutable.",
        json_schema_extra={"items": {"maxLength": 253}},
    )


class PresetOptions(KubeModel):
    """Options for private model images (and, from v1beta1, a Hugging Face token secret)."""

    image: str | None = Field(
        default=None, max_length=512, description="Full image reference of a private model image."
    )
    image_pull_secrets: list[str] | None = Field(
        default=None,
        max_length=16,
        description="Secrets (same namespace) to pull the model image.",
        json_schema_extra={"items": {"maxLength": 253}},
    )
    model_access_secret: str | None = Field(
        default=None, max_length=253, description="Secret with key HF_TOKEN for models downloaded at runtime."
    )


class PresetSpec(KubeModel):
    """A preset model from the catalog (``presets/models``)."""

    model_config = with_rules(
        required(
            "name",
            "preset.name is required: a model of the preset catalog, e.g. name: phi-3-mini-4k-instruct",
        )
    )

    name: str = Field(
        min_length=1, max_length=128, description="Preset name, e.g. phi-3-mini-4k-instruct or falcon-7b."
    )
    access_mode: ModelImageAccessMode = Field(
        default=ModelImageAccessMode.PUBLIC,
        description="public: image from the operator's registry; private: presetOptions.image.",
    )
    preset_options: PresetOptions | None = Field(default=None)


class DataSource(KubeModel):
    """Where tuning data or an adapter comes from: exactly one of urls, volumeSource, image."""

    name: str | None = Field(
        default=None, max_length=253, description="Name of the data set or adapter (DNS-1123 subdomain)."
    )
    urls: list[str] | None = Field(
        default=None,
        max_length=100,
        description="Public URLs of the data.",
        json_schema_extra={"items": {"maxLength": 4096}},
    )
    volume_source: dict[str, Any] | None = Field(
        default=None, description="A core/v1 VolumeSource (not supported yet)."
    )
    image: str | None = Field(
        default=None, max_length=512, description="OCI image holding the data in /data."
    )
    image_pull_secrets: list[str] | None = Field(
        default=None, max_length=16, json_schema_extra={"items": {"maxLength": 253}}
    )


class DataDestination(KubeModel):
    """Where the tuned adapter goes: an image pushed with imagePushSecret."""

    volume_source: dict[str, Any] | None = Field(
        default=None, description="A core/v1 VolumeSource (not supported yet)."
    )
    image: str | None = Field(default=None, max_length=512, description="Image to push the adapter to.")
    image_push_secret: str | None = Field(
        default=None, max_length=253, description="dockerconfigjson Secret used to push the image."
    )


class AdapterSpec(KubeModel):
    """A LoRA adapter merged into the served model."""

    source: DataSource | None = Field(default=None, description="Adapter image (source.name, source.image).")
    strength: str | None = Field(
        default=DEFAULT_ADAPTER_STRENGTH,
        max_length=32,
        description='Multiplier between "0" and "1"; defaults to "1.0".',
    )


class InferenceSpec(KubeModel):
    """Serve a preset model (or a custom pod template)."""

    model_config = with_rules(
        cel(
            "has(self.preset) != has(self.template)",
            "inference needs exactly one of preset (a catalog model) or template (a custom pod)",
        ),
        cel(
            "has(self.preset) == has(oldSelf.preset) && has(self.template) == has(oldSelf.template)",
            "inference.preset and inference.template cannot be added or removed after creation; delete "
            "the workspace and create a new one",
        ),
    )

    preset: PresetSpec | None = Field(
        default=None, description="Catalog model. Immutable.", json_schema_extra=immutable("inference.preset")
    )
    template: dict[str, Any] | None = Field(default=None, description="A core/v1 PodTemplateSpec.")
    config: str | None = Field(
        default=None, max_length=253, description="ConfigMap (same namespace) with inference_config.yaml."
    )
    adapters: list[AdapterSpec] | None = Field(
        default=None, max_length=MAX_ADAPTERS, description="LoRA adapters (at most 10). Mutable."
    )


class TuningSpec(KubeModel):
    """Fine-tune a preset model with LoRA or QLoRA and push the adapter as an image."""

    model_config = with_rules(
        required(
            "preset",
            "tuning.preset is required: the model to tune, e.g. preset: {name: phi-3-mini-4k-instruct}",
        ),
        required("method", "tuning.method is required: lora or qlora"),
        required(
            "input",
            "tuning.input is required: the training data, as urls (e.g. urls: "
            "[https://example.com/train.parquet]) or an image",
        ),
        required(
            "output",
            "tuning.output is required: the image to push the adapter to and a Secret that can push "
            "it, e.g. output: {image: myregistry.azurecr.io/adapter:0.0.1, imagePushSecret: push-secret}",
        ),
    )

    preset: PresetSpec = Field(
        description="Model to tune. Immutable.", json_schema_extra=immutable("tuning.preset")
    )
    method: str = Field(
        max_length=16,
        description="lora or qlora (case-insensitive). Immutable.",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("self.lowerAscii() in ['lora', 'qlora']", "tuning.method must be lora or qlora"),
                cel(
                    "self.lowerAscii() == oldSelf.lowerAscii()",
                    "tuning.method is immutable; delete and re-create the workspace to change it",
                ),
            ]
        },
    )
    config: str | None = Field(
        default=None,
        max_length=253,
        description="ConfigMap (same namespace) with training_config.yaml; empty: the method's default.",
    )
    input: DataSource = Field(description="Training data: urls, or an image.")
    output: DataDestination = Field(description="Where to push the adapter.")


class WorkspaceStatus(KubeModel):
    """Observed state, written by the workspace controller through the status subresource."""

    worker_nodes: list[str] | None = Field(default=None, description="Nodes running the workload (sorted).")
    conditions: list[Condition] | None = Field(
        default=None,
        description="ResourceReady, InferenceReady, JobStarted, WorkspaceSucceeded, WorkspaceReady, ...",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    state: WorkspaceState | None = Field(default=None, description="Summary state.")
    reason: str | None = Field(default=None, description="Typed reason for the state, e.g. ImagePullError.")
    observed_generation: int | None = Field(default=None, description="Generation the status describes.")


class Workspace(KubeModel):
    """A model served (inference) or fine-tuned (tuning) on GPU nodes described by ``resource``."""

    model_config = with_rules(
        cel(
            "has(self.inference) || has(self.tuning)",
            "set either inference (to serve a model) or tuning (to fine-tune one)",
            fieldPath=".inference",
            reason="FieldValueRequired",
        ),
        cel(
            "!(has(self.inference) && has(self.tuning))",
            "inference and tuning cannot both be set in one workspace; use two workspaces",
            fieldPath=".tuning",
            reason="FieldValueForbidden",
        ),
        cel(
            "has(self.inference) == has(oldSelf.inference)",
            "inference cannot be added or removed after creation (inference and tuning are set once); "
            "delete the workspace and create a new one",
            fieldPath=".inference",
            reason="FieldValueForbidden",
        ),
        cel(
            "has(self.tuning) == has(oldSelf.tuning)",
            "tuning cannot be added or removed after creation (inference and tuning are set once); "
            "delete the workspace and create a new one",
            fieldPath=".tuning",
            reason="FieldValueForbidden",
        ),
        cel(
            "!has(self.tuning) || !has(self.resource) || self.resource.count == 1",
            "tuning runs on one node: set resource.count to 1",
            fieldPath=".resource.count",
        ),
        cel(
            "size(self.metadata.name) <= 63 && self.metadata.name.matches('" + DNS1123_LABEL + "')",
            "metadata.name must be a DNS-1123 label: at most 63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (e.g. workspace-phi-3-mini)",
            fieldPath=".metadata.name",
        ),
        required(
            "resource",
            "resource is required: the nodes to run on, e.g. resource: {instanceType: Standard_NC12s_v3, "
            "labelSelector: {matchLabels: {apps: phi-3}}}",
        ),
    )

    api_version: Literal["kaito.sh/v1alpha1", "kaito.sh/v1beta1"] = API_VERSION
    kind: Literal["Workspace"] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    resource: ResourceSpec = Field(description="GPU nodes.")
    inference: InferenceSpec | None = Field(default=None, description="Serve a model.")
    tuning: TuningSpec | None = Field(default=None, description="Fine-tune a model.")
    status: WorkspaceStatus | None = Field(default=None)

    def preset_name(self) -> str | None:
        """The preset named by inference or tuning, if any."""
        if self.inference is not None and self.inference.preset is not None:
            return self.inference.preset.name
        if self.tuning is not None:
            return self.tuning.preset.name
        return None

    def annotations(self) -> dict[str, str]:
        """metadata.annotations, never None."""
        return self.metadata.annotations or {}


class WorkspaceList(KubeModel):
    """A list of workspaces (LIST response)."""

    api_version: str = API_VERSION
    kind: str = "WorkspaceList"
    metadata: dict[str, Any] = Field(default_factory=dict)
    items: list[Workspace] = Field(default_factory=list)
