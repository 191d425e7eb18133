"""OpenAI-compatible ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed or not."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from .engine import Engine, GenerationRequest, GenerationResult
from .errors import ClientError
from .handling import (
    check_text,
    check_token_ids,
    context_check,
    run_generations,
    stop_list,
    stream_response,
    tokenize,
)
from .routes_chat import message_dicts
from .routes_models import check_model
from .sampling import SamplingParams
from .schemas import ChatCompletionRequest, CompletionRequest
from .state import AppState, app_state

router = APIRouter()
State = Annotated[AppState, Depends(app_state)]


def openai_sampling(
    body: ChatCompletionRequest | CompletionRequest, max_new: int, engine: Engine, stops: tuple[str, ...]
) -> SamplingParams:
    """OpenAI sampling fields as per-request parameters; refuses what would be silently ignored."""
    if body.presence_penalty or body.frequency_penalty:
        raise ClientError(
            "presence_penalty and frequency_penalty are not supported", param="presence_penalty"
        )
    if body.logprobs:
        raise ClientError("logprobs are not supported", param="logprobs")
    # Unknown fields are accepted (clients send many optional ones); these would change the answer if
    # honoured, so silently ignoring them would be wrong.
    extra = body.model_extra or {}
    if extra.get("logit_bias"):
        raise ClientError("logit_bias is not supported", param="logit_bias")
    response_format = extra.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
        raise ClientError("only the 'text' response_format is supported", param="response_format")
    if body.stream and body.n > 1:
        raise ClientError("n > 1 is not supported with stream", param="n")
    sample = body.temperature > 0
    if not sample and body.n > 1:
        raise ClientError("n > 1 needs temperature > 0 (greedy decoding gives one answer)", param="n")
    return SamplingParams(
        max_new_tokens=max_new,
        min_new_tokens=min(body.min_tokens, max_new),
        do_sample=sample,
        temperature=body.temperature if sample else 1.0,
        # top_k 0 (or vLLM's -1) disables top-k so sampling follows OpenAI's temperature/top_p semantics.
        top_k=max(0, body.top_k),
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        eos_token_ids=tuple(sorted(engine.loaded.eos_token_ids)),
        seed=body.seed,
        n=body.n,
        stop=stops,
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: State
) -> dict[str, Any] | StreamingResponse:
    """OpenAI chat completions, optionally streamed as server-sent events."""
    check_model(state, body.model)
    engine = state.require()
    if body.tools:
        raise ClientError("tools are not supported by this runtime", param="tools")
    stops = stop_list(body.stop)
    check_text(stops, "stop")
    input_ids = await tokenize(engine.encode_messages, message_dicts(body.messages))
    max_new = context_check(engine, len(input_ids), body.max_completion_tokens or body.max_tokens, "messages")
    req = GenerationRequest(input_ids=input_ids, params=openai_sampling(body, max_new, engine, stops))
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.cfg.model_id}
    if body.stream:
        chunk_base = {**base, "object": "chat.completion.chunk"}

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            delta = {"content": text} if finish is None else {}
            return {**chunk_base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        first = {
            **chunk_base,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        }
        return stream_response(
            state.metrics, "/v1/chat/completions", engine, req, chunk, first, chunk_base, _include_usage(body)
        )
    (result,) = await run_generations(request, state.metrics, "/v1/chat/completions", engine, [req])
    return {
        **base,
        "object": "chat.completion",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": s.text},
                "logprobs": None,
                "finish_reason": s.finish_reason,
            }
            for i, s in enumerate(result.sequences)
        ],
        "usage": _usage(result.prompt_tokens, result.completion_tokens),
    }


def _prompts(body: CompletionRequest, engine: Engine, cap: int) -> list[str | list[int]]:
    """The request's prompts: text, or token ids (a flat list is one prompt, a list of lists many)."""
    p = body.prompt
    prompts: list[str | list[int]]
    if isinstance(p, str):
        prompts = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [[int(x) for x in p if isinstance(x, int)]]
    else:
        prompts = [x for x in p if isinstance(x, str | list)]
    if not prompts or any(len(x) == 0 for x in prompts):
        raise ClientError(
            "prompt must be a non-empty string, list of strings, list of token ids or list of such lists",
            param="prompt",
        )
    if len(prompts) > cap:
        raise ClientError(f"at most {cap} prompts per request (got {len(prompts)})", param="prompt")
    for i, x in enumerate(prompts):
        if isinstance(x, str):
            check_text(x, "prompt")
        else:
            check_token_ids(engine, x, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    return prompts


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, state: State
) -> dict[str, Any] | StreamingResponse:
    """OpenAI text completions, optionally streamed as server-sent events."""
    check_model(state, body.model)
    engine = state.require()
    if body.suffix:
        raise ClientError("suffix is not supported", param="suffix")
    if body.best_of not in (None, 1, body.n):
        raise ClientError("best_of is not supported", param="best_of")
    prompts = _prompts(body, engine, state.cfg.max_prompts_per_request)
    if body.stream and len(prompts) > 1:
        raise ClientError("stream supports a single prompt", param="prompt")
    if len(prompts) > 1 and len(prompts) * body.n > state.cfg.max_prompts_per_request:
        raise ClientError(
            f"prompts x n must be at most {state.cfg.max_prompts_per_request} (got {len(prompts) * body.n})",
            param="n",
        )
    stops = stop_list(body.stop)
    check_text(stops, "stop")
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    reqs: list[GenerationRequest] = []
    texts: list[str] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = await tokenize(engine.encode_prompt, prompt)
            texts.append(prompt)
        else:
            ids = prompt
            texts.append(engine.tokenizer.decode(ids, skip_special_tokens=False) if body.echo else "")
        max_new = context_check(engine, len(ids), max_tokens, "prompt")
        reqs.append(GenerationRequest(input_ids=ids, params=openai_sampling(body, max_new, engine, stops)))
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.cfg.model_id}
    if body.stream:
        chunk_base = {**base, "object": "text_completion"}

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {
                **chunk_base,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        first = chunk(texts[0], None) if body.echo else None
        return stream_response(
            state.metrics, "/v1/completions", engine, reqs[0], chunk, first, chunk_base, _include_usage(body)
        )
    results: list[GenerationResult] = await run_generations(
        request, state.metrics, "/v1/completions", engine, reqs
    )
    choices: list[dict[str, Any]] = []
    prompt_tokens = completion_tokens = 0
    for text, result in zip(texts, results, strict=True):
        prompt_tokens += result.prompt_tokens
        completion_tokens += result.completion_tokens
        for s in result.sequences:
            choices.append(
                {
                    "index": len(choices),
                    "text": (text + s.text) if body.echo else s.text,
                    "logprobs": None,
                    "finish_reason": s.finish_reason,
                }
            )
    return {
        **base,
        "object": "text_completion",
        "choices": choices,
        "usage": _usage(prompt_tokens, completion_tokens),
    }
