"""The start-up report of what each cache tier's byte budget holds, and the advice when it is too small."""

from __future__ import annotations

import torch

from cache import CacheConfig, StateCache
from server.engine.factory import budget_report

SPEC = {"conv": ((2, 24, 3), torch.float32), "ssm": ((2, 4, 8, 16), torch.float32)}


def _cache(hot_blocks: int, cold_blocks: int) -> StateCache:
    probe = StateCache(CacheConfig(hot_bytes=0, cold_bytes=0), SPEC)
    hot, cold = probe.hot_layout.block_bytes, probe.cold_layout.block_bytes
    return StateCache(CacheConfig(hot_bytes=hot * hot_blocks, cold_bytes=cold * cold_blocks), SPEC)


def test_large_enough_budgets_report_their_capacity_without_advice() -> None:
    lines = budget_report(_cache(4, 8), slots=4)
    assert [line.split(":")[0] for line in lines] == ["hot tier", "cold tier"]
    assert "holds 4 checkpoints" in lines[0] and "(fp8)" in lines[0]
    assert "holds 8 checkpoints" in lines[1] and "(fp16)" in lines[1]


def test_too_small_budgets_say_which_flag_to_raise() -> None:
    lines = budget_report(_cache(3, 7), slots=4)
    advice = [line for line in lines if line.startswith("raise")]
    assert len(advice) == 2
    assert advice[0].startswith("raise --hot-bytes: 3 hot checkpoints for 4 live slots")
    assert advice[1].startswith("raise --cold-bytes: 7 cold checkpoints for 4 live slots")


def test_a_disabled_hot_tier_gets_no_advice() -> None:
    lines = budget_report(_cache(0, 8), slots=4)
    assert not any(line.startswith("raise --hot-bytes") for line in lines)
