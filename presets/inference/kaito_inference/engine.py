"""Model loading and generation.

Generation is blocking torch work, so it runs on a dedicated thread pool owned by :class:`Engine`; the
event loop only awaits futures and, for streaming, reads token ids that the generating thread hands over
with ``loop.call_soon_threadsafe``. Every generation carries a cancel flag that a stopping criterion reads
after each token, so a client that goes away (or a stop string that matched) frees the worker at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .adapters import AdapterSpec, discover_adapters, merge_adapters
from .config import TORCH_DTYPES, ServerConfig

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
# Text helpers (pure; unit-tested)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas whose concatenation equals the full decode.

    Decodes a small window (previous chunk + new ids) instead of everything each step, and holds text
    back while it ends in an incomplete UTF-8 sequence (the replacement character).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)
        return text

    def push(self, new_ids: list[int]) -> str:
        """Add ids; return the text they complete (possibly empty)."""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def safe_prefix_length(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be streamed without risking to emit part of a stop string.

    Text up to an earliest full stop match is safe; otherwise the longest suffix that is a proper prefix
    of some stop string is held back until the next tokens decide.
    """
    hit = find_stop(text, stops)
    if hit is not None:
        return hit
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold


# --------------------------------------------------------------------------------------------------
# Generation


@dataclass
class GenerationRequest:
    """What to generate: prompt ids, generate() keyword arguments and post-processing options."""

    input_ids: list[int]
    generate_kwargs: dict[str, Any]
    stop: list[str] = field(default_factory=list)
    clean_up_tokenization_spaces: bool = False
    seed: int | None = None


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


_END = object()


async def _wait_settled(fut: asyncio.Future[Any]) -> None:
    """Wait for a worker-thread future even while the calling task is being cancelled.

    Starlette runs streaming responses in anyio task groups whose cancellation is level-triggered: every
    await in a cancelled scope fails again at once. A shielded scope lets the owner still wait for the
    thread it started (it stops within one token once its cancel flag is set).
    """
    if fut.done():
        return
    with anyio.CancelScope(shield=True):
        await asyncio.wait({fut})


class _Control:
    """Per-request state shared between the event loop and the generating thread."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.first_token_at: float | None = None


class Engine:
    """Runs generation for a :class:`LoadedModel` on its own worker threads.

    Owns the thread pool: :meth:`close` cancels running generations and waits for the threads.
    """

    def __init__(self, loaded: LoadedModel, max_workers: int = 1, max_pending: int = 0) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.context_length = loaded.context_length
        self._eos = loaded.eos_token_ids
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="generate")
        self._controls: set[_Control] = set()
        self._max_pending = max_pending
        self._closed = False
        # A fast tokenizer resets its truncation/padding state (a mutable borrow in Rust) on the first
        # call; doing it now keeps later concurrent encodes and decodes on different threads read-only.
        self.tokenizer("warm-up")

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

    # -- blocking part (worker thread) ------------------------------------------------------------

    def _criteria(self, control: _Control, stop: list[str], prompt_len: int) -> Any:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tokenizer = self.tokenizer
        tail = max((len(s) for s in stop), default=0) + 4

        class _Criteria(StoppingCriteria):
            """Marks the first token's time, honours cancellation and stop strings."""

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                if control.first_token_at is None:
                    control.first_token_at = time.perf_counter()
                batch = input_ids.shape[0]
                if control.cancel.is_set():
                    return torch.ones(batch, dtype=torch.bool, device=input_ids.device)
                if not stop:
                    return torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
                done = []
                for row in input_ids[:, prompt_len:].tolist():
                    text = tokenizer.decode(row[-tail:], skip_special_tokens=True)
                    done.append(find_stop(text, stop) is not None)
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([_Criteria()])

    def _finish(
        self, row: list[int], req: GenerationRequest, cancelled: bool, batched: bool
    ) -> SequenceOutput:
        # generate() pads only rows of a batch (n > 1) that finished early; a single row has no padding,
        # and the pad id may be a token the model legitimately produces.
        pad = self.tokenizer.pad_token_id if batched else None
        ended_by_eos = False
        out: list[int] = []
        for tok in row:
            if tok in self._eos:
                ended_by_eos = True
                break
            if pad is not None and tok == pad:
                break
            out.append(tok)
        text: str = self.tokenizer.decode(
            out, skip_special_tokens=True, clean_up_tokenization_spaces=req.clean_up_tokenization_spaces
        )
        reason = "stop" if ended_by_eos else "length"
        hit = find_stop(text, req.stop) if req.stop else None
        if hit is not None:
            text = text[:hit]
            reason = "stop"
        elif cancelled:
            reason = "stop"
        return SequenceOutput(text=text, token_ids=out, finish_reason=reason)

    def _generate_blocking(
        self, req: GenerationRequest, control: _Control, streamer: Any, queued_at: float
    ) -> GenerationResult:
        import torch

        started = time.perf_counter()
        if control.cancel.is_set():
            raise GenerationCancelled("generation cancelled before it started")
        device = self.model.device
        input_ids = torch.tensor([req.input_ids], dtype=torch.long, device=device)
        kwargs = dict(req.generate_kwargs)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        if req.seed is not None:
            torch.manual_seed(req.seed)
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    stopping_criteria=self._criteria(control, req.stop, len(req.input_ids)),
                    streamer=streamer,
                    **kwargs,
                )
        except (ValueError, TypeError) as exc:
            # generate() validates its keyword arguments and raises these for bad client input.
            raise GenerationError(str(exc)) from None
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the memory of this failed request back to the others
            raise EngineOverloaded(
                "out of accelerator memory for this request; retry with a shorter prompt or fewer tokens"
            ) from None
        finished = time.perf_counter()
        rows = output[:, len(req.input_ids) :].tolist()
        cancelled = control.cancel.is_set()
        return GenerationResult(
            sequences=[self._finish(r, req, cancelled, len(rows) > 1) for r in rows],
            prompt_tokens=len(req.input_ids),
            queued_at=queued_at,
            started_at=started,
            first_token_at=control.first_token_at,
            finished_at=finished,
        )

    # -- async API ---------------------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Raise :class:`EngineOverloaded` when ``max_pending`` generations are already admitted.

        Streaming handlers call it before sending response headers, so an overloaded stream still gets a
        proper 503 rather than a 200 with an in-band error.
        """
        if self._max_pending and len(self._controls) >= self._max_pending:
            raise EngineOverloaded(
                f"server busy: {len(self._controls)} generations already running or queued; retry later"
            )

    def _control(self) -> _Control:
        if self._closed:
            raise GenerationCancelled("server is shutting down")
        self.check_capacity()
        control = _Control()
        self._controls.add(control)
        return control

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """Generate without streaming; the event loop stays free while the worker thread runs."""
        loop = asyncio.get_running_loop()
        control = self._control()
        fut = loop.run_in_executor(
            self._executor, self._generate_blocking, req, control, None, time.perf_counter()
        )
        try:
            return await asyncio.shield(fut)
        finally:
            # If the awaiting request was cancelled, stop the thread and still wait for it: the future
            # is owned here and must not outlive the request.
            control.cancel.set()
            await _wait_settled(fut)
            self._controls.discard(control)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Yield text deltas as tokens are produced, then one delta with ``final`` set.

        The concatenated deltas equal the non-streamed text for the same tokens: text that might turn
        into a stop string is held back, and the last delta reconciles with the final decode.
        """
        from transformers.generation.streamers import BaseStreamer

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        control = self._control()

        class _QueueStreamer(BaseStreamer):
            """Hands new token ids from the generating thread to the event loop."""

            def __init__(self) -> None:
                self._prompt_seen = False

            def put(self, value: Any) -> None:
                if not self._prompt_seen:  # generate() first passes the prompt itself
                    self._prompt_seen = True
                    return
                loop.call_soon_threadsafe(queue.put_nowait, value.reshape(-1).tolist())

            def end(self) -> None:
                pass

        def run() -> GenerationResult:
            try:
                return self._generate_blocking(req, control, _QueueStreamer(), queued_at)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        queued_at = time.perf_counter()
        fut = loop.run_in_executor(self._executor, run)
        detok = IncrementalDetokenizer(self.tokenizer)
        text = ""
        emitted = 0
        try:
            ended = False
            while not ended:
                item = await queue.get()
                if item is _END:
                    break
                # Coalesce whatever else has arrived: when the client or the loop is slower than the
                # model, one chunk carries several tokens instead of falling further behind.
                while not queue.empty():
                    more = queue.get_nowait()
                    if more is _END:
                        ended = True
                        break
                    item = item + more
                if control.cancel.is_set():
                    continue
                if any(t in self._eos for t in item):
                    item = [t for t in item if t not in self._eos]
                text += detok.push(item)
                safe = safe_prefix_length(text, req.stop) if req.stop else len(text)
                if safe > emitted:
                    yield StreamDelta(text=text[emitted:safe])
                    emitted = safe
                if req.stop and find_stop(text, req.stop) is not None:
                    control.cancel.set()
            result = await fut
            final_text = result.sequences[0].text
            tail = final_text[emitted:] if final_text.startswith(text[:emitted]) else ""
            yield StreamDelta(text=tail, final=result)
        finally:
            control.cancel.set()
            await _wait_settled(fut)
            self._controls.discard(control)

    async def close(self) -> None:
        """Cancel running generations and wait for the worker threads to exit."""
        self._closed = True
        for control in list(self._controls):
            control.cancel.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
