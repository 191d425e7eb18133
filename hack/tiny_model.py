"""The tiny random model of the runtime tests, ``make demo`` and the real-node e2e tests.

A byte-level BPE tokenizer trained here on a few sentences and a two-layer Llama with seeded random
weights, saved with ``save_pretrained`` as a model image lays out its weights. Nothing is downloaded; the
same seed gives the same files. ``python hack/tiny_model.py OUT_DIR`` in any environment with torch,
transformers and tokenizers (the runtime venv, or the preset image itself: ``hack/seed_images.py`` runs
it there, so building the tiny preset image needs no torch on the host). Only torch, transformers and
tokenizers are imported, and only when called.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes schedules pods onto nodes with GPUs.",
    "KAITO deploys a model preset and answers chat requests.",
    "Hello world! How are you today? I am fine, thank you.",
    "A tiny random model produces random but deterministic text.",
]


def build_tokenizer(path: Path) -> Any:
    """Train a byte-level BPE tokenizer (every byte is in the vocabulary, so no text is unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=256
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, tokenizer: Any, seed: int = 0) -> None:
    """A two-layer Llama with random weights; the EOS logit is pushed down so greedy runs are long."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Random weights would otherwise pick EOS now and then and make token counts flaky; the final
        # RMSNorm output is not sign-controlled, so zero the row and let a bias-free logit of 0 lose.
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
        model.lm_head.weight[tokenizer.pad_token_id].zero_()
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path, safe_serialization=True)


def write_tiny_model(out: Path) -> None:
    """Tokenizer + model files of the tiny model in ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    build_model(out, build_tokenizer(out))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: tiny_model.py OUT_DIR", file=sys.stderr)
        return 2
    write_tiny_model(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
