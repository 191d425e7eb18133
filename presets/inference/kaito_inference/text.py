"""Text helpers of generation (pure; unit-tested): incremental detokenisation and stop strings."""

from __future__ import annotations

from typing import Any


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
