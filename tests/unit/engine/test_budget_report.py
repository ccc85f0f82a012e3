"""The start-up report of what each cache tier's byte budget holds, and the advice when it is too small."""

from __future__ import annotations

import re

import pytest
import torch

from cache import CacheConfig, StateCache
from server.engine.factory import budget_report, format_bytes

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


def test_a_small_models_advice_is_in_a_unit_that_shows_its_size() -> None:
    """Checkpoints of a few KiB: the advice names a non-zero size ("0.0 GiB keeps 16" was the bug)."""
    (advice,) = [line for line in budget_report(_cache(0, 7), slots=4) if line.startswith("raise")]
    match = re.search(r"; ([\d.,]+) (B|KiB|MiB|GiB) keeps 8$", advice)
    assert match and float(match[1].replace(",", "")) > 0 and match[2] == "KiB", advice
    assert not re.search(r"\b0(\.0)? (KiB|MiB|GiB)\b", " ".join(budget_report(_cache(3, 7), slots=4)))


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (900, "900 B"), (1536, "1.5 KiB"), (512 * 2**20, "512 MiB"), (3 * 2**29, "1.5 GiB")],
)
def test_format_bytes_picks_the_unit_by_size(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_format_bytes_rounds_a_needed_budget_up() -> None:
    n = 2**20 + 1  # just over 1 MiB: 1.0 would not hold it
    assert format_bytes(n) == "1 MiB" and format_bytes(n, round_up=True) == "1.1 MiB"
