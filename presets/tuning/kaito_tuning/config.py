"""The upstream ``training_config.yaml`` format, parsed strictly.

The file holds one mapping ``training_config`` with the sections ``ModelConfig``, ``QuantizationConfig``,
``LoraConfig``, ``TrainingArguments``, ``DatasetConfig`` and ``DataCollator`` (each optional). Own
sections are pydantic models that forbid unknown keys; ``LoraConfig``, ``TrainingArguments`` and
``DataCollator`` are checked against the init fields of peft's ``LoraConfig``, transformers'
``TrainingArguments`` and ``DataCollatorForLanguageModeling`` (what upstream's HfArgumentParser accepted),
so a typo is a clear error naming the section, the key and the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

SECTIONS = (
    "ModelConfig",
    "QuantizationConfig",
    "LoraConfig",
    "TrainingArguments",
    "DatasetConfig",
    "DataCollator",
)
DEFAULT_CONFIG_PATH = "/mnt/config/training_config.yaml"
DEFAULT_OUTPUT_DIR = "/mnt/results"
MOUNT_ROOT = "/mnt"
TORCH_DTYPES = ("auto", "float32", "float16", "bfloat16", "float", "half", "float64")


class ConfigError(ValueError):
    """The training configuration is missing, malformed or names unknown sections or keys."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Section):
    """How the base model and tokenizer are loaded (upstream ``cli.py`` ModelConfig)."""

    pretrained_model_name_or_path: str = "/workspace/tfs/weights"
    state_dict: dict[str, Any] | None = None
    cache_dir: str | None = None
    from_tf: bool = False
    force_download: bool = False
    resume_download: bool = False
    proxies: dict[str, str] | None = None
    output_loading_info: bool = False
    local_files_only: bool = False
    revision: str = "main"
    trust_remote_code: bool = False
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    torch_dtype: str | None = None
    device_map: str | dict[str, Any] | None = "auto"
    chat_template: str | None = None

    @field_validator("torch_dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in TORCH_DTYPES:
            raise ValueError(f"invalid torch dtype {value!r}; use one of {', '.join(TORCH_DTYPES)}")
        return value


class QuantizationConfig(_Section):
    """bitsandbytes settings; 4- or 8-bit loading turns LoRA into QLoRA."""

    quant_method: str = "bitsandbytes"
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: str = "float32"
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: str | None = None

    @field_validator("bnb_4bit_quant_type")
    @classmethod
    def _quant_type(cls, value: str) -> str:
        if value not in ("fp4", "nf4"):
            raise ValueError(f"bnb_4bit_quant_type must be fp4 or nf4, not {value!r}")
        return value


class DatasetConfig(_Section):
    """Where the dataset is and which columns hold what (upstream ``DatasetConfig``).

    ``messages_column`` names a conversational column; ``context_column`` + ``response_column`` name a
    prompt/completion pair; ``response_column`` alone names a plain-text column (default ``text``).
    """

    dataset_path: str | None = None
    dataset_extension: str | None = None
    shuffle_dataset: bool = True
    shuffle_seed: int = 42
    context_column: str | None = None
    response_column: str = "text"
    messages_column: str | None = None
    train_test_split: float = 0.8

    @field_validator("train_test_split")
    @classmethod
    def _split(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"train_test_split must be in (0, 1], got {value}")
        return value


@dataclasses.dataclass
class TuningConfig:
    """All six sections, validated. ``lora``, ``training`` and ``collator`` are raw keyword mappings
    already checked against their classes; they are instantiated where torch is imported anyway."""

    model: ModelConfig
    quantization: QuantizationConfig
    dataset: DatasetConfig
    lora: dict[str, Any]
    training: dict[str, Any]
    collator: dict[str, Any]

    @property
    def quantized(self) -> bool:
        """True for QLoRA (4- or 8-bit base weights)."""
        q, m = self.quantization, self.model
        return q.load_in_4bit or q.load_in_8bit or m.load_in_4bit or m.load_in_8bit

    @property
    def output_dir(self) -> str:
        """``TrainingArguments.output_dir``, relative paths under /mnt (the controller's rule)."""
        return str(self.training["output_dir"])


def _init_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _check_keys(section: str, values: dict[str, Any], allowed: list[str]) -> None:
    for key in values:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{section}: unknown key {key!r}{hint}")


def lora_fields() -> list[str]:
    """Keys accepted in ``LoraConfig`` (peft's LoraConfig init fields)."""
    from peft import LoraConfig

    return _init_fields(LoraConfig)


def training_fields() -> list[str]:
    """Keys accepted in ``TrainingArguments`` (transformers' init fields)."""
    from transformers import TrainingArguments

    return _init_fields(TrainingArguments)


def collator_fields() -> list[str]:
    """Keys accepted in ``DataCollator`` (DataCollatorForLanguageModeling, minus the tokenizer)."""
    from transformers import DataCollatorForLanguageModeling

    return [name for name in _init_fields(DataCollatorForLanguageModeling) if name != "tokenizer"]


def normalize_output_dir(value: Any) -> str:
    """Relative output dirs live under /mnt (as the controller mounts them); /mnt itself is refused."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"TrainingArguments: output_dir must be a non-empty string, got {value!r}")
    path = PurePosixPath(value)
    if not path.is_absolute():
        path = PurePosixPath(MOUNT_ROOT) / path
    normalized = os.path.normpath(str(path))
    if normalized == MOUNT_ROOT:
        raise ConfigError("TrainingArguments: output_dir must be a directory below /mnt, not /mnt itself")
    return normalized


def _section(root: dict[str, Any], name: str) -> dict[str, Any]:
    value = root.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping, got {type(value).__name__}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{name}: keys must be strings, got {bad[0]!r}")
    return dict(value)


def _pydantic(cls: type[_Section], name: str, values: dict[str, Any]) -> Any:
    try:
        return cls(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(section)"
            if err["type"] == "extra_forbidden":
                allowed = list(cls.model_fields)
                close = difflib.get_close_matches(str(err["loc"][0]), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"unknown key {loc!r}{hint}")
            else:
                problems.append(f"{loc}: {err['msg']}")
        raise ConfigError(f"{name}: " + "; ".join(problems)) from None


def parse_config(data: Any, environ: dict[str, str] | None = None) -> TuningConfig:
    """Validate the parsed YAML document (``{"training_config": {...}}``)."""
    env = dict(os.environ) if environ is None else environ
    if not isinstance(data, dict) or "training_config" not in data:
        raise ConfigError("the file must contain a top-level 'training_config' mapping")
    extra_top = [k for k in data if k != "training_config"]
    if extra_top:
        raise ConfigError(f"unknown top-level key {extra_top[0]!r}; only 'training_config' is allowed")
    root = data["training_config"]
    if root is None:
        root = {}
    if not isinstance(root, dict):
        raise ConfigError("'training_config' must be a mapping of sections")
    for name in root:
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), SECTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unrecognized section {name!r}{hint} (sections: {', '.join(SECTIONS)})")

    model = _pydantic(ModelConfig, "ModelConfig", _section(root, "ModelConfig"))
    quantization = _pydantic(QuantizationConfig, "QuantizationConfig", _section(root, "QuantizationConfig"))
    dataset = _pydantic(DatasetConfig, "DatasetConfig", _section(root, "DatasetConfig"))
    if quantization.load_in_4bit and quantization.load_in_8bit:
        raise ConfigError("QuantizationConfig: load_in_4bit and load_in_8bit cannot both be true")

    lora = _section(root, "LoraConfig")
    _check_keys("LoraConfig", lora, lora_fields())
    lora.setdefault("task_type", "CAUSAL_LM")
    if "target_modules" not in lora and env.get("DEFAULT_TARGET_MODULES"):
        # Upstream's per-preset default (e.g. phi-3), set by the controller as an env var.
        lora["target_modules"] = [m.strip() for m in env["DEFAULT_TARGET_MODULES"].split(",") if m.strip()]

    training = _section(root, "TrainingArguments")
    _check_keys("TrainingArguments", training, training_fields())
    training["output_dir"] = normalize_output_dir(training.get("output_dir", DEFAULT_OUTPUT_DIR))
    # transformers would otherwise report to every tracker it finds installed (tensorboard, wandb...).
    training.setdefault("report_to", "none")

    collator = _section(root, "DataCollator")
    _check_keys("DataCollator", collator, collator_fields())
    return TuningConfig(model, quantization, dataset, lora, training, collator)


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> TuningConfig:
    """Read and validate ``training_config.yaml``."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {file} does not exist (mount the ConfigMap at /mnt/config)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {file}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file} is not valid YAML: {exc}") from None
    return parse_config(data, environ)
