"""How the GPU runner cuts a batched pass of short rows into replays of (rows, width) graph buckets
(`server.model.gpu_row_graphs.plan_parts`)."""

from __future__ import annotations

import random

from server.model.gpu_row_graphs import MAX_ROW_TOKENS, ROW_WIDTHS, plan_parts, row_buckets


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
