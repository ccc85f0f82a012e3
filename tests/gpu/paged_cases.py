"""The paged decode-attention kernels against SDPA, shared by the interpreter tests (CPU) and the GPU tests:
rows of different lengths in shuffled blocks of a pool, one padding row."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Close = Callable[[Tensor, Tensor], None]


def paged(
    lengths: Sequence[int], block: int, kv: int, dh: int, dtype: torch.dtype, device: str
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """A pool (N, 2, s, kv, dh) holding each row's keys and values (2, n, kv, dh) of [0, n) in shuffled
    blocks, and the (rows, M) int32 block tables."""
    gen = torch.Generator().manual_seed(0)
    per_row = [-(-n // block) for n in lengths]
    order = torch.randperm(sum(per_row) + 2, generator=gen).tolist()  # two blocks no row uses
    pages = torch.randn(len(order), 2, block, kv, dh, generator=gen).to(device, dtype)
    tables = torch.zeros(len(lengths), max(per_row), dtype=torch.int32)
    rows = []
    for r, n in enumerate(lengths):
        ids = [order.pop() for _ in range(per_row[r])]
        tables[r, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        rows.append(pages[ids].transpose(0, 1).flatten(1, 2)[:, :n].clone())  # (2, n, kv, dh)
    return pages, tables.to(device), rows


def check_decode_attention(
    shape: tuple[int, int, int, int],
    lengths: Sequence[int],
    close: Close,
    dtype: torch.dtype,
    device: str,
    splits: int | None = None,
) -> None:
    """shape (q heads, kv heads, dh, block size); lengths: each row's new token's position + 1; splits: of
    each row's keys (None: the kernel's choice). Appends each row's new key and value, attends, and compares
    with SDPA over the row's keys; the padding row's output is zero and only the blocks of the new tokens
    changed."""
    from server.model import paged_attention as ops

    heads, kv, dh, block = shape
    pages, tables, rows = paged(lengths, block, kv, dh, dtype, device)
    b, gen = len(lengths), torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b + 1, n, dh, generator=gen).to(device, dtype) for n in (heads, kv, kv))
    idx = torch.tensor([*range(b), -1], dtype=torch.int32, device=device)  # the last row is padding
    pos = torch.tensor([n - 1 for n in lengths] + [5], dtype=torch.int32, device=device)
    before = pages.clone()
    ops.kv_append(k, v, pages, idx, pos, tables)
    out = ops.decode_attention(q, pages, idx, pos, tables, 0.3, splits=splits)
    for r, n in enumerate(lengths):
        keys = torch.cat([rows[r][0, : n - 1], k[r : r + 1]]).transpose(0, 1)  # (kv, n, dh)
        values = torch.cat([rows[r][1, : n - 1], v[r : r + 1]]).transpose(0, 1)
        want = F.scaled_dot_product_attention(q[r][:, None], keys, values, scale=0.3, enable_gqa=True)
        close(out[r], want[:, 0])  # (q, dh)
    assert not out[b].any()
    changed = (pages != before).flatten(1).any(-1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted({int(tables[r, (n - 1) // block]) for r, n in enumerate(lengths)})
