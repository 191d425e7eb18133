"""The training flow: tokenizer, base model (4/8-bit for QLoRA), LoRA wrapping, dataset, Trainer, save.

Follows upstream's ``fine_tuning.py`` (v0.4) without trl: rows are rendered and tokenized here
(``dataset.py``), and transformers' ``Trainer`` runs with ``DataCollatorForLanguageModeling`` built from
the ``DataCollator`` section. Works under ``accelerate launch`` / torchrun (one process per GPU) and as
a plain ``python3`` process on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import ConfigError, TuningConfig
from .dataset import detect_format, load_dataset_rows, max_length, render_texts, split, tokenize

log = logging.getLogger("kaito_tuning")

COMPLETED_MARKER = "fine_tuning_completed.txt"
FAILED_MARKER = "fine_tuning_failed.txt"
RESULTS_FILE = "train_results.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class HardwareError(RuntimeError):
    """The configuration needs hardware or a library this pod does not have (QLoRA without CUDA)."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    steps: int
    train_loss: float
    train_rows: int
    eval_rows: int


def check_quantization_support(cfg: TuningConfig) -> None:
    """QLoRA needs CUDA and bitsandbytes: say so before minutes of model loading, naming the fix."""
    if not cfg.quantized:
        return
    import torch

    if not torch.cuda.is_available():
        raise HardwareError(
            "QLoRA (load_in_4bit/load_in_8bit) needs an NVIDIA GPU with CUDA: bitsandbytes quantizes "
            "on the GPU only and no CUDA device is visible in this container. Run the tuning Job on a GPU "
            "node (instanceType with nvidia.com/gpu), or use method 'lora' (QuantizationConfig "
            "load_in_4bit: false, load_in_8bit: false)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise HardwareError("QLoRA needs the bitsandbytes package in the image: pip install bitsandbytes")


def _dtype(name: str | None) -> Any:
    import torch

    if name is None or name == "auto":
        return name
    aliases = {"float": "float32", "half": "float16"}
    return getattr(torch, aliases.get(name, name))


def bnb_kwargs(cfg: TuningConfig) -> dict[str, Any]:
    """Keyword arguments of transformers' ``BitsAndBytesConfig`` for the QLoRA settings."""
    q = cfg.quantization
    kwargs: dict[str, Any] = {
        "load_in_4bit": q.load_in_4bit or cfg.model.load_in_4bit,
        "load_in_8bit": q.load_in_8bit or cfg.model.load_in_8bit,
        "llm_int8_threshold": q.llm_int8_threshold,
        "llm_int8_skip_modules": q.llm_int8_skip_modules,
        "llm_int8_enable_fp32_cpu_offload": q.llm_int8_enable_fp32_cpu_offload,
        "llm_int8_has_fp16_weight": q.llm_int8_has_fp16_weight,
        "bnb_4bit_compute_dtype": _dtype(q.bnb_4bit_compute_dtype),
        "bnb_4bit_quant_type": q.bnb_4bit_quant_type,
        "bnb_4bit_use_double_quant": q.bnb_4bit_use_double_quant,
    }
    if q.bnb_4bit_quant_storage:
        kwargs["bnb_4bit_quant_storage"] = _dtype(q.bnb_4bit_quant_storage)
    return kwargs


def _bnb_config(cfg: TuningConfig) -> Any:
    # Constructing it needs bitsandbytes installed (it checks the version), hence after the check.
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**bnb_kwargs(cfg))  # type: ignore[no-untyped-call]


def _common_load_args(cfg: TuningConfig) -> dict[str, Any]:
    m = cfg.model
    args: dict[str, Any] = {
        "local_files_only": m.local_files_only,
        "revision": m.revision,
        "trust_remote_code": m.trust_remote_code,
        "force_download": m.force_download,
    }
    if m.cache_dir:
        args["cache_dir"] = m.cache_dir
    if m.proxies:
        args["proxies"] = m.proxies
    return args


def load_tokenizer(cfg: TuningConfig) -> Any:
    """The tokenizer, with a pad token (EOS when it has none) and the configured chat template."""
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
        cfg.model.pretrained_model_name_or_path, **_common_load_args(cfg)
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = cfg.model.chat_template
    if template:
        path = Path(template)
        # A short value naming an existing file is a file; anything else is the template itself.
        tokenizer.chat_template = (
            path.read_text(encoding="utf-8") if len(template) < 4096 and path.is_file() else template
        )
    return tokenizer


def _device_map(cfg: TuningConfig) -> Any:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        # One full copy per process under accelerate/torchrun (DDP): pin it to this process's GPU, or
        # leave placement to the Trainer on CPU ("auto" would try to split the model).
        return {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else None
    return cfg.model.device_map


def load_model(cfg: TuningConfig) -> Any:
    """The base model (quantized for QLoRA) wrapped with LoRA; only the adapter is trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs = _common_load_args(cfg)
    if cfg.model.from_tf:
        kwargs["from_tf"] = True
    if cfg.model.state_dict is not None:
        kwargs["state_dict"] = cfg.model.state_dict
    if cfg.model.torch_dtype is not None:
        kwargs["dtype"] = _dtype(cfg.model.torch_dtype)
    device_map = _device_map(cfg)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if cfg.quantized:
        kwargs["quantization_config"] = _bnb_config(cfg)
    # transformers and peft are not typed precisely enough for strict checking of this glue.
    model: Any = AutoModelForCausalLM.from_pretrained(cfg.model.pretrained_model_name_or_path, **kwargs)
    gradient_checkpointing = bool(cfg.training.get("gradient_checkpointing", False))
    if cfg.quantized:
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed frozen embeddings otherwise cut the graph
    try:
        lora = LoraConfig(**cfg.lora)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"LoraConfig: {exc}") from None
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:  # e.g. target_modules the model does not have
        raise ConfigError(f"LoraConfig does not fit the model: {exc}") from None
    model.config.use_cache = False
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable parameters: %d of %d (%.4f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model


def _collator(cfg: TuningConfig, tokenizer: Any) -> Any:
    from transformers import DataCollatorForLanguageModeling

    kwargs = dict(cfg.collator)
    if kwargs.get("mlm", True) and tokenizer.mask_token is None:
        # Upstream's templates say mlm: true; causal LMs have no mask token, so it means causal LM.
        log.info("DataCollator.mlm is true but the tokenizer has no mask token: training as a causal LM")
        kwargs["mlm"] = False
    try:
        return DataCollatorForLanguageModeling(tokenizer=tokenizer, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"DataCollator: {exc}") from None


def training_arguments(cfg: TuningConfig, output_dir: Path) -> Any:
    """transformers ``TrainingArguments`` from the section (its own checks become config errors)."""
    from transformers import TrainingArguments

    values = dict(cfg.training)
    values["output_dir"] = str(output_dir)
    try:
        return TrainingArguments(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"TrainingArguments: {exc}") from None


def clear_markers(output_dir: Path) -> None:
    """Remove markers of an earlier attempt so a waiting pusher never sees a stale one."""
    for name in (COMPLETED_MARKER, FAILED_MARKER):
        (output_dir / name).unlink(missing_ok=True)


def train(cfg: TuningConfig, data_dir: Path, output_dir: Path) -> TrainResult:
    """Run the whole fine-tuning and write the adapter, results and completion marker to ``output_dir``."""
    from transformers import Trainer

    check_quantization_support(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    clear_markers(output_dir)
    args = training_arguments(cfg, output_dir)

    tokenizer = load_tokenizer(cfg)
    rows = load_dataset_rows(data_dir, cfg.dataset)
    fmt = detect_format(rows, cfg.dataset)
    log.info("dataset: %d rows, %s format (columns %s)", len(rows), fmt.kind, ", ".join(fmt.columns))
    texts = render_texts(rows, fmt, tokenizer)

    model = load_model(cfg)
    features = tokenize(texts, tokenizer, max_length(tokenizer, model.config))
    train_set, eval_set = split(features, cfg.dataset)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,  # a list of features is a map-style dataset
        eval_dataset=eval_set,
        data_collator=_collator(cfg, tokenizer),
    )
    output = trainer.train()
    result = TrainResult(
        output_dir=output_dir,
        steps=int(output.global_step),
        train_loss=float(output.training_loss),
        train_rows=len(train_set),
        eval_rows=len(eval_set or []),
    )
    if trainer.is_world_process_zero():
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
            str(output_dir), safe_serialization=True
        )
        missing = [name for name in ADAPTER_FILES if not (output_dir / name).is_file()]
        if missing:
            raise RuntimeError(f"saving the adapter did not produce {', '.join(missing)} in {output_dir}")
        results = {
            "steps": result.steps,
            "train_loss": result.train_loss,
            "train_rows": result.train_rows,
            "eval_rows": result.eval_rows,
            "metrics": output.metrics,
        }
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str) + "\n")
        # Written last: its presence means the adapter files are complete (the pusher waits on it).
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        (output_dir / COMPLETED_MARKER).write_text(f"Fine-Tuning completed at {stamp}\n")
    return result
