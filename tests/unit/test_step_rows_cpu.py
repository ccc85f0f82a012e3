"""bench/step_rows_cpu.py: the per-row and per-step costs it times come from real steps of real rows."""

from __future__ import annotations

from pathlib import Path

from bench.step_rows_cpu import main, measure


def test_every_cost_is_measured_and_the_table_is_written(tmp_path: Path) -> None:
    us = measure(rows=4, steps=20)
    assert set(us) == {"append", "event", "pickle", "unpickle"}
    assert all(0 < v < 1e5 for v in us.values())
    out = tmp_path / "table.md"
    main(["--rows", "4", "--steps", "20", "--out", str(out)])
    row = out.read_text().strip().splitlines()[-1]
    assert len([c for c in row.split("|") if c.strip()]) == 4 and "(4 rows" in out.read_text()
