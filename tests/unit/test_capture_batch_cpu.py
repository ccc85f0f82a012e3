"""bench/capture_batch_cpu.py: both ways of capturing are timed on real captures, and the table is written."""

from __future__ import annotations

from pathlib import Path

from bench.capture_batch_cpu import main, measure


def test_both_ways_are_measured_and_the_table_is_written(tmp_path: Path) -> None:
    us = measure(captures=3, reps=1)
    assert set(us) == {"one", "batch"} and all(0 < v < 1e6 for v in us.values())
    out = tmp_path / "table.md"
    main(["--captures", "3", "--reps", "1", "--out", str(out)])
    text = out.read_text()
    assert "3 captures" in text
    assert len([c for c in text.strip().splitlines()[-1].split("|") if c.strip()]) == 2
