"""A hybrid model's remote tier over HTTP: two tssc replicas of a tiny bamba hybrid share one real
redis-server; the second serves a follow-up from the first's checkpoint (its SSM state and attention KV
brought from Redis) and, with lossless tiers, answers exactly what a `--no-cache` server does."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import COMMON, chat, metric
from tests.integration.server_proc import ServerProc, make_tiny_hybrid, start_server
from tests.integration.test_sessions import STOP_IDS, _cached, _text
from tests.redis_proc import RedisProc, redis_server

FLAGS = ["--max-num-seqs", "2", "--checkpoint-interval", "16", "--max-model-len", "512"]
LOSSLESS = ["--hot-dtype", "fp32", "--cold-dtype", "fp32", "--remote-timeout", "2"]
FIRST = [{"role": "user", "content": "Tell me about the sea, and the ships on it."}]


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hybrid(tmp_path_factory.mktemp("hybrid") / "bamba", "bamba", seed=3)


@pytest.fixture
def rds(tmp_path: Path) -> Iterator[RedisProc]:
    with redis_server(tmp_path) as proc:
        yield proc


@contextlib.contextmanager
def _server(model: Path, log_dir: Path, *args: str) -> Iterator[ServerProc]:
    with start_server(["--model", str(model), *COMMON, *FLAGS, *args], log_dir=log_dir) as srv:
        yield srv


def _turn(base_url: str, messages: list[dict[str, str]], session: str) -> dict[str, object]:
    return chat(base_url, messages, session, stop_token_ids=STOP_IDS, max_tokens=16)


def _follow_up(first: dict[str, object]) -> list[dict[str, str]]:
    return [*FIRST, {"role": "assistant", "content": _text(first)}, {"role": "user", "content": "More."}]


def _until_written(srv: ServerProc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(srv.base_url, "tssc_state_cache_remote_bytes_total", direction="written") == 0:
        if time.monotonic() > deadline:
            pytest.fail("the first replica wrote nothing to Redis")
        time.sleep(0.2)


def test_a_follow_up_on_another_replica_restores_state_and_kv_from_redis(
    hybrid_dir: Path, log_dir: Path, rds: RedisProc
) -> None:
    remote = ["--remote-url", rds.url, *LOSSLESS]
    with _server(hybrid_dir, log_dir, "--no-cache") as plain:
        reference = [_turn(plain.base_url, FIRST, "ref")]
        reference.append(_turn(plain.base_url, _follow_up(reference[0]), "ref"))
    with _server(hybrid_dir, log_dir, *remote) as a:
        first = _turn(a.base_url, FIRST, "s")
        assert _text(first) == _text(reference[0])
        _until_written(a)
        assert metric(a.base_url, "tssc_state_cache_kv_bytes", tier="remote") > 0
    client = rds.client()
    assert any(client.scan_iter(match="tssc:*:k:*"))  # its KV blocks, keys of their own
    with _server(hybrid_dir, log_dir, *remote) as b:  # a fresh replica: empty local tiers
        second = _turn(b.base_url, _follow_up(first), "s")
        assert _cached(second) > 0, second["usage"]
        assert metric(b.base_url, "tssc_state_cache_lookups_total", result="remote_hit") == 1
        assert metric(b.base_url, "tssc_state_cache_remote_errors_total", kind="kv_missing") == 0
        assert _text(second) == _text(reference[1])
