"""bench/burst_cpu.py on a tiny burst: a row per round, every phase observed, the headers before the TTFT,
the server's CPU time per request and per streamed token."""

from __future__ import annotations

import pytest

from bench._common import CpuTimes
from bench.burst_cpu import rounds, table


@pytest.mark.slow
def test_a_small_burst_gives_a_row_per_round_with_every_phase() -> None:
    rows = rounds(prompts=4, tokens=24, count=2, procs=2)
    assert [r[0] for r in rows] == ["1", "2"]
    for row in rows:
        ttft, headers, _rate, _itl, *cells = row[1:]
        cpu, phases = [float(c) for c in cells[:4]], [float(c) for c in cells[4:]]
        assert 0 < float(headers) < float(ttft) and len(phases) == 6
        assert phases[4] > 0 and sum(phases) <= float(ttft) * 1.5  # prefill ran; the phases fit in the TTFT
        assert cpu[1] > 0 and cpu[1] <= cpu[0] + 10  # the loop's ns-precise share of the process's ticks
    assert table(rows).splitlines()[0].startswith("| round | client TTFT p50 ms | client headers p50 ms |")


@pytest.mark.slow
def test_a_streamed_burst_counts_its_tokens_in_the_cpu_per_token() -> None:
    (row,) = rounds(prompts=2, tokens=24, count=1, procs=1, new_tokens=8, flags=["--engine-process"])
    per_request, per_token = float(row[6]), float(row[8])  # the loop's ms per request, µs per token
    assert float(row[4]) > 0  # an ITL: more than one token per stream
    assert per_token == pytest.approx(per_request * 1e3 / 8, rel=0.05, abs=2)


def test_cpu_times_of_this_process_grow_with_its_work() -> None:
    import os

    before = CpuTimes.of(os.getpid())
    sum(i * i for i in range(2_000_000))
    spent = CpuTimes.of(os.getpid()) - before
    assert spent.loop > 0 and spent.process >= 0
