"""bench/hybrid_bench.py on CPU with a tiny seeded hybrid: every table with its columns, and sane numbers (a
cached follow-up prefills fewer tokens, the checkpoints' KV byte accounting adds up, a step that does not fit
before --deadline is skipped with a note)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_e2e_bench import _table, _tables

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 16  # tokens per KV block (server.model.hybrid_runner.KV_BLOCK_SIZE)
HEADERS = {
    "checkpoint bytes": ["tier", "checkpoints", "deepest position", "SSM state", "KV stored (blocks shared)",
                         "KV, a full copy per checkpoint", "full copies / stored",
                         "sum of position x KV per token (model dtype)", "all stored", "all, with full KV copies"],
    "decode": ["measure", "ours", "transformers", "ours vs transformers"],
    "follow-up turn": ["conversation tokens", "measured prompt tokens", "cache TTFT p50 ms", "no-cache TTFT p50 ms",
                       "speed-up", "runs", "resumed after the answer", "cache: tokens prefilled",
                       "no-cache: tokens prefilled"],
    "first-turn TTFT": ["conversation tokens", "measured prompt tokens", "cache TTFT p50 ms",
                        "no-cache TTFT p50 ms", "cache / no-cache", "runs"],
}  # fmt: skip


def _run(out: Path, *extra: str) -> tuple[str, dict[str, Any]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable,
        "-m",
        "bench.hybrid_bench",
        "--shape",
        "tiny",
        "--plan",
        "smoke",
        "--out",
        str(out),
    ]
    proc = subprocess.run([*cmd, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out.with_suffix(".md").read_text(), json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    return _run(tmp_path_factory.mktemp("hybrid-bench") / "bench.json")


def _n(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.mark.slow
def test_every_table_has_its_columns(smoke: tuple[str, dict[str, Any]]) -> None:
    text, results = smoke
    assert text.lstrip().startswith("## Hybrid GraniteMoeHybridForCausalLM (tiny shape, random weights): cpu")
    assert "torch reference" in text  # transformers' kernels for the Mamba layers, named
    assert "--max-model-len" in text and "--no-cache`" in text
    tables = _tables(text)
    for prefix, header in HEADERS.items():
        rows = _table(tables, prefix)
        assert rows[0] == header
        assert len(rows) > 1 and all(len(row) == len(header) for row in rows)
    assert "notes" not in results, results.get("notes")
    assert {"header", "bytes", "runner", "followup"} <= results.keys()


@pytest.mark.slow
def test_a_cached_follow_up_prefills_fewer_tokens(smoke: tuple[str, dict[str, Any]]) -> None:
    rows = _table(_tables(smoke[0]), "follow-up turn")[1:]
    assert [row[0] for row in rows] == ["256", "512"]  # the smoke plan's short and long conversations
    for row in rows:
        prompt, cache, plain = _n(row[1]), _n(row[7]), _n(row[8])
        assert 0 < cache < prompt // 4 and plain == prompt
        assert _n(row[2]) > 0 and _n(row[3]) > 0


@pytest.mark.slow
def test_checkpoint_kv_is_stored_once_and_counted_per_checkpoint(smoke: tuple[str, dict[str, Any]]) -> None:
    data = smoke[1]["bytes"]
    per_token, tiers = data["kv_token_bytes"], data["tiers"]
    assert per_token == 1 * 2 * 2 * 16 * 4  # one attention layer, K and V, 2 kv heads of 16, fp32
    assert {"hot", "cold"} <= tiers.keys()
    for t in tiers.values():
        deepest = max(t["positions"])
        assert t["state_bytes"] > 0 and t["checkpoints"] == len(t["positions"]) >= 2
        assert deepest >= data["conversation_tokens"]
        assert t["kv_bytes"] < t["kv_full_copy_bytes"]  # shared blocks: less than a copy per checkpoint
    hot = tiers["hot"]  # the model dtype: a block of the hot tier is BLOCK tokens x per_token bytes
    blocks = [math.ceil(p / BLOCK) for p in hot["positions"]]
    assert hot["kv_full_copy_bytes"] == sum(blocks) * BLOCK * per_token
    assert max(blocks) * BLOCK * per_token <= hot["kv_bytes"] <= sum(blocks) * BLOCK * per_token
    assert hot["kv_positions_x_token_bytes"] == sum(hot["positions"]) * per_token


@pytest.mark.slow
def test_our_runner_and_transformers_are_both_measured(smoke: tuple[str, dict[str, Any]]) -> None:
    text, results = smoke
    assert "our runner `HybridRunner` vs transformers `GraniteMoeHybridForCausalLM`" in text
    runner = results["runner"]
    for side in ("ours", "transformers"):
        assert set(runner[side]["decode"]) == {"1", "4"} and set(runner[side]["prefill"]) == {"128", "512"}
        values = [*runner[side]["decode"].values(), *runner[side]["prefill"].values()]
        assert all(v > 0 and math.isfinite(v) for v in values), runner[side]


@pytest.mark.slow
def test_a_step_past_the_deadline_is_skipped_with_a_note(tmp_path: Path) -> None:
    text, results = _run(tmp_path / "bench.json", "--sections", "runner", "--deadline", "1")
    assert any(note.startswith("skipped runner:") for note in results["notes"])
    assert "_skipped runner:" in text and "runner" not in results


@pytest.mark.slow
def test_servers_that_fail_to_start_are_noted_and_the_runner_still_runs(tmp_path: Path) -> None:
    text, results = _run(
        tmp_path / "bench.json", "--sections", "followup,runner", "--cache-args=--no-such-flag"
    )
    assert any(note.startswith("serving failed:") for note in results["notes"])
    assert "runner" in results and "followup" not in results
    assert "### decode" in text
