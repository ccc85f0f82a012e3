"""A real `python -m server.serve` whose model cannot load: exits non-zero, and the last line on stderr
is the cause in plain words (not an escaped traceback inside JSON). One stopped by a Ctrl-C exits 130, cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.server_proc import REPO_ROOT, start_server


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "server.serve", "--host", "127.0.0.1", "--port", "0", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)


MODES = pytest.mark.parametrize("mode", [(), ("--engine-process",)], ids=["thread", "process"])


@MODES
@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_missing_model_directory_exits_with_one_plain_line(log_format: str, mode: tuple[str, ...]) -> None:
    done = _serve("--model", "/nope", "--log-format", log_format, *mode)
    assert done.returncode != 0
    last = done.stderr.rstrip("\n").splitlines()[-1]
    expected = "model directory /nope does not exist (and it is not a Hub id 'org/name')"
    assert last == f"tssc serve: cannot load the model: {expected}"
    assert "Traceback" not in done.stderr


@MODES
def test_a_directory_without_config_names_it(tmp_path: Path, mode: tuple[str, ...]) -> None:
    done = _serve("--model", str(tmp_path), *mode)
    assert done.returncode != 0
    assert done.stderr.splitlines()[-1] == f"tssc serve: cannot load the model: {tmp_path} has no config.json"


@MODES
def test_the_traceback_is_logged_at_debug_level(tmp_path: Path, mode: tuple[str, ...]) -> None:
    done = _serve("--model", str(tmp_path), "--log-level", "debug", "--log-format", "text", *mode)
    assert done.returncode != 0 and "Traceback" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("tssc serve: cannot load the model: ")


@pytest.mark.parametrize("extra", [(), ("--api-servers", "2")], ids=["one-front-end", "two-front-ends"])
def test_a_ctrl_c_stops_the_server_cleanly_with_code_130(
    tiny_model_dir: Path, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    """SIGINT (an operator's Ctrl-C) drains and stops the server with the shell's code 130 and no traceback
    in its log (uvicorn re-raises the signal once it has shut down; that is a stop, not a crash)."""
    with start_server(["--model", str(tiny_model_dir), *extra], log_dir=tmp_path) as srv:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
        assert httpx.post(srv.base_url + "/v1/completions", json=body, timeout=60).status_code == 200
        proc, log_path = srv.proc, srv.log_path
    assert proc.returncode == 130
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
