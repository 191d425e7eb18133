"""The trainer end to end: train on CPU, push to a registry with a push secret, pull, serve the adapter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from kaito_tuning.cli import main
from kaito_tuning.train import COMPLETED_MARKER, FAILED_MARKER, RESULTS_FILE
from registry_support import PASSWORD, USER, Registry, docker_config
from runtime_support import make_config
from safetensors.torch import load_file
from tuning_support import (
    QLORA_TEMPLATE,
    conversational_rows,
    prompt_completion_rows,
    write_config,
    write_parquet,
)

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[3]
TRAINER = REPO / "presets" / "tuning" / "fine_tuning.py"
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """Run a program the way the Job's container does (own process, exit code, stderr)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    return subprocess.run(
        cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=170, check=False
    )


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run fine_tuning.py once (4 steps on a generated conversational parquet) for this module's tests."""
    root = tmp_path_factory.mktemp("tuning-job")
    data = root / "mnt" / "data"
    # Named as the URL downloader names the seed's dolly parquet.
    write_parquet(data / "train-00000-of-00001.parquet_download_true", conversational_rows(8))
    results = root / "mnt" / "results"
    config = write_config(root / "mnt" / "config" / "training_config.yaml", tiny_model_dir, results)
    term = root / "termination-log"
    proc = run(
        [sys.executable, str(TRAINER), "--data-dir", str(data), "--termination-log", str(term)],
        YAML_FILE_PATH=str(config),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"results": results, "term": term, "root": root}


def test_trainer_writes_a_trained_adapter(trained: dict[str, Path]) -> None:
    results = trained["results"]
    for name in [*ADAPTER_FILES, COMPLETED_MARKER, RESULTS_FILE]:
        assert (results / name).is_file(), name
    assert (results / COMPLETED_MARKER).read_text().startswith("Fine-Tuning completed at ")
    summary = json.loads((results / RESULTS_FILE).read_text())
    assert summary["steps"] == 4 and summary["train_rows"] == 8 and summary["eval_rows"] == 0
    assert math.isfinite(summary["train_loss"])
    assert trained["term"].read_text().startswith(f"adapter written to {results} (4 steps")

    config = json.loads((results / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    tensors = load_file(results / "adapter_model.safetensors")
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    assert len(lora_b) == 4  # 2 layers x (q_proj, v_proj)
    # peft initialises B to zero: non-zero B means the optimiser really trained the adapter.
    assert all(float(t.abs().sum()) > 0 for t in lora_b)


def test_adapter_goes_through_the_registry_into_the_inference_server(
    trained: dict[str, Path],
    auth_registry: Registry,
    tiny_model_dir: Path,
    tmp_path: Path,
    server_factory: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    results = trained["results"]
    # The imagePushSecret (kubernetes.io/dockerconfigjson) projected as config.json, as the Job mounts it.
    secret = tmp_path / "docker" / "config"
    secret.mkdir(parents=True)
    docker_config(secret / "config.json", auth_registry.host, USER, PASSWORD)
    image = f"{auth_registry.host}/kaito/tuned-adapter:0.0.1"
    files = [arg for name in ADAPTER_FILES for arg in ("--file", name)]

    push = run(
        [
            sys.executable,
            "-m",
            "presets.oci",
            "push",
            "--docker-config",
            str(secret),
            *files,
            str(results),
            image,
        ],
        OCI_PLAIN_HTTP="true",
    )
    assert push.returncode == 0, push.stderr
    assert push.stdout.startswith(f"pushed {image}@sha256:")
    assert PASSWORD not in push.stdout + push.stderr

    adapters = tmp_path / "mnt" / "adapter"
    pull = run(
        [
            sys.executable,
            "-m",
            "presets.oci",
            "pull",
            "--plain-http",
            "--docker-config",
            str(secret / "config.json"),
            image,
            str(adapters / "tuned-adapter"),
        ]
    )
    assert pull.returncode == 0, pull.stderr
    assert sorted(p.name for p in (adapters / "tuned-adapter").iterdir()) == ADAPTER_FILES
    for name in ADAPTER_FILES:
        assert (adapters / "tuned-adapter" / name).read_bytes() == (results / name).read_bytes()

    monkeypatch.setenv("tuned-adapter", "1.0")
    server = server_factory(make_config(tiny_model_dir, adapters_dir=adapters))
    assert server.runtime.state == "ready", server.failures
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["adapters"] == [{"name": "tuned-adapter", "strength": 1.0}]
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    merged = server.runtime.engine.model.state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[key], base[key])  # the trained delta is merged
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged[untouched], base[untouched])
    reply = httpx.post(
        server.url + "/chat", json={"prompt": "Hello", "generate_kwargs": {"max_new_tokens": 4}}
    )
    assert reply.status_code == 200 and reply.json()["Result"]


def test_prompt_completion_csv_with_eval_split_in_bfloat16(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Upstream's template dtype (bfloat16) on CPU, a CSV dataset, and an evaluation split."""
    import csv

    data = tmp_path / "data"
    data.mkdir()
    with (data / "train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(prompt_completion_rows(8))
    results = tmp_path / "results"
    config = write_config(
        tmp_path / "cfg.yaml",
        tiny_model_dir,
        results,
        sections={
            "ModelConfig": {"torch_dtype": "bfloat16"},
            "DatasetConfig": {"train_test_split": 0.75},
            "TrainingArguments": {"max_steps": 2, "eval_strategy": "steps", "eval_steps": 2},
        },
    )
    term = tmp_path / "term"
    assert main(["--config", str(config), "--data-dir", str(data), "--termination-log", str(term)]) == 0, (
        term.read_text()
    )
    summary = json.loads((results / RESULTS_FILE).read_text())
    assert (summary["train_rows"], summary["eval_rows"], summary["steps"]) == (6, 2, 2)
    assert all((results / name).is_file() for name in ADAPTER_FILES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_qlora_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "training_config.yaml"
    results = tmp_path / "results"
    config.write_text(QLORA_TEMPLATE.replace('"/mnt/results"', f'"{results}"'))
    term = tmp_path / "term"
    # The model path does not exist: the check must come before any loading.
    code = main(
        ["--config", str(config), "--data-dir", str(tmp_path / "data"), "--termination-log", str(term)]
    )
    assert code == 4
    message = term.read_text()
    assert "QLoRA" in message and "needs an NVIDIA GPU with CUDA" in message
    assert "method 'lora'" in message and "GPU node" in message
    assert (results / FAILED_MARKER).read_text().strip() == message.strip()
    assert not (results / COMPLETED_MARKER).exists()


def test_config_and_dataset_errors_exit_with_their_codes(tiny_model_dir: Path, tmp_path: Path) -> None:
    term = tmp_path / "term"
    bad = tmp_path / "bad.yaml"
    bad.write_text("training_config:\n  LoRAConfig:\n    r: 8\n")
    flagged = tmp_path / "flagged-results"
    assert main(["--config", str(bad), "--output-dir", str(flagged), "--termination-log", str(term)]) == 2
    assert "unrecognized section 'LoRAConfig'" in term.read_text() and "LoraConfig" in term.read_text()
    assert (flagged / FAILED_MARKER).read_text().strip() == term.read_text().strip()
    # A refused config still tells a waiting pusher, in the output_dir it names.
    named = tmp_path / "named-results"
    bad.write_text(f"training_config:\n  TrainingArguments:\n    output_dir: {named}\n    learnin_rate: 1\n")
    assert main(["--config", str(bad), "--termination-log", str(term)]) == 2
    assert "did you mean 'learning_rate'" in (named / FAILED_MARKER).read_text()

    data = tmp_path / "data"
    write_parquet(data / "d.parquet", [{"question": "q", "answer": "a"}])
    results = tmp_path / "results"
    config = write_config(tmp_path / "cfg.yaml", tiny_model_dir, results)
    assert main(["--config", str(config), "--data-dir", str(data), "--termination-log", str(term)]) == 3
    assert "columns found 'question', 'answer'" in term.read_text()
    assert (results / FAILED_MARKER).is_file()

    # A config that only transformers can refuse is still a config error, not a crash.
    wrong = write_config(
        tmp_path / "wrong.yaml",
        tiny_model_dir,
        results,
        sections={"TrainingArguments": {"optim": "no-such-optimizer"}},
    )
    write_parquet(data / "d.parquet", conversational_rows(2))
    assert main(["--config", str(wrong), "--data-dir", str(data), "--termination-log", str(term)]) == 2
    assert "TrainingArguments" in term.read_text()


def test_qlora_template_maps_to_bitsandbytes_settings() -> None:
    import yaml
    from kaito_tuning.config import parse_config
    from kaito_tuning.train import bnb_kwargs

    kwargs = bnb_kwargs(parse_config(yaml.safe_load(QLORA_TEMPLATE), environ={}))
    assert kwargs["load_in_4bit"] and not kwargs["load_in_8bit"]
    assert (kwargs["bnb_4bit_quant_type"], kwargs["bnb_4bit_compute_dtype"]) == ("nf4", torch.bfloat16)
    assert kwargs["bnb_4bit_use_double_quant"]


def test_qlora_on_a_gpu_without_bitsandbytes_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import yaml
    from kaito_tuning.config import parse_config
    from kaito_tuning.train import HardwareError, check_quantization_support

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU half of the check only
    with pytest.raises(HardwareError, match="pip install bitsandbytes"):
        check_quantization_support(parse_config(yaml.safe_load(QLORA_TEMPLATE), environ={}))
