"""Helpers for the tuning tests: generated datasets and training configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# Upstream's default ConfigMaps (chart lora-params.yaml / qlora-params.yaml, v0.4): the same files the
# controller writes into a workspace's namespace (this venv cannot import the operator package).
TEMPLATES_DIR = Path(__file__).resolve().parents[3] / "presets" / "tuning" / "templates"


def default_template(method: str) -> str:
    """``training_config.yaml`` of the default ConfigMap for ``method`` (``lora`` or ``qlora``)."""
    doc = yaml.safe_load((TEMPLATES_DIR / f"{method}-params.yaml").read_text())
    text = doc["data"]["training_config.yaml"]
    assert isinstance(text, str)
    return text


LORA_TEMPLATE = default_template("lora")
QLORA_TEMPLATE = default_template("qlora")

QUESTIONS = [
    ("What schedules pods?", "Kubernetes schedules pods onto nodes."),
    ("What does KAITO deploy?", "KAITO deploys a model preset."),
    ("Say hello.", "Hello world! How are you today?"),
    ("What jumps?", "The quick brown fox jumps over the lazy dog."),
]


def conversational_rows(n: int = 8) -> list[dict[str, Any]]:
    """Rows in the OAI-style ``messages`` shape (like the dolly-15k parquet of upstream's example)."""
    rows = []
    for i in range(n):
        q, a = QUESTIONS[i % len(QUESTIONS)]
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You are helpful."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a},
                ]
            }
        )
    return rows


def prompt_completion_rows(n: int = 8) -> list[dict[str, Any]]:
    """Rows with ``prompt`` and ``completion`` columns."""
    return [{"prompt": QUESTIONS[i % 4][0] + " ", "completion": QUESTIONS[i % 4][1]} for i in range(n)]


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as a parquet file (pyarrow infers the nested list<struct> type of messages)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_config(
    path: Path, model_dir: Path, output_dir: Path, *, sections: dict[str, dict[str, Any]] | None = None
) -> Path:
    """A small CPU training config for the tiny model: upstream's LoRA template with overrides."""
    data = yaml.safe_load(LORA_TEMPLATE)
    root = data["training_config"]
    root["ModelConfig"].update(
        {"pretrained_model_name_or_path": str(model_dir), "torch_dtype": "float32", "device_map": "cpu"}
    )
    root["LoraConfig"].update({"target_modules": ["q_proj", "v_proj"]})
    root["TrainingArguments"].update(
        {
            "output_dir": str(output_dir),
            "max_steps": 4,
            "learning_rate": 0.01,
            "save_strategy": "no",
            "logging_steps": 1,
            "per_device_train_batch_size": 2,
            "seed": 0,
            "use_cpu": True,
            "dataloader_num_workers": 0,
        }
    )
    for name, values in (sections or {}).items():
        root.setdefault(name, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
