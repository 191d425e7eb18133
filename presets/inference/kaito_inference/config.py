"""Command-line configuration of the inference server.

Flag names follow upstream KAITO's transformers runtime (``inference_api.py``) so the launch command the
controller renders (``--key=value`` or a bare ``--key`` for booleans, in any order) keeps working:
``--pipeline``, ``--pretrained_model_name_or_path``, ``--torch_dtype``, ``--device_map``,
``--trust_remote_code``, ``--allow_remote_files``, ``--revision``, ``--chat_template``,
``--combination_type``. Flags this server does not know are forwarded to ``from_pretrained`` as upstream did
(``--k v`` becomes the string ``v``; a bare ``--k`` becomes ``True``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_PIPELINES = ("text-generation", "conversational")
COMBINATION_TYPES = ("cat", "svd", "linear")
TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64", "half", "float", "double")
DEFAULT_WEIGHTS = "/workspace/tfs/weights"
DEFAULT_ADAPTERS_DIR = "/mnt/adapter"
DEFAULT_PORT = 5000

_TRUE = {"1", "true", "yes", "on", "t", "y"}
_FALSE = {"0", "false", "no", "off", "f", "n"}


class ConfigError(ValueError):
    """A flag has a value the server cannot use; raised before anything is loaded."""


def parse_bool(value: str | bool) -> bool:
    """Parse the boolean spellings HfArgumentParser accepted upstream (``True``, ``false``, ``1`` ...)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


@dataclass
class ServerConfig:
    """Everything the server needs to load the model and serve it."""

    pipeline: str = "text-generation"
    pretrained_model_name_or_path: str = DEFAULT_WEIGHTS
    served_model_name: str | None = None
    torch_dtype: str | None = None
    device_map: str | None = "auto"
    trust_remote_code: bool = False
    allow_remote_files: bool = False
    revision: str = "main"
    chat_template: str | None = None
    combination_type: str = "cat"
    adapters_dir: str = DEFAULT_ADAPTERS_DIR
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    # Sequences decoded together in the continuously batched forward pass; more wait for a free row.
    max_concurrent_generations: int = 32
    # torch intra-op threads; None = from the container's CPU limit (threads.default_torch_threads).
    torch_threads: int | None = None
    # Request bodies: the largest accepted, and how long the client may take to send one.
    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout_s: float = 30.0
    # Prompts in one /v1/completions request (each is one more sequence in the batch).
    max_prompts_per_request: int = 16
    # Generations admitted at once (running + queued); beyond it requests get 503 so a load balancer or
    # client retries elsewhere instead of waiting behind minutes of queued work. 0 = unlimited.
    max_pending_generations: int = 256
    log_level: str = "info"
    # Unknown flags, forwarded to from_pretrained (upstream behaviour).
    extra_model_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        """The id ``/v1/models`` reports and OpenAI requests must name."""
        return self.served_model_name or self.pretrained_model_name_or_path

    def validate(self) -> None:
        """Reject values that would only fail later, after minutes of loading."""
        if self.pipeline not in SUPPORTED_PIPELINES:
            raise ConfigError(
                f"Unsupported pipeline {self.pipeline!r}: expected one of {', '.join(SUPPORTED_PIPELINES)}"
            )
        if self.combination_type not in COMBINATION_TYPES:
            raise ConfigError(
                f"Unsupported combination_type {self.combination_type!r}: "
                f"expected one of {', '.join(COMBINATION_TYPES)}"
            )
        if self.torch_dtype not in (None, "auto", *TORCH_DTYPES):
            raise ConfigError(
                f"Invalid torch dtype: {self.torch_dtype} (expected auto or one of {', '.join(TORCH_DTYPES)})"
            )
        if self.max_concurrent_generations < 1:
            raise ConfigError("max_concurrent_generations must be at least 1")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(
                "torch_threads must be at least 1 (omit it to follow the container's CPU limit)"
            )
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be at least 1024")
        if not self.body_timeout_s > 0:
            raise ConfigError("body_timeout_s must be positive")
        if self.max_prompts_per_request < 1:
            raise ConfigError("max_prompts_per_request must be at least 1")
        if self.max_pending_generations < 0:
            raise ConfigError("max_pending_generations must be 0 (unlimited) or more")
        if not 0 < self.port < 65536 and self.port != 0:
            raise ConfigError(f"invalid port {self.port}")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inference_api.py",
        description="KAITO inference server (transformers runtime): /chat and an OpenAI-compatible API.",
        allow_abbrev=False,
    )
    bool_flag: dict[str, Any] = {"nargs": "?", "const": True, "type": parse_bool}
    parser.add_argument("--pipeline", default="text-generation")
    parser.add_argument("--pretrained_model_name_or_path", default=DEFAULT_WEIGHTS)
    parser.add_argument("--served_model_name", default=None)
    parser.add_argument("--torch_dtype", default=None)
    parser.add_argument("--device_map", default="auto")
    parser.add_argument("--trust_remote_code", default=False, **bool_flag)
    parser.add_argument("--allow_remote_files", default=False, **bool_flag)
    parser.add_argument("--revision", default="main")
    parser.add_argument("--chat_template", default=None)
    parser.add_argument("--combination_type", default="cat")
    parser.add_argument("--adapters_dir", default=DEFAULT_ADAPTERS_DIR)
    parser.add_argument("--host", default="0.0.0.0")
    # Upstream listens on 5000 + LOCAL_RANK so every accelerate/torchrun worker gets its own port.
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--max_concurrent_generations", type=int, default=32)
    parser.add_argument("--torch_threads", type=int, default=None)
    parser.add_argument("--max_body_bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--body_timeout_s", type=float, default=30.0)
    parser.add_argument("--max_prompts_per_request", type=int, default=16)
    parser.add_argument("--max_pending_generations", type=int, default=256)
    parser.add_argument("--log_level", default="info")
    return parser


def _coerce_extra(argv: list[str]) -> dict[str, Any]:
    """Turn leftover ``--k v`` / ``--k=v`` / bare ``--k`` flags into keyword arguments (upstream rules)."""
    extra: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}")
        key, sep, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if sep:
            extra[key] = value
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            extra[key] = argv[i + 1]
            i += 2
        else:
            extra[key] = True
            i += 1
    return extra


def parse_args(argv: list[str], environ: dict[str, str] | None = None) -> ServerConfig:
    """Parse the command line into a validated :class:`ServerConfig`.

    Raises :class:`ConfigError` for a bad value; ``--help`` exits like any argparse program.
    """
    env = os.environ if environ is None else environ
    parser = _build_parser()
    try:
        ns, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:  # pragma: no cover - argparse exits instead by default
        raise ConfigError(str(exc)) from exc
    port = ns.port
    if port is None:
        try:
            port = DEFAULT_PORT + int(env.get("LOCAL_RANK", "0"))
        except ValueError as exc:
            raise ConfigError(f"LOCAL_RANK must be an integer, got {env.get('LOCAL_RANK')!r}") from exc
    cfg = ServerConfig(
        pipeline=ns.pipeline,
        pretrained_model_name_or_path=ns.pretrained_model_name_or_path,
        served_model_name=ns.served_model_name,
        torch_dtype=ns.torch_dtype,
        device_map=None if ns.device_map in ("", "none", "None") else ns.device_map,
        trust_remote_code=ns.trust_remote_code,
        allow_remote_files=ns.allow_remote_files,
        revision=ns.revision,
        chat_template=ns.chat_template,
        combination_type=ns.combination_type,
        adapters_dir=ns.adapters_dir,
        host=ns.host,
        port=port,
        max_concurrent_generations=ns.max_concurrent_generations,
        max_pending_generations=ns.max_pending_generations,
        torch_threads=ns.torch_threads,
        max_body_bytes=ns.max_body_bytes,
        body_timeout_s=ns.body_timeout_s,
        max_prompts_per_request=ns.max_prompts_per_request,
        log_level=ns.log_level,
        extra_model_kwargs=_coerce_extra(rest),
    )
    cfg.validate()
    return cfg
