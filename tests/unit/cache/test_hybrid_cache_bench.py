"""bench/hybrid_cache_cpu.py times a first turn's captures and hot and cold restores (each checked against
its source) and, with --ops, counts their torch ops: a few per capture or restore, not a few per block."""

from __future__ import annotations

from typing import Any

import pytest

from bench import hybrid_cache_cpu
from cache import kv_copies


def _rows(out: str) -> list[dict[str, Any]]:
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (float(c) for c in line.strip("|").split("|")), strict=True)) for line in lines[1:]
    ]


def test_bench_prints_a_row_per_position_with_op_counts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv_copies, "HOST_PIECE_BYTES", 1 << 30)  # one piece per copy, as on a GPU
    hybrid_cache_cpu.main(["--positions", "168,328", "--interval", "64", "--reps", "1", "--ops"])
    rows = _rows(capsys.readouterr().out)
    assert [r["position"] for r in rows] == [168, 328] and [r["turn_captures"] for r in rows] == [3, 6]
    assert all(r[k] > 0 for r in rows for k in ("turn_ms", "hot_restore_ms", "cold_restore_ms"))
    # 10 or 20 full blocks and a partial one: batched, a restore's or a capture's ops do not grow with them
    assert rows[1]["hot_restore_ops"] == rows[0]["hot_restore_ops"]
    assert rows[1]["cold_restore_ops"] == rows[0]["cold_restore_ops"]
    assert rows[1]["cold_capture_ops"] == rows[0]["cold_capture_ops"]
