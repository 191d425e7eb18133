"""Continuous batching: one thread runs the model for every admitted sequence at once.

Requests join the running batch between decode steps and leave it as soon as they finish, each with its
own sampling parameters, stop strings, token budget and cancel flag. The batch shares one KV cache whose
rows are left-padded to a common length:

* a newcomer's prompt is prefilled on its own (or with other newcomers of the same length, which needs no
  padding), its cache rows are left-padded (or the running rows are) to the longer of the two, and the
  rows are concatenated; ``n`` samples of one prompt copy its prefilled row;
* every decode step feeds each row's last token with an attention mask that hides its padding and
  position ids that count only its own tokens, so a row sees exactly what it would see alone;
* finished or cancelled rows are dropped, and cache columns that have become padding for every row left
  are cut off.

transformers 4.57's own continuous batching (``generate_batch`` / ``init_continuous_batching``) applies one
``GenerationConfig`` to the whole batch, so it cannot give each request its own sampling parameters, seed,
stop strings or cancellation; hence this scheduler over the model's ``forward``.

The model runs on the scheduler thread only; the event loop hears of new tokens through
``loop.call_soon_threadsafe`` once per step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .sampling import SamplingParams, TokenPicker, make_generator

log = logging.getLogger("kaito_inference")


class SchedulerClosed(RuntimeError):
    """The scheduler stopped (server shutdown) before or while the request ran."""


class BatchFailed(RuntimeError):
    """The batched forward pass failed; every request in the batch gets this (``oom`` says why)."""

    def __init__(self, message: str, oom: bool) -> None:
        super().__init__(message)
        self.oom = oom


@dataclass
class TokenEvent:
    """New tokens of one sequence (``finish`` set on its last event: ``stop``, ``length``)."""

    seq: int
    tokens: list[int]
    finish: str | None = None


Event = TokenEvent | BaseException
Deliver = Callable[[list[Event]], None]


@dataclass(eq=False)  # identity: a job is a key of per-step event maps
class Job:
    """One request as the scheduler sees it; ``deliver`` runs on the request's event loop."""

    input_ids: list[int]
    params: SamplingParams
    cancel: threading.Event
    loop: asyncio.AbstractEventLoop
    deliver: Deliver
    # False: tokens are handed over once, when every sequence has finished (a non-streamed request
    # need not wake the event loop at every step).
    stream: bool = True
    first_token_at: float | None = None
    started_at: float | None = None
    open_rows: int = 0
    held: list[Event] = field(default_factory=list)


@dataclass(eq=False)
class _Seq:
    job: Job
    index: int
    picker: TokenPicker | None
    history: list[int]  # prompt + generated, what the logits processors look at
    generated: int = 0
    length: int = 0  # tokens of this row in the cache
    pending: int = -1  # last picked token, fed by the next decode step
    finish: str | None = field(default=None)


class BatchScheduler:
    """Owns the model thread and the running batch (at most ``max_rows`` sequences)."""

    def __init__(self, model: Any, tokenizer: Any, eos_token_ids: set[int], max_rows: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos = frozenset(eos_token_ids)
        self.max_rows = max_rows
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._rows: list[_Seq] = []
        self._cache: Any = None
        self._closed = False
        # Only what this model's forward takes: remote-code models of older transformers releases lack
        # cache_position and name logits_to_keep num_logits_to_keep.
        params = inspect.signature(model.forward).parameters
        self._keep_arg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self._cache_position_arg = "cache_position" in params
        self._thread = threading.Thread(target=self._run, name="batch-scheduler", daemon=True)
        self._thread.start()

    # -- called from the event loop ---------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a request; it joins the batch at the next step with room for its ``n`` rows."""
        with self._cond:
            if self._closed:
                raise SchedulerClosed("server is shutting down")
            self._waiting.append(job)
            self._cond.notify()

    @property
    def running_rows(self) -> int:
        """Sequences in the running batch (for metrics and tests)."""
        return len(self._rows)

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the current step; every unfinished request gets :class:`SchedulerClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the model thread -------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._rows:
                        self._cond.wait()
                    if self._closed:
                        break
                    newcomers = self._admit()
                try:
                    self._step(newcomers)
                except Exception as exc:  # one failure must not kill the thread that serves everyone
                    self._fail_all(newcomers, exc)
        waiting = list(self._waiting)
        self._waiting.clear()
        self._fail_jobs(
            {s.job for s in self._rows} | set(waiting), SchedulerClosed("server is shutting down")
        )
        self._rows = []
        self._cache = None

    def _admit(self) -> list[Job]:
        """Take waiting jobs (first come, first served) while their rows fit; called under the lock."""
        taken: list[Job] = []
        rows = len(self._rows)
        while self._waiting:
            job = self._waiting[0]
            if job.cancel.is_set():
                self._waiting.popleft()
                continue
            # A request larger than the whole batch still runs, alone.
            if rows and rows + job.params.n > self.max_rows:
                break
            self._waiting.popleft()
            taken.append(job)
            rows += job.params.n
        return taken

    def _fail_all(self, newcomers: list[Job], exc: Exception) -> None:
        import torch

        oom = isinstance(exc, torch.OutOfMemoryError)
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
        else:
            log.exception("batched generation step failed", exc_info=exc)
        message = (
            "out of accelerator memory for this batch; retry with a shorter prompt or fewer tokens"
            if oom
            else "generation failed"
        )
        self._fail_jobs({s.job for s in self._rows} | set(newcomers), BatchFailed(message, oom))
        self._rows = []
        self._cache = None

    @staticmethod
    def _fail_jobs(jobs: set[Job], exc: BaseException) -> None:
        events: list[Event] = [exc]
        for job in jobs:
            with contextlib.suppress(RuntimeError):  # that loop is closed; nobody waits any more
                job.loop.call_soon_threadsafe(job.deliver, events)

    def _forward(self, input_ids: Any, mask: Any, positions: Any, cache: Any, cache_pos: Any) -> Any:
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": positions,
            "past_key_values": cache,
            "use_cache": True,
        }
        if self._cache_position_arg:
            kwargs["cache_position"] = cache_pos
        if self._keep_arg is not None:
            kwargs[self._keep_arg] = 1
        return self.model(**kwargs).logits[:, -1, :]

    def _step(self, newcomers: list[Job]) -> None:
        import torch

        events: dict[Job, list[Event]] = {}
        for s in self._rows:
            if s.job.cancel.is_set():  # the client left or a stop string matched: free the row now
                s.finish = "stop"
                events.setdefault(s.job, []).append(TokenEvent(s.index, [], "stop"))
        self._drop_finished()
        live = [j for j in newcomers if not j.cancel.is_set()]
        if live:
            self._prefill(live, events)
        if self._rows:
            device = self.model.device
            rows = self._rows
            width = self._cache.get_seq_length()
            lengths = torch.tensor([s.length for s in rows], dtype=torch.long, device=device)
            cols = torch.arange(width + 1, device=device)
            mask = (cols.unsqueeze(0) >= (width - lengths).unsqueeze(1)).to(torch.long)
            ids = torch.tensor([[s.pending] for s in rows], dtype=torch.long, device=device)
            logits = self._forward(
                ids,
                mask,
                lengths.unsqueeze(1),
                self._cache,
                torch.tensor([width], dtype=torch.long, device=device),
            )
            for s in rows:
                s.length += 1
            self._pick(rows, logits, events)
            self._drop_finished()
        for job, evs in events.items():
            job.open_rows -= sum(1 for e in evs if isinstance(e, TokenEvent) and e.finish is not None)
            if not job.stream and job.open_rows > 0:
                job.held.extend(evs)
                continue
            out = [*job.held, *evs] if job.held else evs
            job.held = []
            try:
                job.loop.call_soon_threadsafe(job.deliver, out)
            except RuntimeError:  # that loop is closed; nobody waits any more
                job.cancel.set()

    def _prefill(self, jobs: list[Job], events: dict[Job, list[Event]]) -> None:
        import torch
        from transformers import DynamicCache

        device = self.model.device
        by_len: dict[int, list[Job]] = collections.defaultdict(list)
        for job in jobs:
            by_len[len(job.input_ids)].append(job)
        for length, group in by_len.items():
            now = time.perf_counter()
            for job in group:
                job.started_at = now
            cache = DynamicCache()
            ids = torch.tensor([j.input_ids for j in group], dtype=torch.long, device=device)
            positions = torch.arange(length, device=device).unsqueeze(0).expand(len(group), -1)
            logits = self._forward(
                ids, torch.ones_like(ids), positions, cache, torch.arange(length, device=device)
            )
            # n samples of one prompt share its prefilled row.
            expand = [i for i, j in enumerate(group) for _ in range(j.params.n)]
            seqs: list[_Seq] = []
            for job in group:
                job.open_rows = job.params.n
                gen = make_generator(job.params.seed)
                for k in range(job.params.n):
                    picker = None if job.params.plain_greedy else TokenPicker(job.params, length, gen)
                    seqs.append(_Seq(job, k, picker, list(job.input_ids), length=length))
            index = torch.tensor(expand, dtype=torch.long, device=device)
            if len(expand) != len(group):
                logits = logits.index_select(0, index)
            self._pick(seqs, logits, events)
            keep = [i for i, s in enumerate(seqs) if s.finish is None]
            if not keep:
                continue
            tensors: list[tuple[Any, Any]] = [(layer.keys, layer.values) for layer in cache.layers]
            rows_index = torch.tensor([expand[i] for i in keep], dtype=torch.long, device=device)
            if len(keep) != len(group) or expand != list(range(len(group))):
                tensors = [(k.index_select(0, rows_index), v.index_select(0, rows_index)) for k, v in tensors]
            self._merge([seqs[i] for i in keep], tensors)

    def _merge(self, seqs: list[_Seq], tensors: list[tuple[Any, Any]]) -> None:
        """Append prefilled rows to the running batch, left-padding whichever side is shorter."""
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        if not self._rows or self._cache is None:
            merged = tensors
        else:
            old = [(layer.keys, layer.values) for layer in self._cache.layers]
            width_old, width_new = old[0][0].shape[-2], tensors[0][0].shape[-2]
            width = max(width_old, width_new)

            def pad(t: Any, w: int) -> Any:
                return F.pad(t, (0, 0, width - w, 0)) if w < width else t

            merged = [
                (
                    torch.cat([pad(ko, width_old), pad(kn, width_new)]),
                    torch.cat([pad(vo, width_old), pad(vn, width_new)]),
                )
                for (ko, vo), (kn, vn) in zip(old, tensors, strict=True)
            ]
        cache = DynamicCache()
        for i, (k, v) in enumerate(merged):
            cache.update(k, v, i)
        self._cache = cache
        self._rows = [*self._rows, *seqs]

    def _drop_finished(self) -> None:
        import torch

        if all(s.finish is None for s in self._rows):
            return
        keep = [i for i, s in enumerate(self._rows) if s.finish is None]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = None
            return
        width = self._cache.get_seq_length()
        cut = width - max(s.length for s in self._rows)
        index = torch.tensor(keep, dtype=torch.long, device=self.model.device)
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:, :]
            layer.values = layer.values.index_select(0, index)[:, :, cut:, :]

    def _pick(self, seqs: list[_Seq], logits: Any, events: dict[Job, list[Event]]) -> None:
        """Choose each sequence's next token and decide whether it is done."""
        greedy = logits.argmax(dim=-1).tolist()
        now = time.perf_counter()
        cpu_rows: Any = None
        for i, s in enumerate(seqs):
            if s.picker is None:
                token = int(greedy[i])
            else:
                if cpu_rows is None:
                    cpu_rows = logits.float().cpu()
                token = s.picker.pick(cpu_rows[i], s.history)
            job = s.job
            if job.first_token_at is None:
                job.first_token_at = now
            evs = events.setdefault(job, [])
            if token in self.eos:
                s.finish = "stop"
                evs.append(TokenEvent(s.index, [], "stop"))
                continue
            s.generated += 1
            s.pending = token
            if s.picker is not None:
                s.history.append(token)
            finish = None
            if s.generated >= job.params.max_new_tokens:
                finish = "length"
            if job.params.stop:
                if s.picker is None:
                    s.history.append(token)
                if self._stopped(s):
                    finish = "stop"
            s.finish = finish
            evs.append(TokenEvent(s.index, [token], finish))

    def _stopped(self, s: _Seq) -> bool:
        from .text import find_stop

        stops = list(s.job.params.stop)
        # The generated tail long enough to hold any stop string (a token is at least one character
        # here, and byte-level pieces of one character are covered by the extra slack).
        tail = max(len(x) for x in stops) + 4
        prompt_len = len(s.job.input_ids)
        text = self.tokenizer.decode(
            s.history[max(prompt_len, len(s.history) - tail) :], skip_special_tokens=True
        )
        return find_stop(text, stops) is not None
