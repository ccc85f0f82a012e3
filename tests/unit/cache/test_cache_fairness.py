"""Namespaces (API keys) share each arena tier fairly: a flood of sessions from one key cannot evict another
key's checkpoints below its fair share (capacity / namespaces holding copies)."""

from __future__ import annotations

import torch

from cache import CacheConfig, StateCache

SPEC = {"conv": ((2, 24, 3), torch.float32), "ssm": ((2, 4, 8, 16), torch.float32)}
FP8_BLOCK, FP16_BLOCK = 1792, 3072
BLOCKS = 8


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, (shape, _) in SPEC.items()}


def _cache() -> StateCache:
    config = CacheConfig(hot_bytes=BLOCKS * FP8_BLOCK, cold_bytes=BLOCKS * FP16_BLOCK, hot_window=4)
    return StateCache(config, SPEC)


def _held(cache: StateCache, ns: str, sessions: list[str]) -> int:
    return sum(1 for s in sessions if cache.session_info(ns, s) is not None)


def test_a_flood_from_one_key_keeps_the_other_keys_share() -> None:
    cache = _cache()
    victims = [f"b{i}" for i in range(3)]
    for i, s in enumerate(victims):
        assert cache.capture("key-b", s, [1, 2, i], _state(i), reason="prompt")
    flood = [f"a{i}" for i in range(200)]
    for i, s in enumerate(flood):
        cache.capture("key-a", s, [7, i, i + 1], _state(100 + i), reason="prompt")
    assert _held(cache, "key-b", victims) == 3  # under its share (8 / 2): untouched
    assert _held(cache, "key-a", flood) == BLOCKS - 3  # the flood recycles its own checkpoints
    for tier in cache.stats().tiers.values():
        assert tier.bytes_used <= tier.bytes_capacity


def test_a_newcomer_takes_its_share_from_a_namespace_holding_everything() -> None:
    cache = _cache()
    for i in range(BLOCKS):
        assert cache.capture("key-a", f"a{i}", [7, i], _state(i), reason="prompt")
    newcomer = [f"b{i}" for i in range(BLOCKS)]
    for i, s in enumerate(newcomer):
        assert cache.capture("key-b", s, [1, i], _state(50 + i), reason="prompt")
    # key-b evicts key-a's copies until it holds its share, then recycles its own
    assert _held(cache, "key-b", newcomer) == BLOCKS // 2
    assert _held(cache, "key-a", [f"a{i}" for i in range(BLOCKS)]) == BLOCKS // 2


def test_one_namespace_alone_uses_the_whole_tier() -> None:
    cache = _cache()
    sessions = [f"s{i}" for i in range(3 * BLOCKS)]
    for i, s in enumerate(sessions):
        assert cache.capture("anon", s, [3, i], _state(i), reason="prompt")
    assert _held(cache, "anon", sessions) == BLOCKS


def test_a_shared_checkpoint_is_charged_to_the_key_that_created_it() -> None:
    """Key b restores key a's checkpoints through a common tree, then floods it: the shared copies still count
    as a's (under its share), so b, at its share, recycles only its own."""
    cache = _cache()
    for i in range(3):
        assert cache.capture("key-a", f"a{i}", [1, 2, i], _state(i), reason="prompt", tree="common")
        lease = cache.lookup("key-b", f"b{i}", [1, 2, i, 5], tree="common")
        assert lease is not None and lease.scope == "shared"
        cache.release(lease)
    for i in range(100):
        cache.capture("key-b", f"flood{i}", [7, i, i + 1], _state(100 + i), reason="prompt", tree="common")
    assert _held(cache, "key-a", [f"a{i}" for i in range(3)]) == 3
    assert _held(cache, "key-b", [f"flood{i}" for i in range(100)]) == BLOCKS - 3
