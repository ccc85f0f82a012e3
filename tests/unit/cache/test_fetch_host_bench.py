"""bench/fetch_host.py runs both fetch paths on CPU and prints one row comparing them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_fetch_host_bench_prints_both_paths_and_their_ratio() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fetch_host.py"), "--iters", "20", "--rounds", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    row = proc.stdout.strip().splitlines()[-1].split("|")
    assert row[1].strip() == "cpu"
    old, new, ratio = float(row[2]), float(row[3]), float(row[4].strip().rstrip("x"))
    assert old > 0 and new > 0 and abs(ratio - old / new) < 0.02
