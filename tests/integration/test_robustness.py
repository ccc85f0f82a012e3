"""Bad input, limits, disconnects and concurrency against a real server: 4xx, never 5xx."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.integration.conftest import MODEL, metric
from tests.integration.server_proc import ServerProc

MSG = [{"role": "user", "content": "hi"}]
BAD_BODIES: list[tuple[str, Any]] = [
    ("malformed json", b'{"model": "tiny", "messages": ['),
    ("not an object", b"[1, 2, 3]"),
    ("wrong type", {"model": MODEL, "messages": MSG, "max_tokens": "many"}),
    ("wrong content type", {"model": MODEL, "messages": [{"role": "user", "content": {"x": 1}}]}),
    ("unknown model", {"model": "no-such-model", "messages": MSG}),
    ("negative max_tokens", {"model": MODEL, "messages": MSG, "max_tokens": -5}),
    ("huge max_tokens", {"model": MODEL, "messages": MSG, "max_tokens": 10**15}),
    ("huge n", {"model": MODEL, "messages": MSG, "n": 10**9}),
    ("prompt over the limit", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}),
    ("empty messages", {"model": MODEL, "messages": []}),
    ("invalid role", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}),
    ("missing model", {"messages": MSG}),
    ("too many stops", {"model": MODEL, "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}),
    ("token id outside vocab", {"model": MODEL, "prompt": [10**6]}),
]


@pytest.mark.parametrize(("name", "body"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_an_openai_4xx(client: httpx.Client, name: str, body: Any) -> None:
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    if isinstance(body, bytes):
        resp = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        resp = client.post(path, json=body)
    assert 400 <= resp.status_code < 500, (name, resp.status_code, resp.text)
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    expected = 404 if name == "unknown model" else 400
    assert resp.status_code == expected, (name, resp.text)


def test_prompt_over_the_limit_says_so(client: httpx.Client) -> None:
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "y" * 4000})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def _auth(key: str = "key-a") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_streaming_disconnect_frees_the_slot(one_slot_server: ServerProc) -> None:
    base = one_slot_server.base_url
    aborts_before = metric(base, "tssc_requests_total", finish_reason="abort")
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 90000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=base, timeout=60, headers=_auth()) as c:
        with c.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]  # the only slot is now busy generating
            assert any(line.startswith("data: ") for line in got)
            assert metric(base, "tssc_requests_running") == 1
        # The client has gone: the slot must come free without the 90000 tokens being generated.
        deadline = time.monotonic() + 30
        while metric(base, "tssc_requests_total", finish_reason="abort") <= aborts_before:
            assert time.monotonic() < deadline, "the aborted request still holds its slot"
            time.sleep(0.2)
        assert metric(base, "tssc_requests_running") == 0
        start = time.monotonic()
        later = c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4})
        assert later.status_code == 200 and time.monotonic() - start < 30


def test_non_streaming_disconnect_aborts(one_slot_server: ServerProc) -> None:
    base = one_slot_server.base_url
    aborts_before = metric(base, "tssc_requests_total", finish_reason="abort")
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 90000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", json=body, headers=_auth(), timeout=3)
    deadline = time.monotonic() + 30
    while metric(base, "tssc_requests_total", finish_reason="abort") <= aborts_before:
        assert time.monotonic() < deadline, "the abandoned request still holds its slot"
        time.sleep(0.2)


async def _two_turns(client: httpx.AsyncClient, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    session = f"concurrent-{i}"
    turn1 = [{"role": "user", "content": f"Conversation number {i}: say something."}]
    body = {"model": MODEL, "temperature": 0, "max_tokens": 12, "stop_token_ids": [0, 2, 3, 4]}
    r1 = await client.post(
        "/v1/chat/completions", json={**body, "messages": turn1}, headers={"X-Session-ID": session}
    )
    assert r1.status_code == 200, r1.text
    first = r1.json()
    turn2 = [*turn1, first["choices"][0]["message"], {"role": "user", "content": f"And then {i}?"}]
    r2 = await client.post(
        "/v1/chat/completions", json={**body, "messages": turn2}, headers={"X-Session-ID": session}
    )
    assert r2.status_code == 200, r2.text
    return first, r2.json()


async def _run_sessions(base_url: str, n: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        return list(await asyncio.gather(*(_two_turns(client, i) for i in range(n))))


def test_32_concurrent_interleaved_sessions(lossless_server: ServerProc, nocache_server: ServerProc) -> None:
    results = asyncio.run(_run_sessions(lossless_server.base_url, 32))
    reference = asyncio.run(_run_sessions(nocache_server.base_url, 32))
    for (r1, r2), (ref1, ref2) in zip(results, reference, strict=True):
        for r in (r1, r2):
            assert r["choices"][0]["finish_reason"] in ("stop", "length")
        assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] >= r1["usage"]["prompt_tokens"]
        assert r1["choices"][0]["message"]["content"] == ref1["choices"][0]["message"]["content"]
        assert r2["choices"][0]["message"]["content"] == ref2["choices"][0]["message"]["content"]


def _fuzz_operation(operation: Any, base_url: str, mode: Any) -> list[str]:
    """Hypothesis-driven calls to one operation; the descriptions of any 5xx answers."""
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: Any) -> None:
        if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL  # reach the engine, not just the unknown-model 404
        resp = case.call(base_url=base_url, timeout=60)
        if resp.status_code >= 500:
            failures.append(f"{operation.label}: {resp.status_code} {resp.text[:300]}")

    with contextlib.suppress(Unsatisfiable):  # nothing to make invalid: no parameters, no body
        run()
    return failures


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error(server: ServerProc, mode: str) -> None:
    """Every operation of the app's own OpenAPI document, valid and invalid inputs: no 5xx."""
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    generation_mode = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions"}
    for operation in operations:
        failures += _fuzz_operation(operation, server.base_url, generation_mode)
    assert not failures, failures[:5]
