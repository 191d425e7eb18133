"""Dataset files and row shapes: every format loads, shapes are recognised, unknown shapes are named."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from kaito_tuning.config import DatasetConfig
from kaito_tuning.dataset import (
    DatasetError,
    detect_format,
    file_format,
    find_dataset_files,
    load_dataset_rows,
    render_texts,
    split,
    tokenize,
)
from transformers import AutoTokenizer
from tuning_support import conversational_rows, prompt_completion_rows, write_parquet

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(60)]


def write_rows(path: Path, rows: list[dict[str, Any]], fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        return write_parquet(path, rows)
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("fmt", ["parquet", "json", "jsonl", "csv"])
@pytest.mark.parametrize(
    ("rows", "kind"),
    [(conversational_rows(4), "conversational"), (prompt_completion_rows(4), "prompt_completion")],
    ids=["messages", "prompt-completion"],
)
def test_each_format_and_shape(
    tmp_path: Path, fmt: str, rows: list[dict[str, Any]], kind: str, tokenizer: Any
) -> None:
    write_rows(tmp_path / f"train.{fmt}", rows, fmt)
    cfg = DatasetConfig()
    loaded = load_dataset_rows(tmp_path, cfg)
    assert len(loaded) == 4
    detected = detect_format(loaded, cfg)
    assert detected.kind == kind
    texts = render_texts(loaded, detected, tokenizer)
    assert len(texts) == 4
    if kind == "conversational":
        # Rendered by the chat template, which already carries the special tokens.
        assert texts[0] == (
            tokenizer.apply_chat_template(conversational_rows(1)[0]["messages"], tokenize=False),
            False,
        )
    else:
        assert texts[0] == (rows[0]["prompt"] + rows[0]["completion"] + tokenizer.eos_token, True)
    features = tokenize(texts, tokenizer, 64)
    assert all(
        0 < len(f["input_ids"]) <= 64 and len(f["attention_mask"]) == len(f["input_ids"]) for f in features
    )


def test_plain_text_column(tmp_path: Path, tokenizer: Any) -> None:
    write_rows(tmp_path / "d.jsonl", [{"text": "Hello world"}, {"text": ""}, {"text": "Bye"}], "jsonl")
    rows = load_dataset_rows(tmp_path, DatasetConfig())
    fmt = detect_format(rows, DatasetConfig())
    assert (fmt.kind, fmt.columns) == ("text", ("text",))
    assert [t for t, _ in render_texts(rows, fmt, tokenizer)] == [
        "Hello world</s>",
        "Bye</s>",
    ]  # empty row skipped


def test_column_mapping_options(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"instruction": "Say hi.", "output": "Hi!", "chat": conversational_rows(1)[0]["messages"]}]
    write_rows(tmp_path / "d.json", rows, "json")
    loaded = load_dataset_rows(tmp_path, DatasetConfig())
    pc = detect_format(loaded, DatasetConfig(context_column="instruction", response_column="output"))
    assert (pc.kind, pc.columns) == ("prompt_completion", ("instruction", "output"))
    assert render_texts(loaded, pc, tokenizer)[0][0] == "Say hi.Hi!</s>"
    conv = detect_format(loaded, DatasetConfig(messages_column="chat"))
    assert (conv.kind, conv.columns) == ("conversational", ("chat",))
    text = detect_format(loaded, DatasetConfig(response_column="output"))
    assert (text.kind, text.columns) == ("text", ("output",))
    with pytest.raises(DatasetError, match=r"'answer'.*'instruction', 'output', 'chat'"):
        detect_format(loaded, DatasetConfig(context_column="instruction", response_column="answer"))


def test_unknown_columns_are_a_clear_error(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d.parquet", [{"question": "a", "answer": "b"}])
    rows = load_dataset_rows(tmp_path, DatasetConfig())
    with pytest.raises(DatasetError) as err:
        detect_format(rows, DatasetConfig())
    message = str(err.value)
    assert "columns found 'question', 'answer'" in message
    assert "messages" in message and "prompt" in message and "context_column" in message


def test_file_format_from_name() -> None:
    # What the URL downloader names the seed's dolly parquet (query characters become underscores).
    assert file_format(Path("train-00000-of-00001.parquet_download_true")) == "parquet"
    assert file_format(Path("data.jsonl")) == "jsonl"
    assert file_format(Path("data.JSON")) == "json"
    assert file_format(Path("blob"), "csv") == "csv"
    assert file_format(Path("README.md")) is None
    with pytest.raises(DatasetError, match="dataset_extension"):
        file_format(Path("x"), "xlsx")


def test_json_variants(tmp_path: Path) -> None:
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    (tmp_path / "lines.json").write_text('{"text": "c"}\n{"text": "d"}\n')
    rows = load_dataset_rows(tmp_path, DatasetConfig())
    assert [r["text"] for r in rows] == ["c", "d", "a", "b"]  # files in name order


def test_dataset_path_and_missing_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_rows(data / "a.jsonl", [{"text": "a"}], "jsonl")
    write_rows(data / "b.jsonl", [{"text": "b"}], "jsonl")
    (data / "notes.txt").write_text("ignored")
    assert [p.name for p in find_dataset_files(data, DatasetConfig())] == ["a.jsonl", "b.jsonl"]
    assert [p.name for p in find_dataset_files(data, DatasetConfig(dataset_path="b.jsonl"))] == ["b.jsonl"]
    # Upstream's paths are relative to /mnt, i.e. the data directory's parent.
    assert [p.name for p in find_dataset_files(data, DatasetConfig(dataset_path="data/a.jsonl"))] == [
        "a.jsonl"
    ]
    with pytest.raises(DatasetError, match="not found"):
        find_dataset_files(data, DatasetConfig(dataset_path="nope.parquet"))
    only_txt = tmp_path / "txt"
    only_txt.mkdir()
    (only_txt / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no dataset file .* found: notes.txt"):
        find_dataset_files(only_txt, DatasetConfig())
    with pytest.raises(DatasetError, match="does not exist"):
        find_dataset_files(tmp_path / "absent", DatasetConfig())


def test_unreadable_and_malformed_rows(tmp_path: Path, tokenizer: Any) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"unable to load .*broken\.parquet as parquet"):
        load_dataset_rows(tmp_path, DatasetConfig())
    bad = [{"messages": [{"role": "user"}]}]
    fmt = detect_format(bad, DatasetConfig())
    with pytest.raises(DatasetError, match="role' and 'content'"):
        render_texts(bad, fmt, tokenizer)


def test_conversational_needs_a_chat_template(tiny_model_dir: Path) -> None:
    bare = AutoTokenizer.from_pretrained(tiny_model_dir)
    bare.chat_template = None
    rows = conversational_rows(1)
    with pytest.raises(DatasetError, match=r"ModelConfig\.chat_template"):
        render_texts(rows, detect_format(rows, DatasetConfig()), bare)


def test_split_is_seeded() -> None:
    features = [{"input_ids": [i], "attention_mask": [1]} for i in range(10)]
    train, evaluation = split(features, DatasetConfig(train_test_split=0.8, shuffle_seed=7))
    again, _ = split(features, DatasetConfig(train_test_split=0.8, shuffle_seed=7))
    assert len(train) == 8 and evaluation is not None and len(evaluation) == 2
    assert train == again and train != features[:8]
    whole, none = split(features, DatasetConfig(train_test_split=1, shuffle_dataset=False))
    assert whole == features and none is None


def test_chat_template_override_from_file_or_inline(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kaito_tuning.config import parse_config
    from kaito_tuning.train import load_tokenizer

    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    template_file = tmp_path / "template.jinja"
    template_file.write_text("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}")
    rows = conversational_rows(1)
    fmt = detect_format(rows, DatasetConfig())
    for value, expected in ((inline, "[user] "), (str(template_file), "<user> ")):
        cfg = parse_config(
            {
                "training_config": {
                    "ModelConfig": {
                        "pretrained_model_name_or_path": str(tiny_model_dir),
                        "chat_template": value,
                    }
                }
            },
            environ={},
        )
        text, special = render_texts(rows, fmt, load_tokenizer(cfg))[0]
        assert expected + "What schedules pods?" in text and not special
