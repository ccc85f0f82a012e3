"""One prefix tree per namespace (or named tree), shared by its sessions: a prefix is stored once and serves
every session; trees are isolated; sessions reference checkpoints and deleting one keeps what others use;
GDSF keeps a popular prefix over one-offs; the hot window leaves shared copies alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cache import CacheObserver, Lease, StateCache
from cache.base import LookupResult, LookupScope, MissCause
from tests.unit.cache.test_cache_manager import _make_cache, _make_state

SPEC = {"conv": ((2, 24, 3), torch.float32), "ssm": ((2, 4, 8, 16), torch.float32)}
FP8_BLOCK, FP16_BLOCK = 1792, 3072
PROMPT = list(range(1000, 1100))  # a 100-token system prompt


def _hit(cache: StateCache, ns: str, sess: str | None, tokens: Sequence[int], **kw: Any) -> Lease | None:
    """Look up, fetch and release; the lease (None on a miss)."""
    lease = cache.lookup(ns, sess, tokens, **kw)
    if lease is not None:
        cache.fetch(lease)
        cache.release(lease)
    return lease


def _tiers_by_position(cache: StateCache, ns: str, sess: str | None) -> dict[int, list[str]]:
    info = cache.session_info(ns, sess)
    assert info is not None
    return {c["position"]: c["tiers"] for c in info["checkpoints"]}


def test_a_second_session_restores_the_first_sessions_system_prompt() -> None:
    seen: list[tuple[LookupResult, MissCause, LookupScope]] = []

    class Obs(CacheObserver):
        def on_lookup(self, result: LookupResult, cause: MissCause, scope: LookupScope) -> None:
            seen.append((result, cause, scope))

    cache = _make_cache(Obs())
    assert cache.capture("ns", "alice", PROMPT, _make_state(1), reason="boundary")
    assert cache.capture("ns", "alice", [*PROMPT, 1, 2], _make_state(2), reason="prompt_end")
    lease = _hit(cache, "ns", "bob", [*PROMPT, 7, 8])
    assert lease is not None and (lease.position, lease.scope, lease.session) == (100, "shared", "bob")
    assert not cache.capture("ns", "bob", PROMPT, _make_state(1), reason="boundary")  # stored once
    assert cache.capture("ns", "bob", [*PROMPT, 7, 8], _make_state(3), reason="prompt_end")
    stats = cache.stats()
    assert stats.tiers["cold"].checkpoints == 3 and stats.tiers["cold"].bytes_used == 3 * FP16_BLOCK
    assert stats.captures == 3 and stats.captures_shared == 1 and stats.trees == 1 and stats.sessions == 2
    assert seen == [("hot_hit", "", "shared")]
    assert stats.lookups[("hot_hit", "", "shared")] == 1
    lease = _hit(cache, "ns", "bob", PROMPT)
    assert lease is not None and lease.scope == "session"  # bob references it now
    for sess in ("alice", "bob"):
        info = cache.session_info("ns", sess)
        assert info is not None
        shared = {c["position"]: c["shared"] for c in info["checkpoints"]}
        assert shared == {100: True, 102: False}


def test_trees_are_isolated_by_namespace_name_and_salt() -> None:
    cache = _make_cache()
    assert cache.capture("key-a", "s", PROMPT, _make_state(1), reason="x")
    assert cache.lookup("key-b", "s", PROMPT) is None  # another key's tree, by default
    assert cache.lookup("key-a", "s", PROMPT, tree="common") is None
    assert cache.capture("key-a", "s", PROMPT, _make_state(2), reason="x", tree="common")
    lease = _hit(cache, "key-b", "t", [*PROMPT, 5], tree="common")  # the same tree name shares
    assert lease is not None and (lease.position, lease.scope) == (100, "shared")
    assert cache.lookup("key-b", "t", [*PROMPT, 5]) is None
    assert cache.capture("key-a", "s", [*PROMPT, 9], _make_state(3), reason="x", tree="key-a|salt-1")
    assert cache.lookup("key-a", "s", [*PROMPT, 9], tree="key-a|salt-2") is None  # another salt
    lease = _hit(cache, "key-a", None, [*PROMPT, 9], tree="key-a|salt-1")
    assert lease is not None and lease.position == 101
    lease = _hit(cache, "key-a", None, [*PROMPT, 9])  # the unsalted tree never sees the salted one
    assert lease is not None and lease.position == 100
    assert cache.stats().trees == 3


def test_delete_session_keeps_what_other_sessions_reference() -> None:
    cache = _make_cache()
    cache.capture("ns", "alice", PROMPT, _make_state(1), reason="x")
    cache.capture("ns", "alice", [*PROMPT, 1], _make_state(2), reason="x")
    assert _hit(cache, "ns", "bob", [*PROMPT, 2]) is not None  # bob references the prompt
    cache.capture("ns", "bob", [*PROMPT, 2], _make_state(3), reason="x")
    assert cache.delete_session("ns", "alice") == FP8_BLOCK + FP16_BLOCK  # alice's own one only
    assert cache.session_info("ns", "alice") is None
    lease = _hit(cache, "ns", "dave", [*PROMPT, 1, 5])
    assert lease is not None and lease.position == 100
    cache.delete_session("ns", "dave")
    info = cache.session_info("ns", "bob")
    assert info is not None and [c["position"] for c in info["checkpoints"]] == [100, 101]


def test_delete_of_the_last_referencing_session_frees_a_shared_checkpoint() -> None:
    cache = _make_cache()
    cache.capture("ns", "alice", PROMPT, _make_state(1), reason="x")
    lease = cache.lookup("ns", "bob", [*PROMPT, 3])
    assert lease is not None
    assert cache.delete_session("ns", "alice") == 0  # bob still references it
    assert cache.delete_session("ns", "bob") == 0  # nobody does, but bob's lease pins it
    assert cache.lookup("ns", "carol", PROMPT) is None
    cache.fetch(lease)
    cache.release(lease)
    assert all(ts.bytes_used == 0 for ts in cache.stats().tiers.values())
    assert cache.stats().sessions == 0 and cache.stats().trees == 0


def test_gdsf_keeps_a_popular_prompt_over_deeper_one_offs() -> None:
    """50 sessions restore one system prompt between 50 one-off prompts, each 3x deeper than it, in a tier of
    4 checkpoints. Recency and recompute per byte alone would evict the prompt first (a one-off captured
    right after the prompt's last hit saves 3x as much per byte); counting the hits keeps it."""
    cache = _make_cache(hot_bytes=0, cold_bytes=4 * FP16_BLOCK)
    assert cache.capture("ns", "s0", PROMPT, _make_state(0), reason="boundary")
    for i in range(1, 51):
        lease = _hit(cache, "ns", f"s{i}", [*PROMPT, i])
        assert lease is not None and lease.position == 100, i
        one_off = [i] * 300
        assert cache.capture("ns", f"one-off-{i}", one_off, _make_state(i), reason="prompt_end")
    stats = cache.stats()
    assert stats.tiers["cold"].evictions == 47 and stats.tiers["cold"].checkpoints == 4
    assert cache.session_info("ns", "one-off-1") is None  # the one-offs went first
    info = cache.session_info("ns", "s50")
    assert info is not None and info["checkpoints"][0]["shared"]
    assert _hit(cache, "ns", "late", [*PROMPT, 0]) is not None


def test_an_old_popular_prompt_still_leaves() -> None:
    """300 hits, then nobody uses the prompt: its frequency halves at every turnover of the tier and the clock
    passes it within a few turnovers (undecayed, 300 hits would hold it for about 100 evictions here)."""
    cache = _make_cache(hot_bytes=0, cold_bytes=4 * FP16_BLOCK)
    cache.capture("ns", "s0", PROMPT, _make_state(0), reason="boundary")
    for i in range(1, 301):
        assert _hit(cache, "ns", f"s{i % 50}", [*PROMPT, i]) is not None
    for i in range(40):
        cache.capture("ns", f"one-off-{i}", [i] * 300, _make_state(i), reason="prompt_end")
    assert cache.lookup("ns", "late", PROMPT) is None
    assert cache.stats().lookups[("miss", "evicted", "")] == 1


def test_the_hot_window_never_drops_a_shared_hot_copy() -> None:
    cache = _make_cache(hot_window=1)
    cache.capture("ns", "alice", PROMPT, _make_state(1), reason="x")
    assert _hit(cache, "ns", "bob", [*PROMPT, 5]) is not None
    cache.capture("ns", "alice", [*PROMPT, 1], _make_state(2), reason="x")
    cache.capture("ns", "alice", [*PROMPT, 1, 2], _make_state(3), reason="x")
    cache.capture("ns", "bob", [*PROMPT, 5], _make_state(4), reason="x")
    tiers = _tiers_by_position(cache, "ns", "alice")
    assert tiers == {100: ["hot", "cold"], 101: ["cold"], 102: ["hot", "cold"]}
    assert _tiers_by_position(cache, "ns", "bob") == {100: ["hot", "cold"], 101: ["hot", "cold"]}
    cache.delete_session("ns", "bob")  # alice alone again: the prompt counts in her window from now on
    cache.capture("ns", "alice", [*PROMPT, 1, 2, 3], _make_state(5), reason="x")
    assert "hot" not in _tiers_by_position(cache, "ns", "alice")[100]
