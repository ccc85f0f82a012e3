"""`--engine-process`: the engine core in its own process, through a real server.

The same tests as the thread mode's (streaming, sessions and cache hits, greedy identity with `--no-cache`,
session routes, disconnects) run against process-mode servers; then what only this mode has: /metrics
equal to the thread mode's for the same requests, and the core killed under load.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration import test_clients, test_disconnects, test_robustness, test_sessions, test_shutdown
from tests.integration.conftest import COMMON, MODEL, chat, metric
from tests.integration.server_proc import (
    REPO_ROOT,
    ServerProc,
    child_pids,
    engine_core_pid,
    pid_alive,
    start_server,
    stop_process,
)

PROCESS = "--engine-process"
SERVER = ["--max-num-seqs", "8", "--max-tokens-cap", "64", "--checkpoint-interval", "16"]
LOSSLESS = ["--hot-dtype", "fp32", "--cold-dtype", "fp32", "--hot-window", "1"]
LOSSLESS += ["--max-num-seqs", "8", "--checkpoint-interval", "16"]
ONE_SLOT = ["--max-num-seqs", "1", "--max-tokens-cap", "100000", "--api-key", "key-a", "--api-key", "key-b"]


def _start(model_dir: Path, log_dir: Path, *args: str) -> Iterator[ServerProc]:
    with start_server(["--model", str(model_dir), *COMMON, *args], log_dir=log_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def core_server(tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    yield from _start(tiny_model_dir, log_dir, PROCESS, *SERVER)


@pytest.fixture(scope="module")
def core_lossless_server(tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    yield from _start(tiny_model_dir, log_dir, PROCESS, *LOSSLESS)


@pytest.fixture(scope="module")
def core_one_slot_server(tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    yield from _start(tiny_model_dir, log_dir, PROCESS, *ONE_SLOT)


# ---- the thread mode's tests, in process mode ----------------------------------------------------------


def test_the_engine_runs_in_a_child_process(core_server: ServerProc) -> None:
    core = engine_core_pid(core_server.proc)
    assert core != core_server.proc.pid and pid_alive(core)
    cwd = os.readlink(f"/proc/{core}/cwd")
    assert Path(cwd) == Path(__file__).resolve().parents[2]  # this checkout's code, as the server's


def test_streaming_chat_and_completions(core_server: ServerProc) -> None:
    with httpx.Client(base_url=core_server.base_url, timeout=120) as client:
        test_clients.test_httpx_stream_matches_openai_chunk_format(client)
        test_clients.test_completions_stream_and_echo(client)
    test_clients.test_openai_sync_streaming(core_server)


def test_multi_turn_resumes_from_a_checkpoint(core_server: ServerProc) -> None:
    test_sessions.test_multi_turn_resumes_from_turn_one(core_server)


def test_lossless_tiers_match_a_no_cache_thread_server(
    core_lossless_server: ServerProc, nocache_server: ServerProc
) -> None:
    test_sessions.test_regenerate_and_edit_lossless_tiers_match_no_cache(core_lossless_server, nocache_server)


def _interleaved_turns(base_url: str, session: str) -> list[str]:
    """Three rounds of five requests at once in one session: a follow-up, an edit of the last message, the same
    follow-up again, an edit of an earlier message and a further turn; so the prompts the core receives as
    deltas of the session's previous one (`SentPrompts`) interleave with whole ones. Their greedy texts."""
    say = lambda i: f"message {i}: " + " ".join(f"w{(i * 7 + k) % 23}" for k in range(12))
    conv = [{"role": "user", "content": say(0)}]
    texts: list[str] = []

    async def one(client: httpx.AsyncClient, messages: list[dict[str, str]]) -> str:
        body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 8}
        r = await client.post("/v1/chat/completions", json=body, headers={"X-Session-ID": session})
        r.raise_for_status()
        return str(r.json()["choices"][0]["message"]["content"])

    async def rounds() -> None:
        nonlocal conv
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            for i in range(1, 4):
                conv = [
                    *conv,
                    {"role": "assistant", "content": say(10 + i)},
                    {"role": "user", "content": say(i)},
                ]
                edit = [*conv[:-1], {"role": "user", "content": say(20 + i)}]
                earlier = [*conv[:-3], {"role": "user", "content": say(30 + i)}]
                further = [
                    *conv,
                    {"role": "assistant", "content": say(40 + i)},
                    {"role": "user", "content": say(50)},
                ]
                texts.extend(
                    await asyncio.gather(*(one(client, m) for m in (conv, edit, conv, earlier, further)))
                )

    asyncio.run(rounds())
    return texts


def test_interleaved_turns_of_one_session_match_a_no_cache_thread_server(
    core_lossless_server: ServerProc, nocache_server: ServerProc
) -> None:
    texts = _interleaved_turns(core_lossless_server.base_url, "interleaved")
    assert len(texts) == 15 and texts == _interleaved_turns(nocache_server.base_url, "interleaved")


def test_session_info_and_delete(core_server: ServerProc) -> None:
    test_sessions.test_session_info_and_delete(core_server)


def test_dropped_streams_do_not_fail_the_others(core_server: ServerProc) -> None:
    test_disconnects.test_dropped_streams_do_not_fail_the_others(core_server)


def test_a_streaming_disconnect_frees_the_slot(core_one_slot_server: ServerProc) -> None:
    test_robustness.test_streaming_disconnect_frees_the_slot(core_one_slot_server)


def test_bad_input_is_still_a_400(core_server: ServerProc) -> None:
    resp = httpx.post(core_server.base_url + "/v1/completions", json={"model": MODEL, "prompt": [10**6]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_value"


# ---- metrics: the same values as the thread mode ------------------------------------------------------


def _workload(base_url: str) -> None:
    """Deterministic requests, one at a time: a resumed session, a stream, n=2, a deleted session."""
    turn1 = [{"role": "user", "content": "Tell me about rivers."}]
    r1 = chat(base_url, turn1, "m-1", stop_token_ids=[0, 2, 3, 4], max_tokens=12)
    reply = r1["choices"][0]["message"]  # type: ignore[index]
    chat(base_url, [*turn1, reply, {"role": "user", "content": "Go on."}], "m-1", max_tokens=6)
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 5, "stream": True, "n": 2, "temperature": 0}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.read()
    chat(base_url, [{"role": "user", "content": "Forget me."}], "m-2", max_tokens=4)
    assert httpx.delete(base_url + "/v1/sessions/m-2").status_code == 200


CORE_PROCESS = "tssc_engine_core_process_"  # the core's CPU and memory: process mode only


def _samples(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every tssc_* sample that does not measure time (counters, gauges, histogram counts)."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            timed = s.name.endswith(("_created", "_sum", "_bucket"))
            if s.name.startswith("tssc_") and not timed and not s.name.startswith(CORE_PROCESS):
                out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_equal_the_thread_modes_for_the_same_requests(tiny_model_dir: Path, tmp_path: Path) -> None:
    results = []
    for mode in ([], [PROCESS]):
        with start_server(["--model", str(tiny_model_dir), *COMMON, *SERVER, *mode], log_dir=tmp_path) as srv:
            _workload(srv.base_url)
            results.append(_samples(srv.base_url))
            core_memory = metric(srv.base_url, CORE_PROCESS + "resident_memory_bytes")
            assert (core_memory > 0) == bool(mode)
    thread, process = results
    assert process == thread
    hits = [v for (name, labels), v in process.items() if ("result", "hot_hit") in labels]
    assert sum(hits) > 0  # the workload resumed from a checkpoint
    assert process["tssc_generation_tokens_total", ()] > 0
    info = [k for k, v in process.items() if k[0] == "tssc_model_info" and v == 1]
    assert info and ("device", "cpu") in info[0][1]


# ---- the core killed -----------------------------------------------------------------------------------


async def _kill_core_under_load(srv: ServerProc) -> tuple[list[list[str]], httpx.Response]:
    async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as client:
        started = [asyncio.Event() for _ in range(3)]
        streams = [asyncio.create_task(test_shutdown._stream(client, 90_000, e)) for e in started]
        body = {"model": MODEL, "prompt": "y", "max_tokens": 90_000, "ignore_eos": True}
        plain = asyncio.create_task(client.post("/v1/completions", json=body))
        for event in started:
            await asyncio.wait_for(event.wait(), 60)
        os.kill(engine_core_pid(srv.proc), signal.SIGKILL)
        return list(await asyncio.gather(*streams)), await plain


def test_a_killed_core_fails_open_requests_and_the_health_check(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_model_dir), *COMMON, "--max-tokens-cap", "100000", PROCESS]
    with start_server(args, log_dir=tmp_path) as srv:
        streams, plain = asyncio.run(_kill_core_under_load(srv))
        for lines in streams:  # an error event, then [DONE]: never a cut stream
            assert lines[-1] == "[DONE]" and json.loads(lines[-2])["error"]["code"] == "engine_error"
        assert plain.status_code == 503 and plain.json()["error"]["code"] == "engine_error"
        health = httpx.get(srv.base_url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        later = httpx.post(srv.base_url + "/v1/completions", json={"model": MODEL, "prompt": "z"}, timeout=10)
        assert later.status_code == 503 and later.json()["error"]["code"] == "engine_failed"
        assert httpx.get(srv.base_url + "/metrics", timeout=10).status_code == 200
        assert "engine core process exited unexpectedly (killed by SIGKILL)" in srv.log_tail(200)
        begin = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=30) is not None and time.monotonic() - begin < 30


def test_the_core_exits_when_the_server_is_killed(tiny_model_dir: Path, tmp_path: Path) -> None:
    with start_server(["--model", str(tiny_model_dir), *COMMON, PROCESS], log_dir=tmp_path) as srv:
        core = engine_core_pid(srv.proc)
        srv.proc.kill()
        srv.proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while pid_alive(core):  # the core reads the end of its pipe and stops
            assert time.monotonic() < deadline, "the engine core outlived a killed server"
            time.sleep(0.1)


def test_sigterm_while_the_core_loads_kills_it_without_waiting_for_the_load(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cmd = [sys.executable, "-m", "server.serve", "--port", "0", "--model", str(tiny_model_dir), PROCESS]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not child_pids(proc.pid, "spawn_main"):
            assert time.monotonic() < deadline and proc.poll() is None, "no engine core was started"
            time.sleep(0.05)
        (core,) = child_pids(proc.pid, "spawn_main")
        proc.send_signal(signal.SIGTERM)  # the core is still importing and loading: it reads no pipe yet
        assert proc.wait(timeout=20) is not None
        assert not pid_alive(core), "the loading engine core outlived the server"
        assert b"engine core stopped" not in (tmp_path / "server.log").read_bytes()  # killed, not waited for
    finally:
        stop_process(proc)
