"""Request bodies. Pydantic does the type and range checking; wrong types become 4xx JSON errors.

Every number has a range: floats must be finite (JSON's ``NaN``/``Infinity`` extensions are refused) and
integers have bounds, so no value reaches torch that it would choke on.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from .sampling import SEED_MAX, SEED_MIN

INT32_MAX = 2**31 - 1


class GenerateKwargs(BaseModel):
    """``/chat`` ``generate_kwargs`` with upstream's defaults.

    Upstream dumps the whole object, defaults included, so these values override the model's own
    generation config for these keys; we keep that so answers match upstream for the same request.
    Keys outside these fields are refused by the handler (an allow-list: transformers accepts keys that
    change its return type or crash it).
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    max_length: int = Field(default=200, ge=1, le=INT32_MAX)
    min_length: int = Field(default=0, ge=0, le=INT32_MAX)
    do_sample: StrictBool = True
    early_stopping: StrictBool = False
    num_beams: int = Field(default=1, ge=1, le=16)
    temperature: float = Field(default=1.0, gt=0, le=100)
    top_k: int = Field(default=10, ge=0, le=INT32_MAX)
    top_p: float = Field(default=1.0, gt=0, le=1)
    typical_p: float = Field(default=1.0, gt=0, le=1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=100)
    no_repeat_ngram_size: int = Field(default=0, ge=0, le=INT32_MAX)
    max_new_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    min_new_tokens: int | None = Field(default=None, ge=0, le=INT32_MAX)
    num_return_sequences: int = Field(default=1, ge=1, le=16)
    pad_token_id: int | None = Field(default=None, ge=0, le=INT32_MAX)
    eos_token_id: int | list[int] | None = None
    use_cache: StrictBool = True


class ChatMessage(BaseModel):
    """One conversation turn; content is text or a list of OpenAI-style text parts."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None


class UnifiedRequest(BaseModel):
    """Upstream's ``/chat`` body: ``prompt`` (text generation) or ``messages`` (conversation)."""

    model_config = ConfigDict(allow_inf_nan=False)

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

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logprobs: Any = None
    user: str | None = None
    # vLLM-style extensions
    top_k: int = Field(default=0, ge=-1, le=INT32_MAX)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=100)
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)


class ChatCompletionRequest(_OpenAIBase):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    tools: list[Any] | None = None


# A token id as a prompt: OpenAI accepts lists of ids (and lists of such lists) as well as text.
TokenIds = list[int]


class CompletionRequest(_OpenAIBase):
    """``POST /v1/completions`` (OpenAI's default ``max_tokens`` is 16).

    ``prompt`` is a string, a list of strings, a list of token ids or a list of token-id lists.
    """

    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=16)
