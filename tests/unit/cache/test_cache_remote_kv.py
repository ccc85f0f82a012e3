"""The remote tier of a hybrid model against a real redis-server on loopback: checkpoints with their attention
KV, the KV blocks stored once per tree and shared by every checkpoint that covers them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cache import RemoteConfig, StateCache, remote_kv
from cache.codec import make_codec, roundtrip
from cache.remote_kv import block_names
from tests.redis_proc import RedisProc, redis_server
from tests.unit.cache.kv_helpers import (
    KV,
    KV_BLOCK,
    ListSink,
    TokenKV,
    capture,
    make_hybrid_cache,
    make_kv,
    make_state,
)
from tests.unit.cache.test_cache_remote import Recorder, write_at_once

CONVERSATION = tuple(range(100, 190))  # 90 tokens: 11 full blocks of 8 and a partial one


@pytest.fixture
def rds(tmp_path: Path) -> Iterator[RedisProc]:
    with redis_server(tmp_path) as proc:
        yield proc


def _cache(url: str, recorder: Recorder | None = None, **remote: Any) -> StateCache:
    """A lossless hybrid cache (fp32 tiers, fp32 blobs) with every capture written through."""
    reasons = frozenset({"x"})
    cfg = RemoteConfig(url, dtype=remote.pop("dtype", "fp32"), reasons=reasons, **remote)
    return make_hybrid_cache(remote=cfg, observer=recorder)


def _assert_restores(cache: StateCache, tokens: tuple[int, ...], position: int) -> None:
    """The local lookup of `tokens` finds a checkpoint at `position` whose state and KV equal the captured."""
    lease = cache.lookup("ns", "reader", tokens)
    assert lease is not None and lease.position == position
    try:
        sink = ListSink()
        got = cache.fetch(lease, kv=sink)
        want = make_state("ns", tokens[:position])
        assert all(got[k].equal(want[k]) for k in want)
        assert sink.kv.equal(make_kv(tokens[:position]))
    finally:
        cache.release(lease)


def _keys(client: redis.Redis, cache: StateCache, kind: str) -> list[bytes]:
    prefix = cache._remote.prefix  # type: ignore[union-attr]
    return list(client.scan_iter(match=f"{prefix}{kind}:*"))


@pytest.mark.parametrize("position", [88, 90, 5])  # on a block boundary, off one, inside the first block
def test_a_hybrid_checkpoint_restores_its_state_and_kv_on_another_replica(
    rds: RedisProc, position: int
) -> None:
    a, b = _cache(rds.url), _cache(rds.url)
    assert capture(a, CONVERSATION[:position])
    a.flush()
    assert b.lookup("ns", "s", CONVERSATION) is None
    assert b.prefetch("ns", "s", CONVERSATION) == position
    _assert_restores(b, CONVERSATION, position)


def test_eight_checkpoints_of_one_conversation_store_its_kv_prefix_once(rds: RedisProc) -> None:
    a = _cache(rds.url)
    positions = [11, 23, 35, 47, 59, 71, 83, 90]  # off block boundaries: each has a partial block
    for p in positions:
        assert capture(a, CONVERSATION[:p])
        a.flush()
    client = rds.client()
    blocks = _keys(client, a, "k")
    assert len(blocks) == 90 // KV.block_size  # 11: every full block once, none per checkpoint
    one_block = KV.block_size * KV.n_layers * 2 * KV.n_kv_heads * KV.head_dim * 4  # fp32
    assert all(one_block < int(client.strlen(k)) < one_block + 512 for k in blocks)  # + tokens, header
    blobs = [int(client.strlen(k)) for k in _keys(client, a, "c")]
    # a blob: the state, the partial block (< 1 block of KV), its tokens and a header; no full block
    assert len(blobs) == 8 and max(blobs) < _state_bytes() + one_block + 4 * 90 + 1024
    kv_per_checkpoint = sum(positions) * one_block // KV.block_size  # a KV copy in every blob: 53.6 kB
    assert sum(blobs) + sum(int(client.strlen(k)) for k in blocks) < kv_per_checkpoint * 0.6
    prefix = a._remote.prefix  # type: ignore[union-attr]
    assert rds.memory_used_by(prefix + "*") <= int(client.get(prefix + "used") or 0)  # blocks accounted
    stats = a.stats().remote
    assert stats is not None and stats.checkpoints == len(positions)
    assert stats.kv_bytes == sum(int(v) for k, v in client.hgetall(prefix + "sz").items() if b":k:" in k)
    b = _cache(rds.url)
    for p in positions:  # each restores exactly from the shared blocks
        assert b.prefetch("ns", "s", CONVERSATION[:p]) == p
        _assert_restores(b, CONVERSATION[:p], p)


def test_a_checkpoint_whose_block_is_gone_is_a_miss_not_a_wrong_restore(rds: RedisProc) -> None:
    seen = Recorder()
    a, b = _cache(rds.url), _cache(rds.url, seen)
    assert capture(a, CONVERSATION[:40])
    assert capture(a, CONVERSATION[:75])
    a.flush()
    client = rds.client()
    prefix = a._remote.prefix  # type: ignore[union-attr]
    names = block_names("ns", CONVERSATION, KV.block_size)
    client.delete(f"{prefix}k:{names[6]}")  # positions [48, 56): the deeper checkpoint's alone
    client.config_resetstat()
    assert b.prefetch("ns", "s", CONVERSATION) == 40  # the shallower one, whole
    assert seen.errors["kv_missing"] == 1
    assert client.info("commandstats")["cmdstat_mget"]["calls"] == 1  # the miss moved no KV
    _assert_restores(b, CONVERSATION, 40)
    client.delete(f"{prefix}k:{names[0]}")  # shared by both
    client.config_resetstat()
    c = _cache(rds.url, seen)
    assert c.prefetch("ns", "s", CONVERSATION) == 0
    assert c.lookup("ns", "s", CONVERSATION) is None
    assert seen.errors["kv_missing"] == 3
    assert "cmdstat_mget" not in client.info("commandstats")


def test_a_block_holding_other_tokens_fails_verification(rds: RedisProc) -> None:
    seen = Recorder()
    a, b = _cache(rds.url), _cache(rds.url, seen)
    other = tuple(range(500, 590))
    assert capture(a, CONVERSATION[:30])
    assert capture(a, other[:30], session="t")
    a.flush()
    client = rds.client()
    prefix = a._remote.prefix  # type: ignore[union-attr]
    mine = f"{prefix}k:{block_names('ns', CONVERSATION, KV.block_size)[1]}"
    theirs = client.get(f"{prefix}k:{block_names('ns', other, KV.block_size)[1]}")
    assert theirs is not None
    client.set(mine, theirs, keepttl=True)  # what a hash collision would look like
    assert b.prefetch("ns", "s", CONVERSATION) == 0
    assert seen.errors["corrupt"] == 1


def test_a_follow_up_writes_only_its_new_blocks(rds: RedisProc) -> None:
    seen = Recorder()
    a = _cache(rds.url, seen)
    assert capture(a, CONVERSATION[:40])
    a.flush()
    first = seen.bytes["written"]
    assert capture(a, CONVERSATION[:48])
    a.flush()
    second = seen.bytes["written"] - first
    # the 48-token checkpoint names 6 blocks; 5 were stored: only the sixth goes over the wire with its blob
    one_block = 8 * KV.n_layers * 2 * KV.n_kv_heads * KV.head_dim * 4
    assert second < first and one_block <= second - _state_bytes() < 2 * one_block


def _state_bytes() -> int:
    return sum(t.numel() * 4 for t in make_state("ns", (1,)).values())


def test_writes_and_hits_keep_blocks_alive_longer_than_their_checkpoints(rds: RedisProc) -> None:
    a = _cache(rds.url, ttl=30.0)
    assert capture(a, CONVERSATION[:20])
    a.flush()
    client = rds.client()
    blob_ttl = [int(client.pttl(k)) for k in _keys(client, a, "c")]
    block_ttl = [int(client.pttl(k)) for k in _keys(client, a, "k")]
    assert len(block_ttl) == 2 and min(block_ttl) > max(blob_ttl)
    prefix = a._remote.prefix  # type: ignore[union-attr]
    scores = dict(client.zrange(prefix + "lru", 0, -1, withscores=True))
    blob_score = max(v for k, v in scores.items() if b":c:" in k)
    assert all(v > blob_score for k, v in scores.items() if b":k:" in k)  # evicted after their checkpoint
    for k in _keys(client, a, "k") + _keys(client, a, "c"):
        client.pexpire(k, 10_000)  # as if written a while ago
    assert _cache(rds.url, ttl=30.0).prefetch("ns", "s", CONVERSATION) == 20  # a hit refreshes them all
    assert all(int(client.pttl(k)) > 30_000 for k in _keys(client, a, "k"))
    assert all(20_000 < int(client.pttl(k)) <= 30_000 for k in _keys(client, a, "c"))


def test_the_budget_holds_and_deleting_a_session_drops_the_blocks_it_wrote(rds: RedisProc) -> None:
    budget = 40_000
    a = _cache(rds.url, budget=budget)
    for i in range(12):
        tokens = tuple(range(1000 * i, 1000 * i + 60))
        capture(a, tokens, session=f"s{i}")
        a.flush()
    client = rds.client()
    prefix = a._remote.prefix  # type: ignore[union-attr]
    used = int(client.get(prefix + "used") or 0)
    assert used == sum(int(v) for v in client.hvals(prefix + "sz")) <= budget
    assert rds.memory_used_by(prefix + "*") <= budget
    last = tuple(range(11_000, 11_060))
    assert _cache(rds.url).prefetch("ns", "x", last) == 60
    held = len(_keys(client, a, "k"))
    a.delete_session("ns", "s11")
    a.flush()
    assert len(_keys(client, a, "k")) == held - 60 // KV.block_size  # its blocks went with it
    assert _cache(rds.url).prefetch("ns", "x", last) == 0
    assert int(client.get(prefix + "used:kv") or 0) == sum(
        int(v) for k, v in client.hgetall(prefix + "sz").items() if b":k:" in k
    )


@pytest.mark.parametrize(("cold", "remote"), [("fp16", None), ("fp32", "fp8"), ("fp32", "fp16")])
def test_lossy_blobs_hold_the_kv_rounded_by_the_remote_codec(
    rds: RedisProc, cold: str, remote: str | None
) -> None:
    cfg = RemoteConfig(rds.url, dtype=remote, reasons=frozenset({"x"}))  # type: ignore[arg-type]
    a, b = (make_hybrid_cache(cold_dtype=cold, remote=cfg) for _ in range(2))
    assert capture(a, CONVERSATION[:29])  # 3 blocks and a partial one: the cold copy's bytes, or re-encoded
    a.flush()
    assert b.prefetch("ns", "s", CONVERSATION) == 29
    lease = b.lookup("ns", "s", CONVERSATION)
    assert lease is not None and lease.tier == "hot"  # fp32 hot: what the blob held, exactly
    sink = ListSink()
    b.fetch(lease, kv=sink)
    b.release(lease)
    want = make_kv(CONVERSATION[:29])
    if cold != "fp32":
        want = roundtrip(make_codec(cold), want)
    assert sink.kv.equal(roundtrip(make_codec(remote or cold), want))


def test_conversations_sharing_a_prefix_share_its_blocks_within_a_tree_only(rds: RedisProc) -> None:
    a = _cache(rds.url)
    prompt = CONVERSATION[:40]  # 5 full blocks
    one, two = (*prompt, *range(7000, 7030)), (*prompt, *range(8000, 8030))  # 3 more blocks each
    assert capture(a, one, session="one") and capture(a, two, session="two")
    a.flush()
    client = rds.client()
    assert len(_keys(client, a, "k")) == 5 + 3 + 3
    assert a.capture(
        "ns", "three", one, make_state("other", one), reason="x", tree="other", kv=TokenKV(one)
    )  # another tree (another API key): blocks of its own, never shared across trees
    a.flush()
    assert len(_keys(client, a, "k")) == 11 + 8


def test_redis_down_costs_a_hybrid_nothing_but_the_remote_tier(rds: RedisProc) -> None:
    seen = Recorder()
    a = _cache(rds.url, seen, timeout=0.5)
    rds.kill()
    assert capture(a, CONVERSATION[:30])  # the write-through fails (counted); the local tiers hold it
    a.flush()
    assert seen.errors["connection"] >= 1 and seen.bytes["written"] == 0
    assert a.prefetch("ns", "s", CONVERSATION) == 0
    _assert_restores(a, CONVERSATION, 30)


def test_new_blocks_go_a_piece_at_a_time_and_a_checkpoint_over_the_budget_is_not_written(
    rds: RedisProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote_kv, "PUT_BYTES", 3 * KV_BLOCK)  # 3 blocks per transaction
    a, b = _cache(rds.url), _cache(rds.url)
    client = rds.client()
    client.config_resetstat()
    assert capture(a, CONVERSATION[:90])  # 11 new blocks: 4 transactions, then the blob
    a.flush()
    assert client.info("commandstats")["cmdstat_exec"]["calls"] == 5
    assert b.prefetch("ns", "s", CONVERSATION) == 90
    _assert_restores(b, CONVERSATION, 90)
    seen = Recorder()
    small = _cache(rds.url, seen, budget=20_000, prefix="small")  # the blob and 11 blocks need ~40 kB
    assert capture(small, CONVERSATION[:90])
    small.flush()
    assert seen.errors["too_large"] == 1 and seen.bytes["written"] == 0
    assert not list(client.scan_iter(match="small:*"))


def test_two_replicas_writing_shared_prefixes_at_once_keep_the_accounting_exact(rds: RedisProc) -> None:
    budget = 60_000  # room for about two conversations' blocks: writes evict all along
    a, b = _cache(rds.url, budget=budget), _cache(rds.url, budget=budget)
    prompt = CONVERSATION[:24]  # 3 blocks every conversation shares

    def write(cache: StateCache, base: int) -> None:
        for i in range(8):
            tokens = (*prompt, *range(base + 100 * i, base + 100 * i + 20 + 3 * i))
            capture(cache, tokens, session=f"s{base}-{i}")
        cache.flush()

    write_at_once(write, [(a, 10_000), (b, 20_000)])
    client = rds.client()
    prefix = a._remote.prefix  # type: ignore[union-attr]
    sizes = {k: int(v) for k, v in client.hgetall(prefix + "sz").items()}
    blocks = {k: v for k, v in sizes.items() if b":k:" in k}
    assert int(client.get(prefix + "used") or 0) == sum(sizes.values()) <= budget
    assert int(client.get(prefix + "used:kv") or 0) == sum(blocks.values())
    assert int(client.get(prefix + "used:kvn") or 0) == len(blocks) > 0
    assert set(_keys(client, a, "k") + _keys(client, a, "c")) <= set(sizes)  # nothing stored unaccounted
    assert rds.memory_used_by(prefix + "*") <= budget
    reader, restored = _cache(rds.url), 0
    for base in (10_000, 20_000):  # whatever survived restores exactly; the rest is a miss
        for i in range(8):
            tokens = (*prompt, *range(base + 100 * i, base + 100 * i + 20 + 3 * i))
            position = reader.prefetch("ns", "r", tokens)
            if position == len(tokens):
                _assert_restores(reader, tokens, position)
                restored += 1
    assert restored >= 1
