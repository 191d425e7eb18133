"""Request bodies. Pydantic does the type checking; wrong types become 4xx JSON errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool


class GenerateKwargs(BaseModel):
    """``/chat`` ``generate_kwargs`` with upstream's defaults; extra keys are forwarded to ``generate()``.

    Upstream dumps the whole object, defaults included, so these values override the model's own
    generation config for these keys; we keep that so answers match upstream for the same request.
    """

    model_config = ConfigDict(extra="allow")

    max_length: int = Field(default=200, ge=1)
    min_length: int = Field(default=0, ge=0)
    do_sample: StrictBool = True
    early_stopping: StrictBool = False
    num_beams: int = Field(default=1, ge=1, le=16)
    temperature: float = Field(default=1.0, gt=0)
    top_k: int = Field(default=10, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    typical_p: float = Field(default=1.0, gt=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    max_new_tokens: int | None = Field(default=None, ge=1)
    min_new_tokens: int | None = Field(default=None, ge=0)
    num_return_sequences: int = Field(default=1, ge=1, le=16)
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


class ChatMessage(BaseModel):
    """One conversation turn; content is text or a list of OpenAI-style text parts."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None


class UnifiedRequest(BaseModel):
    """Upstream's ``/chat`` body: ``prompt`` (text generation) or ``messages`` (conversation)."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    return_full_text: StrictBool = True
    clean_up_tokenization_spaces: StrictBool = False
    prefix: str | None = None
    handle_long_generation: str | None = None
    generate_kwargs: GenerateKwargs = Field(default_factory=GenerateKwargs)


class StreamOptions(BaseModel):
    """OpenAI ``stream_options``."""

    include_usage: StrictBool = False


class _OpenAIBase(BaseModel):
    """Sampling fields shared by chat and text completions (OpenAI names, vLLM extensions)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logprobs: Any = None
    user: str | None = None
    # vLLM-style extensions
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    min_tokens: int = Field(default=0, ge=0)


class ChatCompletionRequest(_OpenAIBase):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None


class CompletionRequest(_OpenAIBase):
    """``POST /v1/completions`` (OpenAI's default ``max_tokens`` is 16)."""

    prompt: str | list[str]
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = None


Role = Literal["system", "user", "assistant", "tool", "developer"]
