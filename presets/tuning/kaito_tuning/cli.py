"""Command line of the trainer: flags, logging, exit codes, failure marker and termination message.

Exit codes: 0 adapter written; 1 training failed (unexpected error, out of memory...); 2 invalid
configuration; 3 dataset missing, unreadable or of an unknown shape; 4 the configuration needs hardware
this pod lacks (QLoRA without CUDA/bitsandbytes). The one-line outcome goes to the termination-message
file (``/dev/termination-log``), which Kubernetes copies into the pod status and so the Job's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .config import DEFAULT_CONFIG_PATH, DEFAULT_OUTPUT_DIR, ConfigError, load_config, normalize_output_dir
from .dataset import DatasetError
from .redaction import redact
from .train import FAILED_MARKER, HardwareError, TrainResult, train

log = logging.getLogger("kaito_tuning")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_DATASET = 3
EXIT_HARDWARE = 4
DEFAULT_DATA_DIR = "/mnt/data"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"


def build_parser() -> argparse.ArgumentParser:
    """Flags (env fallbacks are upstream's variable names)."""
    parser = argparse.ArgumentParser(prog="fine_tuning.py", description="Train a LoRA/QLoRA adapter.")
    parser.add_argument(
        "--config",
        default=os.environ.get("YAML_FILE_PATH", DEFAULT_CONFIG_PATH),
        help=f"training_config.yaml (env YAML_FILE_PATH; default {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("DATASET_FOLDER_PATH", DEFAULT_DATA_DIR)),
        help=f"directory the init step filled with the dataset (env DATASET_FOLDER_PATH; default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where the adapter is written; default TrainingArguments.output_dir, else /mnt/results",
    )
    parser.add_argument(
        "--termination-log",
        default=None,
        help=f"file for the one-line outcome (default {DEFAULT_TERMINATION_LOG} when it exists)",
    )
    return parser


def write_termination_log(path: str | None, message: str) -> None:
    """Write the outcome where the kubelet reads it; the default path only when the kubelet made it."""
    target = Path(path) if path else Path(DEFAULT_TERMINATION_LOG)
    if path is None and not target.exists():
        return
    try:
        target.write_text(message[:4000] + "\n", encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", target, exc)


def guess_output_dir(args: argparse.Namespace) -> Path | None:
    """Where the failure marker goes when the config itself was refused: the flag, else the raw
    ``TrainingArguments.output_dir`` if readable, else the default, i.e. the directory the controller
    mounted by the same rule, so that a waiting pusher learns of the failure."""
    try:
        if args.output_dir:
            return Path(normalize_output_dir(args.output_dir))
        raw: Any = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
        value = raw["training_config"]["TrainingArguments"]["output_dir"]
        return Path(normalize_output_dir(value))
    except (OSError, ValueError, yaml.YAMLError, TypeError, KeyError):
        return Path(DEFAULT_OUTPUT_DIR)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run(args: argparse.Namespace) -> tuple[int, str, Path | None]:
    """Load the config and train; return (exit code, outcome line, output dir when known)."""
    output_dir: Path | None = None
    try:
        cfg = load_config(args.config)
        if args.output_dir:
            cfg.training["output_dir"] = normalize_output_dir(args.output_dir)
        output_dir = Path(cfg.output_dir)
        result: TrainResult = train(cfg, args.data_dir, output_dir)
        return (
            EXIT_OK,
            f"adapter written to {result.output_dir} ({result.steps} steps, {result.train_rows} training "
            f"rows, final loss {result.train_loss:.4f})",
            output_dir,
        )
    except ConfigError as exc:
        return EXIT_CONFIG, f"error: invalid training config: {exc}", output_dir
    except DatasetError as exc:
        return EXIT_DATASET, f"error: dataset: {exc}", output_dir
    except HardwareError as exc:
        return EXIT_HARDWARE, f"error: {exc}", output_dir
    except Exception as exc:  # the Job must end with a reason, whatever broke
        log.error("training failed:\n%s", traceback.format_exc())
        return EXIT_FAILED, f"error: training failed: {type(exc).__name__}: {exc}", output_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    code, message, output_dir = run(args)
    # The outcome reaches stderr, the failure marker and the termination message (so the Job's and
    # the Workspace's status): no credential a dataset URL or a library error carried.
    message = redact(message)
    if code == EXIT_OK:
        log.info("%s", message)
    else:
        print(message, file=sys.stderr, flush=True)
        if output_dir is None:
            output_dir = guess_output_dir(args)
        if output_dir is not None and _is_main_process():
            # Tells a pusher sidecar waiting for the completion marker to stop waiting.
            try:
                output_dir.mkdir(parents=True, exist_ok=True)
                (output_dir / FAILED_MARKER).write_text(message + "\n", encoding="utf-8")
            except OSError as exc:
                log.warning("cannot write %s: %s", output_dir / FAILED_MARKER, exc)
    if _is_main_process():
        write_termination_log(args.termination_log, message)
    return code
