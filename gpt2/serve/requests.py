"""The request bodies the HTTP API takes (pydantic models, OpenAI's fields and vLLM's extensions), and
`RequestError`, a bad request's 400 naming its field. Validation that needs the model (token ids in the vocabulary,
the context length) is `gpt2.serve.api`'s."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gpt2.config import SamplingParams, sampling_range_error

MAX_LOGPROBS = 5  # the most alternatives per token a request may ask for (OpenAI's legacy limit)
PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The fields both completion endpoints take: OpenAI's, plus `top_k`, `repetition_penalty` (vLLM's names) and
    `truncate`. Fields OpenAI has and this server does not implement are accepted only at their neutral value, so
    that a client's defaults pass."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(1.0, le=2.0)  # (OpenAI's cap; our ranges: `_in_range`)
    top_p: float | None = 1.0
    top_k: int = 0
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0
    logit_bias: dict[str, float] | None = None
    truncate: bool = False
    """Extension: a prompt longer than the context keeps its tail, and the context window slides past
    block_size, instead of a 400."""

    @field_validator("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "repetition_penalty")
    @classmethod
    def _in_range(cls, value: float | int | None, info: ValidationInfo) -> float | int | None:
        problem = None if value is None else sampling_range_error(info.field_name, value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, logit_bias: dict[str, float] | None) -> None:
        if logit_bias:
            raise ValueError("not supported by this server")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop or []

    def params(self) -> SamplingParams:
        """The request's sampling settings, OpenAI's defaults for nulls."""

        def value(name: str, default: float) -> float:
            got = getattr(self, name)
            return default if got is None else got

        return SamplingParams(
            temperature=value("temperature", 1.0),
            top_k=self.top_k,
            top_p=value("top_p", 1.0),
            repetition_penalty=value("repetition_penalty", 1.0),
            presence_penalty=value("presence_penalty", 0.0),
            frequency_penalty=value("frequency_penalty", 0.0),
        )


class CompletionRequest(GenerationRequest):
    """The body of POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Literal[None, 1] = None
    suffix: Literal[None] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        def ids(value: Any) -> bool:
            return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)

        if isinstance(prompt, list) and not prompt:
            raise ValueError("give at least one prompt")
        ok = (
            isinstance(prompt, str)
            or ids(prompt)
            or isinstance(prompt, list)
            and (all(isinstance(p, str) for p in prompt) or all(ids(p) and p for p in prompt))
        )
        if not ok:
            raise ValueError(f"must be {PROMPT_SHAPES} (none empty)")
        return prompt

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def plain(self) -> dict[str, str]:
        """{role, content} as the chat template reads it (OpenAI's "developer" is a system message)."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(GenerationRequest):
    """The body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("needs logprobs=true")
        return top


class TokenizeRequest(BaseModel):
    """The body of POST /tokenize (vLLM's): a text `prompt`, or chat `messages` rendered with the chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # (GPT-2 adds none: accepted for clients that send it)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class RequestError(Exception):
    """A request this server cannot serve as asked: HTTP `status` (400 unless said), naming `param`."""

    def __init__(self, message: str, param: str | None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status
