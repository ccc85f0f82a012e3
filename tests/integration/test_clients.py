"""httpx and the official `openai` client (sync, async, streaming) against a real server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL
from tests.integration.server_proc import ServerProc

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]


def _sse_events(resp: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]


def test_httpx_chat_completion_shape(client: httpx.Client) -> None:
    resp = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 8})
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0


def test_httpx_stream_matches_openai_chunk_format(client: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 2,
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] >= 2
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] in ("stop", "length")
        assert all(ch["finish_reason"] is None for ch in mine[:-1])


def test_completions_stream_and_echo(client: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 5, "stream": True, "echo": True}
    with client.stream("POST", "/v1/completions", json=body) as resp:
        events = _sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text.startswith("The quick")
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_sync_chat_and_models(server: ServerProc) -> None:
    oai = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    assert [m.id for m in oai.models.list()] == [MODEL]
    out = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert out.choices[0].message.content is not None
    assert out.usage is not None and out.usage.prompt_tokens_details is not None
    assert out.usage.prompt_tokens_details.cached_tokens is not None


def test_openai_sync_streaming(server: ServerProc) -> None:
    oai = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens >= 1
    full = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert "".join(pieces) == full.choices[0].message.content


async def test_openai_async_chat_and_completions(server: ServerProc) -> None:
    oai = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused")
    chat = await oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=3, seed=7)  # type: ignore[arg-type]
    assert [c.index for c in chat.choices] == [0, 1, 2]
    comp = await oai.completions.create(model=MODEL, prompt=["Hello", "What is"], max_tokens=4, n=2)
    assert sorted(c.index for c in comp.choices) == [0, 1, 2, 3]
    assert comp.usage is not None and comp.usage.completion_tokens >= 4
    stream = await oai.completions.create(model=MODEL, prompt="Hello", max_tokens=4, stream=True)
    texts = [c.choices[0].text async for c in stream if c.choices]
    assert texts
    await oai.close()


def test_logprobs_in_both_formats(server: ServerProc) -> None:
    oai = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    chat = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        temperature=0,
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert (
            entry.top_logprobs[0].logprob >= entry.logprob - 1e-5
        )  # greedy: the chosen token is the top one
    comp = oai.completions.create(model=MODEL, prompt="Hello", max_tokens=5, logprobs=2, temperature=0)
    lp = comp.choices[0].logprobs
    assert (
        lp is not None
        and lp.tokens is not None
        and lp.token_logprobs is not None
        and lp.top_logprobs is not None
    )
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset or [])


def test_seed_is_reproducible(client: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    second = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert first == second


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_are_never_emitted(client: httpx.Client, stream: bool) -> None:
    base = {"model": MODEL, "prompt": "Hello", "max_tokens": 40, "temperature": 0}
    free = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    assert len(free) >= 6
    stop = free[3:6]  # a string the greedy output is known to contain
    body = {**base, "stop": [stop], "stream": stream}
    if stream:
        with client.stream("POST", "/v1/completions", json=body) as resp:
            chunks = [json.loads(e) for e in _sse_events(resp)[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        reason = chunks[-1]["choices"][0]["finish_reason"]
    else:
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
        text, reason = choice["text"], choice["finish_reason"]
    assert stop not in text
    assert text == free[: free.index(stop)]
    assert reason == "stop"
