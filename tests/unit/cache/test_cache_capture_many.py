"""`StateCache.capture_many`: a batch of captures is the same as the captures one by one (results, stored bytes,
lookups, counters), whether the batch's blocks form one run or are scattered over the arena, and a bad batch
stores nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cache import CacheConfig, Capture, StateCache
from cache.base import Tier

SPEC = {"conv": ((2, 24, 3), torch.float32), "ssm": ((2, 4, 8, 16), torch.float32)}
FP8_BLOCK, FP16_BLOCK = 1792, 3072  # encoded bytes of one SPEC checkpoint per codec


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, (shape, _) in SPEC.items()}


def _cache(tier: Tier = "hot", **kw: Any) -> StateCache:
    """Both tiers; for `tier` "cold", no hot tier, so that lookups restore from the cold one."""
    hot = 16 * FP8_BLOCK if tier == "hot" else 0
    cfg: dict[str, Any] = {"hot_bytes": hot, "cold_bytes": 16 * FP16_BLOCK, "hot_window": 16}
    cfg.update(kw)
    return StateCache(CacheConfig(**cfg), SPEC)


def _stacked(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([s[name] for s in states]) for name in SPEC}


def _restored(cache: StateCache, tokens: list[int], tier: Tier) -> dict[str, torch.Tensor]:
    """The checkpoint at exactly `tokens`, decoded from `tier`."""
    lease = cache.lookup("ns", "s", [*tokens, 0])
    assert lease is not None and lease.position == len(tokens)
    try:
        assert lease.tier == tier
        return cache.fetch(lease)
    finally:
        cache.release(lease)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in SPEC:
        assert torch.equal(a[name], b[name]), name


# the batch: distinct prompts, a duplicate of the first (shares it), an empty one (nothing), a prompt one token
# past the second (within min_gap of it: skipped), a session-less one
TOKENS = [[1, 2, 3], [4, 5, 6, 7], [1, 2, 3], [], [4, 5, 6, 7, 8], [9, 9, 9, 9, 9, 9]]
SESSIONS = ["s", "s", "t", "s", "s", None]


def _captures() -> list[Capture]:
    return [Capture("ns", sess, toks, "prompt") for toks, sess in zip(TOKENS, SESSIONS, strict=True)]


@pytest.mark.parametrize("tier", ["hot", "cold"])
def test_a_batch_equals_its_captures_one_by_one(tier: Tier) -> None:
    states = [_state(i) for i in range(len(TOKENS))]
    one, many = _cache(tier, min_gap=2), _cache(tier, min_gap=2)
    singles = [
        one.capture(c.namespace, c.session, c.tokens, s, reason=c.reason)
        for c, s in zip(_captures(), states, strict=True)
    ]
    batched = many.capture_many(_captures(), _stacked(states))
    assert batched == singles == [True, True, False, False, False, True]
    a, b = one.stats(), many.stats()
    assert (a.captures, a.captures_shared, a.captures_skipped) == (
        b.captures,
        b.captures_shared,
        b.captures_skipped,
    )
    assert {t: s.bytes_used for t, s in a.tiers.items()} == {t: s.bytes_used for t, s in b.tiers.items()}
    assert one.session_info("ns", "t") is not None and many.session_info("ns", "t") is not None  # the share
    for toks in (TOKENS[0], TOKENS[1], TOKENS[5]):
        _same(_restored(one, toks, tier), _restored(many, toks, tier))


@pytest.mark.parametrize("tier", ["hot", "cold"])
def test_scattered_blocks_get_their_own_states(tier: Tier) -> None:
    """After deletes leave holes in the arenas, a batch's blocks are not one run: each state still lands in
    its own checkpoint's block (the staging path), and the checkpoints beside the holes keep theirs."""
    cache = _cache(tier)
    keep = [_state(100 + i) for i in range(6)]
    for i, state in enumerate(keep):
        session = "s" if i % 2 else "gone"
        assert cache.capture("ns", session, [50, i], state, reason="prompt")
    cache.delete_session("ns", "gone")  # frees every other block of both arenas
    states = [_state(200 + i) for i in range(5)]
    captures = [Capture("ns", "s", [60, i], "prompt") for i in range(5)]
    assert cache.capture_many(captures, _stacked(states)) == [True] * 5
    reference = _cache(tier)  # the same states captured alone into an empty cache: the same codec, same bytes
    for i, state in enumerate(states):
        assert reference.capture("ns", "s", [60, i], state, reason="prompt")
        _same(_restored(cache, [60, i], tier), _restored(reference, [60, i], tier))
    for i in range(1, 6, 2):
        alone = _cache(tier)
        assert alone.capture("ns", "s", [50, i], keep[i], reason="prompt")
        _same(_restored(cache, [50, i], tier), _restored(alone, [50, i], tier))


def test_a_batch_with_a_wrong_shape_stores_nothing() -> None:
    cache = _cache()
    states = _stacked([_state(1), _state(2)])
    with pytest.raises(ValueError, match="shape"):
        cache.capture_many([Capture("ns", "s", [1], "prompt")], states)  # 1 capture, 2 states
    bad = dict(states)
    bad["conv"] = bad["conv"][:, :, :4]
    with pytest.raises(ValueError, match="conv"):
        cache.capture_many([Capture("ns", "s", [1], "prompt"), Capture("ns", "s", [2], "prompt")], bad)
    stats = cache.stats()
    assert stats.captures == 0 and stats.tiers["hot"].bytes_used == 0 and stats.tiers["cold"].bytes_used == 0


def test_an_empty_batch_stores_nothing() -> None:
    cache = _cache()
    empty = {name: torch.empty((0, *shape)) for name, (shape, _) in SPEC.items()}
    assert cache.capture_many([], empty) == []
    assert cache.stats().captures == 0
