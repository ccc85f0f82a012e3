"""The packed prefill's layout (`server.model.gpu_packed.PackedRows`): the host values a packed pass reads,
checked against a plain per-token description of the layout in the module doc."""

from __future__ import annotations

import random

import pytest
import torch

from server.model.gpu_packed import PACKED_BUCKETS, PAD_ID, PackedRows, bucket_for


def _expected(
    tokens: list[list[int]], slots: list[int], spare: int, width: int, seqs: int, rows: int
) -> dict:
    """The layout written out token by token: rows back to back, the tail sequence, empty ones at T."""
    bounds = [0]
    for row in tokens:
        bounds.append(bounds[-1] + len(row))
    bounds += [width] * (seqs - len(tokens))
    seq_of = []
    for s in range(seqs):
        seq_of += [s] * (bounds[s + 1] - bounds[s])
    ids = [t for row in tokens for t in row] + [PAD_ID] * (width - bounds[len(tokens)])
    return {
        "ids": ids,
        "start": [bounds[s] for s in seq_of],
        "slots": slots + [spare] * (seqs - len(slots)),
        "seq_start": bounds[:-1],
        "ends": bounds[1:],
        "last": [bounds[i + 1] - 1 for i in range(len(tokens))] + [0] * (rows - len(tokens)),
        "seq_idx": seq_of,
        "cu": bounds,
    }


@pytest.mark.parametrize("rows", [1, 2, 7, 41])
def test_host_values_viewed_are_the_layout(rows: int) -> None:
    rng = random.Random(rows)
    tokens = [[rng.randrange(1, 50_000) for _ in range(rng.randint(1, 300))] for _ in range(rows)]
    slots = rng.sample(range(1, 65), rows)
    total = sum(map(len, tokens))
    width = bucket_for(total)
    assert width is not None and width >= total and all(b < total for b in PACKED_BUCKETS if b < width)
    seqs, logits = 65, 64
    longs, ints = PackedRows.host(tokens, slots, 0, width, seqs, logits)
    assert (longs.dtype, ints.dtype) == (torch.long, torch.int32)
    assert (longs.numel(), ints.numel()) == PackedRows.sizes(width, seqs, logits)
    ids, layout = PackedRows.views(longs, ints, width, seqs, logits)
    want = _expected(tokens, slots, 0, width, seqs, logits)
    got = {
        "ids": ids, "start": layout.start, "slots": layout.slots, "seq_start": layout.seq_start,
        "ends": layout.ends, "last": layout.last, "seq_idx": layout.seq_idx[0], "cu": layout.cu,
    }  # fmt: skip
    assert {k: v.tolist() for k, v in got.items()} == want
    assert layout.point_rows.tolist() == [0] * seqs


@pytest.mark.parametrize(
    "tokens, width", [([], 128), ([[1] * 100, [2] * 29], 128), ([[1], []], 128), ([[1]] * 65, 128)]
)
def test_rows_that_do_not_fit_are_refused(tokens: list[list[int]], width: int) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        PackedRows.host(tokens, list(range(len(tokens))), 0, width, 65, 64)
