"""Pure pieces of the HTTP edge: auth namespaces, usage accounting, logprob sanitizing, fan-out seeds."""

from __future__ import annotations

import json
import math

import pytest

from server.api.auth import ANON_NAMESPACE, authenticate, namespace_of
from server.api.errors import APIError
from server.api.formatting import MIN_LOGPROB, completion_logprobs, safe_logprob, usage_of
from server.api.requests import Prompt, RequestContext, fan_out
from server.engine.types import FinishReason, SamplingParams, TokenEvent, TopLogprob


def test_namespaces_are_per_key_and_hide_the_key() -> None:
    assert authenticate(None, []) == ANON_NAMESPACE
    a = authenticate("Bearer key-a", ["key-a", "key-b"])
    b = authenticate("bearer key-b", ["key-a", "key-b"])
    assert a != b and a == namespace_of("key-a")
    assert "key-a" not in a
    with pytest.raises(APIError) as info:
        authenticate("Bearer key-c", ["key-a"])
    assert info.value.status == 401


def _final(prompt: int, cached: int, completion: int) -> TokenEvent:
    return TokenEvent("r", 1, "", finish_reason=FinishReason.STOP, prompt_tokens=prompt, cached_tokens=cached,
                      completion_tokens=completion)  # fmt: skip


def test_usage_counts_each_prompt_once_and_every_completion() -> None:
    finals = [_final(10, 4, 3), _final(10, 4, 5), _final(7, 0, 2), _final(7, 0, 1)]  # 2 prompts x n=2
    usage = usage_of(finals, n=2)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (17, 11, 28)
    assert usage.prompt_tokens_details.cached_tokens == 4


def test_impossible_logprobs_stay_valid_json() -> None:
    assert safe_logprob(-math.inf) == MIN_LOGPROB and safe_logprob(math.nan) == MIN_LOGPROB
    event = TokenEvent("r", 3, "ab", logprob=-math.inf, top_logprobs=(TopLogprob(3, -math.inf),))
    out = completion_logprobs([event], token_text=lambda i: f"<{i}>", text_offset=5)
    json.dumps(out.model_dump(), allow_nan=False)
    assert out.text_offset == [5] and out.tokens == ["<3>"]


def test_fan_out_gives_each_choice_a_distinct_reproducible_seed() -> None:
    ctx = RequestContext("req-1", "anon", "s")
    reqs = fan_out(ctx, [Prompt((1, 2)), Prompt((3,))], SamplingParams(seed=41), n=2)
    assert [r.request_id for r in reqs] == ["req-1-0", "req-1-1", "req-1-2", "req-1-3"]
    assert [r.params.seed for r in reqs] == [41, 42, 43, 44]
    assert [r.prompt_tokens for r in reqs] == [(1, 2), (1, 2), (3,), (3,)]
    assert all(r.session_id == "s" and r.namespace == "anon" for r in reqs)
