"""scripts/gpu_run.sh: step selection, per-step markers and output files (its GPU steps skip cleanly on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_tests_step_runs_alone_and_records_its_outcome(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_run.sh"), str(tmp_path), "tests"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "log.txt").read_text()
    assert "== tests: rc 0 at" in log
    assert "== d:" not in log and "== bc:" not in log  # only the named step ran
    tests = (tmp_path / "tests.txt").read_text()
    assert "passed" in tests and "skipped" in tests  # codec tests pass on CPU, GPU tests skip
    assert (tmp_path / "bench.md").read_text().startswith("## run ")
