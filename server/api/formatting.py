"""Engine `TokenEvent`s to OpenAI bodies: choice text, finish reasons, usage, both logprobs formats.

Logprob entries name a token by its text, or by `token_id:<id>` (`TokenNames`): always with vLLM's
`return_tokens_as_token_ids`, and for a token whose bytes are not valid UTF-8 on their own (part of a
multi-byte character: its text would be U+FFFD, the same for every such token). Chat entries carry the
token's own bytes in `bytes`. In the legacy completions format, whose `top_logprobs` maps are keyed by
name, tokens whose names would collide in one map (distinct tokens with one text) are named by id too,
and the chosen token's `tokens` entry is the name its map uses.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
TokenBytes = Callable[[int], bytes]
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


def token_id_name(token_id: int) -> str:
    return f"token_id:{token_id}"


@dataclass(frozen=True)
class TokenNames:
    """A `TokenText` for logprob entries: a token's text, or `token_id:<id>` with `as_ids` or when its bytes
    (`raw`, the tokenizer's `token_bytes`) are not valid UTF-8 on their own."""

    text: TokenText
    raw: TokenBytes | None = None
    as_ids: bool = False

    def __call__(self, token_id: int) -> str:
        if self.as_ids or not self._valid_utf8(token_id):
            return token_id_name(token_id)
        return self.text(token_id)

    def bytes_of(self, token_id: int) -> list[int]:
        raw = self.raw(token_id) if self.raw is not None else self.text(token_id).encode()
        return list(raw)

    def _valid_utf8(self, token_id: int) -> bool:
        if self.raw is None:
            return True
        try:
            self.raw(token_id).decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True


def token_names(tokenizer: Any, as_ids: bool = False) -> TokenNames:
    """The served tokenizer's `TokenNames` (its `token_text`, and `token_bytes` where it has one)."""
    return TokenNames(tokenizer.token_text, getattr(tokenizer, "token_bytes", None), as_ids)


def token_bytes_of(names: TokenText, token_id: int) -> list[int]:
    return names.bytes_of(token_id) if isinstance(names, TokenNames) else list(names(token_id).encode())


def unique_names(ids: Sequence[int], names: TokenText) -> dict[int, str]:
    """Names of the tokens that share one legacy `top_logprobs` map: `token_id:<id>` for those whose names
    would collide (distinct tokens with one text), so that no entry overwrites another."""
    named = {i: names(i) for i in dict.fromkeys(ids)}
    counts = Counter(named.values())
    return {i: name if counts[name] == 1 else token_id_name(i) for i, name in named.items()}


def has_logprob(event: TokenEvent) -> bool:
    return event.token_id is not None and event.logprob is not None


def chat_logprob_entry(event: TokenEvent, token_text: TokenText) -> TokenLogprobEntry:
    assert event.token_id is not None and event.logprob is not None
    tops = [
        TopLogprobEntry(
            token=token_text(top.token_id),
            logprob=safe_logprob(top.logprob),
            bytes=token_bytes_of(token_text, top.token_id),
        )
        for top in event.top_logprobs
    ]
    return TokenLogprobEntry(
        token=token_text(event.token_id),
        logprob=safe_logprob(event.logprob),
        bytes=token_bytes_of(token_text, event.token_id),
        top_logprobs=tops,
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
            named = unique_names([event.token_id, *(t.token_id for t in event.top_logprobs)], token_text)
            out.tokens.append(named[event.token_id])
            out.token_logprobs.append(safe_logprob(event.logprob))
            out.top_logprobs.append({named[t.token_id]: safe_logprob(t.logprob) for t in event.top_logprobs})
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
