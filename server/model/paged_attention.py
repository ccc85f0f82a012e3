# mypy: disable-error-code="no-untyped-def"
# (Triton JIT kernels take untyped pointer and constexpr arguments.)
"""Triton kernels for decode attention over the paged KV pool (imported only where triton is installed).

One layer's slice of the pool, `pages = KVBlockPool.kv[layer]`: (N, 2, s, kv, dh) in the model dtype
(block, 0 = key / 1 = value, offset in block, kv head, head dim). Each decode row r has a slot `idx[r]`
(-1 = padding: skipped, its output zeros), a position `pos[r]` (the tokens its slot already holds, the
new token's position) and the slot's block table `tables[slot]` ((S, M) int32, token t in block
`tables[slot, t // s]` at offset `t % s`). Every per-row input is device data, so one CUDA graph serves
rows at any positions.

- `kv_append`: writes the new token's key and value of each row at `pos[r]` (its block must be in the
  table already);
- `decode_attention`: one query token per row over keys [0, pos[r] + 1), online softmax in fp32, GQA
  (query head i reads kv head i // (q / kv)), split along the keys as flash-decoding does: one program per
  (row, kv head, split) handles that head's group of query heads over its split's share of the row's
  positions, BLOCK_N tokens at a time gathered through the table (any block size), in tensor-core
  products; a second kernel combines the splits' partial sums per (row, query head). Without the splits
  a lone row's attention ran on `kv heads` programs of the GPU's ~132 multiprocessors.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _kv_append_kernel(
    k_ptr, v_ptr, pages_ptr, idx_ptr, pos_ptr, table_ptr,
    dh,
    stride_kb, stride_kh, stride_vb, stride_vh,
    stride_pn, stride_pkv, stride_ps, stride_ph, stride_ts,
    BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(idx_ptr + row).to(tl.int64)
    if slot < 0:
        return
    pos = tl.load(pos_ptr + row).to(tl.int64)
    block = tl.load(table_ptr + slot * stride_ts + pos // BLOCK_SIZE).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < dh
    dst = pages_ptr + block * stride_pn + (pos % BLOCK_SIZE) * stride_ps + head * stride_ph + offs
    k = tl.load(k_ptr + row * stride_kb + head * stride_kh + offs, mask=mask)
    v = tl.load(v_ptr + row * stride_vb + head * stride_vh + offs, mask=mask)
    tl.store(dst, k.to(pages_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_pkv, v.to(pages_ptr.dtype.element_ty), mask=mask)


def kv_append(k: Tensor, v: Tensor, pages: Tensor, idx: Tensor, pos: Tensor, tables: Tensor) -> None:
    """k, v: (b, kv, dh) (head dim contiguous); pages: (N, 2, s, kv, dh) written in place; idx, pos: (b,)
    int; tables: (S, M) int32."""
    b, heads, dh = k.shape
    _check(pages, tables, heads, dh)
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and v.shape == k.shape
    _kv_append_kernel[(b, heads)](
        k, v, pages, idx, pos, tables,
        dh,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        pages.stride(0), pages.stride(1), pages.stride(2), pages.stride(3), tables.stride(0),
        BLOCK_SIZE=pages.shape[2], BLOCK_D=triton.next_power_of_2(dh),
    )  # fmt: skip


@triton.jit
def _decode_attention_kernel(
    q_ptr, pages_ptr, idx_ptr, pos_ptr, table_ptr, part_ptr, stat_ptr,
    dh, group, scale, splits,
    stride_qb, stride_qh,
    stride_pn, stride_pkv, stride_ps, stride_ph, stride_ts,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One (row, kv head, split): its split's share of the row's keys -> unnormalised sums (part: (b, q,
    splits, D) fp32) and their running max and denominator (stat: (b, q, splits, 2) fp32). The group's
    query heads (padded to 16 rows) and a tile of BLOCK_N keys meet in tensor-core products (`tl.dot`):
    scores in fp32 from the pool's dtype, probabilities cast to it for the values, as flash attention does."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(idx_ptr + row).to(tl.int64)
    if slot < 0:  # padding: `_combine_kernel` writes its zeros
        return
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    q_heads = kv_head * group + offs_g  # (G,)
    g_mask = offs_g < group
    d_mask = offs_d < dh
    qd_mask = g_mask[:, None] & d_mask[None, :]
    length = tl.load(pos_ptr + row).to(tl.int32) + 1  # an int32 loop bound
    per = tl.cdiv(tl.cdiv(length, splits), BLOCK_N) * BLOCK_N  # whole tiles per split
    lo = split * per
    hi = tl.minimum(lo + per, length)
    q_ptrs = q_ptr + row * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=qd_mask, other=0.0).to(tl.float32) * scale
    q = q.to(pages_ptr.dtype.element_ty)  # (G, D)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    head_base = pages_ptr + kv_head * stride_ph
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)  # (N,) token positions
        n_mask = offs_n < hi
        block = tl.load(table_ptr + slot * stride_ts + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(
            tl.int64
        )
        tok = block * stride_pn + (offs_n % BLOCK_SIZE) * stride_ps  # (N,)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(head_base + tok[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        v = tl.load(head_base + stride_pkv + tok[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (G, N) fp32
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])  # (G, N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    at = (row * group * tl.num_programs(1) + q_heads) * splits + split  # (G,): (row, head, split)
    tl.store(part_ptr + at[:, None] * BLOCK_D + offs_d[None, :], acc, mask=qd_mask)
    tl.store(stat_ptr + at * 2, m_i, mask=g_mask)
    tl.store(stat_ptr + at * 2 + 1, l_i, mask=g_mask)


@triton.jit
def _combine_kernel(
    part_ptr, stat_ptr, idx_ptr, out_ptr,
    dh, splits, stride_ob, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One (row, query head): its splits' partial sums rescaled to the common max and normalised."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    heads = tl.num_programs(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < splits
    d_mask = offs_d < dh
    out_ptrs = out_ptr + row * stride_ob + head * stride_oh + offs_d
    if tl.load(idx_ptr + row) < 0:
        tl.store(out_ptrs, tl.zeros([BLOCK_D], dtype=out_ptr.dtype.element_ty), mask=d_mask)
        return
    at = (row * heads + head) * splits + offs_s  # (S,)
    m = tl.load(stat_ptr + at * 2, mask=s_mask, other=float("-inf"))
    denom = tl.load(stat_ptr + at * 2 + 1, mask=s_mask, other=0.0)
    weight = tl.exp(m - tl.max(m, axis=0))  # an empty split (max -inf) weighs 0; split 0 is never empty
    acc = tl.load(
        part_ptr + at[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0
    )
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * denom, axis=0)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def decode_attention(
    q: Tensor,
    pages: Tensor,
    idx: Tensor,
    pos: Tensor,
    tables: Tensor,
    scale: float,
    block_n: int = 64,
    splits: int | None = None,
) -> Tensor:
    """q: (b, q, dh) (head dim contiguous), one token per row at position pos[r]; pages: (N, 2, s, kv, dh)
    holding each live row's keys and values of [0, pos[r]] (`kv_append` first); idx, pos: (b,) int;
    tables: (S, M) int32 -> out (b, q, dh) in q's dtype (zeros on padding rows). `splits`: the count of
    key splits per (row, kv head) (default: `split_count`'s)."""
    b, n_heads, dh = q.shape
    kv_heads = pages.shape[3]
    _check(pages, tables, kv_heads, dh)
    assert q.stride(-1) == 1 and n_heads % kv_heads == 0
    group = n_heads // kv_heads
    block_g, block_d = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(dh))  # tl.dot
    splits = splits or split_count(b * kv_heads, tables.shape[1] * pages.shape[2], q.device)
    out = torch.empty(b, n_heads, dh, dtype=q.dtype, device=q.device)
    part = torch.empty(b, n_heads, splits, block_d, dtype=torch.float32, device=q.device)
    stat = torch.empty(b, n_heads, splits, 2, dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(b, kv_heads, splits)](
        q, pages, idx, pos, tables, part, stat,
        dh, group, scale, splits,
        q.stride(0), q.stride(1),
        pages.stride(0), pages.stride(1), pages.stride(2), pages.stride(3), tables.stride(0),
        BLOCK_SIZE=pages.shape[2], BLOCK_N=block_n, BLOCK_G=block_g, BLOCK_D=block_d,
        PRECISION="ieee" if pages.dtype == torch.float32 else "tf32", num_warps=4,
    )  # fmt: skip
    _combine_kernel[(b, n_heads)](
        part, stat, idx, out,
        dh, splits, out.stride(0), out.stride(1),
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
    )  # fmt: skip
    return out


SPLIT_TOKENS = 256  # a split covers at least this many positions of the longest possible row
MAX_SPLITS = 64


def split_count(programs: int, max_len: int, device: torch.device) -> int:
    """How many splits each (row, kv head) of a decode's attention is cut into: enough programs for about
    two per multiprocessor (a lone row at 8k positions ran 1.3 ms on 8 programs of an H200 unsplit), at
    most one per `SPLIT_TOKENS` of the longest row the tables hold. Host values only: one CUDA graph per
    batch bucket keeps its count whatever positions its rows reach."""
    sms = _multiprocessors(device.index or 0) if device.type == "cuda" else 8
    return max(1, min(-(-2 * sms // programs), max_len // SPLIT_TOKENS, MAX_SPLITS))


@functools.cache
def _multiprocessors(index: int) -> int:
    """The CUDA device's multiprocessor count, read once (an eager decode asks every layer, every step)."""
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _check(pages: Tensor, tables: Tensor, kv_heads: int, dh: int) -> None:
    assert pages.dim() == 5 and pages.shape[1] == 2 and pages.shape[3:] == (kv_heads, dh)
    assert pages.stride(-1) == 1 and tables.dtype == torch.int32 and tables.stride(-1) == 1
