"""SIGTERM under load: new requests get 503 + Retry-After, running ones finish within the grace period, and
what is still open then ends cleanly (an error event and [DONE] for streams, an OpenAI error body
otherwise): never a cut chunked stream or a plain-text 500 (issue #11, failure 6). With `--engine-process` the
core process drains with the server and exits with it (no orphan)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import COMMON, MODEL
from tests.integration.server_proc import ServerProc, child_pids, pid_alive, start_server

pytestmark = pytest.mark.slow
MODES = pytest.mark.parametrize("mode", [(), ("--engine-process",)], ids=["thread", "process"])


def _body(max_tokens: int, stream: bool) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def _stream(client: httpx.AsyncClient, max_tokens: int, started: asyncio.Event) -> list[str]:
    lines: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=_body(max_tokens, True)) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                started.set()
    return lines


async def _under_sigterm(
    srv: ServerProc, max_tokens: int, streams: int = 6, plain: int = 2
) -> tuple[list[list[str]], list[httpx.Response], list[httpx.Response]]:
    """Start `streams` streaming and `plain` non-streaming requests, SIGTERM the server once they run, and
    knock while it drains. Returns (stream data lines, plain responses, responses to knocks)."""
    async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as client:
        started = [asyncio.Event() for _ in range(streams)]
        tasks = [asyncio.create_task(_stream(client, max_tokens, e)) for e in started]
        posts = [
            asyncio.create_task(client.post("/v1/chat/completions", json=_body(max_tokens, False)))
            for _ in range(plain)
        ]
        for event in started:
            await asyncio.wait_for(event.wait(), timeout=60)
        srv.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        knocks = [
            await client.post("/v1/chat/completions", json=_body(4, False)),
            await client.get("/health"),
        ]
        return list(await asyncio.gather(*tasks)), list(await asyncio.gather(*posts)), knocks


def _args(model: Path, grace: str, mode: tuple[str, ...]) -> list[str]:
    args = ["--model", str(model), *COMMON, "--max-num-seqs", "16", "--max-tokens-cap", "100000"]
    return [*args, "--shutdown-grace", grace, *mode]


@contextlib.contextmanager
def _serving(model: Path, grace: str, mode: tuple[str, ...], log_dir: Path) -> Iterator[ServerProc]:
    """A server for one SIGTERM: on leaving, it has exited, and so has its engine core (process mode)."""
    with start_server(_args(model, grace, mode), log_dir=log_dir) as srv:
        cores = child_pids(srv.proc.pid, "spawn_main")
        assert len(cores) == len(mode)
        yield srv
        assert srv.proc.wait(timeout=30) is not None
        assert not [pid for pid in cores if pid_alive(pid)], "the engine core outlived the server"


def _assert_refused(knocks: list[httpx.Response]) -> None:
    refused, health = knocks
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "server_shutting_down"
    assert health.status_code == 503 and health.json()["status"] == "draining"


@MODES
def test_open_requests_end_with_an_error_event_when_the_grace_runs_out(
    tiny_model_dir: Path, tmp_path: Path, mode: tuple[str, ...]
) -> None:
    with _serving(tiny_model_dir, "1", mode, tmp_path) as srv:
        streams, plain, knocks = asyncio.run(_under_sigterm(srv, max_tokens=90_000))
    _assert_refused(knocks)
    for lines in streams:
        assert lines[-1] == "[DONE]", lines[-3:]
        assert json.loads(lines[-2])["error"]["code"] == "server_shutting_down"
    for resp in plain:
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "server_shutting_down"


@MODES
def test_running_requests_finish_within_the_grace_period(
    tiny_model_dir: Path, tmp_path: Path, mode: tuple[str, ...]
) -> None:
    with _serving(tiny_model_dir, "60", mode, tmp_path) as srv:
        begin = time.monotonic()
        streams, plain, knocks = asyncio.run(_under_sigterm(srv, max_tokens=300))
        assert srv.proc.wait(timeout=30) is not None
        assert time.monotonic() - begin < 60  # it exited once idle, not at the end of the grace period
    _assert_refused(knocks)
    for lines in streams:
        assert lines[-1] == "[DONE]"
        finishes = [c.get("finish_reason") for x in lines[:-1] for c in json.loads(x).get("choices", [])]
        assert "length" in finishes and not any("error" in x for x in lines)
    for resp in plain:
        assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] == "length"
