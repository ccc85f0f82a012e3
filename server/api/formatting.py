"""Engine `TokenEvent`s to OpenAI bodies: choice text, finish reasons, usage, both logprobs formats."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from server.api.responses import (
    ChatLogprobs,
    CompletionLogprobs,
    FinishReasonOut,
    PromptTokensDetails,
    TokenLogprobEntry,
    TopLogprobEntry,
    Usage,
)
from server.engine.types import FinishReason, TokenEvent

TokenText = Callable[[int], str]
MIN_LOGPROB = -9999.0  # what OpenAI reports for (practically) impossible tokens; JSON has no -inf


def safe_logprob(value: float) -> float:
    if math.isnan(value):
        return MIN_LOGPROB
    return max(value, MIN_LOGPROB)


def finish_reason_out(reason: FinishReason | None) -> FinishReasonOut | None:
    """`stop` / `length` as clients see them (an aborted request has no client to see it)."""
    if reason is None:
        return None
    return "length" if reason == FinishReason.LENGTH else "stop"


def has_logprob(event: TokenEvent) -> bool:
    return event.token_id is not None and event.logprob is not None


def chat_logprob_entry(event: TokenEvent, token_text: TokenText) -> TokenLogprobEntry:
    assert event.token_id is not None and event.logprob is not None
    text = token_text(event.token_id)
    tops = [
        TopLogprobEntry(
            token=(t := token_text(top.token_id)), logprob=safe_logprob(top.logprob), bytes=list(t.encode())
        )
        for top in event.top_logprobs
    ]
    return TokenLogprobEntry(
        token=text, logprob=safe_logprob(event.logprob), bytes=list(text.encode()), top_logprobs=tops
    )


def chat_logprobs(events: Sequence[TokenEvent], token_text: TokenText) -> ChatLogprobs:
    return ChatLogprobs(content=[chat_logprob_entry(e, token_text) for e in events if has_logprob(e)])


def completion_logprobs(
    events: Sequence[TokenEvent], token_text: TokenText, text_offset: int = 0
) -> CompletionLogprobs:
    """Legacy format: parallel lists; `text_offset` is where each token's text starts in the choice."""
    out = CompletionLogprobs()
    offset = text_offset
    for event in events:
        if has_logprob(event):
            assert event.token_id is not None and event.logprob is not None
            out.tokens.append(token_text(event.token_id))
            out.token_logprobs.append(safe_logprob(event.logprob))
            out.top_logprobs.append(
                {token_text(t.token_id): safe_logprob(t.logprob) for t in event.top_logprobs}
            )
            out.text_offset.append(offset)
        offset += len(event.text)
    return out


def choice_text(events: Sequence[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def final_event(events: Sequence[TokenEvent]) -> TokenEvent | None:
    for event in reversed(events):
        if event.finish_reason is not None:
            return event
    return None


def usage_of(finals: Sequence[TokenEvent | None], n: int) -> Usage:
    """Usage of a request whose choice `i` served prompt `i // n`: prompt tokens count once per
    prompt (from its first choice), completion tokens sum over all choices."""
    prompt = cached = completion = 0
    for i, final in enumerate(finals):
        if final is None:
            continue
        completion += final.completion_tokens
        if i % n == 0:
            prompt += final.prompt_tokens
            cached += final.cached_tokens
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )
