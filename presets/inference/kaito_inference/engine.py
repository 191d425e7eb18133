"""Model loading and the async generation API over the continuous-batching scheduler.

Generation is blocking torch work on the scheduler's thread (:mod:`.batching`); the event loop only
reads the token events that thread hands over once per decode step. Every request carries a cancel flag
the scheduler reads before each step, so a client that goes away (or a stop string that matched) frees
its rows of the batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapters import AdapterSpec, discover_adapters, merge_adapters
from .batching import BatchFailed, BatchScheduler, Event, Job, SchedulerClosed, TokenEvent
from .config import TORCH_DTYPES, ServerConfig
from .sampling import SamplingParams
from .text import IncrementalDetokenizer, find_stop, safe_prefix_length
from .threads import default_torch_threads

__all__ = [
    "Engine",
    "EngineOverloaded",
    "GenerationCancelled",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "IncrementalDetokenizer",
    "LoadedModel",
    "SamplingParams",
    "StreamDelta",
    "find_stop",
    "load_chat_template",
    "load_model",
    "resolve_dtype",
    "safe_prefix_length",
]

log = logging.getLogger("kaito_inference")


class GenerationError(ValueError):
    """The request's generation parameters are invalid; the client gets a 400 with this message."""


class GenerationCancelled(RuntimeError):
    """The request went away or the engine closed before its generation started."""


class EngineOverloaded(RuntimeError):
    """The accelerator ran out of memory for this request; the client may retry with less."""


def resolve_dtype(name: str | None) -> Any:
    """Map a ``--torch_dtype`` name to a torch dtype; ``auto`` and ``None`` pass through."""
    if name is None or name == "auto":
        return name
    import torch

    if name not in TORCH_DTYPES:
        raise ValueError(f"Invalid torch dtype: {name}")
    return getattr(torch, name)


def load_chat_template(value: str) -> str:
    """Return a chat template given inline or as a file path (upstream rule: braces/newlines mean inline)."""
    if "{" in value or "}" in value or "\n" in value:
        return value.encode("utf-8").decode("unicode_escape") if "\\n" in value else value
    return Path(value).read_text(encoding="utf-8")


@dataclass
class LoadedModel:
    """A ready model, its tokenizer and facts the server needs about them."""

    model: Any
    tokenizer: Any
    context_length: int | None
    adapters: list[AdapterSpec] = field(default_factory=list)

    @property
    def eos_token_ids(self) -> set[int]:
        """Token ids that end a sequence (tokenizer and generation config may both name some)."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            ids.update(int(i) for i in gen_eos)
        return ids


def _context_length(model: Any, tokenizer: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    tok_max = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (1e30); treat that as unknown.
    if isinstance(tok_max, int) and 0 < tok_max < 10**7:
        return tok_max
    return None


def load_model(cfg: ServerConfig, environ: Mapping[str, str] | None = None) -> LoadedModel:
    """Load tokenizer, model and adapters as the flags say. Blocking; call it off the event loop.

    Adapters are validated before the (slow) model load so a broken one is reported within seconds.
    """
    adapters = discover_adapters(cfg.adapters_dir, environ)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = cfg.torch_threads if cfg.torch_threads is not None else default_torch_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.info("torch uses %d CPU threads", threads)

    common: dict[str, Any] = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "local_files_only": not cfg.allow_remote_files,
    }
    common.update(cfg.extra_model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
        cfg.pretrained_model_name_or_path, **common
    )
    model_kwargs = dict(common)
    dtype = resolve_dtype(cfg.torch_dtype)
    if dtype is not None:
        model_kwargs["dtype"] = dtype  # transformers >= 4.56 name of torch_dtype
    if cfg.device_map is not None:
        model_kwargs["device_map"] = cfg.device_map
    model = AutoModelForCausalLM.from_pretrained(cfg.pretrained_model_name_or_path, **model_kwargs)
    if adapters:
        log.info("merging adapters %s", ", ".join(f"{a.name}={a.strength}" for a in adapters))
        model = merge_adapters(model, adapters, cfg.combination_type)
    model.eval()  # type: ignore[no-untyped-call]
    if cfg.chat_template:
        tokenizer.chat_template = load_chat_template(cfg.chat_template)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model, tokenizer=tokenizer, context_length=_context_length(model, tokenizer), adapters=adapters
    )


# --------------------------------------------------------------------------------------------------
# Generation


@dataclass
class GenerationRequest:
    """What to generate: prompt ids, the sampling parameters and post-processing options."""

    input_ids: list[int]
    params: SamplingParams
    clean_up_tokenization_spaces: bool = False


@dataclass
class SequenceOutput:
    """One generated continuation."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"


@dataclass
class GenerationResult:
    """All sequences of one request plus timing for metrics."""

    sequences: list[SequenceOutput]
    prompt_tokens: int
    queued_at: float
    started_at: float
    first_token_at: float | None
    finished_at: float

    @property
    def completion_tokens(self) -> int:
        """Generated tokens over all sequences."""
        return sum(len(s.token_ids) for s in self.sequences)


@dataclass
class StreamDelta:
    """A piece of streamed text (``final`` carries the finished result instead)."""

    text: str
    final: GenerationResult | None = None


class _Control:
    """One admitted request: its cancel flag and the queue the scheduler's events arrive on."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.events: asyncio.Queue[list[Event]] = asyncio.Queue()
        self.queued_at = time.perf_counter()


def _raise_for(exc: BaseException) -> None:
    if isinstance(exc, SchedulerClosed):
        raise GenerationCancelled(str(exc))
    if isinstance(exc, BatchFailed) and exc.oom:
        raise EngineOverloaded(str(exc))
    raise exc


class Engine:
    """The async face of a :class:`LoadedModel`: admission, generation and streaming.

    Owns the :class:`BatchScheduler` (and with it the model thread): :meth:`close` stops it.
    """

    def __init__(self, loaded: LoadedModel, max_batch: int = 32, max_pending: int = 0) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.context_length = loaded.context_length
        self.vocab_size = _vocab_size(loaded)
        self._eos = loaded.eos_token_ids
        self._controls: set[_Control] = set()
        self._max_pending = max_pending
        self._closed = False
        # A fast tokenizer resets its truncation/padding state (a mutable borrow in Rust) on the first
        # call; doing it now keeps later concurrent encodes and decodes on different threads read-only.
        self.tokenizer("warm-up")
        self.scheduler = BatchScheduler(self.model, self.tokenizer, self._eos, max_batch)

    # -- tokenisation ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a plain prompt (with the tokenizer's usual special tokens)."""
        ids: list[int] = self.tokenizer(prompt)["input_ids"]
        return ids

    def encode_messages(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation rendered by the tokenizer's chat template, ready for a reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise GenerationError("this model has no chat template; send a prompt instead of messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors (e.g. a template that rejects a role) are client errors
            raise GenerationError(f"cannot apply the chat template to these messages: {exc}") from None
        # The template already renders special tokens such as BOS; adding them again would double them.
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    # -- admission ------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests admitted and not finished (running or waiting for room in the batch)."""
        return len(self._controls)

    def check_capacity(self) -> None:
        """Raise :class:`EngineOverloaded` when ``max_pending`` requests are already admitted.

        Streaming handlers call it before sending response headers, so an overloaded stream still gets a
        proper 503 rather than a 200 with an in-band error.
        """
        if self._max_pending and len(self._controls) >= self._max_pending:
            raise EngineOverloaded(
                f"server busy: {len(self._controls)} generations already running or queued; retry later"
            )

    def _start(self, req: GenerationRequest, stream: bool) -> tuple[_Control, Job]:
        if self._closed:
            raise GenerationCancelled("server is shutting down")
        self.check_capacity()
        control = _Control()
        job = Job(
            input_ids=req.input_ids,
            params=req.params,
            cancel=control.cancel,
            loop=asyncio.get_running_loop(),
            deliver=control.events.put_nowait,
            stream=stream,
        )
        try:
            self.scheduler.submit(job)
        except SchedulerClosed as exc:
            raise GenerationCancelled(str(exc)) from None
        self._controls.add(control)
        return control, job

    def _stop(self, control: _Control) -> None:
        # The scheduler drops the request's rows before its next step.
        control.cancel.set()
        self._controls.discard(control)

    # -- results --------------------------------------------------------------------------------

    def _sequence(self, ids: list[int], finish: str, req: GenerationRequest) -> SequenceOutput:
        text: str = self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=req.clean_up_tokenization_spaces
        )
        hit = find_stop(text, list(req.params.stop)) if req.params.stop else None
        if hit is not None:
            text = text[:hit]
            finish = "stop"
        return SequenceOutput(text=text, token_ids=ids, finish_reason=finish)

    def _result(
        self, req: GenerationRequest, control: _Control, job: Job, tokens: list[list[int]], finish: list[str]
    ) -> GenerationResult:
        now = time.perf_counter()
        return GenerationResult(
            sequences=[self._sequence(t, f, req) for t, f in zip(tokens, finish, strict=True)],
            prompt_tokens=len(req.input_ids),
            queued_at=control.queued_at,
            started_at=job.started_at if job.started_at is not None else now,
            first_token_at=job.first_token_at,
            finished_at=now,
        )

    # -- async API ------------------------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """Generate without streaming; cancelling the awaiting task frees the request's rows."""
        control, job = self._start(req, stream=False)
        n = req.params.n
        tokens: list[list[int]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        try:
            while any(f is None for f in finish):
                for ev in await control.events.get():
                    if not isinstance(ev, TokenEvent):
                        _raise_for(ev)
                        continue
                    tokens[ev.seq].extend(ev.tokens)
                    if ev.finish is not None:
                        finish[ev.seq] = ev.finish
        finally:
            self._stop(control)
        return self._result(req, control, job, tokens, [f or "stop" for f in finish])

    async def stream(self, req: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Yield text deltas as tokens are produced, then one delta with ``final`` set (``n`` must be 1).

        The concatenated deltas equal the non-streamed text for the same tokens: text that might turn
        into a stop string is held back, and the last delta reconciles with the final decode.
        """
        control, job = self._start(req, stream=True)
        stops = list(req.params.stop)
        detok = IncrementalDetokenizer(self.tokenizer)
        ids: list[int] = []
        text = ""
        emitted = 0
        finish: str | None = None
        try:
            while finish is None:
                new: list[int] = []
                # Take whatever has arrived: when the client or the loop is slower than the model, one
                # chunk carries several tokens instead of falling further behind.
                batches = [await control.events.get()]
                while not control.events.empty():
                    batches.append(control.events.get_nowait())
                for evs in batches:
                    for ev in evs:
                        if not isinstance(ev, TokenEvent):
                            _raise_for(ev)
                            continue
                        new.extend(ev.tokens)
                        if ev.finish is not None:
                            finish = ev.finish
                ids.extend(new)
                text += detok.push(new)
                safe = safe_prefix_length(text, stops) if stops else len(text)
                if safe > emitted:
                    yield StreamDelta(text=text[emitted:safe])
                    emitted = safe
            result = self._result(req, control, job, [ids], [finish])
            final_text = result.sequences[0].text
            tail = final_text[emitted:] if final_text.startswith(text[:emitted]) else ""
            yield StreamDelta(text=tail, final=result)
        finally:
            self._stop(control)

    async def close(self) -> None:
        """Cancel running generations and stop the scheduler thread."""
        self._closed = True
        for control in list(self._controls):
            control.cancel.set()
        await asyncio.to_thread(self.scheduler.close)


def _vocab_size(loaded: LoadedModel) -> int:
    """Rows of the output embedding: token ids at or above it do not exist for this model."""
    out = loaded.model.get_output_embeddings() if hasattr(loaded.model, "get_output_embeddings") else None
    weight = getattr(out, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    size = getattr(getattr(loaded.model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) else len(loaded.tokenizer)
