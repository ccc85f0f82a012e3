"""Scale-out (#15) on loopback: real tssc replicas sharing a real redis-server, with a real nginx in front.

Every replica runs lossless tiers (`--hot-dtype fp32 --cold-dtype fp32`), so a checkpoint restored from Redis
must give exactly the greedy output of a `--no-cache` server.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.deploy.dashboard_queries import require_binary
from tests.integration.conftest import chat, metric
from tests.integration.server_proc import ServerProc, free_port, start_server
from tests.nginx_conf import loopback_config, nginx_binary, serving
from tests.redis_proc import RedisProc, redis_server

LOSSLESS = ["--hot-dtype", "fp32", "--cold-dtype", "fp32", "--checkpoint-interval", "16"]
Replica = Callable[..., ServerProc]


@pytest.fixture
def rds(tmp_path: Path) -> Iterator[RedisProc]:
    with redis_server(tmp_path) as proc:
        yield proc


@pytest.fixture
def replicas(tiny_model_dir: Path, log_dir: Path, rds: RedisProc) -> Iterator[Replica]:
    """Starts replicas of the tiny model on the test's Redis; all stopped at the end of the test."""
    with contextlib.ExitStack() as stack:

        def start(*extra: str) -> ServerProc:
            args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--remote-url", rds.url]
            args += ["--remote-timeout", "0.5", *LOSSLESS, *extra]
            return stack.enter_context(start_server(args, log_dir=log_dir))

        yield start


@contextlib.contextmanager
def nginx(upstream_ports: list[int], workdir: Path) -> Iterator[str]:
    """The shipped deploy/nginx/tssc.conf on loopback, in front of `upstream_ports`; yields its base URL."""
    if nginx_binary() is None:
        require_binary("nginx", "nginx-light")
    port = free_port()
    with serving(loopback_config(port, upstream_ports, workdir), port) as base:
        yield base


def _turns(base: str, session: str, n: int, headers: dict[str, str] | None = None) -> list[dict]:
    """A greedy conversation of `n` turns; each turn's response."""
    messages = [{"role": "user", "content": "Hello there, replica"}]
    out = []
    for i in range(n):
        resp = chat(base, messages, session=session, headers=headers, max_tokens=12)
        out.append(resp)
        messages += [
            {"role": "assistant", "content": resp["choices"][0]["message"]["content"]},  # type: ignore[index]
            {"role": "user", "content": f"And turn {i + 2}?"},
        ]
    return out


def _text(resp: dict) -> str:
    return str(resp["choices"][0]["message"]["content"])


def _cached(resp: dict) -> int:
    return int(resp["usage"]["prompt_tokens_details"]["cached_tokens"])


def _remote_hits(srv: ServerProc) -> float:
    return metric(srv.base_url, "tssc_state_cache_lookups_total", result="remote_hit")


def _served(srv: ServerProc) -> float:
    return metric(srv.base_url, "tssc_requests_total")


def _until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.1)


def test_a_session_continued_on_another_replica_restores_from_redis(
    replicas: Replica, nocache_server: ServerProc
) -> None:
    a, b = replicas(), replicas()
    reference = _turns(nocache_server.base_url, "ref", 2)
    first = chat(
        a.base_url, [{"role": "user", "content": "Hello there, replica"}], session="s", max_tokens=12
    )
    assert _text(first) == _text(reference[0])
    _until(lambda: metric(a.base_url, "tssc_state_cache_remote_bytes_total", direction="written") > 0)
    messages = [
        {"role": "user", "content": "Hello there, replica"},
        {"role": "assistant", "content": _text(first)},
        {"role": "user", "content": "And turn 2?"},
    ]
    second = chat(b.base_url, messages, session="s", max_tokens=12)
    assert _cached(second) > 0
    assert _remote_hits(b) == 1
    assert _text(second) == _text(reference[1])
    assert metric(b.base_url, "tssc_state_cache_remote_bytes_total", direction="read") > 0
    assert metric(b.base_url, "tssc_state_cache_fetch_seconds_count", tier="remote") == 1
    body = {"model": "tiny", "messages": messages, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", a.base_url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.headers["x-accel-buffering"] == "no"  # proxies pass SSE through unbuffered
        assert "[DONE]" in resp.read().decode()


def test_killing_the_replica_mid_conversation_costs_a_remote_fetch_not_a_prefill(
    replicas: Replica, nocache_server: ServerProc, tmp_path: Path
) -> None:
    a, b = replicas(), replicas()
    reference = _turns(nocache_server.base_url, "ref", 4)
    with nginx([a.port, b.port], tmp_path) as front:
        messages = [{"role": "user", "content": "Hello there, replica"}]
        got = []
        for turn in range(4):
            if turn == 2:  # SIGKILL the replica that served turn 2 (session affinity: turns 1 and 2)
                served = max((a, b), key=_served)
                assert _served(served) == 2
                survivor = b if served is a else a
                served.proc.kill()
                served.proc.wait(10)
            resp = chat(front, messages, session="conversation-1", max_tokens=12)
            got.append(resp)
            if turn == 2:
                assert _cached(resp) > 0
                assert _remote_hits(survivor) == 1
            messages += [
                {"role": "assistant", "content": _text(resp)},
                {"role": "user", "content": f"And turn {turn + 2}?"},
            ]
    assert [_text(r) for r in got] == [_text(r) for r in reference]


def test_redis_down_keeps_serving_and_writes_resume_after_it_returns(
    replicas: Replica, rds: RedisProc
) -> None:
    a, b = replicas(), replicas()
    rds.kill()
    before = metric(a.base_url, "tssc_state_cache_remote_errors_total")
    for i in range(3):
        assert _text(chat(a.base_url, [{"role": "user", "content": f"down {i}"}], session=f"d{i}"))
    assert metric(a.base_url, "tssc_state_cache_remote_errors_total") > before
    rds.start()
    written = metric(a.base_url, "tssc_state_cache_remote_bytes_total", direction="written")
    deadline = time.monotonic() + 45  # the gate's backoff (at most 30 s) ends, then writes go through
    i = 0
    while metric(a.base_url, "tssc_state_cache_remote_bytes_total", direction="written") <= written:
        if time.monotonic() > deadline:
            pytest.fail("remote writes did not resume")
        chat(a.base_url, [{"role": "user", "content": f"back {i}"}], session=f"b{i}")
        i += 1
        time.sleep(0.5)
    messages = [{"role": "user", "content": f"back {i - 1}"}]
    first = chat(a.base_url, messages, session=f"b{i - 1}")
    follow = [*messages, {"role": "assistant", "content": _text(first)}, {"role": "user", "content": "more"}]
    assert _cached(chat(b.base_url, follow, session=f"b{i - 1}")) > 0
    assert _remote_hits(b) >= 1


def test_two_api_keys_with_one_session_id_never_share_through_redis(replicas: Replica) -> None:
    keys = ["--api-key", "key-one", "--api-key", "key-two"]
    a, b = replicas(*keys), replicas(*keys)
    one = {"Authorization": "Bearer key-one"}
    two = {"Authorization": "Bearer key-two"}
    messages = [{"role": "user", "content": "a secret only key one has sent"}]
    first = chat(a.base_url, messages, session="same", headers=one)
    _until(lambda: metric(a.base_url, "tssc_state_cache_remote_bytes_total", direction="written") > 0)
    follow = [*messages, {"role": "assistant", "content": _text(first)}, {"role": "user", "content": "next"}]
    assert _cached(chat(b.base_url, follow, session="same", headers=two)) == 0
    assert _remote_hits(b) == 0
    assert _cached(chat(b.base_url, follow, session="same", headers=one)) > 0
    assert _remote_hits(b) == 1


def test_what_redis_holds_stays_within_the_remote_budget(replicas: Replica, rds: RedisProc) -> None:
    budget = 96 * 1024
    a = replicas("--remote-bytes", str(budget))
    for i in range(40):
        chat(a.base_url, [{"role": "user", "content": f"conversation number {i} " * 3}], session=f"m{i}")
    httpx.get(a.base_url + "/health")
    time.sleep(0.5)  # the last write-through
    client = rds.client()
    prefixes = {k.decode().split(":")[1] for k in client.scan_iter(match="tssc:*")}
    assert len(prefixes) == 1
    held = rds.memory_used_by("tssc:*")
    assert 0 < held <= budget
    used = int(client.get(f"tssc:{prefixes.pop()}:used") or 0)
    assert 0 < used <= budget
    assert metric(a.base_url, "tssc_state_cache_bytes", tier="remote") == used


def test_hostile_clients_on_one_session_of_a_remote_replica(replicas: Replica, rds: RedisProc) -> None:
    """Streams cut mid-way and complete ones, all on one odd session id, against two replicas sharing Redis,
    with Redis killed half-way: every request that stayed connected succeeds, and the servers stay healthy."""
    a, b = replicas(), replicas()
    header = {"X-Session-ID": "会话/a%b"}  # multi-byte, a slash and a percent sign
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hostile"}], "max_tokens": 24}

    def cut(base: str) -> None:
        stream = {**body, "stream": True}
        with httpx.stream(
            "POST", base + "/v1/chat/completions", json=stream, headers=_encoded(header), timeout=60
        ) as r:
            assert r.status_code == 200
            next(r.iter_bytes())  # one chunk, then the client goes away

    def complete(base: str) -> int:
        resp = httpx.post(base + "/v1/chat/completions", json=body, headers=_encoded(header), timeout=120)
        return resp.status_code

    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(cut if i % 2 else complete, (a, b)[i % 3 == 0].base_url) for i in range(16)]
        rds.kill()
        jobs += [pool.submit(complete, srv.base_url) for srv in (a, b) for _ in range(3)]
        codes = [j.result() for j in jobs]
    assert all(code == 200 for code in codes if code is not None)
    for srv in (a, b):
        assert httpx.get(srv.base_url + "/health", timeout=10).status_code == 200
        _until(lambda srv=srv: metric(srv.base_url, "tssc_requests_running") == 0)  # no slot leaked


def _encoded(header: dict[str, str]) -> dict[str, str]:
    """The session header percent-encoded as UTF-8, as the server reads it."""
    from urllib.parse import quote

    return {k: quote(v, safe="") for k, v in header.items()}
