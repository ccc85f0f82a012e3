"""A client that goes away ends its own request only: the step, the batch and every other stream go on
(DESIGN invariant 9). Reproduces issue #11's first failure through a real server."""

from __future__ import annotations

import asyncio
import json
import random

import httpx

from tests.integration.conftest import MODEL, metric
from tests.integration.server_proc import ServerProc

LONG = {"model": MODEL, "max_tokens": 60, "ignore_eos": True, "stream": True, "temperature": 0}


def _chat_body(i: int) -> dict[str, object]:
    return {**LONG, "messages": [{"role": "user", "content": f"def f{i}(x):"}]}


async def _keep(client: httpx.AsyncClient, i: int) -> list[dict[str, object]]:
    """A stream read to its end: every data event, parsed."""
    events: list[dict[str, object]] = []
    async with client.stream("POST", "/v1/chat/completions", json=_chat_body(i)) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
            elif line == "data: [DONE]":
                events.append({"done": True})
    return events


async def _drop(client: httpx.AsyncClient, i: int, after: int) -> None:
    """A stream abandoned after `after` lines."""
    async with client.stream("POST", "/v1/chat/completions", json=_chat_body(i)) as resp:
        seen = 0
        async for _ in resp.aiter_lines():
            seen += 1
            if seen >= after:
                return


def _assert_completed(events: list[dict[str, object]]) -> None:
    assert events and events[-1] == {"done": True}, events[-3:]
    assert not any("error" in e for e in events), [e for e in events if "error" in e]
    finishes = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]  # type: ignore[union-attr, attr-defined]
    assert finishes == ["length"]


async def _mix(base_url: str, keepers: int, droppers: int) -> list[list[dict[str, object]]]:
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        keep = [asyncio.create_task(_keep(client, i)) for i in range(keepers)]
        for j in range(droppers):
            await _drop(client, 100 + j, after=rng.randint(2, 6))
        return list(await asyncio.gather(*keep))


def test_dropped_streams_do_not_fail_the_others(server: ServerProc) -> None:
    errors_before = metric(server.base_url, "tssc_requests_total", finish_reason="error")
    results = asyncio.run(_mix(server.base_url, keepers=4, droppers=12))
    for events in results:
        _assert_completed(events)
    assert metric(server.base_url, "tssc_requests_total", finish_reason="error") == errors_before


def test_dropped_non_streaming_requests_do_not_fail_the_others(server: ServerProc) -> None:
    async def run() -> tuple[list[httpx.Response], list[list[dict[str, object]]]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            keep = [asyncio.create_task(_keep(client, i)) for i in range(3)]
            body = {**LONG, "stream": False, "messages": [{"role": "user", "content": "x"}]}
            plain = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(3)]
            for j in range(12):
                body_j = {**body, "max_tokens": 500}
                task = asyncio.create_task(client.post("/v1/chat/completions", json=body_j))
                await asyncio.sleep(0.01 + 0.005 * j)
                task.cancel()  # the client gives up: the connection closes mid-request
            return list(await asyncio.gather(*plain)), list(await asyncio.gather(*keep))

    plain, streams = asyncio.run(run())
    for resp in plain:
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["finish_reason"] == "length"
    for events in streams:
        _assert_completed(events)
