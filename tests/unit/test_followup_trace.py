"""bench/followup_trace.py on the demo model (CPU): the real engine in-process, a first turn and follow-ups
resuming its checkpoint, a profile of the last follow-up's worker-thread ops, and its Chrome trace."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from bench.followup_trace import engine_settings, run
from server.model.defaults import bundled_model_dir
from server.settings import Settings


@pytest.mark.slow
def test_follow_ups_resume_and_the_last_one_is_traced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(model=str(bundled_model_dir()), max_num_seqs=2, max_prompt_tokens=4096)
    rows = asyncio.run(
        run(settings, length=512, new=32, repeats=2, trace_dir=tmp_path, answer_tokens=2, tail=3)
    )
    [[length, new, first, p50, low, each, cached, count]] = rows
    assert (length, new, count) == ("512", "32", "2")
    assert int(cached) >= 512  # every follow-up resumed at least past the first turn's prompt
    assert 0 < float(low) <= float(p50) and float(first) > 0
    assert min(map(float, each.split(" / "))) == float(low)
    assert "aten::" in capsys.readouterr().out  # the worker thread's ops were recorded
    assert (tmp_path / "followup-512.json").stat().st_size > 0


@pytest.mark.slow
def test_a_hybrid_shape_is_traced_with_room_for_its_kv(tmp_path: Path) -> None:
    args = argparse.Namespace(shape="tiny", length=256, max_num_seqs=2, hot_bytes="1GiB", cold_bytes="1GiB")
    settings = engine_settings(args, tmp_path)
    assert settings.max_model_len == 256 + 8192  # a hybrid's KV pool is sized by it
    assert "layer_types" in json.loads((Path(settings.model) / "config.json").read_text())
    rows = asyncio.run(run(settings, length=256, new=16, repeats=2, trace_dir=None, answer_tokens=2, tail=3))
    [[_, _, _, _, _, _, cached, _]] = rows
    assert int(cached) >= 256  # the hybrid's follow-ups resumed past the first prompt
