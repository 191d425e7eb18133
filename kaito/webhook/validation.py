"""Workspace admission rules that need the preset registry, the SKU catalog or a live lookup.

Upstream's rules (reference §2.2-2.5) with the §2.8 hazards fixed: unknown presets, adapters without a
source, count < 1, matchExpressions-only selectors and tuning of untunable presets get a clean error
that names the field and what would be accepted. Static rules are also in the CRD (CEL), so they hold
when this webhook is down; they are repeated here with the same wording for direct callers.

Every message has the form ``<field path>: <what is wrong>; <what would be accepted>``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlparse

import yaml

from kaito.api.meta import DNS1123_LABEL, DNS1123_SUBDOMAIN
from kaito.api.workspace import (
    ANNOTATION_BYPASS_RESOURCE_CHECKS,
    ANNOTATION_RUNTIME,
    MAX_ADAPTERS,
    DataDestination,
    DataSource,
    InferenceSpec,
    RuntimeName,
    TuningMethod,
    TuningSpec,
    Workspace,
)
from kaito.presets.cpu import explain_cpu_misfit
from kaito.presets.registry import (
    Preset,
    PresetRegistry,
    UnknownPresetError,
    check_fit,
    check_tuning_fit,
)
from kaito.presets.skus import CLOUDS, GPUSku, SkuCatalog

INFERENCE_CONFIG_KEY = "inference_config.yaml"
TRAINING_CONFIG_KEY = "training_config.yaml"
TRAINING_SECTIONS = (
    "ModelConfig",
    "QuantizationConfig",
    "LoraConfig",
    "TrainingArguments",
    "DatasetConfig",
    "DataCollator",
)

# Fetches ConfigMap data: (namespace, name) -> data, or None when the ConfigMap does not exist.
ConfigMapReader = Callable[[str, str], Awaitable[dict[str, str] | None]]

# "registry/path:tag" or "registry/path@sha256:..." -- the shape upstream required (a "/" and a tag).
_IMAGE_SHAPE = re.compile(r"^[^\s/]+(/[^\s/:@]+)+(:[^\s/:@]+|@sha256:[a-fA-F0-9]{64})$")
# The distribution reference grammar, which registries enforce (lowercase repository paths).
_IMAGE_STRICT = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::\d+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)
_IMAGE_EXAMPLE = "myregistry.azurecr.io/my-model:0.0.1"


@dataclass
class Result:
    """Errors deny the request; warnings are shown by kubectl but let it through."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, path: str, message: str) -> None:
        """Record a rejection reason for ``path``."""
        self.errors.append(f"{path}: {message}")

    def warn(self, path: str, message: str) -> None:
        """Record a warning for ``path``."""
        self.warnings.append(f"{path}: {message}")

    @property
    def allowed(self) -> bool:
        """Whether the request passes."""
        return not self.errors


def _shortlist(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _check_image(result: Result, path: str, image: str) -> None:
    if not _IMAGE_SHAPE.match(image):
        result.error(
            path,
            f"{image!r} is not a full image reference; use registry/repository:tag, e.g. {_IMAGE_EXAMPLE}",
        )
    elif not _IMAGE_STRICT.match(image):
        # Kept a warning so the documented placeholders (ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1) apply.
        result.warn(
            path,
            f"{image!r} is not a valid image reference (repository names must be lowercase letters, digits, "
            f"'.', '_' or '-'); pulling or pushing it will fail",
        )


class WorkspaceValidator:
    """Validates Workspace creates and updates.

    ``cloud_provider`` (``azure``, ``aws``, ``arc`` or None for "any catalog") picks the SKU table.
    ``configmaps`` reads ConfigMaps for ``inference.config`` / ``tuning.config``; without it a named
    ConfigMap cannot be checked and the request is denied with a message saying so.
    ``allow_unknown_instance_types`` (for bring-your-own nodes) turns an unknown SKU into a warning
    without the bypass annotation.
    """

    def __init__(
        self,
        registry: PresetRegistry,
        skus: SkuCatalog,
        cloud_provider: str | None = None,
        configmaps: ConfigMapReader | None = None,
        allow_unknown_instance_types: bool = False,
    ) -> None:
        if cloud_provider is not None and cloud_provider not in CLOUDS:
            raise ValueError(
                f"unknown cloud provider {cloud_provider!r}; expected one of {', '.join(CLOUDS)}"
            )
        self.registry = registry
        self.skus = skus
        self.cloud_provider = cloud_provider
        self.configmaps = configmaps
        self.allow_unknown_instance_types = allow_unknown_instance_types

    # ----------------------------------------------------------------------------------------- create

    async def validate_create(self, ws: Workspace) -> Result:
        """All rules for a new workspace."""
        result = Result()
        self._check_name(result, ws)
        self._check_resource(result, ws)
        if (ws.inference is None) == (ws.tuning is None):
            result.error(
                "inference",
                "set exactly one of inference (to serve a model) or tuning (to fine-tune one)"
                if ws.inference is None
                else "inference and tuning cannot both be set; use two workspaces",
            )
            return result
        self._check_annotations(result, ws)
        if ws.inference is not None:
            await self._check_inference_create(result, ws, ws.inference)
        elif ws.tuning is not None:
            await self._check_tuning_create(result, ws, ws.tuning)
        return result

    def _check_name(self, result: Result, ws: Workspace) -> None:
        name = ws.metadata.name or ""
        if not name:
            return  # generateName: the apiserver fills it in and validates it
        if len(name) > 63 or not re.match(DNS1123_LABEL, name):
            result.error(
                "metadata.name",
                f"{name!r} must be a DNS-1123 label: at most 63 lowercase letters, digits and '-', "
                "starting and ending with a letter or digit (e.g. workspace-phi-3-mini)",
            )

    def _check_resource(self, result: Result, ws: Workspace) -> None:
        res = ws.resource
        if res.count < 1:
            result.error("resource.count", f"must be at least 1 (got {res.count})")
        if not res.label_selector.match_labels:
            result.error(
                "resource.labelSelector.matchLabels",
                "required: name at least one label (e.g. apps: phi-3); matchExpressions alone cannot select "
                "GPU nodes",
            )

    def _check_annotations(self, result: Result, ws: Workspace) -> None:
        runtime = ws.annotations().get(ANNOTATION_RUNTIME)
        if runtime is not None and runtime not in {r.value for r in RuntimeName}:
            result.error(
                f"metadata.annotations[{ANNOTATION_RUNTIME}]",
                f"unknown runtime {runtime!r}; use {' or '.join(r.value for r in RuntimeName)}",
            )

    def _bypass(self, ws: Workspace) -> bool:
        return ANNOTATION_BYPASS_RESOURCE_CHECKS in ws.annotations()

    def _lookup_sku(self, result: Result, ws: Workspace, preset: Preset | None = None) -> GPUSku | None:
        name = ws.resource.instance_type
        sku = self.skus.get(name, self.cloud_provider)
        if sku is not None:
            return sku
        if self._bypass(ws) or self.allow_unknown_instance_types:
            result.warn("resource.instanceType", f"unknown instance type {name!r}: GPU fit not checked")
            return None
        suggestions = self.skus.suggest(name, self.cloud_provider)
        # Examples from the cloud the user is most likely on, fitting the preset when there is one.
        cloud = self.cloud_provider
        if cloud is None:
            guess = self.skus.get(suggestions[0]) if suggestions else None
            cloud = guess.cloud if guess else ("azure" if name.startswith("Standard_") else "aws")
        examples = [s.name for s in self.registry.fitting_skus(preset, self.skus, cloud)] if preset else []
        examples = examples or [s.name for s in self.skus.list(cloud)]
        where = f"the {self.cloud_provider} SKU catalog" if self.cloud_provider else "the SKU catalog"
        hint = f"did you mean {', '.join(suggestions)}? " if suggestions else ""
        fits = f" that fits {preset.name}" if preset else ""
        result.error(
            "resource.instanceType",
            f"unknown instance type {name!r} (not in {where}); {hint}use a known GPU SKU{fits}, e.g. "
            f'{_shortlist(examples, 4)}, or add the annotation {ANNOTATION_BYPASS_RESOURCE_CHECKS}: "true" '
            "to use it without GPU checks",
        )
        return None

    def _lookup_preset(self, result: Result, path: str, name: str) -> Preset | None:
        try:
            return self.registry.get(name)
        except UnknownPresetError as e:
            hint = f"did you mean {', '.join(e.suggestions)}? " if e.suggestions else ""
            result.error(
                path,
                f"unknown preset {name!r}; {hint}supported presets: {', '.join(self.registry.names())}",
            )
            return None

    async def _check_inference_create(self, result: Result, ws: Workspace, inf: InferenceSpec) -> None:
        if (inf.preset is None) == (inf.template is None):
            result.error(
                "inference",
                "set exactly one of preset (a catalog model) or template (a custom pod template)",
            )
            return
        preset: Preset | None = None
        if inf.preset is not None:
            preset = self._lookup_preset(result, "inference.preset.name", inf.preset.name)
        sku = self._lookup_sku(result, ws, preset)
        if inf.preset is not None:
            if preset is not None:
                self._check_preset_access(result, "inference.preset", ws, preset)
                self._check_node_count(result, ws, preset)
                if sku is not None and sku.is_cpu:
                    self._report_cpu_misfit(
                        result, ws, explain_cpu_misfit(preset, sku, self.skus, self.registry)
                    )
                elif sku is not None:
                    self._check_fit(result, ws, preset, sku)
        else:
            self._check_template(result, inf.template or {})
        self._check_adapters(result, ws, inf, preset)
        if inf.config:
            await self._check_inference_config(result, ws, inf.config, sku)

    def _check_preset_access(self, result: Result, path: str, ws: Workspace, preset: Preset) -> None:
        spec = ws.inference.preset if ws.inference is not None else (ws.tuning.preset if ws.tuning else None)
        if spec is None:
            return
        mode = spec.access_mode.value
        image = spec.preset_options.image if spec.preset_options else None
        if preset.is_private and mode != "private":
            result.error(
                f"{path}.accessMode",
                f"preset {preset.name} has no public image; set accessMode: private and "
                f"presetOptions.image to the image you built (e.g. {_IMAGE_EXAMPLE})",
            )
        if mode == "private":
            if not image:
                result.error(
                    f"{path}.presetOptions.image",
                    f"required when accessMode is private; set it to your model image (e.g. {_IMAGE_EXAMPLE})",
                )
            else:
                _check_image(result, f"{path}.presetOptions.image", image)
        if preset.download_auth_required and not (
            spec.preset_options and spec.preset_options.model_access_secret
        ):
            result.error(
                f"{path}.presetOptions.modelAccessSecret",
                f"preset {preset.name} downloads gated weights at runtime; set it to a Secret (same namespace) "
                "with key HF_TOKEN",
            )

    def _check_node_count(self, result: Result, ws: Workspace, preset: Preset) -> None:
        """A distributed preset's checkpoint has one shard per torch rank: ``count`` must divide them."""
        count, world = ws.resource.count, max(preset.world_size, 1)
        if not preset.distributed_inference or count < 1 or world % count == 0:
            return
        fits = ", ".join(str(n) for n in range(1, world + 1) if world % n == 0)
        result.error(
            "resource.count",
            f"preset {preset.name} runs as {world} torch ranks, which {count} nodes cannot share evenly; "
            f"use one of {fits}",
        )

    def _check_fit(self, result: Result, ws: Workspace, preset: Preset, sku: GPUSku) -> None:
        problems = check_fit(preset, sku, ws.resource.count)
        if not problems:
            return
        if self._bypass(ws):
            for p in problems:
                result.warn(
                    "resource.instanceType", f"{p.message} (ignored: {ANNOTATION_BYPASS_RESOURCE_CHECKS})"
                )
            return
        fitting = [s.name for s in self.registry.fitting_skus(preset, self.skus, sku.cloud)]
        accepted = (
            f"use an instance type that fits, e.g. {_shortlist(fitting, 4)}"
            if fitting
            else "no known SKU fits"
        )
        detail = "; ".join(p.message for p in problems)
        result.error(
            "resource.instanceType",
            f"{sku.name} ({sku.describe()}) is too small for preset {preset.name}: {detail}; {accepted}; or add the "
            f'annotation {ANNOTATION_BYPASS_RESOURCE_CHECKS}: "true" to skip this check',
        )

    def _report_cpu_misfit(self, result: Result, ws: Workspace, misfit: str | None) -> None:
        """A CPU SKU that cannot serve or tune the preset (kaito.presets.cpu): an error, or a warning
        under the bypass annotation."""
        if misfit is None:
            return
        if self._bypass(ws):
            result.warn("resource.instanceType", f"{misfit} (ignored: {ANNOTATION_BYPASS_RESOURCE_CHECKS})")
            return
        result.error(
            "resource.instanceType",
            f'{misfit}; or add the annotation {ANNOTATION_BYPASS_RESOURCE_CHECKS}: "true" to skip this check',
        )

    def _check_template(self, result: Result, template: dict[str, Any]) -> None:
        spec = template.get("spec")
        containers = spec.get("containers") if isinstance(spec, dict) else None
        if not isinstance(containers, list) or not containers:
            result.error(
                "inference.template.spec.containers",
                "a pod template needs at least one container (name and image)",
            )
            return
        for i, container in enumerate(containers):
            if not isinstance(container, dict) or not container.get("name") or not container.get("image"):
                result.error(
                    f"inference.template.spec.containers[{i}]", "each container needs a name and an image"
                )

    def _check_adapters(
        self, result: Result, ws: Workspace, inf: InferenceSpec, preset: Preset | None
    ) -> None:
        adapters = inf.adapters or []
        if len(adapters) > MAX_ADAPTERS:
            result.error(
                "inference.adapters", f"at most {MAX_ADAPTERS} adapters are supported (got {len(adapters)})"
            )
        seen: set[str] = set()
        for i, adapter in enumerate(adapters):
            path = f"inference.adapters[{i}]"
            source = adapter.source
            if source is None:
                result.error(
                    f"{path}.source", "required: set source.name and source.image (the adapter image)"
                )
                continue
            name = source.name or ""
            if not name:
                result.error(
                    f"{path}.source.name", "required: a DNS-1123 name for the adapter, e.g. phi-3-adapter"
                )
            elif len(name) > 253 or not re.match(DNS1123_SUBDOMAIN, name):
                result.error(
                    f"{path}.source.name",
                    f"{name!r} must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.'), "
                    "e.g. phi-3-adapter",
                )
            elif name in seen:
                result.error(
                    f"{path}.source.name", f"duplicate adapter name {name!r}; adapter names must be unique"
                )
            seen.add(name)
            if source.urls or source.volume_source is not None:
                result.error(
                    f"{path}.source",
                    "adapters come from images only; set source.image, not urls/volumeSource",
                )
            if not source.image:
                result.error(f"{path}.source.image", f"required: the adapter image, e.g. {_IMAGE_EXAMPLE}")
            else:
                _check_image(result, f"{path}.source.image", source.image)
            strength = adapter.strength if adapter.strength is not None else "1.0"
            try:
                value = Decimal(strength)
                ok = value.is_finite() and Decimal(0) <= value <= Decimal(1)
            except ArithmeticError:
                ok = False
            if not ok:
                result.error(
                    f"{path}.strength", f'{strength!r} must be a number between "0" and "1" (e.g. "1.0")'
                )
        vllm = preset.runtime.vllm if preset is not None else None
        uses_vllm = ws.annotations().get(ANNOTATION_RUNTIME) == RuntimeName.VLLM
        if adapters and uses_vllm and preset is not None and vllm is not None and vllm.disallow_lora:
            result.error(
                "inference.adapters",
                f"preset {preset.name} cannot load LoRA adapters with the vllm runtime; remove the adapters or "
                f"set the annotation {ANNOTATION_RUNTIME}: transformers",
            )

    async def _read_configmap(
        self, result: Result, path: str, namespace: str, name: str
    ) -> dict[str, str] | None:
        if self.configmaps is None:
            result.error(path, f"ConfigMap {name!r} cannot be checked: the webhook has no Kubernetes client")
            return None
        data = await self.configmaps(namespace, name)
        if data is None:
            result.error(
                path,
                f"ConfigMap {name!r} not found in namespace {namespace!r}; create it first or remove {path}",
            )
        return data

    async def _check_inference_config(
        self, result: Result, ws: Workspace, name: str, sku: GPUSku | None
    ) -> None:
        namespace = ws.metadata.namespace or "default"
        data = await self._read_configmap(result, "inference.config", namespace, name)
        if data is None:
            return
        if INFERENCE_CONFIG_KEY not in data:
            result.error("inference.config", f"ConfigMap {name!r} must have the key {INFERENCE_CONFIG_KEY}")
            return
        try:
            parsed = yaml.safe_load(data[INFERENCE_CONFIG_KEY]) or {}
        except yaml.YAMLError as e:
            result.error(
                "inference.config", f"{INFERENCE_CONFIG_KEY} in ConfigMap {name!r} is not valid YAML: {e}"
            )
            return
        if not isinstance(parsed, dict):
            result.error(
                "inference.config", f"{INFERENCE_CONFIG_KEY} in ConfigMap {name!r} must be a YAML mapping"
            )
            return
        vllm = parsed.get("vllm")
        if vllm is not None and not isinstance(vllm, dict):
            result.error("inference.config", f"the vllm section of {INFERENCE_CONFIG_KEY} must be a mapping")
        elif (
            ws.annotations().get(ANNOTATION_RUNTIME) == RuntimeName.VLLM
            and sku is not None
            and sku.gpu_count > 1
            and sku.per_gpu_memory_gib < 20
            and not (vllm or {}).get("max-model-len")
        ):
            result.error(
                "inference.config",
                f"{sku.name} has {sku.gpu_count} GPUs with less than 20Gi each: set vllm.max-model-len in "
                f"{INFERENCE_CONFIG_KEY} of ConfigMap {name!r}",
            )

    async def _check_tuning_create(self, result: Result, ws: Workspace, tuning: TuningSpec) -> None:
        if ws.resource.count != 1:
            result.error("resource.count", "tuning runs on one node: set resource.count to 1")
        method = tuning.method.lower()
        if method not in {m.value for m in TuningMethod}:
            result.error("tuning.method", f"{tuning.method!r} is not supported; use lora or qlora")
        preset = self._lookup_preset(result, "tuning.preset.name", tuning.preset.name)
        if preset is not None:
            if preset.tuning is None:
                result.error(
                    "tuning.preset.name",
                    f"preset {preset.name} cannot be tuned; presets that support tuning: "
                    f"{', '.join(self.registry.tunable())}",
                )
            elif method in {m.value for m in TuningMethod} and method not in preset.tuning.methods:
                result.error(
                    "tuning.method", f"preset {preset.name} supports {', '.join(preset.tuning.methods)}"
                )
        sku = self._lookup_sku(result, ws)
        if sku is not None and sku.is_cpu and preset is not None and preset.tuning is not None:
            misfit = explain_cpu_misfit(preset, sku, self.skus, self.registry, method=method)
            self._report_cpu_misfit(result, ws, misfit)
        elif sku is not None and preset is not None:
            for p in check_tuning_fit(preset, sku, method):
                result.warn("resource.instanceType", p.message)
        self._check_input(result, tuning.input)
        self._check_output(result, tuning.output)
        if tuning.config:
            await self._check_tuning_config(result, ws, tuning.config, method)

    def _check_input(self, result: Result, source: DataSource) -> None:
        given = [n for n, v in (("urls", source.urls), ("image", source.image)) if v]
        if source.volume_source is not None:
            given.append("volumeSource")
            result.error("tuning.input.volumeSource", "volumes are not supported yet; use urls or image")
        if len(given) != 1:
            result.error(
                "tuning.input",
                f"set exactly one of urls or image (got {', '.join(given) if given else 'none'})",
            )
        for i, url in enumerate(source.urls or []):
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                result.error(f"tuning.input.urls[{i}]", f"{url!r} is not an http(s) URL")
        if source.image:
            _check_image(result, "tuning.input.image", source.image)
        if source.name and (len(source.name) > 253 or not re.match(DNS1123_SUBDOMAIN, source.name)):
            result.error("tuning.input.name", f"{source.name!r} must be a DNS-1123 subdomain, e.g. dolly-15k")

    def _check_output(self, result: Result, dest: DataDestination) -> None:
        if dest.volume_source is not None:
            result.error(
                "tuning.output.volumeSource", "volumes are not supported yet; use image and imagePushSecret"
            )
        if not dest.image:
            result.error(
                "tuning.output.image", f"required: the image to push the adapter to, e.g. {_IMAGE_EXAMPLE}"
            )
            return
        _check_image(result, "tuning.output.image", dest.image)
        if not dest.image_push_secret:
            result.error(
                "tuning.output.imagePushSecret",
                "required with output.image: a dockerconfigjson Secret (same namespace) that can push to it",
            )

    async def _check_tuning_config(self, result: Result, ws: Workspace, name: str, method: str) -> None:
        namespace = ws.metadata.namespace or "default"
        data = await self._read_configmap(result, "tuning.config", namespace, name)
        if data is None:
            return
        where = f"{TRAINING_CONFIG_KEY} of ConfigMap {name!r}"
        if TRAINING_CONFIG_KEY not in data:
            result.error("tuning.config", f"ConfigMap {name!r} must have the key {TRAINING_CONFIG_KEY}")
            return
        try:
            parsed = yaml.safe_load(data[TRAINING_CONFIG_KEY])
        except yaml.YAMLError as e:
            result.error("tuning.config", f"{where} is not valid YAML: {e}")
            return
        sections = parsed.get("training_config") if isinstance(parsed, dict) else None
        if not isinstance(sections, dict):
            result.error("tuning.config", f"{where} must have a top-level mapping training_config")
            return
        for section in sections:
            if section not in TRAINING_SECTIONS:
                result.error(
                    "tuning.config",
                    f"{where}: unrecognized section {section!r}; use {', '.join(TRAINING_SECTIONS)}",
                )
        quant = sections.get("QuantizationConfig")
        if quant is None:
            if method == TuningMethod.QLORA:
                result.error(
                    "tuning.config",
                    f"{where}: qlora needs a QuantizationConfig with load_in_4bit or load_in_8bit",
                )
        elif not isinstance(quant, dict):
            result.error("tuning.config", f"{where}: QuantizationConfig must be a mapping")
        else:
            flags = {k: quant.get(k) for k in ("load_in_4bit", "load_in_8bit")}
            for key, value in flags.items():
                if value is not None and not isinstance(value, bool):
                    result.error("tuning.config", f"{where}: QuantizationConfig.{key} must be true or false")
            if flags["load_in_4bit"] is True and flags["load_in_8bit"] is True:
                result.error("tuning.config", f"{where}: load_in_4bit and load_in_8bit cannot both be true")
            if method == TuningMethod.LORA and True in flags.values():
                result.error(
                    "tuning.config",
                    f"{where}: lora does not quantize; set load_in_4bit/8bit false or use qlora",
                )
            if method == TuningMethod.QLORA and True not in flags.values():
                result.error(
                    "tuning.config", f"{where}: qlora needs load_in_4bit or load_in_8bit set to true"
                )
        args = sections.get("TrainingArguments")
        if isinstance(args, dict) and "output_dir" in args:
            out = args["output_dir"]
            if not isinstance(out, str):
                result.error("tuning.config", f"{where}: TrainingArguments.output_dir must be a string")
            else:
                joined = posixpath.normpath(posixpath.join("/mnt", out.lstrip("/")))
                if not joined.startswith("/mnt/"):
                    result.error(
                        "tuning.config",
                        f"{where}: TrainingArguments.output_dir {out!r} must be a directory under /mnt, "
                        "e.g. /mnt/results",
                    )

    # ----------------------------------------------------------------------------------------- update

    async def validate_update(self, old: Workspace, new: Workspace) -> Result:
        """Rules for changing an existing workspace (immutability, adapters, changed ConfigMaps)."""
        result = Result()
        if new.metadata.deletion_timestamp is not None:
            # Finalizer removal must always go through, whatever the spec holds (upstream could wedge here).
            return result
        if (old.inference is None) != (new.inference is None) or (old.tuning is None) != (new.tuning is None):
            result.error("inference", "inference and tuning cannot be added or removed after creation")
            return result
        immutable_hint = "is immutable; delete and re-create the workspace to change it"
        if old.resource.count != new.resource.count:
            result.error("resource.count", f"{immutable_hint} (was {old.resource.count})")
        if old.resource.instance_type != new.resource.instance_type:
            result.error("resource.instanceType", f"{immutable_hint} (was {old.resource.instance_type})")
        if old.resource.label_selector != new.resource.label_selector:
            result.error("resource.labelSelector", immutable_hint)
        if old.annotations().get(ANNOTATION_RUNTIME) != new.annotations().get(ANNOTATION_RUNTIME):
            self._check_annotations(result, new)
        if new.inference is not None and old.inference is not None:
            await self._check_inference_update(result, old, new, old.inference, new.inference)
        elif new.tuning is not None and old.tuning is not None:
            await self._check_tuning_update(result, new, old.tuning, new.tuning)
        return result

    async def _check_inference_update(
        self, result: Result, old: Workspace, new: Workspace, was: InferenceSpec, now: InferenceSpec
    ) -> None:
        if was.preset != now.preset:
            result.error(
                "inference.preset", "is immutable; delete and re-create the workspace to change the model"
            )
        if (was.template is None) != (now.template is None):
            result.error("inference.template", "cannot be added or removed after creation")
        if now.template is not None and now.template != was.template:
            self._check_template(result, now.template)
        preset = None
        if now.preset is not None and self.registry.has(now.preset.name):
            preset = self.registry.get(now.preset.name)
        # Only what changed is re-checked, so metadata-only writes (the controller's finalizer and
        # annotations) always pass even if an older object would not satisfy today's rules.
        if now.adapters != was.adapters:
            self._check_adapters(result, new, now, preset)
        if now.config and now.config != was.config:
            sku = self.skus.get(new.resource.instance_type, self.cloud_provider)
            await self._check_inference_config(result, new, now.config, sku)

    async def _check_tuning_update(
        self, result: Result, new: Workspace, was: TuningSpec, now: TuningSpec
    ) -> None:
        if was.preset != now.preset:
            result.error(
                "tuning.preset", "is immutable; delete and re-create the workspace to change the model"
            )
        if was.method.lower() != now.method.lower():
            result.error("tuning.method", f"is immutable (was {was.method})")
        if (was.input.name or "") != (now.input.name or ""):
            result.error("tuning.input.name", f"is immutable (was {was.input.name!r})")
        if now.input != was.input:
            self._check_input(result, now.input)
        if now.output != was.output:
            self._check_output(result, now.output)
        if now.config and now.config != was.config:
            await self._check_tuning_config(result, new, now.config, now.method.lower())


def kube_configmap_reader(api_client: Any) -> ConfigMapReader:
    """A :data:`ConfigMapReader` over a kubernetes_asyncio ``ApiClient`` (needs ``get configmaps``)."""
    from kubernetes_asyncio.client import CoreV1Api
    from kubernetes_asyncio.client.exceptions import ApiException

    core = CoreV1Api(api_client)

    async def read(namespace: str, name: str) -> dict[str, str] | None:
        try:
            cm = await core.read_namespaced_config_map(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return dict(cm.data or {})

    return read


def build_validator(
    api_client: Any | None = None,
    cloud_provider: str | None = None,
    registry: PresetRegistry | None = None,
    skus: SkuCatalog | None = None,
    allow_unknown_instance_types: bool = False,
) -> WorkspaceValidator:
    """A validator over the default catalogs (loaded once; call at startup, it reads files)."""
    from kaito.presets.registry import default_registry
    from kaito.presets.skus import default_sku_catalog

    return WorkspaceValidator(
        registry or default_registry(),
        skus or default_sku_catalog(),
        cloud_provider=cloud_provider,
        configmaps=kube_configmap_reader(api_client) if api_client is not None else None,
        allow_unknown_instance_types=allow_unknown_instance_types,
    )
