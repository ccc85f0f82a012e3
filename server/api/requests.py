"""From a validated OpenAI request to the engine's `GenerationRequest`s (one per choice).

Checks the limits that depend on the server's settings and tokenizer: the model name, `n`,
`max_tokens`, the prompt length, token ids inside the vocabulary.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from server.api.errors import APIError, bad_request
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.engine.types import GenerationRequest, SamplingParams
from server.model.tokenizer import RESERVED_TEMPLATE_NAMES
from server.settings import Settings

DEFAULT_MAX_TOKENS = 256
_SEED_MOD = 2**63


@dataclass(frozen=True)
class Prompt:
    """One tokenized prompt: `boundaries` are message ends (chat) and `text` is the prompt (echo)."""

    tokens: tuple[int, ...]
    boundaries: tuple[int, ...] = ()
    text: str = ""


@dataclass(frozen=True)
class RequestContext:
    """Who asks: `namespace` comes from the API key, `session_id` from the header or body."""

    request_id: str
    namespace: str
    session_id: str | None
    tree: str | None = None  # the state cache's prefix tree (`cache_tree`)


def check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(404, f"The model '{requested}' does not exist.", param="model", code="model_not_found")


SHARED_TREE = "*"  # the one tree of --share-prefixes-across-keys (no namespace is named "*")


def cache_tree(namespace: str, salt: str | None, across_keys: bool) -> str:
    """The prefix tree a request looks up and captures in: its namespace's (every session and session-less
    request of an API key share it), the server's one tree with `--share-prefixes-across-keys`, and in
    either case a separate one per `cache_salt` (only requests with the same salt share prefixes)."""
    tree = SHARED_TREE if across_keys else namespace
    if salt is None:
        return tree
    return f"{tree}|salt-{hashlib.sha256(salt.encode()).hexdigest()[:24]}"


def resolve_session(header: str | None, body: str | None) -> str | None:
    if header is not None and body is not None and header != body:
        raise bad_request("X-Session-ID and session_id disagree.", param="session_id")
    return header if header is not None else body


def _max_tokens(requested: int | None, settings: Settings, param: str) -> int:
    if requested is None:
        return min(DEFAULT_MAX_TOKENS, settings.max_tokens_cap)
    if requested > settings.max_tokens_cap:
        raise bad_request(f"{param} must be <= {settings.max_tokens_cap}.", param=param)
    return requested


def _check_n(n: int, settings: Settings) -> None:
    if n > settings.max_n:
        raise bad_request(f"n must be <= {settings.max_n}.", param="n")


def context_length_exceeded(n_tokens: int, limit: int, param: str) -> APIError:
    return APIError(
        400,
        f"The prompt has {n_tokens} tokens; this server accepts at most {limit}.",
        param=param,
        code="context_length_exceeded",
    )


def check_prompt_length(n_tokens: int, settings: Settings, param: str) -> None:
    if n_tokens > settings.max_prompt_tokens:
        raise context_length_exceeded(n_tokens, settings.max_prompt_tokens, param)
    if n_tokens == 0:
        raise bad_request("The prompt must not be empty.", param=param)


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    if ids and max(ids) >= vocab_size:  # the scan in C; the first offender's value for the message
        bad = next(i for i in ids if i >= vocab_size)
        raise bad_request(f"token id {bad} is outside the vocabulary (size {vocab_size}).", param=param)


def chat_sampling(req: ChatCompletionRequest, settings: Settings) -> SamplingParams:
    _check_n(req.n, settings)
    max_tokens = _max_tokens(
        req.requested_max_tokens,
        settings,
        "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
    )
    _check_template_kwargs(req.chat_template_kwargs)
    return _sampling(req, max_tokens, req.logprobs, req.top_logprobs or 0)


def completion_sampling(req: CompletionRequest, settings: Settings) -> SamplingParams:
    _check_n(req.n, settings)
    if req.stream and scored_prompt(req) is not None:
        raise bad_request(
            "echo with logprobs (prompt logprobs) is only supported without stream.", param="echo"
        )
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens 0 needs echo (only the prompt comes back).", param="max_tokens")
    # max_tokens 0: one token is generated and dropped from the response (the engine always samples one)
    max_tokens = max(1, _max_tokens(req.requested_max_tokens, settings, "max_tokens"))
    wants = req.logprobs is not None
    return _sampling(req, max_tokens, wants, req.logprobs or 0)


def scored_prompt(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    """How many alternatives each prompt token's logprob entry carries, if the request wants them: vLLM's
    `prompt_logprobs`, or OpenAI's legacy `echo` + `logprobs` (completions)."""
    if req.prompt_logprobs is not None:
        return req.prompt_logprobs
    if isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None:
        return req.logprobs
    return None


def _sampling(
    req: ChatCompletionRequest | CompletionRequest,
    max_tokens: int,
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    check_supported(req)
    requested = req.requested_max_tokens
    _check_min_tokens(req.min_tokens, requested if requested is not None else max_tokens)
    stop = req.stop_list()
    fields: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": max(req.top_k, 0) if req.top_k is not None else None,
        "min_p": req.min_p,
        "seed": req.seed,
        "stop": stop,
        "stop_token_ids": tuple(req.stop_token_ids or ()),
        "ignore_eos": req.ignore_eos,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "logprobs": logprobs,
        "top_logprobs": top_logprobs,
        "logit_bias": req.logit_bias_pairs(),
        "min_tokens": req.min_tokens,
    }
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as exc:
        raise bad_request(str(exc)) from exc


def unsupported(message: str, param: str) -> APIError:
    return bad_request(message, param=param, code="unsupported_parameter")


def check_supported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """Refuse what this server cannot do rather than ignore it: tool calling (`tools` unless `tool_choice`
    is "none", a `tool_choice` other than "none", the legacy `functions` / `function_call`) and any
    `response_format` but text (no constrained decoding). No served model family calls tools."""
    if isinstance(req, ChatCompletionRequest):
        _check_tools(req)
    fmt = req.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        raise unsupported(
            f"response_format {fmt.get('type')!r} is not supported by this server (only 'text').",
            "response_format",
        )


def _check_tools(req: ChatCompletionRequest) -> None:
    if req.tool_choice not in (None, "none"):
        raise unsupported("tool_choice is not supported by this server (only 'none').", "tool_choice")
    if req.tools and req.tool_choice != "none":
        raise unsupported("tools (tool calling) are not supported by this server.", "tools")
    if req.functions or req.function_call not in (None, "none"):
        param = "functions" if req.functions else "function_call"
        raise unsupported("function calling is not supported by this server.", param)


def _check_min_tokens(min_tokens: int, max_tokens: int) -> None:
    if min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({min_tokens}) must be <= max_tokens ({max_tokens}).", param="min_tokens"
        )


def _check_template_kwargs(kwargs: Mapping[str, Any] | None) -> None:
    reserved = sorted(set(kwargs or {}) & RESERVED_TEMPLATE_NAMES)
    if reserved:
        raise bad_request(
            f"chat_template_kwargs may not set {', '.join(reserved)} (a request field or the renderer's own).",
            param="chat_template_kwargs",
        )


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    check_token_ids([t for t, _ in params.logit_bias], vocab_size, "logit_bias")


def fan_out(
    ctx: RequestContext,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    n: int,
    prompt_logprobs: int | None = None,
) -> list[GenerationRequest]:
    """One request per (prompt, choice), choice index = prompt_index * n + j. Seeded choices get
    distinct, reproducible seeds (seed + index)."""
    now = time.monotonic()
    out = []
    for p_idx, prompt in enumerate(prompts):
        for j in range(n):
            index = p_idx * n + j
            choice_params = params
            if params.seed is not None and index:
                choice_params = _with_seed(params, (params.seed + index) % _SEED_MOD)
            out.append(
                GenerationRequest(
                    request_id=f"{ctx.request_id}-{index}",
                    prompt_tokens=prompt.tokens,
                    params=choice_params,
                    namespace=ctx.namespace,
                    session_id=ctx.session_id,
                    tree=ctx.tree,
                    prompt_logprobs=prompt_logprobs,
                    boundaries=prompt.boundaries,
                    arrival_time=now,
                )
            )
    return out


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=seed)


def with_extra_stop(params: SamplingParams, extra: Sequence[str]) -> SamplingParams:
    """Add the chat template's own stop strings (e.g. a fallback template's end-of-turn marker)."""
    added = tuple(s for s in extra if s and s not in params.stop)
    return replace(params, stop=params.stop + added) if added else params
