"""Upstream's ``POST /chat``: ``prompt`` or ``messages`` in, ``{"Result": text}`` out."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from .engine import Engine, GenerationRequest
from .errors import ClientError
from .handling import check_text, context_check, run_generations, tokenize
from .sampling import SamplingParams
from .schemas import ChatMessage, GenerateKwargs, UnifiedRequest
from .state import AppState, app_state

router = APIRouter()
State = Annotated[AppState, Depends(app_state)]

ALLOWED_GENERATE_KWARGS = frozenset(GenerateKwargs.model_fields)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template wants them (text parts joined; ``developer`` is ``system``)."""
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        content = msg.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ClientError(
                        f"messages[{i}]: only text content parts are supported", param="messages"
                    )
                texts.append(part["text"])
            content = "".join(texts)
        role = "system" if msg.role == "developer" else msg.role
        out.append({"role": role, "content": content or ""})
    check_text(out, "messages")
    return out


def _token_ids(value: int | list[int] | None, engine: Engine, key: str) -> list[int] | None:
    if value is None:
        return None
    ids = [value] if isinstance(value, int) else value
    bad = [i for i in ids if not 0 <= i < engine.vocab_size]
    if bad or not ids:
        raise ClientError(
            f"generate_kwargs.{key} must name token ids of this model (0 to {engine.vocab_size - 1})"
        )
    return ids


def chat_sampling(kw: GenerateKwargs, engine: Engine, prompt_len: int) -> SamplingParams:
    """``generate_kwargs`` as per-request sampling parameters, with upstream's meaning of each key."""
    extra = sorted(kw.model_extra or {})
    if extra:
        raise ClientError(
            f"generate_kwargs cannot set {', '.join(extra)}; supported keys: "
            f"{', '.join(sorted(ALLOWED_GENERATE_KWARGS))}"
        )
    if kw.num_beams != 1:
        raise ClientError(
            "generate_kwargs.num_beams must be 1: beam search is not supported by this runtime's "
            "batched generation (use do_sample or greedy decoding)"
        )
    ctx = engine.context_length
    fields = kw.model_fields_set
    if ctx is not None:
        for key in ("max_length", "max_new_tokens"):
            value = getattr(kw, key)
            if value is not None and (key in fields or key == "max_new_tokens") and value > ctx:
                raise ClientError(
                    f"generate_kwargs.{key}={value} exceeds the model's context length of {ctx} tokens"
                )
    # generate(): max_new_tokens wins over max_length (which counts the prompt); at least one token.
    max_new = kw.max_new_tokens if kw.max_new_tokens is not None else max(1, kw.max_length - prompt_len)
    if ctx is not None:
        max_new = min(max_new, max(1, ctx - prompt_len))
    min_new = kw.min_new_tokens if kw.min_new_tokens is not None else max(0, kw.min_length - prompt_len)
    eos = _token_ids(kw.eos_token_id, engine, "eos_token_id")
    _token_ids(kw.pad_token_id, engine, "pad_token_id")
    return SamplingParams(
        max_new_tokens=max_new,
        min_new_tokens=min(min_new, max_new),
        do_sample=kw.do_sample,
        temperature=kw.temperature,
        top_k=kw.top_k,
        top_p=kw.top_p,
        typical_p=kw.typical_p,
        min_p=kw.min_p,
        repetition_penalty=kw.repetition_penalty,
        no_repeat_ngram_size=kw.no_repeat_ngram_size,
        # Upstream passed only the tokenizer's EOS, so chat models whose turns end with another token
        # (phi-3's <|end|>, llama-3's <|eot_id|>, listed in generation_config) ran on to max_length;
        # stop on all of them.
        eos_token_ids=tuple(eos if eos is not None else sorted(engine.loaded.eos_token_ids)),
        n=kw.num_return_sequences,
    )


@router.post("/chat")
async def chat(body: UnifiedRequest, request: Request, state: State) -> dict[str, Any]:
    """Upstream's generation endpoint: ``prompt`` or ``messages`` in, ``{"Result": text}`` out."""
    engine = state.require()
    cfg = state.cfg
    check_text(body.prompt, "prompt")
    check_text(body.prefix, "prefix")
    use_messages = body.messages is not None and (cfg.pipeline == "conversational" or not body.prompt)
    if use_messages:
        if not body.messages:
            raise ClientError("Conversational parameter messages required")
        input_ids = await tokenize(engine.encode_messages, message_dicts(body.messages))
    else:
        if not body.prompt:
            raise ClientError(
                "Conversational parameter messages required"
                if cfg.pipeline == "conversational"
                else "Text generation parameter prompt required"
            )
        input_ids = await tokenize(engine.encode_prompt, (body.prefix or "") + body.prompt)

    kw = body.generate_kwargs
    ctx = engine.context_length
    if body.handle_long_generation not in (None, "hole"):
        raise ClientError("handle_long_generation must be 'hole' or null")
    if body.handle_long_generation == "hole" and ctx is not None:
        keep = ctx - (kw.max_new_tokens or 1)
        if keep < 1:
            raise ClientError(f"generate_kwargs.max_new_tokens leaves no room for the prompt in {ctx} tokens")
        input_ids = input_ids[-keep:]
    elif ctx is not None and len(input_ids) >= ctx:
        raise ClientError(
            f"the prompt has {len(input_ids)} tokens but the model's context length is {ctx} tokens "
            "(set handle_long_generation to 'hole' to keep only its end)"
        )
    if not input_ids:
        raise ClientError("the prompt is empty after tokenization")
    params = chat_sampling(kw, engine, len(input_ids))
    context_check(engine, len(input_ids), params.max_new_tokens, "prompt")
    req = GenerationRequest(
        input_ids=input_ids, params=params, clean_up_tokenization_spaces=body.clean_up_tokenization_spaces
    )
    (result,) = await run_generations(request, state.metrics, "/chat", engine, [req])
    if use_messages:
        # Upstream returned a Python repr of the whole conversation here; the reply text is what
        # callers actually want.
        return {"Result": "".join(s.text for s in result.sequences)}
    lead = (body.prompt or "") if body.return_full_text else ""
    return {"Result": "".join(lead + s.text for s in result.sequences)}
