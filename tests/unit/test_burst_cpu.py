"""bench/burst_cpu.py on a tiny burst: a row per round, every phase observed, the headers before the TTFT."""

from __future__ import annotations

import pytest

from bench.burst_cpu import rounds, table


@pytest.mark.slow
def test_a_small_burst_gives_a_row_per_round_with_every_phase() -> None:
    rows = rounds(prompts=4, tokens=24, count=2, procs=2)
    assert [r[0] for r in rows] == ["1", "2"]
    for row in rows:
        ttft, headers, *phases = (float(c) for c in row[1:])
        assert 0 < headers < ttft and len(phases) == 6
        assert phases[4] > 0 and sum(phases) <= ttft * 1.5  # prefill ran; the phases fit in the TTFT
    assert (
        table(rows).splitlines()[0].startswith("| round | client TTFT p50 ms | client headers p50 ms | parse")
    )
