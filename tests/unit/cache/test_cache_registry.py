"""The session registry is bounded by what the tiers hold: a session with no checkpoint left is forgotten,
tree and ghosts included, and a later lookup still reports its miss as `evicted`."""

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


def test_one_shot_sessions_do_not_accumulate() -> None:
    cache = StateCache(CacheConfig(hot_bytes=4 * FP8_BLOCK, cold_bytes=6 * FP16_BLOCK), SPEC)
    long_prompt = list(range(300, 3300))
    for i in range(500):
        cache.capture("anon", f"one-shot-{i}", [*long_prompt, i], _state(i % 7), reason="prompt")
    stats = cache.stats()
    assert stats.sessions == _checkpoints(cache) == 6
    assert cache.session_info("anon", "one-shot-0") is None
    assert cache.lookup("anon", "one-shot-0", [*long_prompt, 0, 1]) is None
    assert cache.stats().lookups[("miss", "evicted")] == 1
    assert cache.lookup("anon", "never-seen", [1, 2]) is None
    assert cache.stats().lookups[("miss", "never_saved")] == 1


def test_deleted_sessions_leave_the_registry() -> None:
    cache = StateCache(CacheConfig(hot_bytes=8 * FP8_BLOCK, cold_bytes=8 * FP16_BLOCK), SPEC)
    for i in range(8):
        assert cache.capture("anon", f"s{i}", [1, i], _state(i), reason="prompt")
    assert cache.stats().sessions == 8
    for i in range(8):
        assert cache.delete_session("anon", f"s{i}") > 0
    assert cache.stats().sessions == 0
    assert cache.lookup("anon", "s0", [1, 0, 5]) is None
    assert cache.stats().lookups[("miss", "never_saved")] == 1
