"""Preset model registry, loaded from ``presets/models/*.yaml``.

Each file is one family: ``family``, ``defaults`` (deep-merged into every preset; a ``*Params`` map in a
preset replaces the default map as a whole, so a preset can drop a flag), optional ``tuningDefaults``
(merged into every preset's ``tuning``) and ``presets``. Upstream registered Go structs at init; here the
catalog is data, so adding a model is a YAML change and the webhook, the controller and the docs agree.
"""

from __future__ import annotations

import builtins
import copy
import difflib
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kaito.api.quantity import format_gib, parse_quantity, to_gib
from kaito.presets.catalog import CatalogError, catalog_dir, parse_duration
from kaito.presets.skus import Sku, SkuCatalog

DEFAULT_REGISTRY = "mcr.microsoft.com/aks/kaito"
DEFAULT_ACCELERATE_PARAMS = {"num_processes": "1", "num_machines": "1", "machine_rank": "0", "gpu_ids": "all"}


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


def _check_quantity(value: str) -> str:
    parse_quantity(value)
    return value


class TransformersParams(_Model):
    """Launch parameters for the transformers (accelerate/torchrun) runtime."""

    base_command: str = "accelerate launch"
    accelerate_params: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_ACCELERATE_PARAMS))
    torch_run_params: dict[str, str] = Field(default_factory=dict)
    torch_run_rdzv_params: dict[str, str] = Field(default_factory=dict)
    inference_main_file: str = "/workspace/tfs/inference_api.py"
    model_run_params: dict[str, str] = Field(default_factory=dict)


class VLLMParams(_Model):
    """Launch parameters for the vLLM runtime."""

    base_command: str = "python3 /workspace/vllm/inference_api.py"
    model_name: str | None = Field(default=None, description="served-model-name; defaults to the preset name")
    distribution_params: dict[str, str] = Field(default_factory=dict)
    model_run_params: dict[str, str] = Field(default_factory=dict)
    disallow_lora: bool = Field(default=False, alias="disallowLoRA")
    disable_tensor_parallelism: bool = False


class RuntimeParams(_Model):
    """Per-runtime launch parameters; a runtime that is None is not supported by the preset."""

    transformers: TransformersParams | None = None
    vllm: VLLMParams | None = None


CPU_DTYPES = ("float32", "bfloat16")


class CPUParams(_Model):
    """How a preset runs on a CPU-only node (``cpu:`` in the catalog; absent: it cannot).

    ``memory`` is the RAM the model needs while serving (weights in ``dtype``, the runtime, a KV cache
    for a few requests); ``minCPUs`` the cores it needs to answer at a usable pace; ``tuningMemory``
    the RAM a LoRA tuning Job needs (default: twice ``memory``). The server is started with
    ``--torch_dtype=<dtype> --device_map=cpu`` (no GPU placement) and ``--torch_threads``.
    """

    memory: str
    min_cpus: Decimal = Field(default=Decimal(1), gt=0, alias="minCPUs")
    dtype: str = "bfloat16"
    tuning_memory: str | None = None

    @field_validator("memory", "tuning_memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None:
            parse_quantity(value)
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in CPU_DTYPES:
            raise ValueError(
                f"cpu.dtype {value!r}: expected one of {', '.join(CPU_DTYPES)} (no float16 on CPU)"
            )
        return value


class TuningParams(_Model):
    """Requirements and launch parameters of a tuning Job."""

    disk_storage: str
    gpu_count: int = Field(ge=1)
    total_gpu_memory: str = Field(alias="totalGPUMemory")
    per_gpu_memory: str = Field(default="0Gi", alias="perGPUMemory")
    per_gpu_memory_by_method: dict[str, str] = Field(default_factory=dict, alias="perGPUMemoryByMethod")
    readiness_timeout: timedelta = timedelta(minutes=30)
    base_command: str = "cd /workspace/tfs/ && python3 metrics_server.py & accelerate launch"
    accelerate_params: dict[str, str] = Field(default_factory=dict)
    methods: tuple[str, ...] = ("lora", "qlora")

    _q = field_validator("disk_storage", "total_gpu_memory", "per_gpu_memory")(_check_quantity)

    @field_validator("readiness_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str | int | float) else value


class Preset(_Model):
    """One preset model: image, hardware requirements, runtime parameters, tuning support."""

    name: str
    family: str
    type: str = "text-generation"
    model_id: str | None = Field(default=None, description="Hugging Face repository id")
    image: str | None = Field(default=None, description="image name; default kaito-<name>")
    tag: str
    access_mode: str = "public"
    download_at_runtime: bool = False
    download_auth_required: bool = False
    disk_storage: str
    gpu_count: int = Field(ge=1, alias="gpuCount")
    total_gpu_memory: str = Field(alias="totalGPUMemory")
    per_gpu_memory: str = Field(default="0Gi", alias="perGPUMemory")
    readiness_timeout: timedelta = timedelta(minutes=30)
    distributed_inference: bool = False
    world_size: int = 1
    runtime: RuntimeParams = Field(default_factory=RuntimeParams)
    tuning: TuningParams | None = None
    cpu: CPUParams | None = None

    _q = field_validator("disk_storage", "total_gpu_memory", "per_gpu_memory")(_check_quantity)

    @field_validator("readiness_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str | int | float) else value

    @model_validator(mode="after")
    def _cpu_needs_one_node(self) -> Preset:
        if self.cpu is not None and self.distributed_inference:
            raise ValueError(f"preset {self.name}: a distributed preset cannot have a cpu section")
        if self.cpu is not None and self.runtime.transformers is None:
            raise ValueError(f"preset {self.name}: the cpu section needs the transformers runtime")
        return self

    @property
    def supports_cpu(self) -> bool:
        """Whether the preset can run on a CPU-only node (its catalog entry has a ``cpu:`` section)."""
        return self.cpu is not None

    @property
    def supports_tuning(self) -> bool:
        """Whether ``tuning:`` workspaces may use this preset."""
        return self.tuning is not None

    @property
    def is_private(self) -> bool:
        """Whether the user must supply the image (``accessMode: private``)."""
        return self.access_mode == "private"

    @property
    def image_name(self) -> str:
        """Repository name of the model image."""
        return self.image or f"kaito-{self.name}"

    def image_ref(self, registry: str = DEFAULT_REGISTRY) -> str:
        """Full image reference in ``registry``."""
        return f"{registry.rstrip('/')}/{self.image_name}:{self.tag}"

    @property
    def total_gpu_memory_gib(self) -> Decimal:
        """Total GPU memory the model needs, in GiB."""
        return to_gib(self.total_gpu_memory)

    @property
    def per_gpu_memory_gib(self) -> Decimal:
        """GPU memory each GPU needs, in GiB (0: no per-GPU constraint)."""
        return to_gib(self.per_gpu_memory)

    @property
    def vllm_model_name(self) -> str:
        """The OpenAI model id vLLM serves the preset as."""
        if self.runtime.vllm is not None and self.runtime.vllm.model_name:
            return self.runtime.vllm.model_name
        return self.name


@dataclass(frozen=True)
class FitProblem:
    """One reason an instance type cannot run a preset."""

    # GPU: "gpu-count", "per-gpu-memory", "total-gpu-memory"; CPU (kaito.presets.cpu): "cpu-unsupported",
    # "cpu-count", "memory", "method-needs-gpu"
    kind: str
    message: str


def check_fit(preset: Preset, sku: Sku, count: int = 1) -> builtins.list[FitProblem]:
    """Why ``count`` nodes of ``sku`` cannot serve ``preset`` (empty list: it fits).

    Upstream multiplied by ``count`` for every preset, but a non-distributed preset runs whole on each
    node (``count`` replicas), so only distributed presets may pool GPUs across nodes. A CPU SKU has no
    GPUs, so it never fits here; :func:`kaito.presets.cpu.check_cpu_fit` is the check for those.
    """
    nodes = count if preset.distributed_inference else 1
    gpus = nodes * sku.gpu_count
    total = nodes * sku.gpu_memory_gib
    where = f"{count} x {sku.name}" if nodes > 1 else sku.name
    problems: list[FitProblem] = []
    if gpus < preset.gpu_count:
        problems.append(
            FitProblem(
                "gpu-count",
                f"insufficient number of GPUs: {where} provides {gpus}, "
                f"but preset {preset.name} requires at least {preset.gpu_count}",
            )
        )
    if preset.per_gpu_memory_gib > 0 and sku.per_gpu_memory_gib < preset.per_gpu_memory_gib:
        problems.append(
            FitProblem(
                "per-gpu-memory",
                f"insufficient per-GPU memory: {sku.name} provides {format_gib(sku.per_gpu_memory_gib)} per GPU, "
                f"but preset {preset.name} requires at least {preset.per_gpu_memory} per GPU",
            )
        )
    if total < preset.total_gpu_memory_gib:
        problems.append(
            FitProblem(
                "total-gpu-memory",
                f"insufficient total GPU memory: {where} has {format_gib(total)}, "
                f"but preset {preset.name} requires at least {preset.total_gpu_memory}",
            )
        )
    return problems


def check_tuning_fit(preset: Preset, sku: Sku, method: str) -> builtins.list[FitProblem]:
    """Why ``sku`` is likely too small to tune ``preset`` with ``method`` (advisory: upstream never checked).

    GPU SKUs only: :func:`kaito.presets.cpu.check_cpu_tuning_fit` checks CPU ones.
    """
    tuning = preset.tuning
    if tuning is None or sku.is_cpu:
        return []
    problems: list[FitProblem] = []
    needed_per_gpu = to_gib(tuning.per_gpu_memory_by_method.get(method, tuning.per_gpu_memory))
    if needed_per_gpu > 0 and sku.per_gpu_memory_gib < needed_per_gpu:
        problems.append(
            FitProblem(
                "per-gpu-memory",
                f"tuning {preset.name} with {method} usually needs {format_gib(needed_per_gpu)} per GPU; "
                f"{sku.name} has {format_gib(sku.per_gpu_memory_gib)} per GPU",
            )
        )
    elif (
        sku.gpu_memory_gib < to_gib(tuning.total_gpu_memory) and method not in tuning.per_gpu_memory_by_method
    ):
        problems.append(
            FitProblem(
                "total-gpu-memory",
                f"tuning {preset.name} with {method} usually needs {tuning.total_gpu_memory} GPU memory; "
                f"{sku.name} has {sku.gpu_memory}",
            )
        )
    return problems


class UnknownPresetError(KeyError):
    """A preset name that is not in the catalog; the message lists close matches."""

    def __init__(self, name: str, suggestions: list[str]) -> None:
        self.name = name
        self.suggestions = suggestions
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"unknown preset {name!r}{hint}")

    def __str__(self) -> str:
        return str(self.args[0])


def _merge(base: Any, override: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(override, dict) and not key.endswith("Params"):
        out = copy.deepcopy(base)
        for k, v in override.items():
            out[k] = _merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    return copy.deepcopy(override)


class PresetRegistry:
    """Presets by name. Names are exact; :meth:`get` also accepts any capitalisation, like upstream."""

    def __init__(self, presets: list[Preset]) -> None:
        self._presets: dict[str, Preset] = {}
        for preset in presets:
            if preset.name in self._presets:
                raise CatalogError(f"preset {preset.name} is defined twice")
            self._presets[preset.name] = preset
        self._lower = {name.lower(): p for name, p in self._presets.items()}

    @classmethod
    def load(cls, directory: Path | None = None) -> PresetRegistry:
        """Read every family file in ``directory`` (default ``<catalog>/models``)."""
        directory = directory or catalog_dir() / "models"
        presets: list[Preset] = []
        for path in sorted(directory.glob("*.yaml")):
            try:
                doc = yaml.safe_load(path.read_text()) or {}
                defaults = doc.get("defaults", {})
                tuning_defaults = doc.get("tuningDefaults") or defaults.pop("tuningDefaults", {})
                for raw in doc.get("presets", []):
                    entry = _merge({"family": doc["family"], **defaults}, raw)
                    if "tuning" in entry and tuning_defaults:
                        entry["tuning"] = _merge(tuning_defaults, entry["tuning"])
                    presets.append(Preset.model_validate(entry))
            except (ValidationError, yaml.YAMLError, KeyError, TypeError) as e:
                raise CatalogError(f"{path}: {e}") from e
        if not presets:
            raise CatalogError(f"no presets found in {directory}")
        return cls(presets)

    def has(self, name: str) -> bool:
        """Whether ``name`` is a preset (case-insensitive)."""
        return name.lower() in self._lower

    def get(self, name: str) -> Preset:
        """The preset, or :class:`UnknownPresetError` with suggestions."""
        preset = self._presets.get(name) or self._lower.get(name.lower())
        if preset is None:
            raise UnknownPresetError(name, self.suggest(name))
        return preset

    def names(self) -> builtins.list[str]:
        """All preset names, sorted."""
        return sorted(self._presets)

    def list(self) -> builtins.list[Preset]:
        """All presets, sorted by name."""
        return [self._presets[n] for n in self.names()]

    def tunable(self) -> builtins.list[str]:
        """Names of presets that support tuning."""
        return [p.name for p in self.list() if p.supports_tuning]

    def suggest(self, name: str, limit: int = 3) -> builtins.list[str]:
        """Preset names close to ``name``."""
        return difflib.get_close_matches(name.lower(), list(self._lower), n=limit, cutoff=0.5)

    def fitting_skus(
        self, preset: Preset, catalog: SkuCatalog, cloud: str | None = None
    ) -> builtins.list[Sku]:
        """GPU SKUs on which one node serves ``preset``, smallest total GPU memory first
        (:func:`kaito.presets.cpu.fitting_cpu_skus` lists the CPU ones)."""
        fits = [s for s in catalog.list(cloud) if not check_fit(preset, s, 1)]
        return sorted(fits, key=lambda s: (s.gpu_memory_gib, s.gpu_count, s.name))


@cache
def default_registry() -> PresetRegistry:
    """The registry from the default catalog location, loaded once per process."""
    return PresetRegistry.load()
