"""The remote tier against a real redis-server on loopback: two caches stand for two replicas of one model."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cache import CacheConfig, CacheObserver, RemoteConfig, StateCache
from cache.base import FetchTier, LookupResult, LookupScope, MissCause, RemoteDirection
from cache.codec import make_codec, roundtrip
from cache.remote import accounted, encode_blob
from tests.redis_proc import RedisProc, redis_server, self_signed

SPEC = {"conv": ((2, 24, 3), torch.float32), "ssm": ((2, 4, 8, 16), torch.float32)}
FP32_BLOCK = 4864


class Recorder(CacheObserver):
    def __init__(self) -> None:
        self.lookups: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.fetches: Counter[str] = Counter()

    def on_lookup(self, result: LookupResult, cause: MissCause, scope: LookupScope) -> None:
        self.lookups[result] += 1

    def on_remote_error(self, kind: str) -> None:
        self.errors[kind] += 1

    def on_remote_bytes(self, direction: RemoteDirection, nbytes: int) -> None:
        self.bytes[direction] += nbytes

    def on_fetch(self, tier: FetchTier, seconds: float) -> None:
        self.fetches[tier] += 1


@pytest.fixture
def rds(tmp_path: Path) -> Iterator[RedisProc]:
    with redis_server(tmp_path) as proc:
        yield proc


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, (shape, _) in SPEC.items()}


def _cache(
    url: str, observer: CacheObserver | None = None, lossless: bool = True, **remote: Any
) -> StateCache:
    dtypes = {"hot_dtype": "fp32", "cold_dtype": "fp32"} if lossless else {}
    cfg = CacheConfig(
        hot_bytes=8 * FP32_BLOCK, cold_bytes=8 * FP32_BLOCK, remote=RemoteConfig(url, **remote), **dtypes
    )
    return StateCache(cfg, SPEC, observer)


def _restore(cache: StateCache, ns: str, sess: str | None, tokens: list[int]) -> tuple[int, dict]:
    lease = cache.lookup(ns, sess, tokens)
    assert lease is not None
    try:
        return lease.position, cache.fetch(lease)
    finally:
        cache.release(lease)


def test_a_checkpoint_written_by_one_replica_restores_exactly_on_another(rds: RedisProc) -> None:
    seen_a, seen_b = Recorder(), Recorder()
    a, b = _cache(rds.url, seen_a), _cache(rds.url, seen_b)
    tokens = list(range(40))
    state = _state(1)
    assert a.capture("ns", "s", tokens[:10], _state(0), reason="boundary")
    assert a.capture("ns", "s", tokens[:30], state, reason="prompt")
    a.flush()
    assert seen_a.bytes["written"] > 0
    assert b.lookup("ns", "s", tokens) is None  # nothing local on replica b
    assert b.prefetch("ns", "s", tokens) == 30
    position, got = _restore(b, "ns", "s", tokens)
    assert position == 30
    for name in SPEC:
        assert torch.equal(got[name], state[name]), name
    assert seen_b.lookups["remote_hit"] == 1 and seen_b.fetches["remote"] == 1
    assert seen_b.bytes["read"] > 0
    assert b.prefetch("ns", "s", tokens) == 0  # now local: nothing deeper remotely
    assert _restore(b, "ns", "s", tokens)[0] == 30
    assert seen_b.lookups["remote_hit"] == 1 and seen_b.lookups["hot_hit"] == 1
    stats = b.stats()
    assert stats.remote is not None and stats.remote.bytes_capacity == 4 * 2**30


def test_only_checkpoints_that_matter_are_written_unless_asked(rds: RedisProc) -> None:
    a, b = _cache(rds.url), _cache(rds.url)
    tokens = list(range(64))
    assert a.capture("ns", "s", tokens[:16], _state(2), reason="interval")
    a.flush()
    assert b.prefetch("ns", "s", tokens) == 0
    every = _cache(rds.url, reasons=frozenset({"interval", "boundary", "prompt", "finish"}))
    assert every.capture("ns", "s", tokens[:32], _state(3), reason="interval")
    every.flush()
    assert b.prefetch("ns", "s", tokens) == 32


def test_another_namespace_never_finds_them(rds: RedisProc) -> None:
    a, b = _cache(rds.url), _cache(rds.url)
    tokens = list(range(20))
    a.capture("key-a", "same-id", tokens[:10], _state(4), reason="finish")
    a.flush()
    assert b.prefetch("key-b", "same-id", tokens) == 0
    assert b.prefetch("key-b", "same-id", tokens, tree="key-a") == 10  # the tree is the scope


def test_a_blob_that_fails_verification_is_never_restored(rds: RedisProc) -> None:
    seen = Recorder()
    a, b = _cache(rds.url), _cache(rds.url, seen)
    tokens = list(range(20))
    a.capture("ns", "s", tokens[:12], _state(5), reason="prompt")
    a.flush()
    client = rds.client()
    (key,) = [k for k in client.scan_iter(match="tssc:*:c:*")]
    good = client.get(key)
    assert good is not None
    # the right key holding another prefix's checkpoint (what a hash collision would look like)
    client.set(key, encode_blob({n: t for n, t in _fields(a, _state(6)).items()}, [9] * 12), keepttl=True)
    assert b.prefetch("ns", "s", tokens) == 0
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    client.set(key, bytes(flipped), keepttl=True)
    assert b.prefetch("ns", "s", tokens) == 0
    assert seen.errors["corrupt"] == 2
    assert b.lookup("ns", "s", tokens) is None
    client.set(key, good, keepttl=True)
    assert b.prefetch("ns", "s", tokens) == 12


def _fields(cache: StateCache, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    block = torch.empty(cache.remote_layout.block_bytes, dtype=torch.uint8)
    cache.remote_layout.encode_into(state, block)
    return {n: t.clone() for n, t in cache.remote_layout.named(block).items()}


def test_fp8_blobs_restore_the_fp8_rounding_of_the_state(rds: RedisProc) -> None:
    a = _cache(rds.url, lossless=False, dtype="fp8")
    b = _cache(rds.url, lossless=False, dtype="fp8")
    state = _state(7)
    tokens = list(range(9))
    a.capture("ns", "s", tokens, state, reason="finish")
    a.flush()
    assert b.prefetch("ns", "s", [*tokens, 1]) == 9
    _, got = _restore(b, "ns", "s", [*tokens, 1])
    fp8, fp16 = make_codec("fp8"), make_codec("fp16")
    for name in SPEC:  # the cold FP16 copy, re-encoded as FP8 for Redis, then FP8 again in the hot tier
        expected = roundtrip(fp8, roundtrip(fp8, roundtrip(fp16, state[name])))
        torch.testing.assert_close(got[name], expected, rtol=0, atol=0)
    assert b.prefetch("ns", "s", tokens) == 0
    fp16_replica = _cache(rds.url, lossless=False)  # another precision: other keys, never mixed
    assert fp16_replica.prefetch("ns", "s", [*tokens, 1]) == 0


def test_budget_holds_with_two_replicas_writing_at_once(rds: RedisProc) -> None:
    blob_cost = accounted(len(encode_blob(_fields(_cache(rds.url), _state(0)), list(range(40)))))
    budget = 6 * blob_cost
    a, b = _cache(rds.url, budget=budget), _cache(rds.url, budget=budget)

    def write(cache: StateCache, base: int) -> None:
        for i in range(15):
            tokens = [base, *range(i + 1, i + 40)]
            cache.capture("ns", f"s{base}-{i}", tokens, _state(i), reason="finish")
            cache.capture("ns", f"t{base}-{i}", [0, *range(39)], _state(0), reason="finish")  # same blob
        cache.flush()

    write_at_once(write, [(a, 1000), (b, 2000)])
    client = rds.client()
    prefix = a._remote.prefix  # type: ignore[union-attr]
    used = int(client.get(prefix + "used") or 0)
    sizes = [int(v) for v in client.hvals(prefix + "sz")]
    assert used == sum(sizes) <= budget  # never double counted, never negative
    assert 1 <= len(sizes) <= 6
    assert rds.memory_used_by(prefix + "*") <= budget


def write_at_once(write: Callable[[StateCache, int], None], replicas: list[tuple[StateCache, int]]) -> None:
    """Run `write(cache, base)` for every (replica, base) on threads of their own, at once; wait for all."""
    threads = [threading.Thread(target=write, args=pair) for pair in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_ttl_expiry_gives_the_bytes_back(rds: RedisProc) -> None:
    a = _cache(rds.url, ttl=0.3)
    a.capture("ns", "s", [1, 2, 3], _state(8), reason="finish")
    a.flush()
    prefix = a._remote.prefix  # type: ignore[union-attr]
    assert int(rds.client().get(prefix + "used") or 0) > 0
    time.sleep(0.5)
    a.capture("ns", "s", [4, 5, 6], _state(9), reason="finish")  # the next write purges the expired one
    a.flush()
    assert len(rds.client().hvals(prefix + "sz")) == 1


def test_deleting_a_session_deletes_its_remote_checkpoints(rds: RedisProc) -> None:
    a, b = _cache(rds.url), _cache(rds.url)
    tokens = list(range(30))
    a.capture("ns", "s", tokens[:20], _state(10), reason="finish")
    a.flush()
    a.delete_session("ns", "s")
    a.flush()
    assert b.prefetch("ns", "s", tokens) == 0
    assert int(rds.client().get(a._remote.prefix + "used") or 0) == 0  # type: ignore[union-attr]


def test_redis_down_costs_nothing_but_the_remote_tier_and_writes_resume(rds: RedisProc) -> None:
    seen = Recorder()
    a = _cache(rds.url, seen, timeout=0.5)
    b = _cache(rds.url)
    rds.kill()
    tokens = list(range(50))
    assert a.capture("ns", "s", tokens[:10], _state(11), reason="finish")  # local tiers still work
    a.flush()
    started = time.monotonic()
    assert a.prefetch("ns", "s", tokens) == 0
    assert time.monotonic() - started < 1.0
    assert _restore(a, "ns", "s", tokens)[0] == 10
    assert seen.errors["connection"] >= 1
    rds.start()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:  # the gate reopens after its backoff
        a.capture("ns", "s", tokens[: 20 + int(time.monotonic() * 10) % 20], _state(12), reason="finish")
        a.flush()
        if b.prefetch("ns", "s", tokens) > 0:
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"remote writes never resumed: {seen.errors}")


def test_lossy_default_restores_like_a_local_restore(rds: RedisProc) -> None:
    a, b = _cache(rds.url, lossless=False), _cache(rds.url, lossless=False)
    state = _state(13)
    a.capture("ns", "s", list(range(8)), state, reason="prompt")
    a.flush()
    assert b.prefetch("ns", "s", list(range(10))) == 8
    _, got = _restore(b, "ns", "s", list(range(10)))
    fp8, fp16 = make_codec("fp8"), make_codec("fp16")
    for name in SPEC:  # FP16 in Redis (the cold copy's bytes), then the FP8 hot copy it restores from
        assert torch.equal(got[name], roundtrip(fp8, roundtrip(fp16, state[name])))


def test_a_remote_checkpoint_saving_too_few_tokens_is_not_fetched(rds: RedisProc) -> None:
    a, b = _cache(rds.url), _cache(rds.url, min_tokens=20)
    tokens = list(range(60))
    a.capture("ns", "s", tokens[:15], _state(14), reason="boundary")
    a.capture("ns", "s", tokens[:30], _state(15), reason="finish")
    a.flush()
    b.capture("ns", "s", tokens[:12], _state(16), reason="interval")  # local depth 12
    assert b.prefetch("ns", "s", tokens) == 0  # 30 - 12 < 20: prefilling 18 tokens is cheaper
    c = _cache(rds.url, min_tokens=20)
    assert c.prefetch("ns", "s", tokens) == 30  # nothing local: 30 tokens saved


def test_auth_with_the_password_and_a_counted_failure_without_it(tmp_path: Path) -> None:
    with redis_server(tmp_path, password="s3cret") as rds:
        seen = Recorder()
        a, b = _cache(rds.url, password="s3cret"), _cache(rds.url, password="s3cret")
        wrong = _cache(rds.url, seen, password="nope")
        tokens = list(range(20))
        assert a.capture("ns", "s", tokens[:10], _state(17), reason="finish")
        a.flush()
        assert b.prefetch("ns", "s", tokens) == 10
        assert wrong.prefetch("ns", "s", tokens) == 0
        assert seen.errors["auth"] >= 1
        assert wrong.capture("ns", "s", tokens[:12], _state(18), reason="finish")  # local tiers unaffected
        assert _restore(wrong, "ns", "s", tokens)[0] == 12


def test_tls_with_the_ca_file(tmp_path: Path) -> None:
    tls = self_signed(tmp_path)
    with redis_server(tmp_path, tls=tls) as rds:
        assert rds.url.startswith("rediss://")
        a, b = _cache(rds.url, tls_ca_file=tls[2]), _cache(rds.url, tls_ca_file=tls[2])
        seen = Recorder()
        untrusting = _cache(rds.url, seen)  # the system CAs do not know the test CA
        tokens = list(range(20))
        assert a.capture("ns", "s", tokens[:10], _state(19), reason="finish")
        a.flush()
        assert b.prefetch("ns", "s", tokens) == 10
        assert untrusting.prefetch("ns", "s", tokens) == 0
        assert seen.errors["connection"] >= 1
