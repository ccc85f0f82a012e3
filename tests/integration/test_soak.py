"""Soak: the whole server under hostile traffic for a minute (issue #11's acceptance).

64 concurrent streaming clients, with one front end and with two (`--api-servers 2`), hold multi-turn
conversations under odd (valid) session ids; a third of the requests are abandoned at a random point; a
trickle of malformed requests and invalid ids runs beside them. Then: every request that was not abandoned
completed correctly (well-formed chunks, its finish chunk, [DONE], the text a reference run gives), nothing
answered 5xx, `tssc_requests_running` is back to 0, no tier ever held more than its budget, and the resident
memory plateaued (the last third of the run grew by less than 5%). Lossless tiers, so that a resumed
conversation must give exactly the reference text.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import COMMON, MODEL
from tests.integration.server_proc import ServerProc, start_server

pytestmark = pytest.mark.slow
CLIENTS, SECONDS = 64, 60.0
IDS = ["会话", "café", "team/alpha", "u:1@x", "emoji-🙂", "plain"]
BAD: list[tuple[dict[str, str], bytes]] = [
    ({}, b'{"model": "tiny", "messages": ['),
    (
        {"X-Session-ID": "50%zz"},
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a"}]}).encode(),
    ),
    (
        {},
        json.dumps(
            {"model": MODEL, "session_id": " x ", "messages": [{"role": "user", "content": "a"}]}
        ).encode(),
    ),
    ({}, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}] * 1200}).encode()),
    ({}, json.dumps({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}).encode()),
    (
        {},
        json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}
        ).encode(),
    ),
]


@dataclass
class Tally:
    completed: int = 0
    abandoned: int = 0
    rejected: int = 0
    failures: list[str] = field(default_factory=list)
    scrapes: list[dict[str, float]] = field(default_factory=list)


@pytest.fixture(scope="module", params=[1, 2], ids=["one-front-end", "two-front-ends"])
def soak_server(request: pytest.FixtureRequest, tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    """The server, with one front end or two (`--api-servers 2`: the engine core in its own process, the
    connections spread over both front ends, each abandoned stream ended through the core's pipes)."""
    args = ["--model", str(tiny_model_dir), *COMMON, "--max-num-seqs", "16", "--checkpoint-interval", "16"]
    args += ["--api-servers", str(request.param)] if request.param > 1 else []
    args += ["--hot-dtype", "fp32", "--cold-dtype", "fp32", "--hot-bytes", "64KiB", "--cold-bytes", "128KiB"]
    args += ["--max-concurrent-requests", "512"]
    with start_server(args, log_dir=log_dir) as srv:
        yield srv


def _body(messages: list[dict[str, str]], max_tokens: int) -> dict[str, object]:
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip


async def _stream(
    client: httpx.AsyncClient, body: dict[str, object], sid: str | None, stop_after: int | None
) -> tuple[int, list[str]]:
    """(status, data lines); stops reading after `stop_after` lines (the client walks away)."""
    headers = {"X-Session-ID": quote(sid, safe="")} if sid else {}
    lines: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code, [resp.text]
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if stop_after is not None and len(lines) >= stop_after:
                    break
    return 200, lines


def _text(lines: list[str]) -> str:
    """The content of a finished stream, or raises AssertionError naming what is wrong."""
    assert lines and lines[-1] == "[DONE]", f"no [DONE]: {lines[-2:]}"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
    assert finishes == ["length"], finishes
    return "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])


async def _reference(client: httpx.AsyncClient, messages: list[dict[str, str]], max_tokens: int) -> str:
    status, lines = await _stream(client, _body(messages, max_tokens), None, None)
    assert status == 200
    return _text(lines)


async def _conversation(
    client: httpx.AsyncClient, ref: httpx.AsyncClient, i: int, tally: Tally, end: float
) -> None:
    rng = random.Random(i)
    turn = 0
    while time.monotonic() < end:
        sid = f"{IDS[i % len(IDS)]}-{i}-{turn // 4}"
        messages = [{"role": "user", "content": f"conversation {i} starts"}]
        for _ in range(4):
            max_tokens = rng.randint(4, 16)
            walk_away = rng.random() < 1 / 3
            status, lines = await _stream(
                client, _body(messages, max_tokens), sid, rng.randint(1, 6) if walk_away else None
            )
            turn += 1
            if status != 200:
                tally.failures.append(f"{status}: {lines[0][:200]}")
                return
            if walk_away:
                tally.abandoned += 1
                break
            try:
                text = _text(lines)
                expected = await _reference(ref, messages, max_tokens)
                assert text == expected, (text, expected)
            except AssertionError as exc:
                tally.failures.append(str(exc)[:300])
                return
            tally.completed += 1
            messages = [
                *messages,
                {"role": "assistant", "content": text},
                {"role": "user", "content": f"more {turn}"},
            ]


async def _trickle(client: httpx.AsyncClient, tally: Tally, end: float) -> None:
    rng = random.Random(99)
    while time.monotonic() < end:
        headers, content = rng.choice(BAD)
        resp = await client.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json", **headers}
        )
        if not 400 <= resp.status_code < 500:
            tally.failures.append(f"malformed request got {resp.status_code}: {resp.text[:200]}")
        tally.rejected += 1
        await asyncio.sleep(0.2)


def _scrape(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("tssc_state_cache_bytes", "tssc_state_cache_capacity_bytes"):
                out[f"{s.name}:{s.labels['tier']}"] = s.value
            elif s.name in ("process_resident_memory_bytes", "tssc_requests_running"):
                out[s.name] = s.value
    return out


async def _watch(client: httpx.AsyncClient, tally: Tally, end: float) -> None:
    while time.monotonic() < end:
        tally.scrapes.append({"t": time.monotonic(), **_scrape((await client.get("/metrics")).text)})
        await asyncio.sleep(1.0)


async def _soak(base_url: str) -> Tally:
    tally = Tally()
    limits = httpx.Limits(max_connections=CLIENTS + 16, max_keepalive_connections=CLIENTS + 16)
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client,
        httpx.AsyncClient(base_url=base_url, timeout=120) as ref,
    ):
        end = time.monotonic() + SECONDS
        tasks = [_conversation(client, ref, i, tally, end) for i in range(CLIENTS)]
        await asyncio.gather(*tasks, _trickle(client, tally, end), _watch(client, tally, end))
        await asyncio.sleep(2.0)
        tally.scrapes.append({"t": time.monotonic(), **_scrape((await client.get("/metrics")).text)})
    return tally


def test_soak_under_hostile_traffic(soak_server: ServerProc) -> None:
    tally = asyncio.run(_soak(soak_server.base_url))
    assert not tally.failures, tally.failures[:5]
    assert tally.completed > 100 and tally.abandoned > 30 and tally.rejected > 100, tally
    assert tally.scrapes[-1]["tssc_requests_running"] == 0
    for scrape in tally.scrapes:
        for tier in ("hot", "cold", "disk"):
            assert (
                scrape[f"tssc_state_cache_bytes:{tier}"] <= scrape[f"tssc_state_cache_capacity_bytes:{tier}"]
            )
    rss = [s["process_resident_memory_bytes"] for s in tally.scrapes]
    last_third = rss[2 * len(rss) // 3 :]
    assert max(last_third) < 1.05 * last_third[0], [round(r / 2**20, 1) for r in rss]
