"""bench/eval_cache.py end to end at a tiny size against real servers on the bundled model: the report has
one row per server in both tables, and the lossless control (fp32 tiers) restores checkpoints yet answers
exactly as --no-cache does (the same choices, the same continuation tokens, KL at fp32 rounding), with the
servers run side by side (`--parallel`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.eval_cache import main

pytestmark = pytest.mark.slow

SERVERS = ["no-cache", "fp32 / fp32 (lossless control)"]


def _run(tmp_path: Path) -> tuple[str, list[dict[str, Any]]]:
    out, js = tmp_path / "report.md", tmp_path / "report.json"
    argv = [
        "--questions",
        "8",
        "--continuations",
        "2",
        "--tokens",
        "16",
        "--max-context",
        "400",
        "--restore-gap",
        "2",
        "--parallel",  # the servers side by side, as on the GPU: each still answers in order
    ]
    assert main([*argv, "--out", str(out), "--json", str(js), "--servers", *SERVERS]) == 0
    return out.read_text(), json.loads(js.read_text())


def test_report_structure_and_lossless_control(tmp_path: Path) -> None:
    text, rows = _run(tmp_path)
    assert [r["server"] for r in rows] == SERVERS
    for name in SERVERS:
        assert sum(line.startswith(f"| {name} |") for line in text.splitlines()) == 2  # both tables
    ref, lossless = rows
    assert ref["changed"] == 0 and ref["restored"]["value"] == 0.0
    assert lossless["restored"]["value"] > 0
    assert lossless["changed"] == 0 and lossless["identical"]["value"] == 1.0
    assert lossless["accuracy"] == ref["accuracy"]
    assert lossless["step_kl_max"] < 1e-6 and lossless["answer_kl_max"] < 1e-6
