"""How the GPU runner cuts a batched pass of short rows into replays of (rows, width) graph buckets
(`server.model.gpu_row_graphs.plan_parts`)."""

from __future__ import annotations

import random

import torch

from server.model.config import ModelConfig
from server.model.gpu_row_graphs import (
    MAX_ROW_TOKENS,
    ROW_WIDTHS,
    launch_tokens,
    plan_parts,
    replays_win,
    row_buckets,
)
from server.model.lm import MambaLM


def test_buckets_are_powers_of_two_rows_within_the_token_bound() -> None:
    buckets = row_buckets(64)
    assert (64, 256) in buckets and (32, 512) in buckets and (64, 512) not in buckets
    assert all(b >= 2 and b * w <= MAX_ROW_TOKENS and w in ROW_WIDTHS for b, w in buckets)
    assert {b for b, _ in row_buckets(48)} == {2, 4, 8, 16, 32, 48}  # the pool's size is a bucket


def test_a_burst_is_cut_into_full_buckets_rather_than_padded_to_the_next() -> None:
    buckets = row_buckets(64)
    assert plan_parts([200] * 40, buckets) == [(32, (32, 256)), (8, (8, 256))]
    assert plan_parts([200] * 48, buckets) == [(48, (64, 256))]  # a third padding rows at most
    assert plan_parts([128] * 5, buckets) == [(4, (4, 128)), (1, (2, 128))]
    assert plan_parts([100, 90, 20], buckets) == [(3, (4, 128))]
    assert plan_parts([30], buckets) == [(1, (2, 32))]
    assert plan_parts([513, 10], buckets) is None  # wider than every bucket: the eager pass
    assert plan_parts([500] * 40, buckets) == [(32, (32, 512)), (8, (8, 512))]  # 64 x 512 is past the bound


def test_parts_cover_the_rows_in_order_each_in_a_bucket_that_holds_it() -> None:
    rng = random.Random(0)
    for max_slots in (2, 7, 16, 64):
        buckets = row_buckets(max_slots)
        for _ in range(200):
            lengths = sorted((rng.randint(1, 512) for _ in range(rng.randint(1, max_slots))), reverse=True)
            parts = plan_parts(lengths, buckets)
            assert parts is not None
            assert sum(count for count, _ in parts) == len(lengths)
            start = 0
            for count, (rows, width) in parts:
                assert (rows, width) in buckets and 0 < count <= rows
                assert max(lengths[start : start + count]) <= width
                assert rows <= count + max(1, count // 2) or rows == count
                start += count


def _layer_params(d_model: int, n_layer: int = 2) -> int:
    with torch.device("meta"):
        model = MambaLM(ModelConfig(arch="mamba2", d_model=d_model, n_layer=n_layer, vocab_size=512))
    return sum(p.numel() for p in model.blocks()[0].parameters())


def test_a_large_burst_runs_eagerly_on_a_large_model_and_as_replays_on_a_small_one() -> None:
    """64 rows of ~200 tokens: eager 64 x 208, replays of the 64 x 256 bucket. On the 2.7b shape the eager
    pass's launches hide ~8k tokens, so the 23% wider bucket loses; on the 130m shape they hide every bucket."""
    big, small = launch_tokens(_layer_params(2560)), launch_tokens(_layer_params(768))
    assert 6_000 < big < 10_000 and small > MAX_ROW_TOKENS
    assert not replays_win(64 * 256, 64 * 208, big)
    assert replays_win(64 * 256, 64 * 208, small)
    assert replays_win(8 * 256, 8 * 208, big)  # a small pass waits on its launches: replays win
    assert replays_win(64 * 256, 64 * 256, big)  # no wider than the eager pass
    assert launch_tokens(10**12) == 4096  # the floor
