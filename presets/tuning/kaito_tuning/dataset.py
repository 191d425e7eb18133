"""Finding, loading and recognising the training dataset; turning rows into token ids.

Files: parquet, json (an array of objects, an object holding one, or JSON lines), jsonl and csv. The
format comes from ``DatasetConfig.dataset_extension``, else the suffix, else a substring of the name
(the URL downloader names files like ``train.parquet_download_true``, as upstream's did).

Row shapes, in this order:
- conversational: a ``messages`` column (or ``DatasetConfig.messages_column``) holding
  ``[{"role", "content"}, ...]``, rendered with the tokenizer's chat template;
- prompt/completion: ``prompt`` + ``completion`` columns (or ``context_column`` + ``response_column``);
- plain text: the ``response_column`` (default ``text``).
Anything else is an error that lists the columns found.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DatasetConfig

log = logging.getLogger("kaito_tuning")

FORMATS = ("parquet", "jsonl", "json", "csv")
_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".csv": "csv"}
DEFAULT_MAX_LENGTH = 2048


class DatasetError(ValueError):
    """The dataset is missing, unreadable, empty or of an unrecognised shape."""


@dataclass(frozen=True)
class DatasetFormat:
    """The recognised row shape: ``kind`` is ``conversational``, ``prompt_completion`` or ``text``."""

    kind: str
    columns: tuple[str, ...]


def file_format(path: Path, extension: str | None = None) -> str | None:
    """The loader for ``path``: explicit extension, suffix, or a format name inside the file name."""
    if extension:
        ext = extension.lower().lstrip(".")
        if ext not in FORMATS:
            raise DatasetError(
                f"DatasetConfig.dataset_extension {extension!r} is not one of {', '.join(FORMATS)}"
            )
        return ext
    by_suffix = _SUFFIXES.get(path.suffix.lower())
    if by_suffix:
        return by_suffix
    name = path.name.lower()
    for fmt in FORMATS:  # jsonl before json: the first match wins
        if fmt in name:
            return fmt
    return None


def find_dataset_files(data_dir: Path, cfg: DatasetConfig) -> list[Path]:
    """The dataset files: ``dataset_path`` (file or directory; relative to ``data_dir``, or to its
    parent as upstream's ``/mnt``-relative paths were), else every loadable file under ``data_dir``."""
    if cfg.dataset_path:
        given = Path(cfg.dataset_path)
        candidates = [given] if given.is_absolute() else [data_dir / given, data_dir.parent / given]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise DatasetError(
                f"DatasetConfig.dataset_path {cfg.dataset_path!r} not found (looked at "
                f"{', '.join(str(p) for p in candidates)})"
            )
        if found.is_file():
            return [found]
        data_dir = found
    if not data_dir.is_dir():
        raise DatasetError(f"data directory {data_dir} does not exist (the init step fills it)")
    files = sorted(
        p
        for p in data_dir.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(data_dir).parts)
        and file_format(p, cfg.dataset_extension) is not None
    )
    if not files:
        present = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file())
        raise DatasetError(
            f"no dataset file ({', '.join(FORMATS)}) in {data_dir}; found: {', '.join(present[:20]) or 'nothing'}"
        )
    return files


def load_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    """Read every row of one file as a dict."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
        elif fmt == "csv":
            with path.open(newline="", encoding="utf-8") as handle:
                rows = [dict(r) for r in csv.DictReader(handle)]
        elif fmt == "jsonl":
            rows = _json_lines(path.read_text(encoding="utf-8"), path)
        else:
            rows = _json_document(path.read_text(encoding="utf-8"), path)
    except DatasetError:
        raise
    except Exception as exc:  # pyarrow, csv, json and decoding errors all mean "unreadable"
        raise DatasetError(f"unable to load {path} as {fmt}: {exc}") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DatasetError(f"{path}: row {bad} is not an object")
    return rows


def _json_lines(text: str, path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}: line {number} is not JSON: {exc.msg}") from None
    return rows


def _json_document(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several documents: JSON lines in a .json file
            return _json_lines(text, path)
        raise DatasetError(f"{path} is not JSON: {exc}") from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:  # {"data": [...]} / {"train": [...]}
            return list(lists[0])
        return [data]
    raise DatasetError(f"{path}: expected an array of objects, got {type(data).__name__}")


def load_dataset_rows(data_dir: Path, cfg: DatasetConfig) -> list[dict[str, Any]]:
    """All rows of all dataset files, in file order."""
    rows: list[dict[str, Any]] = []
    for path in find_dataset_files(data_dir, cfg):
        fmt = file_format(path, cfg.dataset_extension)
        assert fmt is not None  # find_dataset_files keeps only loadable files
        loaded = load_rows(path, fmt)
        log.info("loaded %d rows from %s (%s)", len(loaded), path, fmt)
        rows.extend(loaded)
    if not rows:
        raise DatasetError(f"the dataset in {data_dir} has no rows")
    return rows


def detect_format(rows: list[dict[str, Any]], cfg: DatasetConfig) -> DatasetFormat:
    """Recognise the row shape from the columns (union over the first rows) and the column options."""
    columns: list[str] = []
    for row in rows[:100]:
        columns.extend(k for k in row if k not in columns)
    found = ", ".join(repr(c) for c in columns) or "none"

    def need(*names: str) -> None:
        missing = [n for n in names if n not in columns]
        if missing:
            raise DatasetError(
                f"DatasetConfig names column(s) {', '.join(map(repr, missing))} but the dataset has {found}"
            )

    if cfg.messages_column:
        need(cfg.messages_column)
        return DatasetFormat("conversational", (cfg.messages_column,))
    if cfg.context_column:
        need(cfg.context_column, cfg.response_column)
        return DatasetFormat("prompt_completion", (cfg.context_column, cfg.response_column))
    if "messages" in columns:
        return DatasetFormat("conversational", ("messages",))
    if "prompt" in columns and "completion" in columns:
        return DatasetFormat("prompt_completion", ("prompt", "completion"))
    if cfg.response_column in columns:
        return DatasetFormat("text", (cfg.response_column,))
    raise DatasetError(
        f"unrecognised dataset format: columns found {found}. Expected a 'messages' column "
        "(conversational), 'prompt' and 'completion' columns, or a 'text' column; or name yours with "
        "DatasetConfig.messages_column, context_column + response_column, or response_column"
    )


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DatasetError(f"{where}: messages is a string that is not JSON") from None
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: messages must be a non-empty list of {{role, content}}")
    result = []
    for msg in value:
        if (
            not isinstance(msg, dict)
            or not isinstance(msg.get("role"), str)
            or not isinstance(msg.get("content"), str)
        ):
            raise DatasetError(f"{where}: every message needs string 'role' and 'content'")
        result.append({"role": msg["role"], "content": msg["content"]})
    return result


def render_texts(rows: list[dict[str, Any]], fmt: DatasetFormat, tokenizer: Any) -> list[tuple[str, bool]]:
    """One training text per usable row, with whether the tokenizer should add special tokens
    (not for chat-template output, which already has them). Rows with empty fields are skipped."""
    eos = tokenizer.eos_token or ""
    texts: list[tuple[str, bool]] = []
    skipped = 0
    for index, row in enumerate(rows):
        where = f"row {index}"
        if fmt.kind == "conversational":
            raw = row.get(fmt.columns[0])
            if raw is None:
                skipped += 1
                continue
            if not getattr(tokenizer, "chat_template", None):
                raise DatasetError(
                    "a conversational dataset needs a chat template and the tokenizer has none; "
                    "set ModelConfig.chat_template"
                )
            text = tokenizer.apply_chat_template(_messages(raw, where), tokenize=False)
            texts.append((str(text), False))
            continue
        if fmt.kind == "prompt_completion":
            prompt, completion = row.get(fmt.columns[0]), row.get(fmt.columns[1])
            if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
                text = tokenizer.apply_chat_template(
                    _messages(prompt, where) + _messages(completion, where), tokenize=False
                )
                texts.append((str(text), False))
                continue
            if not prompt and not completion:
                skipped += 1
                continue
            texts.append((f"{prompt or ''}{completion or ''}{eos}", True))
            continue
        value = row.get(fmt.columns[0])
        if not value:
            skipped += 1
            continue
        texts.append((f"{value}{eos}", True))
    if skipped:
        log.warning("skipped %d row(s) with empty %s", skipped, " / ".join(fmt.columns))
    if not texts:
        raise DatasetError(f"no usable rows: every row has empty {' / '.join(fmt.columns)}")
    return texts


def max_length(tokenizer: Any, model_config: Any) -> int:
    """Longest sequence to train on: the tokenizer's limit, capped by the model's positions."""
    limits: list[int] = []
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:  # "no limit" is a huge sentinel
        limits.append(tok_limit)
    positions = getattr(model_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits) if limits else DEFAULT_MAX_LENGTH


def tokenize(texts: list[tuple[str, bool]], tokenizer: Any, limit: int) -> list[dict[str, list[int]]]:
    """Token ids and attention masks, truncated to ``limit``; the collator pads and builds labels."""
    features = []
    for text, special in texts:
        enc = tokenizer(text, add_special_tokens=special, truncation=True, max_length=limit)
        if enc["input_ids"]:
            features.append(
                {"input_ids": list(enc["input_ids"]), "attention_mask": list(enc["attention_mask"])}
            )
    if not features:
        raise DatasetError("every row tokenized to nothing")
    return features


def split(
    features: list[dict[str, list[int]]], cfg: DatasetConfig
) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]] | None]:
    """Shuffle (seeded) and split into train and eval; ``train_test_split`` 1 means no eval set."""
    items = list(features)
    if cfg.shuffle_dataset:
        random.Random(cfg.shuffle_seed).shuffle(items)
    if cfg.train_test_split >= 1:
        return items, None
    cut = max(1, int(len(items) * cfg.train_test_split))
    if cut >= len(items):
        return items, None
    return items[:cut], items[cut:]
