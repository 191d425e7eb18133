"""Parsing of upstream's training_config.yaml: default templates, strictness, output dir rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kaito_tuning.config import ConfigError, load_config, parse_config
from tuning_support import LORA_TEMPLATE, QLORA_TEMPLATE

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(60)]


def test_upstream_lora_template_parses(tmp_path: Path) -> None:
    path = tmp_path / "training_config.yaml"
    path.write_text(LORA_TEMPLATE)
    cfg = load_config(path, environ={})
    assert not cfg.quantized
    assert (
        cfg.model.torch_dtype == "bfloat16" and cfg.model.local_files_only and cfg.model.device_map == "auto"
    )
    assert cfg.lora == {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    assert cfg.output_dir == "/mnt/results"
    assert cfg.training["save_strategy"] == "epoch" and cfg.training["report_to"] == "none"
    assert cfg.collator == {"mlm": True}
    assert cfg.dataset.train_test_split == 1 and cfg.dataset.shuffle_dataset


def test_upstream_qlora_template_parses_and_is_quantized() -> None:
    cfg = parse_config(yaml.safe_load(QLORA_TEMPLATE), environ={})
    assert cfg.quantized
    assert cfg.quantization.load_in_4bit and cfg.quantization.bnb_4bit_quant_type == "nf4"
    assert cfg.quantization.bnb_4bit_use_double_quant


def test_instantiates_into_the_library_classes(tmp_path: Path) -> None:
    from kaito_tuning.train import training_arguments
    from peft import LoraConfig

    cfg = parse_config(yaml.safe_load(LORA_TEMPLATE), environ={})
    args = training_arguments(cfg, tmp_path)
    assert args.per_device_train_batch_size == 1 and args.output_dir == str(tmp_path)
    assert LoraConfig(**cfg.lora).r == 8


def test_empty_and_missing_sections_use_defaults() -> None:
    cfg = parse_config({"training_config": {"LoraConfig": None}}, environ={})
    assert cfg.output_dir == "/mnt/results"
    assert cfg.model.pretrained_model_name_or_path == "/workspace/tfs/weights"
    assert cfg.dataset.response_column == "text" and cfg.dataset.train_test_split == 0.8


def test_unknown_section_is_rejected() -> None:
    with pytest.raises(
        ConfigError, match=r"unrecognized section 'TrainingArgs'.*did you mean 'TrainingArguments'"
    ):
        parse_config({"training_config": {"TrainingArgs": {"max_steps": 1}}}, environ={})


@pytest.mark.parametrize(
    ("section", "key", "hint"),
    [
        ("TrainingArguments", "learnin_rate", "learning_rate"),
        ("LoraConfig", "alpha", "lora_alpha"),
        ("ModelConfig", "torch_dtpe", "torch_dtype"),
        ("DatasetConfig", "shuffle", "shuffle_seed"),
        ("DataCollator", "mlm_prob", "mlm_probability"),
        ("QuantizationConfig", "load_4bit", "load_in_4bit"),
    ],
)
def test_unknown_key_is_rejected_with_a_suggestion(section: str, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"training_config": {section: {key: 1}}}, environ={})
    assert section in str(err.value) and repr(key) in str(err.value) and hint in str(err.value)


def test_top_level_shape_is_checked() -> None:
    with pytest.raises(ConfigError, match="training_config"):
        parse_config({"ModelConfig": {}}, environ={})
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config({"training_config": {"LoraConfig": [1, 2]}}, environ={})


def test_bad_values_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid torch dtype"):
        parse_config({"training_config": {"ModelConfig": {"torch_dtype": "float128"}}}, environ={})
    with pytest.raises(ConfigError, match="both be true"):
        parse_config(
            {"training_config": {"QuantizationConfig": {"load_in_4bit": True, "load_in_8bit": True}}},
            environ={},
        )
    with pytest.raises(ConfigError, match="train_test_split"):
        parse_config({"training_config": {"DatasetConfig": {"train_test_split": 0}}}, environ={})
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("training_config: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad_yaml)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("/mnt/results", "/mnt/results"), ("results", "/mnt/results"), ("out/../adapter", "/mnt/adapter")],
)
def test_output_dir_lives_under_mnt(value: str, expected: str) -> None:
    cfg = parse_config({"training_config": {"TrainingArguments": {"output_dir": value}}}, environ={})
    assert cfg.output_dir == expected


def test_output_dir_mnt_itself_is_refused() -> None:
    with pytest.raises(ConfigError, match="below /mnt"):
        parse_config({"training_config": {"TrainingArguments": {"output_dir": "x/.."}}}, environ={})


def test_default_target_modules_from_env() -> None:
    env = {"DEFAULT_TARGET_MODULES": "k_proj,q_proj, v_proj"}
    cfg = parse_config(yaml.safe_load(LORA_TEMPLATE), environ=env)
    assert cfg.lora["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    explicit = parse_config({"training_config": {"LoraConfig": {"target_modules": ["o_proj"]}}}, environ=env)
    assert explicit.lora["target_modules"] == ["o_proj"]
