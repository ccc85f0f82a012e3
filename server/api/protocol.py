"""OpenAI request bodies (pydantic, strict): what `/v1/chat/completions` and `/v1/completions` accept.

Range checks that do not depend on the server's settings live here; limits that do (`max_tokens`
cap, `n` cap, prompt length) are checked in `server.api.requests`. Unknown fields are ignored, as
OpenAI clients send extras (`user`, `metadata`, `store`, ...). Text must be valid Unicode (no lone
surrogates) so that every accepted string can be tokenized.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from server.api import session_ids

MAX_STOP = 4
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries in one logit_bias map
INT64_MAX = 2**63 - 1


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from exc
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
SessionId = Annotated[str, AfterValidator(session_ids.check)]
StopStr = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
LogitBias = Annotated[float, Field(ge=-100.0, le=100.0)]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Model):
    include_usage: bool = False


class TextPart(_Model):
    type: Literal["text"]
    text: Text


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _SamplingFields(_Model):
    """Fields both endpoints share."""

    model: Text
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    stop: StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    n: Annotated[int, Field(ge=1, le=INT64_MAX)] = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    session_id: SessionId | None = None
    cache_salt: Annotated[Text, Field(min_length=1, max_length=256)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # as in vLLM
    user: Text | None = None
    # token id (a decimal string, as OpenAI's) -> a bias added to its logit before sampling
    logit_bias: Annotated[dict[str, LogitBias], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT64_MAX)] = 0  # as in vLLM
    return_tokens_as_token_ids: bool = False  # as in vLLM: logprob tokens read "token_id:<id>"
    response_format: dict[str, Any] | None = None  # only {"type": "text"} (`server.api.requests`)

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not (key.isascii() and key.isdigit() and int(key) <= 2**31 - 1):
                raise ValueError(f"logit_bias keys must be token ids (decimal integers), got {key!r}")
        return value

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """The logit_bias map as (token id, bias) pairs, ascending by id."""
        by_id = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}  # "07" and "7": the last
        return tuple(sorted(by_id.items()))

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is only supported without stream")
        return self

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # accepted so that they can be refused with a clear 400 (`server.api.requests.check_supported`)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    # passed to the chat template, as in vLLM
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _continue_or_prompt(self) -> ChatCompletionRequest:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError(
                "continue_final_message and add_generation_prompt cannot both be true "
                "(set add_generation_prompt to false to continue the final message)"
            )
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _prompt_kind(value: Any) -> str | None:
    """Which `PromptInput` member a prompt is, from its first element: one validation, where a plain union
    tried each member (a 131k-id prompt failed the text members id by id first: ~2 ms more on a 2-core CPU)
    and a bad prompt got an error per member. The tags read as type names (`errors._is_field` drops them).
    None (neither a string nor a list): the discriminator's own error."""
    if isinstance(value, str):
        return "str"
    if not isinstance(value, list):
        return None
    first = value[0] if value else None
    if isinstance(first, str):
        return "list[str]"
    if isinstance(first, list):
        return "list[list[int]]"
    return "list[int]"  # ids, and an empty list (its error: at least one item)


PromptInput = Annotated[
    Annotated[Text, Tag("str")]
    | Annotated[list[Text], Field(min_length=1, max_length=64), Tag("list[str]")]
    | Annotated[list[TokenId], Field(min_length=1), Tag("list[int]")]
    | Annotated[
        list[Annotated[list[TokenId], Field(min_length=1)]],
        Field(min_length=1, max_length=64),
        Tag("list[list[int]]"),
    ],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_type",
        custom_error_message="prompt must be a string, a list of strings, a list of token ids or a list of such lists",
    ),
]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # 0 with `echo`: only the prompt (and its logprobs) comes back, as OpenAI's legacy API allows
    max_tokens: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    suffix: Text | None = None
    best_of: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (it must equal n)")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
