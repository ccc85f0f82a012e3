"""Prompt logprobs in the two formats clients use.

- OpenAI's legacy completions (`echo: true` with `logprobs: k`): the prompt's tokens lead the choice's
  `logprobs` lists, the first with a null logprob and null alternatives (nothing precedes it); lm-eval's
  `local-completions` loglikelihood reads these.
- vLLM's `prompt_logprobs: k`: a list with one entry per prompt token, null for the first, else a map from
  token id (a string) to `{"logprob", "rank", "decoded_token"}` holding the prompt token and its k best
  alternatives. Completions put it on each choice, chat on the response.

The engine computes them (`server.engine.prompt_logprobs`); this module only formats them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from server.api.formatting import safe_logprob, unique_names
from server.api.responses import CompletionLogprobs
from server.engine.types import PromptLogprob, TokenEvent

TokenText = Callable[[int], str]
Entries = Sequence[PromptLogprob | None]


def prompt_entries(events: Sequence[TokenEvent]) -> Entries | None:
    """The prompt logprobs a choice's events carry (on its first event), if it asked for them."""
    return events[0].prompt_logprobs if events else None


def legacy(entries: Entries, token_text: TokenText, prompt_ids: Sequence[int]) -> CompletionLogprobs:
    """The prompt part of a legacy `logprobs` object; `text_offset` counts from the start of the echo."""
    out = CompletionLogprobs()
    offset = 0
    for token_id, entry in zip(prompt_ids, entries, strict=True):
        text = token_text(token_id)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.tokens.append(text)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        # distinct tokens with one text are named by id (`unique_names`), the token and its map alike
        named = unique_names([token_id, *(t.token_id for t in entry.top)], token_text)
        out.tokens.append(named[token_id])
        out.token_logprobs.append(safe_logprob(entry.logprob))
        tops = {named[t.token_id]: safe_logprob(t.logprob) for t in entry.top}
        out.top_logprobs.append({named[token_id]: safe_logprob(entry.logprob), **tops})
    return out


def prepend(prompt: CompletionLogprobs, generated: CompletionLogprobs) -> CompletionLogprobs:
    """Prompt logprobs followed by the generated tokens' (whose offsets already count the echo)."""
    return CompletionLogprobs(
        tokens=prompt.tokens + generated.tokens,
        token_logprobs=prompt.token_logprobs + generated.token_logprobs,
        top_logprobs=prompt.top_logprobs + generated.top_logprobs,
        text_offset=prompt.text_offset + generated.text_offset,
    )


def vllm_format(entries: Entries, token_text: TokenText) -> list[dict[str, dict[str, Any]] | None]:
    return [None if e is None else _vllm_entry(e, token_text) for e in entries]


def _vllm_entry(entry: PromptLogprob, token_text: TokenText) -> dict[str, dict[str, Any]]:
    out = {
        str(entry.token_id): {
            "logprob": safe_logprob(entry.logprob),
            "rank": entry.rank,
            "decoded_token": token_text(entry.token_id),
        }
    }
    for rank, alt in enumerate(entry.top, start=1):
        out.setdefault(
            str(alt.token_id),
            {"logprob": safe_logprob(alt.logprob), "rank": rank, "decoded_token": token_text(alt.token_id)},
        )
    return out
