"""StateCache facade: exact prefix lookup, tiers, write-through, eviction policy, pins, budgets, stats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from cache import CacheConfig, CacheObserver, StateCache
from cache.base import Tier
from cache.codec import make_codec, roundtrip

SPEC = {"conv": ((2, 24, 3), torch.float32), "ssm": ((2, 4, 8, 16), torch.float32)}
FP8_BLOCK, FP16_BLOCK, FP32_BLOCK = 1792, 3072, 4864  # encoded bytes of one SPEC checkpoint per codec


def _make_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, (shape, _) in SPEC.items()}


def _make_cache(observer: CacheObserver | None = None, **kw: Any) -> StateCache:
    cfg: dict[str, Any] = {"hot_bytes": 8 * FP8_BLOCK, "cold_bytes": 8 * FP16_BLOCK, "hot_window": 4}
    cfg.update(kw)
    return StateCache(CacheConfig(**cfg), SPEC, observer)


def _restore(cache: StateCache, ns: str, sess: str | None, tokens: Sequence[int]) -> tuple[int, Tier, dict]:
    lease = cache.lookup(ns, sess, tokens)
    assert lease is not None
    try:
        return lease.position, lease.tier, cache.fetch(lease)
    finally:
        cache.release(lease)


def _assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_budgets(cache: StateCache) -> None:
    for tier, ts in cache.stats().tiers.items():
        assert ts.bytes_used <= ts.bytes_capacity, tier


def test_lossless_tiers_restore_bit_exact() -> None:
    cache = _make_cache(
        hot_dtype="fp32", cold_dtype="fp32", hot_bytes=4 * FP32_BLOCK, cold_bytes=4 * FP32_BLOCK
    )
    state = _make_state(0)
    assert cache.capture("ns", "s", [1, 2, 3], state, reason="prompt_end")
    pos, tier, got = _restore(cache, "ns", "s", [1, 2, 3, 4])
    assert (pos, tier) == (3, "hot")
    _assert_state_equal(got, state)


def test_deepest_match_with_branches_and_namespace_isolation() -> None:
    cache = _make_cache(hot_window=8)
    trunk = list(range(20))
    cache.capture("ns", "s", trunk[:10], _make_state(1), reason="boundary")
    cache.capture("ns", "s", [*trunk, 7], _make_state(2), reason="generation_end")  # branch A
    cache.capture("ns", "s", [*trunk, 8, 8], _make_state(3), reason="generation_end")  # branch B (regenerate)
    assert _restore(cache, "ns", "s", [*trunk, 7, 1])[0] == 21
    assert _restore(cache, "ns", "s", [*trunk, 8, 8, 1])[0] == 22
    assert _restore(cache, "ns", "s", [*trunk, 8, 9])[0] == 10  # diverges inside branch B: back to the trunk
    assert cache.lookup("ns", "s", [0, 1, 2, 99]) is None  # shares 3 tokens, but nothing saved that shallow
    assert _restore(cache, "ns", "other", trunk)[0] == 10  # the namespace's tree serves all its sessions
    assert _restore(cache, "ns", None, trunk)[0] == 10
    assert cache.lookup("other", "s", trunk) is None  # never another namespace's


def test_anonymous_namespace_session() -> None:
    cache = _make_cache()
    cache.capture("key1", None, [5, 6, 7], _make_state(4), reason="prompt_end")
    assert _restore(cache, "key1", None, [5, 6, 7, 8])[0] == 3
    assert cache.lookup("key2", None, [5, 6, 7, 8]) is None


def test_hot_is_fp8_encoding_and_cold_is_fp16_encoding() -> None:
    cache = _make_cache(hot_window=1)
    a, b = _make_state(5), _make_state(6)
    cache.capture("ns", "s", [1, 2], a, reason="x")
    _, tier, got = _restore(cache, "ns", "s", [1, 2])
    assert tier == "hot"
    _assert_state_equal(got, {k: roundtrip(make_codec("fp8"), v) for k, v in a.items()})
    cache.capture("ns", "s", [1, 2, 3, 4], b, reason="x")  # a leaves the one-slot hot window
    pos, tier, got = _restore(cache, "ns", "s", [1, 2, 3])
    assert (pos, tier) == (2, "cold")
    # write-through: the cold copy was made from the full-precision state, not from the FP8 copy
    _assert_state_equal(got, {k: roundtrip(make_codec("fp16"), v) for k, v in a.items()})


def test_hot_window_keeps_most_recently_used() -> None:
    cache = _make_cache(hot_window=2)
    for n in (1, 2, 3):
        cache.capture("ns", "s", list(range(n * 5)), _make_state(n), reason="x")
    info = cache.session_info("ns", "s")
    assert info is not None
    tiers = {c["position"]: c["tiers"] for c in info["checkpoints"]}
    assert tiers == {5: ["cold"], 10: ["hot", "cold"], 15: ["hot", "cold"]}
    _restore(cache, "ns", "s", list(range(10)))  # touch 10: 15 is now the least recently used
    cache.capture("ns", "s", list(range(20)), _make_state(4), reason="x")
    info = cache.session_info("ns", "s")
    assert info is not None
    tiers = {c["position"]: c["tiers"] for c in info["checkpoints"]}
    assert "hot" in tiers[10] and "hot" in tiers[20] and "hot" not in tiers[15]


def test_eviction_order_follows_recompute_per_byte() -> None:
    cache = _make_cache(hot_bytes=0, cold_bytes=3 * FP16_BLOCK)
    for sess, n in (("a", 30), ("b", 10), ("c", 20)):
        assert cache.capture("ns", sess, list(range(n)), _make_state(n), reason="x")
    cache.capture("ns", "d", list(range(40)), _make_state(40), reason="x")
    assert cache.lookup("ns", "b", list(range(10))) is None  # cheapest to recompute went first
    cache.capture("ns", "e", list(range(50)), _make_state(50), reason="x")
    assert cache.lookup("ns", "c", list(range(20))) is None
    for sess, n in (("a", 30), ("d", 40), ("e", 50)):
        assert _restore(cache, "ns", sess, list(range(n)))[0] == n
    assert cache.stats().tiers["cold"].evictions == 2


def test_stale_deep_checkpoint_ages_out_under_churn() -> None:
    cache = _make_cache(hot_bytes=0, cold_bytes=2 * FP16_BLOCK)
    cache.capture("ns", "deep", list(range(30)), _make_state(1), reason="x")
    for i in range(3):  # shallower but fresh captures raise the clock past the stale deep one
        cache.capture("ns", f"t{i}", [i] * 25, _make_state(i), reason="x")
    assert cache.lookup("ns", "deep", list(range(30))) is None
    assert _restore(cache, "ns", "t2", [2] * 25)[0] == 25


def test_hit_refreshes_priority_among_equal_cost() -> None:
    cache = _make_cache(hot_bytes=0, cold_bytes=3 * FP16_BLOCK)
    for sess in "abc":
        cache.capture("ns", sess, [ord(sess)] * 10, _make_state(ord(sess)), reason="x")
    cache.capture("ns", "d", [1] * 10, _make_state(1), reason="x")  # evicts a (oldest)
    _restore(cache, "ns", "b", [ord("b")] * 10)  # b used: now more recent than c
    cache.capture("ns", "e", [2] * 10, _make_state(2), reason="x")
    assert cache.lookup("ns", "a", [ord("a")] * 10) is None
    assert cache.lookup("ns", "c", [ord("c")] * 10) is None
    assert _restore(cache, "ns", "b", [ord("b")] * 10)[0] == 10


def test_leased_checkpoint_is_never_evicted() -> None:
    cache = _make_cache(hot_bytes=2 * FP8_BLOCK, cold_bytes=2 * FP16_BLOCK)
    state = _make_state(7)
    cache.capture("ns", "s", [1], state, reason="x")
    lease = cache.lookup("ns", "s", [1])
    assert lease is not None and lease.tier == "hot"
    for i in range(2, 12):
        cache.capture("ns", f"o{i}", [i] * 50, _make_state(i), reason="x")
        _assert_budgets(cache)
    got = cache.fetch(lease)
    _assert_state_equal(got, {k: roundtrip(make_codec("fp8"), v) for k, v in state.items()})
    cache.release(lease)
    with pytest.raises(KeyError):
        cache.release(lease)
    cache.capture("ns", "x", [9] * 60, _make_state(99), reason="x")
    cache.capture("ns", "y", [8] * 60, _make_state(98), reason="x")
    assert cache.lookup("ns", "s", [1]) is None  # evictable again once released


def test_capture_refused_when_everything_is_pinned() -> None:
    cache = _make_cache(hot_bytes=0, cold_bytes=FP16_BLOCK)
    cache.capture("ns", "s", [1, 2], _make_state(1), reason="x")
    lease = cache.lookup("ns", "s", [1, 2])
    assert lease is not None
    assert not cache.capture("ns", "t", [3, 4], _make_state(2), reason="x")
    assert cache.stats().captures_skipped == 1
    _assert_budgets(cache)
    cache.release(lease)
    assert cache.capture("ns", "t", [3, 4], _make_state(2), reason="x")


def test_admission_skips_duplicates_and_near_duplicates() -> None:
    cache = _make_cache(min_gap=8)
    assert cache.capture("ns", "s", list(range(16)), _make_state(1), reason="x")
    assert not cache.capture("ns", "s", list(range(16)), _make_state(1), reason="x")
    assert not cache.capture("ns", "s", list(range(20)), _make_state(2), reason="x")
    assert cache.capture("ns", "s", list(range(24)), _make_state(3), reason="x")
    assert cache.capture(
        "ns", "s", [*range(10), 99, 99], _make_state(4), reason="x"
    )  # a branch, not a descendant
    assert cache.stats().captures_skipped == 2


def test_miss_causes_and_observer() -> None:
    seen: list[tuple[str, object]] = []

    class Obs(CacheObserver):
        def on_lookup(self, result: str, cause: str, scope: str) -> None:
            seen.append(("lookup", (result, cause, scope)))

        def on_evict(self, tier: str) -> None:
            seen.append(("evict", tier))

        def on_fetch(self, tier: str, seconds: float) -> None:
            seen.append(("fetch", tier))

        def on_capture(self, seconds: float) -> None:
            seen.append(("capture", seconds >= 0))

        def on_reuse(self, tokens: int) -> None:
            seen.append(("reuse", tokens))

    cache = _make_cache(Obs(), hot_bytes=0, cold_bytes=FP16_BLOCK)
    assert cache.lookup("ns", "s", [1, 2, 3]) is None
    cache.capture("ns", "s", [1, 2], _make_state(1), reason="x")
    _restore(cache, "ns", "s", [1, 2, 3])
    cache.capture("ns", "t", [4, 5, 6], _make_state(2), reason="x")  # evicts [1, 2]
    assert cache.lookup("ns", "s", [1, 2, 3]) is None
    stats = cache.stats()
    assert stats.lookups[("miss", "never_saved", "")] == 1
    assert stats.lookups[("miss", "evicted", "")] == 1
    assert stats.lookups[("cold_hit", "", "session")] == 1
    assert stats.tokens_reused == 2 and len(stats.fetch_seconds["cold"]) == 1
    assert ("lookup", ("miss", "evicted", "")) in seen and ("evict", "cold") in seen
    assert ("lookup", ("cold_hit", "", "session")) in seen
    assert ("fetch", "cold") in seen and ("reuse", 2) in seen and ("capture", True) in seen


def test_delete_session_frees_every_tier() -> None:
    cache = _make_cache()
    for n in (3, 6, 9):
        cache.capture("ns", "s", list(range(n)), _make_state(n), reason="x")
    cache.capture("ns", "keep", [1], _make_state(1), reason="x")
    freed = cache.delete_session("ns", "s")
    assert freed == 3 * FP8_BLOCK + 3 * FP16_BLOCK
    assert cache.session_info("ns", "s") is None
    assert cache.lookup("ns", "s", list(range(9))) is None
    stats = cache.stats()
    assert stats.tiers["hot"].bytes_used == FP8_BLOCK and stats.tiers["cold"].bytes_used == FP16_BLOCK
    assert stats.lookups[("miss", "never_saved", "")] == 1  # a deleted session leaves no ghosts


def test_delete_session_while_leased_frees_at_release() -> None:
    cache = _make_cache()
    state = _make_state(1)
    cache.capture("ns", "s", [1, 2], state, reason="x")
    lease = cache.lookup("ns", "s", [1, 2])
    assert lease is not None
    assert cache.delete_session("ns", "s") == 0
    assert cache.lookup("ns", "s", [1, 2]) is None
    _assert_state_equal(cache.fetch(lease), {k: roundtrip(make_codec("fp8"), v) for k, v in state.items()})
    cache.release(lease)
    assert all(ts.bytes_used == 0 for ts in cache.stats().tiers.values())


def test_resize_shrinks_with_pins_respected() -> None:
    cache = _make_cache(hot_bytes=4 * FP8_BLOCK, cold_bytes=4 * FP16_BLOCK)
    for i in range(4):
        cache.capture("ns", f"s{i}", [i] * (i + 1), _make_state(i), reason="x")
    lease = cache.lookup("ns", "s0", [0])
    assert lease is not None
    cache.resize(hot_bytes=0, cold_bytes=FP16_BLOCK // 2)
    stats = cache.stats()
    assert (
        stats.tiers["hot"].bytes_used == FP8_BLOCK == stats.tiers["hot"].bytes_capacity
    )  # only the pinned one
    assert stats.tiers["cold"].checkpoints == 1
    cache.release(lease)
    stats = cache.stats()
    assert stats.tiers["hot"].bytes_used == 0 and stats.tiers["cold"].bytes_used == 0
    assert stats.tiers["hot"].bytes_capacity == 0
    cache.resize(hot_bytes=8 * FP8_BLOCK, cold_bytes=8 * FP16_BLOCK)  # grow again
    for i in range(6):
        assert cache.capture("ns", f"g{i}", [i, i], _make_state(i), reason="x")
    assert cache.stats().tiers["hot"].checkpoints == 6


def test_fetch_into_given_tensors() -> None:
    cache = _make_cache(hot_dtype="fp32", hot_bytes=2 * FP32_BLOCK)
    state = _make_state(3)
    cache.capture("ns", "s", [1], state, reason="x")
    slot = {k: torch.zeros(s, dtype=d) for k, (s, d) in SPEC.items()}
    lease = cache.lookup("ns", "s", [1])
    assert lease is not None
    got = cache.fetch(lease, out=slot)
    cache.release(lease)
    assert got["ssm"].data_ptr() == slot["ssm"].data_ptr()
    _assert_state_equal(slot, state)


def test_bad_state_is_rejected() -> None:
    cache = _make_cache()
    with pytest.raises(ValueError):
        cache.capture("ns", "s", [1], {"conv": torch.zeros(2, 24, 3)}, reason="x")
    with pytest.raises(ValueError):
        cache.capture(
            "ns", "s", [1], {"conv": torch.zeros(2, 24, 4), "ssm": torch.zeros(2, 4, 8, 16)}, reason="x"
        )
    assert not cache.capture("ns", "s", [], _make_state(0), reason="x")


def test_capture_positions_uses_config() -> None:
    cache = _make_cache(checkpoint_interval=16, min_gap=4)
    assert cache.capture_positions(0, 40, [10, 30]) == [10, 16, 32, 40]  # 30 is within 4 of 32


def test_session_info_reports_bytes_per_tier() -> None:
    cache = _make_cache(hot_window=1)
    cache.capture("ns", "s", [1, 2], _make_state(1), reason="prompt_end")
    cache.capture("ns", "s", [1, 2, 3], _make_state(2), reason="generation_end")
    info = cache.session_info("ns", "s")
    assert info is not None
    assert info["bytes"] == {"hot": FP8_BLOCK, "cold": 2 * FP16_BLOCK, "disk": 0}
    assert [c["reason"] for c in info["checkpoints"]] == ["prompt_end", "generation_end"]


def test_hot_only_session_survives_its_own_window_eviction() -> None:
    cache = _make_cache(cold_bytes=0, hot_window=1, max_ghosts=0)
    cache.capture("ns", "s", [1, 2], _make_state(1), reason="x")
    assert cache.capture("ns", "s", [1, 2, 3], _make_state(2), reason="x")  # evicts [1, 2]: its last copy
    assert _restore(cache, "ns", "s", [1, 2, 3, 4])[0] == 3
    assert cache.lookup("ns", "s", [1, 2]) is None


def test_warmup_runs_the_codecs_without_storing_or_counting_anything() -> None:
    spec = {"conv": ((2, 24, 3), torch.float32), "ssm": ((2, 4, 8, 16), torch.float32)}
    cache = StateCache(CacheConfig(hot_bytes=1 << 20, cold_bytes=1 << 20), spec)
    before = cache.stats()
    cache.warmup()
    after = cache.stats()
    assert after == before
    assert cache.lookup("ns", "s", [1, 2, 3]) is None


def test_warmup_decodes_zeros_into_the_given_views_and_rejects_wrong_shapes() -> None:
    spec = {"conv": ((2, 24, 3), torch.float32), "ssm": ((2, 4, 8, 16), torch.float32)}
    cache = StateCache(CacheConfig(hot_bytes=1 << 20, cold_bytes=1 << 20), spec)
    pool = {name: torch.ones(shape[0], 3, *shape[1:]) for name, (shape, _) in spec.items()}  # 3 slots
    cache.warmup({name: t[:, 1] for name, t in pool.items()})  # strided views of slot 1
    for t in pool.values():
        assert not t[:, 1].any() and bool((t[:, 0] == 1).all()) and bool((t[:, 2] == 1).all())
    with pytest.raises(ValueError, match="shape"):
        cache.warmup({"conv": torch.zeros(2, 24, 4), "ssm": torch.zeros(2, 4, 8, 16)})


def test_arena_block_views_are_made_once_and_temporary_blocks_are_not_remembered() -> None:
    from cache.layout import BlockLayout

    spec = {"conv": ((2, 24, 3), torch.float32), "ssm": ((2, 4, 8, 16), torch.float32)}
    layout = BlockLayout(spec, make_codec("fp8"))
    block = torch.zeros(layout.block_bytes, dtype=torch.uint8)
    first = layout.views(block, arena=True)
    assert layout.views(block[:], arena=True) is first  # same address: the same views
    assert layout.views(block) is not first  # a temporary block gets fresh views
    state = {name: torch.randn(shape) for name, (shape, _) in spec.items()}
    layout.encode_into(state, block, arena=True)
    out = {name: torch.empty(shape) for name, (shape, _) in spec.items()}
    layout.decode_into(block, out, arena=True)
    expected = {name: roundtrip(make_codec("fp8"), t) for name, t in state.items()}
    assert all(torch.equal(out[k], expected[k]) for k in spec)
    staging = block.clone()
    layout.decode_into(staging, out)
    assert all(torch.equal(out[k], expected[k]) for k in spec)
    assert staging.data_ptr() not in layout._arena_views  # not kept alive by the memo
