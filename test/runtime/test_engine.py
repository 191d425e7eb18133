"""Pure pieces of the engine: incremental detokenisation, stop strings, dtype and template flags."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from kaito_inference.engine import (
    IncrementalDetokenizer,
    find_stop,
    load_chat_template,
    resolve_dtype,
    safe_prefix_length,
)
from runtime_support import CORPUS

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(30)]


def metaspace_tokenizer() -> Any:
    """A sentencepiece-style tokenizer (▁ for spaces, leading space dropped on decode), as Llama/Mistral use."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Metaspace()])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def byte_level_tokenizer(tmp_path: Path) -> Any:
    from runtime_support import build_tokenizer

    return build_tokenizer(tmp_path)


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_incremental_detokenizer_matches_full_decode(kind: str, tmp_path: Path) -> None:
    tok = byte_level_tokenizer(tmp_path) if kind == "byte-level" else metaspace_tokenizer()
    texts = [*CORPUS, "naïve café \u2013 日本語 😀 mixed bytes", "  leading and   double spaces"]
    rng = random.Random(0)
    samples = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    # Random id sequences too: partial UTF-8 byte tokens must be held back, never emitted as garbage
    # that a later token would have to take back.
    samples += [[rng.randrange(len(tok)) for _ in range(40)] for _ in range(20)]
    for n, ids in enumerate(samples):
        detok = IncrementalDetokenizer(tok)
        streamed = "".join(detok.push([i]) for i in ids)
        full = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if n < len(texts):
            assert streamed == full
        else:
            # Random ids may end inside a multi-byte character: that tail is held back, nothing else.
            assert full.startswith(streamed)
            assert "\ufffd" in full[len(streamed) :] or streamed == full


def test_find_stop_and_safe_prefix() -> None:
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello", ["xyz"]) is None
    assert find_stop("hello", []) is None
    # A suffix that could grow into a stop string is held back ...
    assert safe_prefix_length("the end is ne", ["near"]) == len("the end is ")
    assert safe_prefix_length("abc", ["cd", "bcx"]) == 1
    # ... text up to a complete match is safe, the rest never is.
    assert safe_prefix_length("say STOP now", ["STOP"]) == 4
    assert safe_prefix_length("plain text", ["zz"]) == len("plain text")


def test_resolve_dtype() -> None:
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("auto") == "auto"
    assert resolve_dtype(None) is None
    with pytest.raises(ValueError, match="Invalid torch dtype"):
        resolve_dtype("int3")


def test_chat_template_inline_or_file(tmp_path: Path) -> None:
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert load_chat_template(inline) == inline
    path = tmp_path / "t.jinja"
    path.write_text(inline)
    assert load_chat_template(str(path)) == inline
    assert load_chat_template("{{ a }}\\n{{ b }}") == "{{ a }}\n{{ b }}"
