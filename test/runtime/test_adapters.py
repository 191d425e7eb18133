"""LoRA adapters from the adapters directory, merged by strength (peft weighted merge)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from kaito_inference.adapters import AdapterError, discover_adapters
from runtime_support import RunningServer, http_get, http_post, make_config

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(90)]

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
CHAT = {
    "prompt": "Hello world",
    "return_full_text": False,
    "generate_kwargs": {"do_sample": False, "max_new_tokens": 16},
}


def make_lora(base_dir: Path, out_dir: Path, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """Train-free LoRA: random A and B (non-zero B, unlike peft's default init) saved like a tuning job would."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out_dir)
    # Delta of every targeted weight: scaling * B @ A.
    deltas: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight
            key = name.replace("base_model.model.", "") + ".weight"
            deltas[key] = (b @ a * module.scaling["default"]).detach().clone()
    return deltas


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adapters-src")
    first = make_lora(tiny_model_dir, root / "adapter-one", seed=1)
    second = make_lora(tiny_model_dir, root / "adapter-two", seed=2, rank=2)
    return {"root": root, "adapter-one": first, "adapter-two": second}


def adapter_dir(tmp_path: Path, src: Path, names: list[str]) -> Path:
    """An /mnt/adapter look-alike holding the named adapters (as the init containers copy them)."""
    import shutil

    target = tmp_path / "mnt-adapter"
    target.mkdir()
    for name in names:
        shutil.copytree(src / name, target / name)
    return target


def result(server: RunningServer) -> str:
    r = http_post(server.url + "/chat", json=CHAT)
    assert r.status_code == 200, r.text
    return str(r.json()["Result"])


def test_adapter_changes_output_and_zero_strength_is_base(
    tiny_model_dir: Path, adapters: dict[str, Any], tmp_path: Path, server_factory: Any, monkeypatch: Any
) -> None:
    base = result(server_factory(make_config(tiny_model_dir)))
    mnt = adapter_dir(tmp_path, adapters["root"], ["adapter-one"])

    monkeypatch.delenv("adapter-one", raising=False)  # no env var: strength 1.0
    with_adapter = server_factory(make_config(tiny_model_dir, adapters_dir=mnt))
    assert with_adapter.runtime.state == "ready", with_adapter.failures
    assert result(with_adapter) != base
    models = http_get(with_adapter.url + "/v1/models").json()
    assert models["data"][0]["adapters"] == [{"name": "adapter-one", "strength": 1.0}]

    monkeypatch.setenv("adapter-one", "0.0")
    zero = server_factory(make_config(tiny_model_dir, adapters_dir=mnt))
    assert zero.runtime.state == "ready", zero.failures
    assert result(zero) == base


def test_two_adapters_combine_by_strength(
    tiny_model_dir: Path, adapters: dict[str, Any], tmp_path: Path, server_factory: Any, monkeypatch: Any
) -> None:
    from transformers import AutoModelForCausalLM

    mnt = adapter_dir(tmp_path, adapters["root"], ["adapter-one", "adapter-two"])
    monkeypatch.setenv("adapter-one", "1.0")
    monkeypatch.setenv("adapter-two", "0.5")
    both = server_factory(make_config(tiny_model_dir, adapters_dir=mnt))
    assert both.runtime.state == "ready", both.failures

    # The merged weights are exactly W + 1.0 * delta_one + 0.5 * delta_two (cat combination).
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    merged = both.runtime.engine.model.state_dict()
    assert set(adapters["adapter-one"]) == set(adapters["adapter-two"])
    for key, delta_one in adapters["adapter-one"].items():
        expected = base[key] + 1.0 * delta_one + 0.5 * adapters["adapter-two"][key]
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-5)
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[untouched], base[untouched])

    combined = result(both)
    (tmp_path / "one").mkdir()
    only_one = adapter_dir(tmp_path / "one", adapters["root"], ["adapter-one"])
    single = server_factory(make_config(tiny_model_dir, adapters_dir=only_one))
    assert result(single) != combined


def write_bad(tmp_path: Path, kind: str) -> Path:
    mnt = tmp_path / "mnt"
    bad = mnt / "broken"
    bad.mkdir(parents=True)
    if kind == "config-missing":
        (bad / "adapter_model.safetensors").write_bytes(b"x")
    elif kind == "config-garbage":
        (bad / "adapter_config.json").write_text("{not json")
        (bad / "adapter_model.safetensors").write_bytes(b"x")
    elif kind == "weights-missing":
        (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    elif kind == "not-lora":
        (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
        (bad / "adapter_model.safetensors").write_bytes(b"x")
    return mnt


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("empty", "directory is empty"),
        ("config-missing", "adapter_config.json is missing"),
        ("config-garbage", "adapter_config.json is unreadable"),
        ("weights-missing", "no weights"),
        ("not-lora", "not supported"),
    ],
)
def test_broken_adapter_is_reported_before_loading(tmp_path: Path, kind: str, fragment: str) -> None:
    with pytest.raises(AdapterError) as err:
        discover_adapters(write_bad(tmp_path, kind), environ={})
    assert "'broken'" in str(err.value)
    assert fragment in str(err.value)


def test_bad_strength_is_reported(adapters: dict[str, Any], tmp_path: Path) -> None:
    mnt = adapter_dir(tmp_path, adapters["root"], ["adapter-one"])
    with pytest.raises(AdapterError, match="strength 'strong'"):
        discover_adapters(mnt, environ={"adapter-one": "strong"})
    assert discover_adapters(mnt, environ={"adapter-one": "0.25"})[0].strength == 0.25
    assert discover_adapters(tmp_path / "absent", environ={}) == []


def test_corrupt_weights_fail_the_load(
    tiny_model_dir: Path, adapters: dict[str, Any], tmp_path: Path, server_factory: Any
) -> None:
    mnt = adapter_dir(tmp_path, adapters["root"], ["adapter-one"])
    (mnt / "adapter-one" / "adapter_model.safetensors").write_bytes(b"\x00garbage, not safetensors")
    server = server_factory(make_config(tiny_model_dir, adapters_dir=mnt))
    assert server.runtime.state == "failed"
    assert "adapter 'adapter-one'" in server.failures[0]
    assert "cannot be loaded" in server.failures[0]
    assert http_get(server.url + "/health").status_code == 503
