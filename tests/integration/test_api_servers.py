"""`--api-servers N`: several front-end processes on one port in front of one engine core, through real
servers: connections spread over them, they answer alike, /metrics counts every front end's requests whichever
one a scrape reaches, and the process group survives a hostile stop (a front end killed mid-stream, SIGTERM
under load, the primary killed)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.engine.core import STALL_SECONDS
from server.frontends import FLUSH_SECONDS
from tests.integration.conftest import COMMON, MODEL, chat, metric
from tests.integration.server_proc import REPO_ROOT, ServerProc, child_pids, pid_alive, start_server

FRONT_ENDS = [
    "--api-servers",
    "3",
    "--max-num-seqs",
    "32",
    "--max-tokens-cap",
    "400",
    "--shutdown-grace",
    "30",
]


@pytest.fixture(scope="module")
def three(tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    with start_server(["--model", str(tiny_model_dir), *COMMON, *FRONT_ENDS], log_dir=log_dir) as srv:
        yield srv


def _fresh_health(base_url: str) -> dict[str, object]:
    body: dict[str, object] = httpx.get(base_url + "/health", timeout=30).json()  # a new connection each time
    return body


def _listening_pids(pids: list[int], port: int) -> list[int]:
    """Those of `pids` that hold a socket listening on `port` (from /proc: the front ends, not the core)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    found = []
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found.append(pid)
                break
    return found


async def _streams(
    base_url: str, count: int, max_tokens: int, started: list[int] | None = None
) -> list[str | BaseException]:
    """`count` streamed completions, each on its own connection: "done" or the error that ended it. Each
    appends to `started` once its response has begun."""

    async def one(i: int) -> str:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            body = {"model": MODEL, "prompt": f"stream {i}", "max_tokens": max_tokens, "ignore_eos": True}
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                if started is not None:
                    started.append(i)
                text = "".join([chunk async for chunk in r.aiter_text()])
        return "done" if text.rstrip().endswith("data: [DONE]") else text[-200:]

    return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)


def test_connections_spread_over_the_front_ends_which_answer_alike(three: ServerProc) -> None:
    seen = {_fresh_health(three.base_url)["api_server"] for _ in range(40)}
    assert seen == {0, 1, 2}  # 40 connections hashed over 3 listeners: each one gets some
    texts = {chat(three.base_url, [{"role": "user", "content": "same prompt"}])["choices"][0]["message"]["content"]
             for _ in range(12)}  # fmt: skip
    assert len(texts) == 1  # greedy: whichever front end tokenized it, the same answer


def _settled(base_url: str, name: str, **labels: str) -> float:
    """A metric once what the front ends hold back (`FLUSH_SECONDS`) has reached the primary: the same twice."""
    value = metric(base_url, name, **labels)
    while True:
        time.sleep(4 * FLUSH_SECONDS)
        value, last = metric(base_url, name, **labels), value
        if value == last:
            return value


def test_metrics_count_every_front_ends_requests_on_every_scrape(three: ServerProc) -> None:
    before = _settled(three.base_url, "tssc_request_phase_seconds_count", phase="tokenize")
    results = asyncio.run(_streams(three.base_url, 12, 8))
    assert results == ["done"] * 12
    deadline = time.monotonic() + 10
    while metric(three.base_url, "tssc_request_phase_seconds_count", phase="tokenize") < before + 12:
        assert time.monotonic() < deadline, "a front end's tokenize observations never reached /metrics"
        time.sleep(0.2)
    for _ in range(9):  # fresh connections: scrapes reach all three front ends, and agree
        assert metric(three.base_url, "tssc_request_phase_seconds_count", phase="tokenize") == before + 12


def test_a_session_continues_on_another_front_end(three: ServerProc) -> None:
    first = [{"role": "user", "content": "remember this long opening message " * 4}]
    reply = chat(three.base_url, first, session="across-front-ends")
    answer = {"role": "assistant", "content": reply["choices"][0]["message"]["content"]}
    for i in range(6):  # fresh connections: the turns land on different front ends
        turn = chat(
            three.base_url,
            [*first, answer, {"role": "user", "content": f"go on {i}"}],
            session="across-front-ends",
        )
        assert (
            turn["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        )  # the core's cache, not the front end's


def test_a_killed_front_end_ends_its_own_streams_only_and_frees_their_slots(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with start_server(["--model", str(tiny_model_dir), *COMMON, *FRONT_ENDS], log_dir=tmp_path) as srv:
        children = child_pids(srv.proc.pid, "spawn_main")
        further = _listening_pids(children, srv.port)
        assert len(further) == 2 and len(children) == 3  # two further front ends and the core

        async def drive() -> list[str | BaseException]:
            started: list[int] = []
            streams = asyncio.ensure_future(_streams(srv.base_url, 24, 300, started))
            while len(started) < 24 and not streams.done():
                await asyncio.sleep(0.05)
            os.kill(further[0], signal.SIGKILL)
            return await streams

        results = asyncio.run(drive())
        broken = [r for r in results if isinstance(r, httpx.TransportError)]
        assert results.count("done") + len(broken) == 24, results
        assert results.count("done") > 0 and broken  # 24 connections over 3 listeners: some on the killed one
        deadline = time.monotonic() + 20
        while (
            metric(srv.base_url, "tssc_requests_running") > 0
        ):  # the core aborted the dead front end's requests
            assert time.monotonic() < deadline, "slots of the killed front end's streams stayed held"
            time.sleep(0.2)
        assert asyncio.run(_streams(srv.base_url, 12, 8)) == ["done"] * 12  # the others serve on
        assert _fresh_health(srv.base_url)["status"] == "ok"


def test_sigterm_drains_every_front_end_then_stops_the_group(tiny_model_dir: Path, tmp_path: Path) -> None:
    with start_server(["--model", str(tiny_model_dir), *COMMON, *FRONT_ENDS], log_dir=tmp_path) as srv:
        # the first "ok" (start_server waited for it) holds on every connection: no front end still loads
        assert {_fresh_health(srv.base_url)["status"] for _ in range(30)} == {"ok"}
        children = child_pids(srv.proc.pid, "spawn_main")

        async def drive() -> list[str | BaseException]:
            started: list[int] = []
            streams = asyncio.ensure_future(_streams(srv.base_url, 18, 200, started))
            while len(started) < 18 and not streams.done():
                await asyncio.sleep(0.05)
            srv.proc.send_signal(signal.SIGTERM)
            return await streams

        assert asyncio.run(drive()) == ["done"] * 18  # on every front end, each stream ran to its end
        assert srv.proc.wait(timeout=60) is not None
        assert not [pid for pid in children if pid_alive(pid)], "a front end or the core outlived the server"
        assert srv.log_path.read_text().count("Finished server process") == 3


def test_the_group_exits_when_the_primary_is_killed(tiny_model_dir: Path, tmp_path: Path) -> None:
    with start_server(["--model", str(tiny_model_dir), *COMMON, *FRONT_ENDS], log_dir=tmp_path) as srv:
        children = child_pids(srv.proc.pid, "spawn_main")
        srv.proc.kill()
        srv.proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while [pid for pid in children if pid_alive(pid)]:
            assert time.monotonic() < deadline, "a front end or the core outlived a killed primary"
            time.sleep(0.1)


def test_several_front_ends_need_the_engine_process(tiny_model_dir: Path) -> None:
    cmd = [sys.executable, "-m", "server.serve", "--model", str(tiny_model_dir), "--api-servers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [*cmd, "--no-engine-process"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120
    )
    assert done.returncode == 2
    assert b"--api-servers: Value error, several front ends share one engine core" in done.stderr


def test_a_stopped_front_end_holds_no_other_and_is_dropped(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A further front end stopped (SIGSTOP) while its stream runs: the core writes each pipe from a thread of
    its own, so the primary's requests keep being answered after the stopped one's pipe has filled, and once
    that pipe has taken nothing for STALL_SECONDS the core drops it (its stream's slot freed)."""
    flags = ["--api-servers", "2", "--max-num-seqs", "8", "--max-tokens-cap", "100000"]
    with start_server(["--model", str(tiny_model_dir), *COMMON, *flags], log_dir=tmp_path) as srv:
        (further,) = _listening_pids(child_pids(srv.proc.pid, "spawn_main"), srv.port)
        clients = [httpx.Client(base_url=srv.base_url, timeout=60) for _ in range(12)]  # kept connections
        on = {c: c.get("/health").json()["api_server"] for c in clients}
        theirs = next(c for c in clients if on[c] == 1)
        ours = next(c for c in clients if on[c] == 0)
        body = {"model": MODEL, "prompt": "long", "max_tokens": 100000, "ignore_eos": True, "stream": True}
        with theirs.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # held: a dropped iterator would close the stream
            next(lines)
            os.kill(further, signal.SIGSTOP)
            try:
                started = time.monotonic()
                while time.monotonic() - started < STALL_SECONDS + 3:  # past a full pipe, then past the stall
                    one = ours.post(
                        "/v1/completions",
                        json={"model": MODEL, "prompt": "hi", "max_tokens": 16, "ignore_eos": True},
                    )
                    assert one.status_code == 200 and one.json()["usage"]["completion_tokens"] == 16
                deadline = time.monotonic() + 10
                # the stopped one's stream ended (scraped on our connection: a fresh one may land on the stopped one)
                while metric(srv.base_url, "tssc_requests_running", client=ours) > 0:
                    assert time.monotonic() < deadline, "the stopped front end's stream kept its slot"
                    time.sleep(0.2)
            finally:
                os.kill(further, signal.SIGCONT)
        assert f"front end 1 took nothing for {STALL_SECONDS:.0f} s; dropping it" in srv.log_path.read_text()
        for c in clients:
            c.close()
