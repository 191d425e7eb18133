"""Per-request token choice for a batch whose rows each carry their own sampling parameters.

The batch scheduler runs one forward pass for every running sequence and then asks each sequence's
:class:`TokenPicker` for its next token. Greedy rows with nothing to adjust take the batched fast path
(one ``argmax`` for all of them); the others apply transformers' own logits processors (the classes
``generate()`` builds from the same keyword arguments) to their row and draw from it with the request's
own :class:`torch.Generator`, so a seeded request draws the same numbers whether it runs alone or
beside others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

# Seeds accepted from clients: anything a signed or unsigned 64-bit integer can hold. torch's generator
# takes an unsigned 64-bit seed; negative seeds are mapped onto it two's-complement style.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """Everything that decides a request's tokens besides the prompt (validated by the HTTP layer)."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def plain_greedy(self) -> bool:
        """True when the next token is the argmax of the raw logits (the batched fast path)."""
        return (
            not self.do_sample
            and self.repetition_penalty == 1.0
            and self.no_repeat_ngram_size == 0
            and self.min_new_tokens == 0
        )


def make_generator(seed: int | None) -> Any:
    """A CPU generator seeded by the request (or from the OS when it gave no seed)."""
    import torch

    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.manual_seed(random.SystemRandom().getrandbits(63))
    else:
        gen.manual_seed(seed & SEED_MAX)
    return gen


class TokenPicker:
    """Chooses one sequence's next token from its logits row with the request's parameters."""

    def __init__(self, params: SamplingParams, prompt_len: int, generator: Any) -> None:
        from transformers import (
            LogitsProcessorList,
            MinNewTokensLengthLogitsProcessor,
            MinPLogitsWarper,
            NoRepeatNGramLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
            TypicalLogitsWarper,
        )

        self.params = params
        self.generator = generator
        procs: list[Any] = []
        # Same order as generate(): processors that shape the distribution, then the sampling warpers.
        if params.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.no_repeat_ngram_size > 0:
            procs.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
        if params.min_new_tokens > 0 and params.eos_token_ids:
            procs.append(
                MinNewTokensLengthLogitsProcessor(
                    prompt_len, params.min_new_tokens, list(params.eos_token_ids), device="cpu"
                )
            )
        self._processors = LogitsProcessorList(procs)
        warpers: list[Any] = []
        if params.do_sample:
            if params.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
            if params.min_p > 0.0:
                warpers.append(MinPLogitsWarper(params.min_p))
            if params.typical_p < 1.0:
                warpers.append(TypicalLogitsWarper(params.typical_p))
        self._warpers = LogitsProcessorList(warpers)

    def pick(self, logits: Any, history: list[int]) -> int:
        """Next token for a ``[vocab]`` float32 CPU logits row; ``history`` is prompt + generated ids."""
        import torch

        raw = logits.unsqueeze(0)
        scores = raw
        if len(self._processors) or len(self._warpers):
            ids: Any = torch.tensor([history], dtype=torch.long)
            if len(self._processors):
                scores = self._processors(ids, scores)
            if not self.params.do_sample:
                return int(scores.argmax(dim=-1))
            shaped = self._warpers(ids, scores) if len(self._warpers) else scores
        elif not self.params.do_sample:
            return int(raw.argmax(dim=-1))
        else:
            shaped = scores
        probs = torch.softmax(shaped, dim=-1)
        # A tiny temperature overflows the scaled logits and the softmax turns into NaN; its limit is
        # the argmax, which is also what the client asked for in effect. Never let torch.multinomial
        # raise inside the shared batch step.
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
            return int(scores.argmax(dim=-1))
        return int(torch.multinomial(probs, 1, generator=self.generator))
