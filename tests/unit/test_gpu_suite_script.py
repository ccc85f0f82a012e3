"""scripts/gpu_suite.sh: a run that outlives its caller (its own process session), polled, then stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.server_proc import pid_alive

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_suite.sh"


def _call(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_SUITE_DIR": str(tmp), "OUT": str(tmp)}
    return subprocess.run(
        [str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_a_started_run_is_waited_for_and_reports_pytests_status(tmp_path: Path) -> None:
    assert _call(tmp_path, "wait", "1").returncode == 3  # nothing started here yet
    started = _call(tmp_path, "start", "-k", "no_such_test_anywhere")
    assert started.returncode == 0 and "started" in started.stdout
    waited = _call(tmp_path, "wait", "60")
    assert waited.returncode == 5, waited.stdout  # pytest's "no tests ran"
    assert "finished, pytest exit 5" in waited.stdout
    assert "deselected" in (tmp_path / "gpu_suite.log").read_text()  # copied to $OUT


def test_a_run_outlives_its_caller_until_stopped(tmp_path: Path) -> None:
    """The caller's process returns while pytest goes on (the device call's shell ends between polls);
    `stop` ends pytest's whole process group."""
    assert _call(tmp_path, "start").returncode == 0
    pid = int((tmp_path / "pid").read_text())
    polled = _call(tmp_path, "wait", "0")
    assert polled.returncode == 0 and "still running" in polled.stdout
    assert pid_alive(pid) and os.getpgid(pid) == pid  # a process group (and session) of its own
    assert _call(tmp_path, "stop").returncode == 0
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid)
