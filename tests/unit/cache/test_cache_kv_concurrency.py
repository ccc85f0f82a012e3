"""Hybrid checkpoints from many threads at once: conversations sharing a system prompt capture, restore and
spill concurrently (so captures share KV blocks other captures are still writing); every restore is exact,
no lease or KV hold is lost, and deleting every session frees every byte and file."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import torch

from cache import StateCache
from tests.unit.cache.kv_helpers import (
    KV_BLOCK,
    STATE_BLOCK,
    ListSink,
    TokenKV,
    make_hybrid_cache,
    make_kv,
    make_state,
)

PROMPT = tuple(range(50, 70))  # a 20-token system prompt every conversation starts with
SESSIONS = tuple("abcdef")


def _one_op(cache: StateCache, rng: random.Random, errors: list[str]) -> None:
    session = rng.choice(SESSIONS)
    tokens = PROMPT + tuple(rng.randrange(3) for _ in range(rng.randrange(0, 30)))
    if rng.random() < 0.5:
        kv = TokenKV(tokens)
        cache.capture("ns", session, tokens, make_state("ns", tokens), reason="x", tree="ns", kv=kv)
        return
    lease = cache.lookup("ns", session, tokens, tree="ns")
    if lease is None:
        return
    try:
        sink = ListSink()
        got = cache.fetch(lease, kv=sink)
        prefix = tokens[: lease.position]
        want = make_state("ns", prefix)
        if not all(torch.equal(got[k], want[k]) for k in want) or not torch.equal(sink.kv, make_kv(prefix)):
            errors.append(f"wrong restore at {lease.position} from {lease.tier}")
    finally:
        cache.release(lease)


def test_many_threads_capture_and_restore_hybrid_checkpoints(tmp_path: Path) -> None:
    cache = make_hybrid_cache(
        hot_bytes=3 * STATE_BLOCK + 12 * KV_BLOCK,
        cold_bytes=6 * STATE_BLOCK + 24 * KV_BLOCK,
        hot_window=2,
        disk_dir=tmp_path,
        disk_bytes=1 << 20,
    )
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            _one_op(cache, rng, errors)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    stats = cache.stats()
    assert stats.leases == 0 and stats.captures > 0
    for tier, ts in stats.tiers.items():
        assert ts.kv_bytes <= ts.bytes_used <= ts.bytes_capacity, tier
    for session in SESSIONS:
        cache.delete_session("ns", session)
    cache.flush()
    stats = cache.stats()
    assert all(ts.bytes_used == 0 for ts in stats.tiers.values())
    assert not list(tmp_path.glob("*/kv/*.safetensors")) and not list(tmp_path.glob("*/*.safetensors"))
