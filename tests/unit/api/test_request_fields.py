"""Request fields beyond the basics: logit_bias, min_tokens, the refused tools / response_format, chat
template options, and how logprob entries name tokens (return_tokens_as_token_ids, byte tokens)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from server.api.errors import APIError
from server.api.formatting import TokenNames, chat_logprob_entry, completion_logprobs, unique_names
from server.api.protocol import MAX_LOGIT_BIAS, ChatCompletionRequest, CompletionRequest
from server.api.requests import chat_sampling, check_logit_bias, check_token_ids, completion_sampling
from server.engine.types import SamplingParams, TokenEvent, TopLogprob
from server.settings import Settings

SETTINGS = Settings(model="/nonexistent/tiny", max_tokens_cap=64)
MSG = [{"role": "user", "content": "hi"}]


def _chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "tiny", "messages": MSG, **fields}, strict=False)


def _chat_params(**fields: Any) -> SamplingParams:
    return chat_sampling(_chat(**fields), SETTINGS)


def _refused(**fields: Any) -> APIError:
    with pytest.raises(APIError) as info:
        _chat_params(**fields)
    assert info.value.status == 400
    return info.value


# ---- logit_bias and min_tokens --------------------------------------------------------------------


def test_logit_bias_becomes_sorted_pairs() -> None:
    params = _chat_params(logit_bias={"12": 5, "3": -100.0})
    assert params.logit_bias == ((3, -100.0), (12, 5.0))


@pytest.mark.parametrize("bias", [{"x": 1}, {"-1": 1}, {"1.5": 1}, {"3": 101}, {"3": -100.5}])
def test_malformed_logit_bias_is_a_validation_error(bias: dict[str, float]) -> None:
    with pytest.raises(ValidationError, match="logit_bias"):
        _chat(logit_bias=bias)


def test_logit_bias_has_a_size_limit() -> None:
    with pytest.raises(ValidationError, match="logit_bias"):
        _chat(logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)})


def test_logit_bias_ids_must_be_in_the_vocabulary() -> None:
    params = _chat_params(logit_bias={"299": 1})
    check_logit_bias(params, vocab_size=300)
    with pytest.raises(APIError) as info:
        check_logit_bias(params, vocab_size=299)
    assert info.value.param == "logit_bias"


def test_a_prompts_token_ids_must_be_in_the_vocabulary_and_the_error_names_the_first_outside() -> None:
    check_token_ids((0, 5, 299), vocab_size=300, param="prompt")
    check_token_ids((), vocab_size=300, param="prompt")
    with pytest.raises(APIError) as info:
        check_token_ids((4, 301, 7, 999), vocab_size=300, param="prompt")
    assert info.value.param == "prompt" and "token id 301 " in str(info.value.message)


def test_min_tokens_reaches_the_params() -> None:
    assert _chat_params(min_tokens=5, max_tokens=5).min_tokens == 5


@pytest.mark.parametrize("fields", [{"min_tokens": 6, "max_tokens": 5}, {"min_tokens": 65}])
def test_min_tokens_above_max_tokens_is_refused(fields: dict[str, int]) -> None:
    assert _refused(**fields).param == "min_tokens"  # without max_tokens: the default, here the cap 64


def test_min_tokens_is_checked_for_completions_too() -> None:
    req = CompletionRequest.model_validate({"model": "tiny", "prompt": "x", "min_tokens": 3, "max_tokens": 2})
    with pytest.raises(APIError) as info:
        completion_sampling(req, SETTINGS)
    assert info.value.param == "min_tokens"


# ---- what the server refuses -----------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [TOOL]}, "tools"),
        ({"tools": [TOOL], "tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"functions": [TOOL["function"]]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ],
)
def test_tool_calling_and_structured_output_are_refused(fields: dict[str, Any], param: str) -> None:
    err = _refused(**fields)
    assert err.param == param and err.code == "unsupported_parameter"
    assert "not supported by this server" in err.message


@pytest.mark.parametrize(
    "fields",
    [
        {"tool_choice": "none"},
        {"tools": [TOOL], "tool_choice": "none"},
        {"response_format": {"type": "text"}},
    ],
)
def test_what_changes_nothing_is_accepted(fields: dict[str, Any]) -> None:
    _chat_params(**fields)


def test_completions_refuse_a_json_response_format() -> None:
    req = CompletionRequest.model_validate(
        {"model": "tiny", "prompt": "x", "response_format": {"type": "json_object"}}
    )
    with pytest.raises(APIError) as info:
        completion_sampling(req, SETTINGS)
    assert info.value.param == "response_format"


# ---- chat template options -------------------------------------------------------------------------


def test_template_options_default_as_in_vllm() -> None:
    req = _chat()
    assert (req.add_generation_prompt, req.continue_final_message, req.chat_template_kwargs) == (
        True,
        False,
        None,
    )


def test_continue_final_message_needs_add_generation_prompt_off() -> None:
    with pytest.raises(ValidationError, match="continue_final_message"):
        _chat(continue_final_message=True)
    _chat(continue_final_message=True, add_generation_prompt=False)


def test_reserved_template_kwargs_are_refused() -> None:
    err = _refused(chat_template_kwargs={"enable_thinking": False, "tokenize": True, "messages": []})
    assert err.param == "chat_template_kwargs" and "messages, tokenize" in err.message


# ---- naming tokens in logprobs ---------------------------------------------------------------------

# token 0: "a"; 1 and 2: the two bytes of "é" (each U+FFFD alone); 3 and 4: two distinct tokens "b"
_TEXT = {0: "a", 1: "\ufffd", 2: "\ufffd", 3: "b", 4: "b"}
_BYTES = {0: b"a", 1: b"\xc3", 2: b"\xa9", 3: b"b", 4: b"b"}


def _names(as_ids: bool = False) -> TokenNames:
    return TokenNames(_TEXT.__getitem__, _BYTES.__getitem__, as_ids)


def _event(token: int, tops: tuple[int, ...]) -> TokenEvent:
    top = tuple(TopLogprob(t, -float(k)) for k, t in enumerate(tops))
    return TokenEvent("r", token, _TEXT[token], logprob=-0.5, top_logprobs=top)


def test_names_are_texts_or_ids() -> None:
    assert [_names()(i) for i in range(5)] == ["a", "token_id:1", "token_id:2", "b", "b"]
    assert [_names(as_ids=True)(i) for i in (0, 3)] == ["token_id:0", "token_id:3"]


def test_chat_entries_carry_the_tokens_own_bytes() -> None:
    entry = chat_logprob_entry(_event(1, (1, 2, 0)), _names())
    assert (entry.token, entry.bytes) == ("token_id:1", [0xC3])
    assert [(t.token, t.bytes) for t in entry.top_logprobs] == [
        ("token_id:1", [0xC3]),
        ("token_id:2", [0xA9]),
        ("a", [0x61]),
    ]


def test_return_tokens_as_token_ids_keeps_the_bytes() -> None:
    entry = chat_logprob_entry(_event(0, (0,)), _names(as_ids=True))
    assert (entry.token, entry.bytes, entry.top_logprobs[0].token) == ("token_id:0", [0x61], "token_id:0")


def test_legacy_maps_keep_distinct_tokens_apart() -> None:
    out = completion_logprobs([_event(3, (3, 4, 1, 2, 0))], _names())
    top = out.top_logprobs[0]
    assert top is not None and len(top) == 5
    assert set(top) == {"token_id:3", "token_id:4", "token_id:1", "token_id:2", "a"}
    assert out.tokens == ["token_id:3"]  # the name its own map uses: a client finds it there


def test_legacy_names_stay_texts_without_collisions() -> None:
    out = completion_logprobs([_event(3, (3, 0))], _names())
    assert out.tokens == ["b"] and out.top_logprobs == [{"b": -0.0, "a": -1.0}]


def test_unique_names_of_plain_text_functions() -> None:
    assert unique_names([3, 4, 0], _TEXT.__getitem__) == {3: "token_id:3", 4: "token_id:4", 0: "a"}
