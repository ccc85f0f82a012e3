"""The session and tree registries are bounded by what the tiers hold: a session or tree with no checkpoint
left is forgotten, and so are ghost markers beyond the tree's bound; a recent eviction still reports its miss
as `evicted`."""

from __future__ import annotations

import torch

from cache import CacheConfig, StateCache

SPEC = {"conv": ((2, 24, 3), torch.float32), "ssm": ((2, 4, 8, 16), torch.float32)}
FP8_BLOCK, FP16_BLOCK = 1792, 3072


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, (shape, _) in SPEC.items()}


def _checkpoints(cache: StateCache) -> int:
    tiers = cache.stats().tiers
    return max(tiers["hot"].checkpoints, tiers["cold"].checkpoints)


def _ghosts(cache: StateCache, tree: str) -> int:
    return sum(node.ghost for node in cache._book.index.trees[tree].ghosts)


def test_one_shot_sessions_do_not_accumulate() -> None:
    cache = StateCache(CacheConfig(hot_bytes=4 * FP8_BLOCK, cold_bytes=6 * FP16_BLOCK, max_ghosts=16), SPEC)
    long_prompt = list(range(300, 3300))
    for i in range(500):
        cache.capture("anon", f"one-shot-{i}", [*long_prompt, i], _state(i % 7), reason="prompt")
    stats = cache.stats()
    assert stats.sessions == _checkpoints(cache) == 6 and stats.trees == 1
    assert _ghosts(cache, "anon") <= 16  # max(max_ghosts, checkpoints in the tree)
    assert cache.session_info("anon", "one-shot-0") is None
    assert cache.lookup("anon", "one-shot-490", [*long_prompt, 490, 1]) is None
    assert cache.stats().lookups[("miss", "evicted", "")] == 1  # a recent eviction: its ghost is kept
    assert cache.lookup("anon", "one-shot-0", [*long_prompt, 0, 1]) is None
    assert cache.stats().lookups[("miss", "never_saved", "")] == 1  # beyond the ghost bound
    assert cache.lookup("anon", "never-seen", [1, 2]) is None
    assert cache.stats().lookups[("miss", "never_saved", "")] == 2


def test_a_tree_whose_checkpoints_were_all_evicted_is_forgotten_but_misses_as_evicted() -> None:
    cache = StateCache(CacheConfig(hot_bytes=0, cold_bytes=2 * FP16_BLOCK), SPEC)
    cache.capture("key-a", "s", [1, 2, 3], _state(1), reason="prompt", tree="salted")
    for i in range(4):
        cache.capture("key-a", "s", [9, i], _state(i), reason="prompt")
    assert cache.stats().trees == 1  # "salted" is gone, its nodes and ghosts with it
    assert cache.lookup("key-a", "s", [1, 2, 3], tree="salted") is None
    assert cache.lookup("key-a", "s", [1, 2, 3], tree="never-used") is None
    lookups = cache.stats().lookups
    assert lookups[("miss", "evicted", "")] == 1 and lookups[("miss", "never_saved", "")] == 1


def test_deleted_sessions_leave_the_registry() -> None:
    cache = StateCache(CacheConfig(hot_bytes=8 * FP8_BLOCK, cold_bytes=8 * FP16_BLOCK), SPEC)
    for i in range(8):
        assert cache.capture("anon", f"s{i}", [1, i], _state(i), reason="prompt")
    assert cache.stats().sessions == 8
    for i in range(8):
        assert cache.delete_session("anon", f"s{i}") > 0
    assert cache.stats().sessions == 0
    assert cache.lookup("anon", "s0", [1, 0, 5]) is None
    assert cache.stats().lookups[("miss", "never_saved", "")] == 1


def test_sessions_sharing_one_checkpoint_stay_bounded() -> None:
    """Many one-shot sessions restoring one shared prompt: at most max_sessions are tracked (the least
    recently used forgotten as if deleted), and the shared checkpoint survives for the rest."""
    cache = StateCache(CacheConfig(hot_bytes=4 * FP8_BLOCK, cold_bytes=6 * FP16_BLOCK, max_sessions=10), SPEC)
    prompt = list(range(300, 400))
    assert cache.capture("anon", "creator", prompt, _state(0), reason="boundary")
    for i in range(50):
        lease = cache.lookup("anon", f"reader-{i}", [*prompt, i])
        assert lease is not None and lease.position == len(prompt)
        cache.release(lease)
    assert cache.stats().sessions == 10
    assert cache.session_info("anon", "reader-49") is not None
    assert cache.session_info("anon", "reader-0") is None
    lease = cache.lookup("anon", "late", [*prompt, 7])
    assert lease is not None
    cache.release(lease)
