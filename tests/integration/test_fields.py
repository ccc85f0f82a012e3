"""Request fields through a real server (issue #14): logit_bias, min_tokens, return_tokens_as_token_ids,
the 400s for tool calling and structured output, and the chat template options (add_generation_prompt,
continue_final_message, chat_template_kwargs).

The tiny model's tokenizer is character-level (one token per character), so token counts and texts are
exact: a forced token "x" reads "x", and a template variable of six characters adds six prompt tokens."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import COMMON, MODEL, chat
from tests.integration.server_proc import ServerProc, char_tokenizer, start_server

MESSAGES = [{"role": "user", "content": "Write a function"}]
X = char_tokenizer().token_to_id("x")
TOKEN_ID = re.compile(r"token_id:\d+")


def _post(server: ServerProc, path: str, **body: Any) -> httpx.Response:
    return httpx.post(server.base_url + path, json={"model": MODEL, **body}, timeout=120)


def _content(out: dict[str, Any]) -> str:
    return str(out["choices"][0]["message"]["content"])


def _forced_x(server: ServerProc, **fields: Any) -> dict[str, Any]:
    """A greedy chat whose every token would be "x" (logit_bias +100)."""
    return chat(server.base_url, MESSAGES, logit_bias={str(X): 100}, **fields)


# ---- logit_bias and min_tokens ---------------------------------------------------------------------


def test_logit_bias_forces_a_token(server: ServerProc) -> None:
    out = _forced_x(server, max_tokens=6)
    assert _content(out) == "xxxxxx" and out["usage"]["completion_tokens"] == 6


def test_logit_bias_outside_the_vocabulary_is_a_400(server: ServerProc) -> None:
    resp = _post(server, "/v1/chat/completions", messages=MESSAGES, logit_bias={"100000": 5})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "logit_bias"


def test_min_tokens_delays_a_stop_token(server: ServerProc) -> None:
    """The token "x" forced and a stop token: at once it is the first; with min_tokens 3 it is banned for
    three tokens (other characters come), and the fourth is "x", which stops."""
    at_once = _forced_x(server, stop_token_ids=[X])
    delayed = _forced_x(server, stop_token_ids=[X], min_tokens=3)
    assert at_once["usage"]["completion_tokens"] == 1 and _content(at_once) == ""
    assert delayed["usage"]["completion_tokens"] == 4
    assert delayed["choices"][0]["finish_reason"] == "stop"
    assert len(_content(delayed)) == 3 and "x" not in _content(delayed)


def test_min_tokens_delays_a_stop_string(server: ServerProc) -> None:
    """Stop "xx": at once after two tokens; with min_tokens 4 the stop string completed by the fifth."""
    at_once = _forced_x(server, stop=["xx"])
    delayed = _forced_x(server, stop=["xx"], min_tokens=4)
    assert at_once["usage"]["completion_tokens"] == 2 and _content(at_once) == ""
    assert delayed["usage"]["completion_tokens"] == 5 and _content(delayed) == "xxx"


def test_min_tokens_above_max_tokens_is_a_400(server: ServerProc) -> None:
    resp = _post(server, "/v1/chat/completions", messages=MESSAGES, max_tokens=2, min_tokens=3)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "min_tokens"


# ---- return_tokens_as_token_ids ----------------------------------------------------------------------


def test_chat_logprobs_name_tokens_by_id(server: ServerProc) -> None:
    out = _forced_x(server, max_tokens=3, logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True)
    entries = out["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in entries] == [f"token_id:{X}"] * 3
    assert all(e["bytes"] == [ord("x")] for e in entries)
    assert all(TOKEN_ID.fullmatch(t["token"]) for e in entries for t in e["top_logprobs"])
    assert _content(out) == "xxx"  # the text itself is unchanged


def test_completion_logprobs_name_tokens_by_id(server: ServerProc) -> None:
    body = {"prompt": "def f(", "max_tokens": 4, "temperature": 0, "logprobs": 3}
    resp = _post(server, "/v1/completions", **body, return_tokens_as_token_ids=True)
    assert resp.status_code == 200, resp.text
    lp = resp.json()["choices"][0]["logprobs"]
    assert all(TOKEN_ID.fullmatch(t) for t in lp["tokens"])
    assert all(
        token in top and all(TOKEN_ID.fullmatch(k) for k in top)
        for token, top in zip(lp["tokens"], lp["top_logprobs"], strict=True)
    )
    plain = _post(server, "/v1/completions", **body).json()["choices"][0]
    assert resp.json()["choices"][0]["text"] == plain["text"]


def test_streamed_chat_logprobs_name_tokens_by_id(server: ServerProc) -> None:
    body = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "logprobs": True, "stream": True}
    with httpx.stream(
        "POST",
        server.base_url + "/v1/chat/completions",
        json={"model": MODEL, **body, "logit_bias": {str(X): 100}, "return_tokens_as_token_ids": True},
        timeout=120,
    ) as resp:
        lines = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(line) for line in lines]
    tokens = [
        e["token"]
        for c in chunks
        for ch in c["choices"]
        if ch.get("logprobs")
        for e in ch["logprobs"]["content"]
    ]
    assert tokens == [f"token_id:{X}"] * 3


# ---- refused: tool calling, structured output ------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [TOOL]}, "tools"),
        ({"tools": [TOOL], "tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_unsupported_features_are_a_400(server: ServerProc, fields: dict[str, Any], param: str) -> None:
    resp = _post(server, "/v1/chat/completions", messages=MESSAGES, **fields)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == param and error["code"] == "unsupported_parameter"
    assert "not supported by this server" in error["message"]


def test_tool_choice_none_and_text_format_are_served(server: ServerProc) -> None:
    chat(server.base_url, MESSAGES, tools=[TOOL], tool_choice="none", response_format={"type": "text"})


# ---- chat template options -------------------------------------------------------------------------


def _prompt_tokens(out: dict[str, Any]) -> int:
    return int(out["usage"]["prompt_tokens"])


def test_add_generation_prompt_false_drops_the_assistant_header(server: ServerProc) -> None:
    with_header = chat(server.base_url, MESSAGES)
    without = chat(server.base_url, MESSAGES, add_generation_prompt=False)
    assert _prompt_tokens(with_header) - _prompt_tokens(without) == 2  # "<|assistant|>" and "\n"


def test_continue_final_message_continues_the_assistant_text(server: ServerProc) -> None:
    """The chat continues right after "def f": the same prompt tokens and text as a completion of the
    rendering cut there."""
    partial = [*MESSAGES, {"role": "assistant", "content": "def f"}]
    out = chat(
        server.base_url, partial, add_generation_prompt=False, continue_final_message=True, max_tokens=8
    )
    rendered = "<|user|>\nWrite a function<|end|>\n<|assistant|>\ndef f"
    resp = _post(server, "/v1/completions", prompt=rendered, max_tokens=8, temperature=0)
    assert resp.status_code == 200, resp.text
    assert _prompt_tokens(out) == resp.json()["usage"]["prompt_tokens"]
    assert _content(out) == resp.json()["choices"][0]["text"]
    closed = chat(server.base_url, partial, add_generation_prompt=False, max_tokens=1)
    assert _prompt_tokens(closed) - _prompt_tokens(out) == 2  # "<|end|>" and "\n" cut off


def test_continue_final_message_with_the_generation_prompt_is_a_400(server: ServerProc) -> None:
    partial = [*MESSAGES, {"role": "assistant", "content": "def f"}]
    resp = _post(server, "/v1/chat/completions", messages=partial, continue_final_message=True)
    assert resp.status_code == 400 and "continue_final_message" in resp.json()["error"]["message"]


@pytest.fixture(scope="module")
def template_server(
    tiny_model_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProc]:
    """The tiny model with a chat template that opens with the variable `preamble` when it is given."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("templated") / MODEL))
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% if preamble is defined %}{{ preamble }}{% endif %}" + config["chat_template"]
    )
    config_path.write_text(json.dumps(config))
    with start_server(["--model", str(model), *COMMON, "--no-cache"], log_dir=log_dir) as srv:
        yield srv


def test_chat_template_kwargs_reach_the_template(template_server: ServerProc) -> None:
    base = chat(template_server.base_url, MESSAGES)
    greeted = chat(template_server.base_url, MESSAGES, chat_template_kwargs={"preamble": "Hello!"})
    assert _prompt_tokens(greeted) - _prompt_tokens(base) == len("Hello!")


def test_reserved_chat_template_kwargs_are_a_400(template_server: ServerProc) -> None:
    resp = _post(
        template_server, "/v1/chat/completions", messages=MESSAGES, chat_template_kwargs={"tokenize": True}
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "chat_template_kwargs"
