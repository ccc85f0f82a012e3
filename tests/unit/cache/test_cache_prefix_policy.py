"""Radix tree over token content, Greedy-Dual-Size-Frequency eviction order and capture positions (plain
Python)."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from cache.policy import END_SLACK, GreedyDualSizeFrequency, capture_positions
from cache.prefix import Node, PrefixTree


def _deepest(tree: PrefixTree, tokens: tuple[int, ...]) -> int | None:
    best = None
    for node in tree.path(tokens):
        if node.value is not None:
            best = node.value
    return best


def test_branches_share_trunk_and_match_exactly() -> None:
    tree = PrefixTree()
    trunk = tuple(range(10))
    a, b = (*trunk, 1, 2, 3), (*trunk, 1, 9, 9)
    for i, toks in enumerate((trunk, a, b)):
        tree.insert(toks).value = i
    assert _deepest(tree, (*a, 5)) == 1
    assert _deepest(tree, (*b, 5)) == 2
    assert _deepest(tree, (*trunk, 1, 7)) == 0
    assert _deepest(tree, trunk[:9]) is None
    assert tree.insert(a).tokens() == a


def test_prune_removes_empty_nodes_and_merges() -> None:
    tree = PrefixTree()
    n1 = tree.insert((1, 2, 3))
    n2 = tree.insert((1, 2, 3, 4, 5))
    n3 = tree.insert((1, 2, 9))
    n1.value, n2.value, n3.value = 1, 2, 3
    n3.value = None
    tree.prune(n3)
    n1.value = None
    tree.prune(n1)
    assert _deepest(tree, (1, 2, 3, 4, 5)) == 2
    assert list(tree.root.children.values()) == [n2]
    assert n2.label == (1, 2, 3, 4, 5) and n2.tokens() == (1, 2, 3, 4, 5)
    n2.value = None
    tree.prune(n2)
    assert tree.empty()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=20), st.data())
def test_tree_matches_brute_force(seqs: list[list[int]], data: st.DataObject) -> None:
    tree = PrefixTree()
    stored: dict[tuple[int, ...], int] = {}
    for i, s in enumerate(seqs):
        toks = tuple(s)
        tree.insert(toks).value = i
        stored[toks] = i
    for toks in list(stored)[: len(stored) // 2]:  # remove some
        node = tree.insert(toks)
        node.value = None
        tree.prune(node)
        del stored[toks]
    query = tuple(data.draw(st.lists(st.integers(0, 3), max_size=14)))
    expect = None
    for n in range(len(query) + 1):
        expect = stored.get(query[:n], expect)
    assert _deepest(tree, query) == expect


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=2, max_size=20))
def test_an_insert_from_a_node_on_the_path_is_the_insert_from_the_root(seqs: list[list[int]]) -> None:
    """What a capture does (`CheckpointIndex.near`, then `node` from the deepest node it walked to)."""
    tree, twin = PrefixTree(), PrefixTree()
    for s in seqs:
        toks = tuple(s)
        on_path = list(tree.path(toks))[-1]
        node = tree.insert(toks, on_path)
        assert node.tokens() == toks and node.depth == len(toks)
        assert tree.insert(toks) is node  # the root's walk finds the same node
        twin.insert(toks)
    assert _shape(tree.root) == _shape(twin.root)


def _shape(node: Node) -> dict[tuple[int, ...], object]:
    return {child.label: _shape(child) for child in node.children.values()}


def test_greedy_dual_evicts_lowest_cost_per_byte_first() -> None:
    gd = GreedyDualSizeFrequency()
    for cid, cost in ((1, 100.0), (2, 10.0), (3, 50.0)):
        gd.touch(cid, cost, size=10)
    order = []
    while (v := gd.victim(lambda c: True)) is not None:
        order.append(v)
        gd.evicted(v)
    assert order == [2, 3, 1]


def test_greedy_dual_recency_ages_out_stale_entries() -> None:
    gd = GreedyDualSizeFrequency()
    gd.touch(1, 100.0, size=10)  # deep but never used again
    for cid in range(2, 40):  # a stream of shallower, fresh ones, each evicting the previous
        gd.touch(cid, 20.0, size=10)
        v = gd.victim(lambda c: True)
        assert v is not None
        gd.evicted(v)
    assert 1 not in gd  # the clock caught up with it


def test_greedy_dual_skips_unevictable_and_refresh_reorders() -> None:
    gd = GreedyDualSizeFrequency()
    for cid in (1, 2, 3):
        gd.touch(cid, float(cid), size=1)
    assert gd.victim(lambda c: c != 1) == 2
    gd.touch(2, 10.0, size=1)  # a hit refreshes
    assert gd.victim(lambda c: c != 1) == 3
    assert gd.victim(lambda c: False) is None
    assert len(gd) == 3


def test_gdsf_hits_outrank_recompute_per_byte() -> None:
    gd = GreedyDualSizeFrequency()
    gd.touch(1, 10.0, size=1)
    for _ in range(4):
        gd.hit(1, 10.0, size=1)  # freq 5: H = 50
    gd.touch(2, 30.0, size=1)  # H = 30
    assert gd.freq(1) == 5.0 and gd.victim(lambda c: True) == 2


def test_gdsf_halves_frequencies_after_each_turnover() -> None:
    gd = GreedyDualSizeFrequency()
    gd.touch(1, 1.0, size=1)
    for _ in range(15):
        gd.hit(1, 1.0, size=1)
    for cid in (2, 3):
        gd.touch(cid, 1.0, size=1)
    freqs = []
    for cid in range(4, 10):  # one eviction per new id: a turnover every 3 evictions (3 held)
        v = gd.victim(lambda c: c != 1)
        assert v is not None
        gd.evicted(v)
        gd.touch(cid, 1.0, size=1)
        freqs.append(gd.freq(1))
    assert freqs == [16.0, 16.0, 8.0, 8.0, 8.0, 4.0]


def test_gdsf_a_copy_entering_a_tier_keeps_its_frequency() -> None:
    gd = GreedyDualSizeFrequency()
    gd.touch(7, 10.0, size=10, freq=6.0)
    gd.touch(7, 10.0, size=10)  # a refresh keeps it
    assert gd.freq(7) == 6.0 and gd.priority(7) == 6.0
    gd.hit(7, 10.0, size=10)
    assert gd.freq(7) == 7.0


def test_capture_positions_boundaries_interval_and_end() -> None:
    assert capture_positions(0, 100, [5, 40, 100, 200], interval=32, min_gap=0) == [5, 32, 40, 64, 96, 100]
    # intervals count from the resumed position (chunk-aligned for the prefill that starts there)
    assert capture_positions(50, 100, [40, 60], interval=32, min_gap=0) == [60, 82, 100]
    assert capture_positions(10, 10, [10], interval=4, min_gap=0) == []


def test_capture_positions_thinned_by_min_gap() -> None:
    got = capture_positions(0, 100, [5, 40, 95], interval=32, min_gap=10)
    assert got[-1] == 100 and 95 not in got
    assert all(b - a >= 10 for a, b in itertools.pairwise(got))
    assert capture_positions(90, 100, [95], interval=0, min_gap=10) == [100]


def test_capture_positions_capped_per_request() -> None:
    """1,000 one-token messages: at most `limit` captures, the end and the last boundary always among them,
    denser towards the end."""
    bounds = list(range(1, 1001))
    got = capture_positions(0, 1003 + END_SLACK, bounds, interval=16, min_gap=0, limit=8)
    assert len(got) == 8 and got[-1] == 1003 + END_SLACK and 1000 in got
    gaps = [b - a for a, b in itertools.pairwise(got)]
    assert gaps[0] >= gaps[-2], got  # older part sparser than the recent one
    assert capture_positions(0, 100, [5, 40], interval=0, min_gap=0, limit=8) == [5, 40, 100]  # under the cap


def test_a_chat_prompt_end_right_after_its_last_message_is_not_captured() -> None:
    """The generation prompt after the last message: the boundary serves every later request the end would."""
    assert capture_positions(0, 102, [40, 100], interval=0, min_gap=0) == [40, 100]
    assert capture_positions(0, 102, [40, 102], interval=0, min_gap=0) == [40, 102]
    assert capture_positions(0, 120, [40, 100], interval=0, min_gap=0) == [40, 100, 120]
    assert capture_positions(0, 102, [], interval=0, min_gap=0) == [102]  # completions: no boundaries


def test_a_boundary_right_after_the_resumed_checkpoint_is_not_captured() -> None:
    """A follow-up resumes after the answer: the answer's end-of-turn boundary a token or two later is served
    by the resumed checkpoint, so the prefill is not split there."""
    assert capture_positions(1000, 1075, [1002, 1070], interval=0, min_gap=0) == [1070]
    assert capture_positions(1000, 1075, [1000 + END_SLACK, 1070], interval=0, min_gap=0) == [1008, 1070]
    assert capture_positions(1000, 1004, [1002], interval=0, min_gap=0) == [1002]  # one capture stays
    assert capture_positions(0, 75, [2, 70], interval=0, min_gap=0) == [2, 70]  # nothing resumed: kept


def test_capture_positions_random_invariants() -> None:
    rng = random.Random(0)
    for _ in range(200):
        start = rng.randrange(0, 500)
        end = start + rng.randrange(1, 500)
        bounds = [rng.randrange(0, 1000) for _ in range(rng.randrange(0, 8))]
        k, gap = rng.choice([0, 16, 64]), rng.choice([0, 8, 32])
        limit = rng.choice([0, 1, 2, 5])
        got = capture_positions(start, end, bounds, interval=k, min_gap=gap, limit=limit)
        assert all(start < p <= end for p in got) and got == sorted(set(got))
        near = [
            b for b in bounds if end - END_SLACK <= b < end and start < b and (start == 0 or b - start >= gap)
        ]
        assert got[-1] == end or (got[-1] in near and end not in bounds)
        assert limit == 0 or len(got) <= limit
        assert start == 0 or all(p - start >= END_SLACK for p in got[:-1])


def test_greedy_dual_heap_stays_bounded_when_one_id_is_refreshed_many_times() -> None:
    """A hot checkpoint hit over and over (same priority each time): stale heap entries must be dropped,
    or every touch compacts an ever-growing heap (quadratic time, unbounded memory)."""
    gd = GreedyDualSizeFrequency()
    gd.touch(1, cost=10, size=1)
    gd.touch(2, cost=5, size=1)
    for _ in range(10_000):
        gd.touch(1, cost=10, size=1)
    assert len(gd._heap) <= 4 * len(gd) + 65  # the compaction bound, on the private heap itself
    assert gd.victim(lambda cid: True) == 2
    gd.evicted(2)
    assert gd.victim(lambda cid: True) == 1
