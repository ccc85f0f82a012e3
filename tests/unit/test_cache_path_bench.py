"""`bench/cache_path_cpu.py` on small sizes: its session's path holds the checkpoints it stored, and the
lookups it times hit at the conversation's end (the bench asserts it) with either kind of ids."""

from __future__ import annotations

from bench.cache_path_cpu import measure, table


def test_the_bench_times_hits_at_the_conversations_end() -> None:
    rows = [measure(length, turns=10, repeats=2) for length in (400, 1_200)]
    assert [r.tokens for r in rows] == [400, 1_200] and all(r.checkpoints == 20 for r in rows)
    assert all(min(r.lookup_shared_ms, r.lookup_own_ms, r.capture_ms) > 0 for r in rows)
    assert "| 1,200 | 20 |" in table(rows, 10, 2)
