"""bench/e2e_bench.py in its CPU smoke mode: both servers, every section, and the tables it appends."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TABLES = {
    "throughput and latency": ["streams", "completion tok/s", "upstream generate tok/s", "ratio", "TTFT p50 ms",
                               "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "requests"],
    "bursts of": ["burst", "TTFT p50 ms", "TTFT p99 ms", "headers p50 ms",
                  "the server's prefill steps: rows (prompt tokens) + decodes, wall ms (where it went, ms)"],
    "the runner's own decode step": ["batch", "runner step ms", "server ITL p50 ms", "ITL / step", "target"],
    "the runner's own batched prefill of the burst": ["prompts x tokens", "upstream forward ms",
                                                       "runner prefill_batch ms", "server TTFT p50 ms",
                                                       "TTFT / prefill"],
    "where the throughput rounds' TTFT goes": ["load", "client TTFT p50 ms", "client headers p50 ms", "parse",
                                               "tokenize", "queue", "restore", "prefill", "first_token"],
    "ITL with long prefills in flight": ["load", "ITL p50 ms", "ITL p99 ms", "p99 / p50 (target <= 3x)",
                                         "long prefills", "their TTFT p50 ms"],
    "follow-up turn": ["conversation tokens", "measured prompt tokens", "cache TTFT p50 ms",
                       "no-cache TTFT p50 ms", "speed-up", "runs", "resumed after the answer"],
    "first-turn TTFT": ["conversation tokens", "measured prompt tokens", "cache TTFT p50 ms",
                        "no-cache TTFT p50 ms", "cache / no-cache", "runs"],
    "follow-up on token ids": ["conversation tokens", "measured prompt tokens", "cache TTFT p50 ms",
                               "no-cache TTFT p50 ms", "speed-up", "runs", "resumed after the answer"],
    "where TTFT goes": ["conversation tokens", "server", "turn", "client TTFT p50 ms", "parse", "tokenize",
                        "queue", "restore", "prefill", "first_token"],
}  # fmt: skip


def _run_smoke(out: Path, *extra: str) -> tuple[str, str]:
    """The bench's --out text and its stdout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench.e2e_bench", "--shape", "demo", "--smoke", "--out", str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out.read_text(), proc.stdout


def _tables(text: str) -> dict[str, list[list[str]]]:
    """Title -> rows (the header row first) of every markdown table under a `### title`."""
    tables: dict[str, list[list[str]]] = {}
    title = ""
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:]
            tables[title] = []
        elif line.startswith("|") and not line.startswith("|---") and title:
            tables[title].append([cell.strip() for cell in line.strip("|").split("|")])
    return tables


def _table(tables: dict[str, list[list[str]]], prefix: str) -> list[list[str]]:
    matches = [rows for title, rows in tables.items() if title.startswith(prefix)]
    assert len(matches) == 1, f"{prefix!r} in {list(tables)}"
    return matches[0]


@pytest.mark.slow
def test_smoke_run_writes_every_table_with_its_columns(tmp_path: Path) -> None:
    text, stdout = _run_smoke(tmp_path / "bench.md")
    assert text.lstrip().startswith("## End to end over HTTP vs upstream mamba_ssm: cpu, demo")
    assert "cache server: `python -m server.serve" in text and "--no-cache`" in text
    tables = _tables(text)
    for prefix, header in TABLES.items():
        rows = _table(tables, prefix)
        assert rows[0] == header
        assert len(rows) > 1 and all(len(row) == len(header) for row in rows)
    tput = _table(tables, "throughput and latency")
    assert [row[0] for row in tput[1:3]] == ["1", "2"]  # the smoke plan's concurrencies, then the burst
    assert all(float(row[1].replace(",", "")) > 0 for row in tput[1:3])
    assert all(row[2].startswith("n/a") for row in tput[1:3])  # no upstream without CUDA
    followup = _table(tables, "follow-up turn")
    assert [row[0] for row in followup[1:]] == ["256", "512"]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in followup[1:])
    # token-id follow-ups always resume after the answer (the demo model's chat answers also re-tokenize
    # to the ids generated, so the chat ones do here too)
    assert all(row[-1] == "1 of 1" for row in _table(tables, "follow-up on token ids")[1:])
    burst = _table(tables, "the runner's own batched prefill of the burst")
    assert (
        burst[1][:2] == ["4 x 24", "-"] and float(burst[1][2]) > 0 and float(burst[1][3]) > 0
    )  # the smoke plan's burst; no upstream on the CPU
    loads = _table(tables, "where the throughput rounds' TTFT goes")
    assert [row[0] for row in loads[1:]] == ["1", "2", "4 at once, 24-token prompts"]
    for row in loads[1:]:  # every request observed every phase
        parts = [float(cell) for cell in row[3:]]
        assert parts[4] > 0 and sum(parts) <= float(row[1]) * 1.5
        assert 0 < float(row[2]) < float(row[1])  # the headers come before the first token
    phases = _table(tables, "where TTFT goes")
    assert len(phases) == 1 + 2 * 4 * 2  # per length, per server (chat and token ids), per turn
    for row in phases[1:]:
        parts = [float(cell) for cell in row[4:]]  # every phase observed once per turn
        assert sum(parts) <= float(row[3]) * 1.5  # the server's phases fit in the client's TTFT
        assert float(row[8]) > 0  # prefill: at least one token always runs
    # one line per conversation and server: every first turn a miss (no conversation's text starts with
    # another's, which shared prefixes would serve), every cache-server follow-up a hit
    runs = [line for line in stdout.splitlines() if re.match(r"\[e2e\] [\d,]+ #\d+: ", line)]
    assert len(runs) == 2 * 2
    cached = [
        [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) of [\d,]+ cached", line)] for line in runs
    ]
    assert all(first == 0 for first, _ in cached)
    assert all(followup > 0 for _, followup in cached[:2]) and all(f == 0 for _, f in cached[2:])
    # on token ids, the cache server's follow-up resumes at the first turn's finish checkpoint: its prompt
    # and the answer less its last token (the smoke plan's 4-token answers)
    ids = [line for line in stdout.splitlines() if re.match(r"\[e2e\] ids [\d,]+ #\d+: ", line)]
    assert len(ids) == 2 * 2
    counts = [
        [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) of ([\d,]+) cached", line)[i]]
        for line in ids
        for i in (0, 1)
    ]
    for n, (first, followup) in enumerate(zip(counts[::2], counts[1::2], strict=True)):
        assert first[0] == 0 and first[1] in (256, 512)
        assert followup[0] == (first[1] + 4 - 1 if n < 2 else 0), ids[n]


@pytest.mark.slow
def test_variants_serve_the_sections_once_per_flag_set(tmp_path: Path) -> None:
    variants = ["", "--decode-prefill-budget 8", " --gil-switch-interval-ms=1"]  # a lone flag: a space first
    text, _ = _run_smoke(tmp_path / "bench.md", "--sections", "tput", "--variants", *variants)
    servers = [line for line in text.splitlines() if line.startswith("cache server:")]
    assert len(servers) == 3 and "--decode-prefill-budget" not in servers[0]
    assert servers[1].endswith("--decode-prefill-budget 8`")
    assert servers[2].endswith("--gil-switch-interval-ms=1`")
    assert text.count("### throughput and latency") == 3


@pytest.mark.slow
def test_profiled_follow_ups_leave_a_trace_each(tmp_path: Path) -> None:
    """--profile-followups starts the cache server with --profile-dir and records every follow-up turn: one
    Chrome trace per conversation, holding the model's ops, and the follow-up table as usual."""
    traces = tmp_path / "traces"
    text, _ = _run_smoke(tmp_path / "bench.md", "--sections", "followup", "--profile-followups", str(traces))
    assert f"--profile-dir {traces}" in text  # the cache server's flags
    files = sorted(traces.glob("*.json"))
    assert len(files) == 2  # the smoke plan's two conversation lengths, one run each
    for path in files:
        names = {e.get("name", "") for e in json.loads(path.read_text())["traceEvents"]}
        assert any(n.startswith("aten::") for n in names)
    assert [row[0] for row in _table(_tables(text), "follow-up turn")[1:]] == ["256", "512"]


@pytest.mark.slow
def test_bursts_show_the_servers_prefill_steps_with_the_debug_log(tmp_path: Path) -> None:
    """The burst section: a warm-up and the smoke plan's two timed bursts, each with the engine's prefill
    steps meanwhile (every prompt in one of them), where each step's time went, and how long storing its
    captures took before the next step (each step ends prompts, so each captures)."""
    text, _ = _run_smoke(tmp_path / "bench.md", "--sections", "burst", "--variants", " --log-level debug")
    rows = _table(_tables(text), "bursts of 4 simultaneous 24-token prompts")
    assert [row[0] for row in rows[1:]] == ["warm-up", "1", "2", "median of the timed"]
    *bursts, summary = rows[1:]
    for col in (1, 2, 3):  # the medians of the two timed bursts' values, as printed (to the rounding)
        assert abs(float(summary[col]) - statistics.median(float(r[col]) for r in bursts[1:])) <= 0.051
    within = sum(float(r[1]) <= 150 for r in bursts[1:])  # CPU bursts of 4 short prompts: ~tens of ms
    assert summary[4] == f"{within} of 2 p50s at or under 150 ms"
    for row in bursts:
        assert 0 < float(row[1]) <= float(row[2]) and 0 < float(row[3]) < float(row[2])  # headers first
        steps = row[4].split("; ")
        assert sum(int(step.split(" ")[0]) for step in steps) >= 4  # every prompt's last chunk is in a step
        for step in steps:
            parts = dict(re.findall(r"(\w+) (-?[\d.]+)", step.split("(", 2)[-1]))
            assert {"admit", "prefill", "stored", "wait", "handoff", "apply"} <= set(parts), step
            assert re.search(r"\) \[stored [\d.]+\]$", step), step
