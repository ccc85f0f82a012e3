"""The server on its default model (the bundled demo Mamba2, real byte-level BPE): it answers in
kind, and a follow-up turn resumes from turn 1's checkpoint through the real tokenizer."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.model.defaults import bundled_model_dir
from tests.integration.server_proc import ServerProc, start_server

pytestmark = pytest.mark.skipif(
    not (bundled_model_dir() / "model.safetensors").is_file(), reason="bundled demo model absent"
)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with start_server([], log_dir=tmp_path_factory.mktemp("demo-logs")) as srv:  # no --model: the default
        yield srv


def _chat(srv: ServerProc, messages: list[dict[str, str]], max_tokens: int) -> dict:
    body = {"model": "demo-mamba2", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    resp = httpx.post(
        srv.base_url + "/v1/chat/completions", json=body, headers={"X-Session-ID": "demo"}, timeout=300
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_default_model_answers_a_function_request_with_a_function(demo_server: ServerProc) -> None:
    """Asked in the shape of its chat training data, the demo model answers with a `def` of the
    same arity. (It is a 4.6M-parameter demo: the body is often wrong, so only the shape is checked.)"""
    sig = 'def maximum(a, b):\n    """Return the larger of a and b."""'
    ask = [{"role": "user", "content": f"Implement `maximum`.\n\n{sig}"}]
    text = _chat(demo_server, ask, max_tokens=64)["choices"][0]["message"]["content"]
    header = text.lstrip().splitlines()[0]
    assert header.startswith("def ") and header.endswith(":"), text
    fn = ast.parse(header + "\n    pass").body[0]
    assert isinstance(fn, ast.FunctionDef) and len(fn.args.args) == 2, text


def test_follow_up_turn_resumes_through_the_real_tokenizer(demo_server: ServerProc) -> None:
    history = [{"role": "user", "content": "Write a function that returns the larger of two numbers."}]
    first = _chat(demo_server, history, max_tokens=48)
    history += [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "Now make it work for three numbers."},
    ]
    second = _chat(demo_server, history, max_tokens=8)
    turn1 = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= turn1 - 2, (cached, turn1)
    assert Path(bundled_model_dir()).name == "demo-mamba2"
