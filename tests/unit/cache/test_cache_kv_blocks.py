"""Hybrid checkpoints (`cache.kv_blocks`): each KV block is stored once along the prefix tree, budgets count
KV and state together, demotion and eviction move a checkpoint's state and KV together, and a restore
brings back both, exactly, at any position (block-aligned or not)."""

from __future__ import annotations

import threading

import pytest
import torch

from cache import StateCache
from tests.unit.cache.kv_helpers import (
    KV,
    KV_BLOCK,
    STATE_BLOCK,
    ListSink,
    TokenKV,
    assert_restores,
    capture,
    make_hybrid_cache,
    make_state,
)

CONVERSATION = tuple(range(100, 200))  # 100 tokens: 12 full blocks of 8 and a partial one
POSITIONS = (20, 27, 32, 45, 57, 64, 77, 100)  # 8 checkpoints of one conversation; 32 and 64 aligned


def _blocks(p: int) -> int:
    return -(-p // KV.block_size)


def test_eight_checkpoints_of_one_conversation_hold_the_kv_prefix_once() -> None:
    cache = make_hybrid_cache()
    sources = []
    for p in POSITIONS:
        sources.append(TokenKV(CONVERSATION[:p]))
        toks = CONVERSATION[:p]
        assert cache.capture("ns", "s", toks, make_state("ns", toks), reason="x", kv=sources[-1])
    full = 100 // KV.block_size  # every full block of the longest, once
    partial = sum(p % KV.block_size != 0 for p in POSITIONS)  # one per unaligned checkpoint
    copies = sum(_blocks(p) for p in POSITIONS)  # what a full KV copy per checkpoint would hold
    stats = cache.stats()
    for tier in ("hot", "cold"):
        kv_bytes = stats.tiers[tier].kv_bytes
        assert kv_bytes == (full + partial) * KV_BLOCK < copies * KV_BLOCK / 2
        assert stats.tiers[tier].bytes_used == kv_bytes + len(POSITIONS) * STATE_BLOCK
    # each capture read only the blocks its tiers lacked: its new full blocks and its partial one
    read = sum(end - start for src in sources for start, end in src.reads)
    assert read <= len(CONVERSATION) + len(POSITIONS) * KV.block_size
    for p in POSITIONS:
        assert assert_restores(cache, CONVERSATION[:p]) == "hot"


@pytest.mark.parametrize("p", (1, 7, 8, 9, 16, 17))
def test_a_restore_at_any_position_brings_back_state_and_kv(p: int) -> None:
    cache = make_hybrid_cache()
    assert capture(cache, CONVERSATION[:p])
    assert assert_restores(cache, CONVERSATION[:p]) == "hot"
    lease = cache.lookup("ns", "r", CONVERSATION[: p + 5])  # a longer request resumes at p
    assert lease is not None and lease.position == p
    sink = ListSink()
    cache.fetch(lease, kv=sink)
    cache.release(lease)
    assert sink.kv.shape[2] == p


def test_the_hot_window_demotes_state_and_kv_together() -> None:
    cache = make_hybrid_cache(hot_window=2)
    for p in POSITIONS[:4]:
        assert capture(cache, CONVERSATION[:p])
    stats = cache.stats()
    # hot: the newest two (27 is gone: 32 and 45 hold blocks 0..4 and 45's partial); cold: all four
    assert stats.tiers["hot"].checkpoints == 2 and stats.tiers["hot"].kv_bytes == (5 + 1) * KV_BLOCK
    assert stats.tiers["cold"].kv_bytes == (5 + 3) * KV_BLOCK
    assert assert_restores(cache, CONVERSATION[:20]) == "cold"
    assert assert_restores(cache, CONVERSATION[:45]) == "hot"


def test_budgets_count_kv_and_state_together_and_eviction_keeps_what_kept_checkpoints_need() -> None:
    budget = 3 * STATE_BLOCK + 10 * KV_BLOCK
    cache = make_hybrid_cache(hot_bytes=0, cold_bytes=budget)
    other = tuple(range(500, 540))  # another conversation: 5 blocks
    assert capture(cache, other, session="b")
    for p in (20, 45, 64):
        assert capture(cache, CONVERSATION[:p])
        cold = cache.stats().tiers["cold"]
        assert cold.bytes_used <= cold.bytes_capacity <= budget  # capacity: whole state blocks
    kept = {c["position"] for c in cache.session_info("ns", "s")["checkpoints"]}  # type: ignore[index]
    assert 64 in kept and cache.session_info("ns", "b") is None  # the least valuable went first
    for p in kept:
        assert assert_restores(cache, CONVERSATION[:p]) == "cold"


def test_a_checkpoint_whose_kv_cannot_fit_evicts_nothing() -> None:
    cache = make_hybrid_cache(hot_bytes=0, cold_bytes=2 * STATE_BLOCK + 4 * KV_BLOCK)
    assert capture(cache, CONVERSATION[:10])  # 2 blocks
    assert not capture(cache, tuple(range(300, 340)))  # 5 blocks: more than the whole tier
    assert assert_restores(cache, CONVERSATION[:10]) == "cold"


def test_deleting_the_session_frees_every_kv_block_and_a_lease_keeps_them_until_released() -> None:
    cache = make_hybrid_cache()
    for p in POSITIONS[:3]:
        assert capture(cache, CONVERSATION[:p])
    lease = cache.lookup("ns", "s", CONVERSATION[:27])
    assert lease is not None
    cache.delete_session("ns", "s")
    assert cache.stats().tiers["cold"].kv_bytes == _blocks(27) * KV_BLOCK  # the leased one's blocks
    sink = ListSink()
    cache.fetch(lease, kv=sink)
    assert torch.equal(sink.kv, TokenKV(CONVERSATION[:27]).kv)
    cache.release(lease)
    stats = cache.stats()
    assert all(stats.tiers[t].bytes_used == 0 for t in ("hot", "cold"))
    assert not cache._book.tiers.extra.index.roots  # type: ignore[attr-defined]


def test_trees_do_not_share_kv_blocks() -> None:
    cache = make_hybrid_cache()
    assert capture(cache, CONVERSATION[:16], tree="a") and capture(cache, CONVERSATION[:16], tree="b")
    assert cache.stats().tiers["cold"].kv_bytes == 4 * KV_BLOCK
    assert_restores(cache, CONVERSATION[:16], tree="a")


def test_hybrid_calls_without_kv_are_refused() -> None:
    cache = make_hybrid_cache()
    toks = CONVERSATION[:9]
    with pytest.raises(ValueError, match="KVSource"):
        cache.capture("ns", "s", toks, make_state("ns", toks), reason="x")
    with pytest.raises(ValueError, match="holds 8 tokens"):
        cache.capture("ns", "s", toks, make_state("ns", toks), reason="x", kv=TokenKV(toks[:8]))
    assert capture(cache, toks)
    lease = cache.lookup("ns", "s", toks)
    assert lease is not None
    with pytest.raises(ValueError, match="KVSink"):
        cache.fetch(lease)
    cache.release(lease)


def test_a_failed_kv_read_stores_nothing() -> None:
    cache = make_hybrid_cache()
    toks = CONVERSATION[:20]
    source = TokenKV(toks)
    source.fail = True
    with pytest.raises(RuntimeError, match="KV read failed"):
        cache.capture("ns", "s", toks, make_state("ns", toks), reason="x", kv=source)
    stats = cache.stats()
    assert all(stats.tiers[t].bytes_used == 0 for t in ("hot", "cold"))
    assert capture(cache, toks)
    assert_restores(cache, toks)


def _capture_in_thread(
    cache: StateCache, toks: tuple[int, ...], source: TokenKV, name: str | None = None
) -> tuple[threading.Thread, list]:
    result: list = []

    def run() -> None:
        try:
            result.append(cache.capture("ns", "s", toks, make_state("ns", toks), reason="x", kv=source))
        except RuntimeError as exc:
            result.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread, result


@pytest.mark.parametrize("first_fails", (False, True))
def test_a_capture_sharing_a_block_another_capture_writes_waits_for_that_write(first_fails: bool) -> None:
    """A (at 20) takes blocks 0 and 1 and stalls writing them; B (at 27) shares them: B is published only
    once A's write is done, and not at all if it failed."""
    cache = make_hybrid_cache()
    slow = TokenKV(CONVERSATION[:20])
    slow.gate, slow.fail = threading.Event(), first_fails
    a, a_result = _capture_in_thread(cache, CONVERSATION[:20], slow)
    assert slow.entered.wait(10)
    b, b_result = _capture_in_thread(cache, CONVERSATION[:27], TokenKV(CONVERSATION[:27]))
    b.join(0.2)
    assert b.is_alive() and cache.lookup("ns", "r", CONVERSATION[:27]) is None  # B waits, unpublished
    slow.gate.set()
    a.join(10)
    b.join(10)
    assert b_result == [not first_fails]
    if first_fails:
        assert isinstance(a_result[0], RuntimeError)
        assert all(cache.stats().tiers[t].bytes_used == 0 for t in ("hot", "cold"))
    else:
        assert a_result == [True]
        assert_restores(cache, CONVERSATION[:27])
        assert_restores(cache, CONVERSATION[:20])


@pytest.mark.parametrize(
    ("hot", "codecs", "bound"),
    [(False, {"cold_dtype": "fp16"}, 2.0**-11), (True, {"hot_kv_dtype": "fp8"}, 2.0**-4)],
    ids=("cold-fp16", "hot-fp8"),
)
def test_lossy_kv_codecs_scale_per_token_and_head(hot: bool, codecs: dict[str, str], bound: float) -> None:
    """Keys far beyond FP16's range restore finite from the cold tier; each (token, head) vector within the
    codec's bound of its largest value."""
    cache = make_hybrid_cache(hot_bytes=(1 << 20) if hot else 0, **codecs)
    toks = CONVERSATION[:20]
    source = TokenKV(toks)
    source.kv = source.kv * 1e6
    assert cache.capture("ns", "s", toks, make_state("ns", toks), reason="x", kv=source)
    lease = cache.lookup("ns", "s", toks)
    assert lease is not None and lease.tier == ("hot" if hot else "cold")
    sink = ListSink()
    cache.fetch(lease, kv=sink)
    cache.release(lease)
    err = (sink.kv - source.kv).abs().amax(-1)  # (L, 2, n, kv)
    assert torch.isfinite(sink.kv).all()
    assert (err <= bound * source.kv.abs().amax(-1)).all()


def test_a_hybrids_arenas_take_memory_as_they_fill() -> None:
    """States and KV blocks share each budget: neither arena reserves the whole of it up front."""
    cache = make_hybrid_cache(hot_bytes=1 << 30, cold_bytes=1 << 30)
    kv = cache._book.tiers.extra
    arenas = [cache._book.arenas["hot"], cache._book.arenas["cold"], *kv.arenas.values()]  # type: ignore[attr-defined]
    assert all(a is not None and a._allocated == 0 for a in arenas)
    assert capture(cache, CONVERSATION)
    for arena in arenas:
        assert arena is not None and 0 < arena._allocated * arena.block_bytes <= 64 << 20


def test_a_capture_failing_before_its_kv_write_never_leaves_a_sharer_waiting() -> None:
    """A takes blocks 0 and 1, then fails before writing them; B, sharing them, waits, then gives up."""
    cache = make_hybrid_cache()
    entered, gate, original = threading.Event(), threading.Event(), cache._run_io

    def run_io(work: object) -> None:
        if threading.current_thread().name == "A":  # after A's reservation, before its writes
            entered.set()
            gate.wait(10)
            raise RuntimeError("queueing file I/O failed")
        original(work)  # type: ignore[arg-type]

    cache._run_io = run_io  # type: ignore[method-assign]
    a, a_result = _capture_in_thread(cache, CONVERSATION[:20], TokenKV(CONVERSATION[:20]), name="A")
    assert entered.wait(10)
    b, b_result = _capture_in_thread(cache, CONVERSATION[:27], TokenKV(CONVERSATION[:27]))
    b.join(0.2)
    assert b.is_alive()  # waiting for A's blocks
    gate.set()
    a.join(10)
    b.join(10)
    assert isinstance(a_result[0], RuntimeError) and b_result == [False]
    assert all(cache.stats().tiers[t].bytes_used == 0 for t in ("hot", "cold"))
    assert capture(cache, CONVERSATION[:27])
    assert_restores(cache, CONVERSATION[:27])


def test_a_hybrids_cold_states_and_kv_blocks_grow_from_one_buffer_allocated_up_front() -> None:
    """No host allocation on a capture's path (pinning stalls the driver): both cold arenas' chunks are cut
    from the buffer the cache allocated at start-up."""
    cache = make_hybrid_cache(hot_bytes=1 << 30, cold_bytes=1 << 30, hot_window=1)
    source = cache._storage.cold_source
    assert source is not None and source.buffer.numel() >= 1 << 30 and source.used == 0
    for end in POSITIONS:  # a window of one: every older checkpoint is demoted to the cold tier
        assert capture(cache, CONVERSATION[:end])
    cold = [cache._book.arenas["cold"], cache._book.tiers.extra.arenas["cold"]]  # type: ignore[attr-defined]
    base, end = source.buffer.data_ptr(), source.buffer.data_ptr() + source.buffer.numel()
    for arena in cold:
        assert arena is not None and arena._chunks
        assert all(base <= c.data_ptr() and c.data_ptr() + c.numel() <= end for c in arena._chunks)
    assert source.used >= sum(c.numel() for a in cold for c in a._chunks)
