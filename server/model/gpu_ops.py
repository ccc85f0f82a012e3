# mypy: disable-error-code="no-untyped-def"
# (Triton JIT kernels take untyped pointer and constexpr arguments.)
"""Our own Triton kernels for the GPU path (imported only where triton is installed).

- `conv_step`: one token of the depthwise causal conv + SiLU, reading and updating the conv state of
  each row's slot in the live pool in place (rows whose slot is -1 are padding: state untouched, output 0).
  Replaces causal-conv1d's `causal_conv1d_update` when that extension is not built.
- `ssm_step`: one token of the Mamba2 recurrence for each row, in place in the fp32 live pool, indexed by
  slot (-1 = padding). Same maths as mamba-ssm's `selective_state_update` with a head-tied dt, with
  blocks of several head rows per program and dt / dt_limit / softplus computed once per head.
- `conv_prefill`: the causal conv + SiLU over b right-padded segments from their carried conv states,
  reading the in_proj output in place (strided rows) and writing row-major: no transposed copies;
- `conv_window`: the conv state at any point of a segment (its last k-1 inputs, reaching back into the
  old state): each segment's new state after its real length, and the states at capture points.
- `state_pass`: the chunked scan's state passing from and to the live pool's slots: mamba-ssm's stage with
  each row's initial state read from its slot and its final one written there, in one kernel. The gathers,
  scatters and copies of the rows' fp32 states (2.6 MB a row a layer on mamba2-2.7b) that it replaces took
  51 of the 230 ms of device time of a 64 x 200-token batched pass on an H200;
- `final_states`: each fresh sequence's final ssm state of a packed row (`server.model.gpu_packed`), written
  straight into its slot: mamba-ssm's `chunk_state_varlen` and the scatter after it, in one kernel that skips
  the layout's padding sequences. The two took 23 of the 200 ms of device time of a 64 x 200-token packed pass
  on mamba2-2.7b (an H200, session 22), for 65 sequences a layer whatever the rows;
- `chunk_scan`, `chunk_state`: two stages of the Mamba2 chunked scan, mamba-ssm's `_chunk_scan_fwd` and
  `_chunk_state_fwd` in other blocks: the outputs with the state entering each chunk loaded once per head
  (faster at every length measured), and each chunk's own state for a packed row (1.6x faster there);
- `selective_scan`: the Mamba1 scan over a segment starting from an initial state (mamba-ssm's
  `selective_scan_fn` has no initial-state argument), sequential in time, parallel over channels.

Shape letters as in `server.model.config`; S is the number of slots in the live pool.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _softplus(x: tl.tensor) -> tl.tensor:
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _conv_step_kernel(
    x_ptr, state_ptr, w_ptr, b_ptr, idx_ptr, out_ptr,
    c,
    stride_xb, stride_ss, stride_sc, stride_sk, stride_wc, stride_wk, stride_ob,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < c
    slot = tl.load(idx_ptr + row).to(tl.int64)
    out_ptrs = out_ptr + row * stride_ob + offs
    if slot < 0:
        tl.store(out_ptrs, tl.zeros([BLOCK_C], dtype=out_ptr.dtype.element_ty), mask=mask)
        return
    srow = state_ptr + slot * stride_ss + offs * stride_sc
    wrow = w_ptr + offs * stride_wc
    x = tl.load(x_ptr + row * stride_xb + offs, mask=mask, other=0.0)
    acc = tl.load(wrow + (K - 1) * stride_wk, mask=mask, other=0.0).to(tl.float32) * x.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(K - 1):
        s = tl.load(srow + k * stride_sk, mask=mask, other=0.0)
        acc += tl.load(wrow + k * stride_wk, mask=mask, other=0.0).to(tl.float32) * s.to(tl.float32)
        if k > 0:  # shift left: the value at k moves to k-1 (already read by this thread)
            tl.store(srow + (k - 1) * stride_sk, s, mask=mask)
    tl.store(srow + (K - 2) * stride_sk, x.to(state_ptr.dtype.element_ty), mask=mask)
    out = acc * tl.sigmoid(acc)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def conv_step(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor) -> Tensor:
    """x: (b, c) (rows may be strided, channels contiguous); state: (S, c, k-1) updated in place;
    weight: (c, k); bias: (c,) | None; idx: (b,) int slot per row, -1 = padding. Returns (b, c)."""
    b, c = x.shape
    k = weight.shape[-1]
    assert x.stride(-1) == 1 and state.shape[1:] == (c, k - 1) and idx.shape == (b,)
    out = torch.empty(b, c, dtype=x.dtype, device=x.device)  # (b, c)
    block = min(1024, triton.next_power_of_2(c))
    grid = (b, triton.cdiv(c, block))
    _conv_step_kernel[grid](
        x, state, weight, bias, idx, out,
        c,
        x.stride(0), state.stride(0), state.stride(1), state.stride(2), weight.stride(0), weight.stride(1),
        out.stride(0),
        K=k, HAS_BIAS=bias is not None, BLOCK_C=block, num_warps=4,
    )  # fmt: skip
    return out


@triton.jit
def _conv_prefill_kernel(
    x_ptr, state_ptr, w_ptr, b_ptr, out_ptr, start_ptr,
    length, c,
    stride_xb, stride_xl, stride_sb, stride_sc, stride_sk, stride_wc, stride_wk, stride_ob, stride_ol,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_START: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    seq = tl.program_id(2).to(tl.int64)
    x_ptr += seq * stride_xb
    state_ptr += seq * stride_sb
    out_ptr += seq * stride_ob
    mask_c = chans < c
    mask = (rows < length)[:, None] & mask_c[None, :]
    first = rows * 0  # the first input each position may read (a packed row: its sequence's start)
    if HAS_START:
        first = tl.load(start_ptr + rows, mask=rows < length, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + chans, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(K):
        src = rows - (K - 1) + j  # input position; < 0 reads the carried state
        w = tl.load(w_ptr + chans * stride_wc + j * stride_wk, mask=mask_c, other=0.0).to(tl.float32)
        from_x = tl.load(
            x_ptr + src[:, None] * stride_xl + chans[None, :],
            mask=mask & ((src >= 0) & (src >= first))[:, None],
            other=0.0,
        ).to(tl.float32)
        acc += from_x * w[None, :]
    if tl.program_id(0) * BLOCK_L < K - 1:  # only the first block's first rows reach into the state
        for j in tl.static_range(K - 1):
            src = rows - (K - 1) + j
            w = tl.load(w_ptr + chans * stride_wc + j * stride_wk, mask=mask_c, other=0.0).to(tl.float32)
            from_state = tl.load(
                state_ptr + (src + K - 1)[:, None] * stride_sk + chans[None, :] * stride_sc,
                mask=mask & (src < 0)[:, None],
                other=0.0,
            ).to(tl.float32)
            acc += from_state * w[None, :]
    out = acc * tl.sigmoid(acc)
    tl.store(
        out_ptr + rows[:, None] * stride_ol + chans[None, :], out.to(out_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _conv_window_kernel(
    x_ptr, state_ptr, rows_ptr, pos_ptr, start_ptr, out_ptr,
    length, c,
    stride_xb, stride_xl, stride_sb, stride_sc, stride_sk, stride_ot, stride_oc, stride_ok,
    K1: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_POS: tl.constexpr, HAS_START: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = chans < c
    seq = t.to(tl.int64)
    if HAS_ROWS:
        seq = tl.load(rows_ptr + t).to(tl.int64)
    pos = (t * 0 + length).to(tl.int64)  # (a tensor even where `length` is specialised to a constant)
    if HAS_POS:
        pos = tl.load(pos_ptr + t).to(tl.int64)
    first = pos * 0  # inputs before it read as 0 (a packed row: the point's sequence starts there)
    if HAS_START:
        first = tl.load(start_ptr + t).to(tl.int64)
    for j in tl.static_range(K1):
        src = pos - K1 + j  # input position; < 0 reads the old state
        from_x = tl.load(
            x_ptr + seq * stride_xb + src * stride_xl + chans,
            mask=mask & (src >= 0) & (src >= first),
            other=0.0,
        )
        state_ptrs = state_ptr + seq * stride_sb + chans * stride_sc + (src + K1) * stride_sk
        from_state = tl.load(state_ptrs, mask=mask & (src < 0), other=0.0)
        dtype = out_ptr.dtype.element_ty
        value = tl.where(src >= 0, from_x.to(dtype), from_state.to(dtype))
        tl.store(out_ptr + t * stride_ot + chans * stride_oc + j * stride_ok, value, mask=mask)


def conv_prefill(
    x: Tensor,
    state: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    block_l: int = 32,
    block_c: int = 128,
    num_warps: int = 4,
    *,
    rows: Tensor | None = None,
    pos: Tensor | None = None,
    start: Tensor | None = None,
    point_start: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The causal conv + SiLU over b segments continuing from their states, in the row-major layout (no
    transposes), and the conv states at chosen points (`conv_window`).

    x: (b, l, c) with contiguous channels (rows and sequences may be strided); state: (b, c, k-1);
    weight: (c, 1, k); rows, pos, point_start: as in `conv_window` (default: every sequence after all l
    inputs). start: (l,) int, for b = 1 holding several fresh sequences back to back (a packed row): the
    position where each position's sequence starts; inputs before it read as 0 (the zero state of a
    sequence that starts there), so no sequence sees another's inputs.
    Returns (out (b, l, c) contiguous, states (t, c, k-1)); for b = 1 and no points, like
    `server.model.layers.causal_conv`. Right padding is harmless: causality keeps it out of real outputs.
    Only the first block's rows read the carried state: as masked loads in every block, 8,192 tokens of
    mamba2-2.7b's 5,376 channels took 267-297 us against 147-174 us now (an H200, session 23)."""
    b, length, c = x.shape
    k = weight.shape[-1]
    assert x.stride(-1) == 1 and state.shape == (b, c, k - 1)
    w = weight[:, 0, :]  # (c, k)
    out = torch.empty(b, length, c, dtype=x.dtype, device=x.device)  # (b, l, c)
    block_c = min(block_c, triton.next_power_of_2(c))
    grid = (triton.cdiv(length, block_l), triton.cdiv(c, block_c), b)
    assert start is None or (b == 1 and start.shape == (length,))
    _conv_prefill_kernel[grid](
        x, state, w, bias, out, start,
        length, c,
        x.stride(0), x.stride(1), state.stride(0), state.stride(1), state.stride(2), w.stride(0), w.stride(1),
        out.stride(0), out.stride(1),
        K=k, HAS_BIAS=bias is not None, HAS_START=start is not None, BLOCK_L=block_l, BLOCK_C=block_c,
        num_warps=num_warps,
    )  # fmt: skip
    return out, conv_window(x, state, rows, pos, point_start)


def conv_window(
    x: Tensor,
    state: Tensor,
    rows: Tensor | None = None,
    pos: Tensor | None = None,
    start: Tensor | None = None,
) -> Tensor:
    """The conv state of sequence rows[i] after its first pos[i] inputs: the k-1 inputs before that point,
    reaching back into the sequence's old state when pos[i] < k-1.

    x: (b, l, c) with contiguous channels; state: (b, c, k-1); rows: (t,) int sequence per point (None:
    t = b, point i in sequence i); pos: (t,) int in [0, l] (None: l for every point); start: (t,) int
    (None: 0), for a packed row: where point i's sequence starts, whose inputs before it read as 0.
    Returns (t, c, k-1) in the state's dtype."""
    b, length, c = x.shape
    k1 = state.shape[-1]
    assert x.stride(-1) == 1 and state.shape == (b, c, k1)
    count = rows.shape[0] if rows is not None else pos.shape[0] if pos is not None else b
    assert rows is not None or count == b
    out = torch.empty(count, c, k1, dtype=state.dtype, device=x.device)  # (t, c, k-1)
    block = min(1024, triton.next_power_of_2(c))
    assert start is None or start.shape == (count,)
    _conv_window_kernel[(count, triton.cdiv(c, block))](
        x, state, rows, pos, start, out,
        length, c,
        x.stride(0), x.stride(1), state.stride(0), state.stride(1), state.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        K1=k1, HAS_ROWS=rows is not None, HAS_POS=pos is not None, HAS_START=start is not None, BLOCK_C=block,
        num_warps=4,
    )  # fmt: skip
    return out


@triton.jit
def _ssm_step_kernel(
    state_ptr, x_ptr, dt_ptr, dt_bias_ptr, a_ptr, b_ptr, c_ptr, d_ptr, idx_ptr, out_ptr,
    p, n, heads_per_group, dt_lo, dt_hi,
    stride_ss, stride_sh, stride_sp,
    stride_xb, stride_xh, stride_dtb, stride_bb, stride_bg, stride_cb, stride_cg,
    stride_dh, stride_dp, stride_ob, stride_oh,
    HAS_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    row = tl.program_id(1)
    head = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < p
    out_ptrs = out_ptr + row * stride_ob + head * stride_oh + offs_p
    slot = tl.load(idx_ptr + row).to(tl.int64)
    if slot < 0:
        tl.store(out_ptrs, tl.zeros([BLOCK_P], dtype=out_ptr.dtype.element_ty), mask=mask_p)
        return
    dt = tl.load(dt_ptr + row * stride_dtb + head).to(tl.float32) + tl.load(dt_bias_ptr + head).to(tl.float32)
    dt = tl.minimum(tl.maximum(_softplus(dt), dt_lo), dt_hi)
    decay = tl.exp(dt * tl.load(a_ptr + head).to(tl.float32))
    group = head // heads_per_group
    mask_n = offs_n < n
    bv = tl.load(b_ptr + row * stride_bb + group * stride_bg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    cv = tl.load(c_ptr + row * stride_cb + group * stride_cg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * stride_xb + head * stride_xh + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    s_ptrs = state_ptr + slot * stride_ss + head * stride_sh + offs_p[:, None] * stride_sp + offs_n[None, :]
    mask = mask_p[:, None] & mask_n[None, :]
    s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)  # fp32 or bf16 pool; fp32 maths
    s = s * decay + (dt * x)[:, None] * bv[None, :]
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(s * cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(d_ptr + head * stride_dh + offs_p * stride_dp, mask=mask_p, other=0.0).to(tl.float32)
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_p)


def ssm_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    dt_bias: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    idx: Tensor,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    block_p: int = 16,
    num_warps: int = 4,
) -> Tensor:
    """state: (S, h, p, n) fp32 or bf16, in place (fp32 maths, rounded to the state's dtype on store);
    x: (b, h, p); dt: (b, h) raw (before bias and softplus); dt_bias, A: (h,) fp32; B, C: (b, g, n);
    D: (h,) or (h, p); idx: (b,). Returns y (b, h, p) in x's dtype, without the gate (from the fp32 state)."""
    b, h, p = x.shape
    n = state.shape[-1]
    assert state.stride(-1) == 1 and x.stride(-1) == 1 and dt.stride(-1) == 1
    assert B.stride(-1) == 1 and C.stride(-1) == 1 and state.dtype in (torch.float32, torch.bfloat16)
    out = torch.empty(b, h, p, dtype=x.dtype, device=x.device)  # (b, h, p)
    d2 = D if D is None or D.dim() == 2 else D.unsqueeze(-1).expand(h, p)
    block_p = min(block_p, triton.next_power_of_2(p))
    grid = (triton.cdiv(p, block_p), b, h)
    _ssm_step_kernel[grid](
        state, x, dt, dt_bias, A, B, C, d2, idx, out,
        p, n, h // B.shape[1], float(dt_limit[0]), min(float(dt_limit[1]), 3.0e38),
        state.stride(0), state.stride(1), state.stride(2),
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        d2.stride(0) if d2 is not None else 0, d2.stride(1) if d2 is not None else 0,
        out.stride(0), out.stride(1),
        HAS_D=d2 is not None, BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(n), num_warps=num_warps,
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["chunks"])
def _state_pass_kernel(
    own_ptr, da_ptr, pool_ptr, slot_ptr, out_ptr,
    dim, chunks,
    stride_ob, stride_oc, stride_oh, stride_ab, stride_ah, stride_ac,
    stride_ps, stride_ph, stride_eb, stride_ec, stride_eh,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row = tl.program_id(1)
    head = tl.program_id(2)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    slot = tl.load(slot_ptr + row).to(tl.int64)
    pool_ptrs = pool_ptr + slot * stride_ps + head * stride_ph + offs
    state = tl.load(pool_ptrs, mask=mask, other=0.0).to(tl.float32)
    own_ptrs = own_ptr + row * stride_ob + head * stride_oh + offs
    out_ptrs = out_ptr + row * stride_eb + head * stride_eh + offs
    da_ptrs = da_ptr + row * stride_ab + head * stride_ah
    for c in range(chunks):
        tl.store(out_ptrs + c * stride_ec, state, mask=mask)
        own = tl.load(own_ptrs + c * stride_oc, mask=mask, other=0.0).to(tl.float32)
        state = tl.exp(tl.load(da_ptrs + c * stride_ac).to(tl.float32)) * state + own
    tl.store(pool_ptrs, state.to(pool_ptr.dtype.element_ty), mask=mask)


def state_pass(own: Tensor, da_last: Tensor, pool: Tensor, slots: Tensor, block: int = 1024) -> Tensor:
    """The chunked scan's state passing with the states in the live pool: row r starts from slot slots[r]'s
    state and leaves there its state after its last chunk (fp32 maths, rounded to the pool's dtype on store).

    own: (b, c, h, d) fp32, each chunk's own end state (from 0 within the chunk); da_last: (b, h, c) fp32, the
    log decay across each chunk; pool: (S, h, d) fp32 or bf16, in place; slots: (b,) long, distinct but for rows
    whose chunks leave the state as it was (own 0, decay 0: a padding row may share a slot). Returns the states
    entering the chunks (b, c, h, d) fp32: mamba-ssm's `_state_passing_fwd` with the initial states gathered
    from the pool and the final states scattered back, without either copy."""
    b, c, h, d = own.shape
    assert own.stride(-1) == 1 and pool.stride(-1) == 1 and pool.shape[1:] == (h, d)
    assert da_last.shape == (b, h, c) and pool.dtype in (torch.float32, torch.bfloat16)
    out = torch.empty_like(own, dtype=torch.float32)
    block = min(block, triton.next_power_of_2(d))
    _state_pass_kernel[(triton.cdiv(d, block), b, h)](
        own, da_last, pool, slots, out,
        d, c,
        own.stride(0), own.stride(1), own.stride(2), da_last.stride(0), da_last.stride(1), da_last.stride(2),
        pool.stride(0), pool.stride(1), out.stride(0), out.stride(1), out.stride(2),
        BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out


@triton.jit
def _final_state_kernel(
    x_ptr, b_ptr, dt_ptr, da_ptr, enter_ptr, cu_ptr, slot_ptr, pool_ptr,
    p, n, chunk, heads_per_group, skip,
    stride_xt, stride_xh, stride_xp, stride_bt, stride_bg, stride_bn, stride_dh, stride_dc, stride_dk,
    stride_ec, stride_eh, stride_ep, stride_en, stride_ps, stride_ph, stride_pp, stride_pn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    if slot != skip:
        blocks_n = tl.cdiv(n, BLOCK_N)
        offs_m = (pid // blocks_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (pid % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < p, offs_n < n
        start = tl.load(cu_ptr + seq)
        end = tl.load(cu_ptr + seq + 1)
        c = (end - 1) // chunk  # the chunk of the sequence's last token
        base = c * chunk
        dt_c = dt_ptr + head * stride_dh + c * stride_dc
        da_c = da_ptr + head * stride_dh + c * stride_dc
        da_end = tl.load(da_c + (end - 1 - base) * stride_dk)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(tl.maximum(start, base), end, BLOCK_K):  # the sequence's tokens in chunk c
            t = k + tl.arange(0, BLOCK_K)
            inside = t < end
            da = tl.load(da_c + (t - base) * stride_dk, mask=inside, other=0.0)
            dt = tl.load(dt_c + (t - base) * stride_dk, mask=inside, other=0.0)
            weight = tl.where(inside, tl.exp(tl.minimum(da_end - da, 0.0)) * dt, 0.0)  # (K,)
            xs = tl.load(
                x_ptr + t[None, :] * stride_xt + head * stride_xh + offs_m[:, None] * stride_xp,
                mask=mask_m[:, None] & inside[None, :],
                other=0.0,
            )  # (M, K)
            bs = tl.load(
                b_ptr
                + t[:, None] * stride_bt
                + (head // heads_per_group) * stride_bg
                + offs_n[None, :] * stride_bn,
                mask=inside[:, None] & mask_n[None, :],
                other=0.0,
            ).to(tl.float32)  # (K, N)
            acc += tl.dot(xs, (bs * weight[:, None]).to(xs.dtype))
        if start < base:  # the sequence entered chunk c with a state: decayed across the chunk up to its end
            block = offs_m[:, None] * stride_ep + offs_n[None, :] * stride_en
            entering = tl.load(
                enter_ptr + c * stride_ec + head * stride_eh + block, mask=mask_m[:, None] & mask_n[None, :]
            )
            acc += entering * tl.exp(da_end)
        out = (
            pool_ptr
            + slot * stride_ps
            + head * stride_ph
            + offs_m[:, None] * stride_pp
            + offs_n[None, :] * stride_pn
        )
        tl.store(out, acc.to(pool_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def final_states(
    x: Tensor,
    B: Tensor,
    dt: Tensor,
    dA_cumsum: Tensor,
    entering: Tensor,
    cu: Tensor,
    pool: Tensor,
    slots: Tensor,
    skip: int,
    block_n: int = 128,
    num_warps: int = 8,
) -> None:
    """Each fresh sequence's final ssm state of a packed row (sequences back to back, `seq_idx`), written
    straight into its slot of the live pool: the last chunk's partial sum of the sequence's own tokens, plus
    the state it entered that chunk with (when it began before it) decayed to its end. mamba-ssm's
    `chunk_state_varlen` and a scatter into the pool in one kernel, with no work for sequences on the `skip`
    slot (a packed layout's padding sequences: `server.model.gpu_packed`).

    x: (T, h, p); B: (T, g, n); dt, dA_cumsum: (h, c, chunk) fp32, the scan's dt and its cumsum within each
    chunk; entering: (c, h, p, n) fp32, the states entering the chunks (reset where a new sequence begins);
    cu: (S + 1,) int32 the sequences' bounds; pool: (slots, h, p, n) fp32 or bf16, in place; slots: (S,) long,
    distinct but for `skip`; a sequence on another slot must be non-empty. Blocks of 64 x 128 state entries
    and 8 warps: 183 us for 41 sequences of 197 tokens on mamba2-2.7b's heads, against 201-210 us for the
    others tried (an H200, session 23)."""
    _, h, p = x.shape
    n = B.shape[-1]
    assert dt.shape == dA_cumsum.shape and dt.stride() == dA_cumsum.stride() and dt.shape[0] == h
    assert entering.shape == (dt.shape[1], h, p, n) and pool.shape[1:] == (h, p, n)
    assert cu.shape == (slots.shape[0] + 1,) and cu.dtype == torch.int32
    block_m, block_n = (
        max(16, min(64, triton.next_power_of_2(p))),
        max(16, min(block_n, triton.next_power_of_2(n))),
    )
    grid = (triton.cdiv(p, block_m) * triton.cdiv(n, block_n), slots.shape[0], h)
    _final_state_kernel[grid](
        x, B, dt, dA_cumsum, entering, cu, slots, pool,
        p, n, dt.shape[-1], h // B.shape[1], skip,
        x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
        dt.stride(0), dt.stride(1), dt.stride(2),
        entering.stride(0), entering.stride(1), entering.stride(2), entering.stride(3),
        pool.stride(0), pool.stride(1), pool.stride(2), pool.stride(3),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32, num_warps=num_warps,
    )  # fmt: skip


@triton.jit
def _chunk_scan_kernel(
    cb_ptr, x_ptr, dt_ptr, da_ptr, c_ptr, s_ptr, d_ptr, seq_ptr, y_ptr,
    chunk, p, n, batch, length, heads_per_group,
    stride_cbb, stride_cbc, stride_cbg, stride_cbm, stride_cbk,
    stride_xb, stride_xl, stride_xh, stride_xp, stride_db, stride_dh, stride_dc, stride_dk,
    stride_cb, stride_cl, stride_cg, stride_cn, stride_sb, stride_sc, stride_sh, stride_sp, stride_sn,
    stride_dd, stride_qb, stride_ql, stride_yb, stride_yl, stride_yh, stride_yp,
    HAS_D: tl.constexpr, D_HAS_P: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    pid_bc = tl.program_id(1)
    c = pid_bc // batch
    b = pid_bc - c * batch
    head = tl.program_id(2)
    group = head // heads_per_group
    base = c.to(tl.int64) * chunk
    limit = tl.minimum(chunk, length - base)  # this chunk's tokens (the last chunk may be short)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    mask_n, mask_s = offs_n < p, offs_s < n
    cb_ptr += b * stride_cbb + c * stride_cbc + group * stride_cbg
    x_ptr += b * stride_xb + base * stride_xl + head * stride_xh
    dt_ptr += b * stride_db + head * stride_dh + c * stride_dc
    da_ptr += b * stride_db + head * stride_dh + c * stride_dc
    c_ptr += b * stride_cb + base * stride_cl + group * stride_cg
    y_ptr += b * stride_yb + base * stride_yl + head * stride_yh
    # the state entering the chunk, loaded once for all its rows, rounded to C's dtype for the product
    entering = tl.load(
        s_ptr
        + b * stride_sb
        + c * stride_sc
        + head * stride_sh
        + offs_s[:, None] * stride_sn
        + offs_n[None, :] * stride_sp,
        mask=mask_s[:, None] & mask_n[None, :],
        other=0.0,
    ).to(c_ptr.dtype.element_ty)  # (S, N)
    seq_prev = 0
    if HAS_SEQ:  # the sequence the entering state belongs to: the previous chunk's last token's
        seq_ptr += b * stride_qb + base * stride_ql
        seq_prev = tl.load(seq_ptr - stride_ql, mask=c >= 1, other=0)
    skip = 0.0
    if HAS_D:
        if D_HAS_P:
            skip = tl.load(d_ptr + head * stride_dd + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        else:
            skip = tl.load(d_ptr + head * stride_dd).to(tl.float32)
    for m0 in range(0, limit, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < limit
        da_m = tl.load(da_ptr + offs_m * stride_dk, mask=mask_m, other=0.0)
        scale = tl.exp(da_m)
        if HAS_SEQ:  # a row whose sequence began inside this chunk does not see the entering state
            seq_m = tl.load(seq_ptr + offs_m * stride_ql, mask=mask_m, other=-1)
            scale = tl.where(seq_m == seq_prev, scale, 0.0)
        c_m = tl.load(
            c_ptr + offs_m[:, None] * stride_cl + offs_s[None, :] * stride_cn,
            mask=mask_m[:, None] & mask_s[None, :],
            other=0.0,
        )  # (M, S)
        acc = tl.dot(c_m, entering) * scale[:, None]  # (M, N) fp32
        for k0 in range(0, tl.minimum(m0 + BLOCK_M, limit), BLOCK_K):  # causal: tokens up to the block's last
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < limit
            # C_m . B_k (zero across sequences), decayed from k to m, times dt_k
            cb = tl.load(
                cb_ptr + offs_m[:, None] * stride_cbm + offs_k[None, :] * stride_cbk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            ).to(tl.float32)
            da_k = tl.load(da_ptr + offs_k * stride_dk, mask=mask_k, other=0.0)
            dt_k = tl.load(dt_ptr + offs_k * stride_dk, mask=mask_k, other=0.0)
            cb *= tl.exp(tl.minimum(da_m[:, None] - da_k[None, :], 0.0)) * dt_k[None, :]
            cb = tl.where(offs_m[:, None] >= offs_k[None, :], cb, 0.0)
            x_k = tl.load(
                x_ptr + offs_k[:, None] * stride_xl + offs_n[None, :] * stride_xp,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )  # (K, N)
            acc += tl.dot(cb.to(x_k.dtype), x_k)
        block = mask_m[:, None] & mask_n[None, :]
        if HAS_D:
            x_m = tl.load(
                x_ptr + offs_m[:, None] * stride_xl + offs_n[None, :] * stride_xp, mask=block, other=0.0
            )
            acc += x_m.to(tl.float32) * skip
        tl.store(
            y_ptr + offs_m[:, None] * stride_yl + offs_n[None, :] * stride_yp,
            acc.to(y_ptr.dtype.element_ty),
            mask=block,
        )


def chunk_scan(
    cb: Tensor,
    x: Tensor,
    dt: Tensor,
    dA_cumsum: Tensor,
    C: Tensor,
    states: Tensor,
    D: Tensor | None = None,
    seq_idx: Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    block_k: int = 32,
    num_warps: int = 4,
    num_stages: int = 1,
) -> Tensor:
    """The chunked scan's outputs: mamba-ssm's `_chunk_scan_fwd` (causal, no z), with one program per chunk,
    head and block of the head's channels, which loads the state entering the chunk once and walks the
    chunk's rows in blocks (mamba-ssm's has a program per block of rows, each loading that state again:
    32 KB of fp32 a head a chunk on mamba2-2.7b). On an H200 at mamba2-2.7b's heads (session 26, two calls),
    a packed row of 41 x 197 tokens takes 251-252 us against mamba-ssm's 265-266, one sequence of 8,192
    tokens 232-233 against 277-279, and of 32,768 tokens 919-947 against 1,105-1,156; the blocks are the
    best of 27 tried there (more stages of pipelining lose: 344-406 us on the packed row).

    cb: (b, c, g, L, L), C_t . B_s within each chunk (zero across sequences where `seq_idx` is given);
    x: (b, l, h, p); dt, dA_cumsum: (b, h, c, L) fp32; C: (b, l, g, n); states: (b, c, h, p, n), the states
    entering the chunks; D: (h,) or (h, p); seq_idx: (b, l) int32, sequences packed in a row -> y (b, l, h, p)
    in x's dtype, with the D skip. The entering states and the decayed cb are rounded to C's and x's dtype for
    their products, as mamba-ssm's kernel does."""
    b, length, h, p = x.shape
    _, _, chunks, chunk = dt.shape
    g, n = C.shape[-2:]
    assert cb.shape == (b, chunks, g, chunk, chunk) and states.shape == (b, chunks, h, p, n)
    assert dA_cumsum.shape == dt.shape == (b, h, chunks, chunk) and dA_cumsum.stride() == dt.stride()
    assert C.shape == (b, length, g, n) and h % g == 0
    y = torch.empty(b, length, h, p, dtype=x.dtype, device=x.device)
    block_n = max(16, min(block_n, triton.next_power_of_2(p)))
    block_m = max(16, min(block_m, triton.next_power_of_2(chunk)))
    block_k = max(16, min(block_k, triton.next_power_of_2(chunk)))
    seq = (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
    _chunk_scan_kernel[(triton.cdiv(p, block_n), b * chunks, h)](
        cb, x, dt, dA_cumsum, C, states, D, seq_idx, y,
        chunk, p, n, b, length, h // g,
        *cb.stride(), *x.stride(), dt.stride(0), dt.stride(1), dt.stride(2), dt.stride(3),
        *C.stride(), *states.stride(),
        D.stride(0) if D is not None else 0, *seq, *y.stride(),
        HAS_D=D is not None, D_HAS_P=D is not None and D.dim() == 2, HAS_SEQ=seq_idx is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_S=max(16, triton.next_power_of_2(n)),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y


@triton.jit
def _chunk_state_kernel(
    x_ptr, b_ptr, dt_ptr, da_ptr, seq_ptr, out_ptr,
    chunk, p, n, batch, length, heads_per_group,
    stride_xb, stride_xl, stride_xh, stride_xp, stride_bb, stride_bl, stride_bg, stride_bn,
    stride_db, stride_dh, stride_dc, stride_dk, stride_qb, stride_ql,
    stride_ob, stride_oc, stride_oh, stride_op, stride_on,
    HAS_SEQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_bc = tl.program_id(1)
    c = pid_bc // batch
    b = pid_bc - c * batch
    head = tl.program_id(2)
    blocks_n = tl.cdiv(n, BLOCK_N)
    offs_m = (tl.program_id(0) // blocks_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(0) % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < p, offs_n < n
    base = c.to(tl.int64) * chunk
    limit = tl.minimum(chunk, length - base)
    x_ptr += b * stride_xb + base * stride_xl + head * stride_xh
    b_ptr += b * stride_bb + base * stride_bl + (head // heads_per_group) * stride_bg
    dt_ptr += b * stride_db + head * stride_dh + c * stride_dc
    da_ptr += b * stride_db + head * stride_dh + c * stride_dc
    da_last = tl.load(da_ptr + (chunk - 1) * stride_dk)  # past a short last chunk's end, dt is 0
    seq_last = 0
    if HAS_SEQ:  # only the chunk's last sequence's tokens count: its state is the one passed on
        seq_ptr += b * stride_qb + base * stride_ql
        seq_last = tl.load(seq_ptr + (limit - 1) * stride_ql)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, limit, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < limit
        da_k = tl.load(da_ptr + offs_k * stride_dk, mask=mask_k, other=0.0)
        dt_k = tl.load(dt_ptr + offs_k * stride_dk, mask=mask_k, other=0.0)
        scale = tl.exp(tl.minimum(da_last - da_k, 0.0)) * dt_k
        if HAS_SEQ:
            seq_k = tl.load(seq_ptr + offs_k * stride_ql, mask=mask_k, other=-1)
            scale = tl.where(seq_k == seq_last, scale, 0.0)
        x_k = tl.load(
            x_ptr + offs_m[:, None] * stride_xp + offs_k[None, :] * stride_xl,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # (M, K)
        b_k = tl.load(
            b_ptr + offs_k[:, None] * stride_bl + offs_n[None, :] * stride_bn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)  # (K, N)
        acc += tl.dot(x_k, (b_k * scale[:, None]).to(x_k.dtype))
    tl.store(
        out_ptr + b * stride_ob + c * stride_oc + head * stride_oh + offs_m[:, None] * stride_op
        + offs_n[None, :] * stride_on,
        acc,
        mask=mask_m[:, None] & mask_n[None, :],
    )  # fmt: skip


def chunk_state(
    B: Tensor,
    x: Tensor,
    dt: Tensor,
    dA_cumsum: Tensor,
    seq_idx: Tensor | None = None,
    block_n: int = 64,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
) -> Tensor:
    """Each chunk's own end state (from 0 within the chunk): mamba-ssm's `_chunk_state_fwd` with fp32 states,
    for a packed row: on an H200 at mamba2-2.7b's heads (session 26, two calls), 41 x 197 tokens with
    `seq_idx` take 91 us against mamba-ssm's 102-149 (its autotuner's pick depends on the first shape it
    meets; these blocks are the best of 16 tried). On one long sequence mamba-ssm's is faster where it picks
    well (289 against 325 us for 32,768 tokens), so the runner calls this one for packed rows only.

    B: (b, l, g, n); x: (b, l, h, p); dt, dA_cumsum: (b, h, c, L) fp32; seq_idx: (b, l) int32 (only the
    tokens of the sequence that ends the chunk count) -> (b, c, h, p, n) fp32."""
    b, length, h, p = x.shape
    _, _, chunks, chunk = dt.shape
    g, n = B.shape[-2:]
    assert B.shape == (b, length, g, n) and h % g == 0
    assert dA_cumsum.shape == dt.shape == (b, h, chunks, chunk) and dA_cumsum.stride() == dt.stride()
    out = torch.empty(b, chunks, h, p, n, dtype=torch.float32, device=x.device)
    block_m = max(16, min(64, triton.next_power_of_2(p)))
    block_n = max(16, min(block_n, triton.next_power_of_2(n)))
    block_k = max(16, min(block_k, triton.next_power_of_2(chunk)))
    seq = (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
    _chunk_state_kernel[(triton.cdiv(p, block_m) * triton.cdiv(n, block_n), b * chunks, h)](
        x, B, dt, dA_cumsum, seq_idx, out,
        chunk, p, n, b, length, h // g,
        *x.stride(), *B.stride(), *dt.stride(), *seq, *out.stride(),
        HAS_SEQ=seq_idx is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


@triton.jit
def _scan_kernel(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, h0_ptr, y_ptr, hout_ptr,
    length, e, n,
    stride_xb, stride_xl, stride_dtb, stride_dtl, stride_ae,
    stride_bb, stride_bl, stride_cb, stride_cl, stride_zb, stride_zl,
    stride_hb, stride_he, stride_yb, stride_yl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    bi = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_e = offs_e < e
    mask_n = offs_n < n
    mask = mask_e[:, None] & mask_n[None, :]
    h_ptrs = bi * stride_hb + offs_e[:, None] * stride_he + offs_n[None, :]
    h = tl.load(h0_ptr + h_ptrs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs_e[:, None] * stride_ae + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    d = tl.zeros([BLOCK_E], dtype=tl.float32)
    if HAS_D:
        d = tl.load(d_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    for t in range(length):
        x = tl.load(x_ptr + bi * stride_xb + t * stride_xl + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + bi * stride_dtb + t * stride_dtl + offs_e, mask=mask_e, other=0.0).to(
            tl.float32
        )
        bv = tl.load(b_ptr + bi * stride_bb + t * stride_bl + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        cv = tl.load(c_ptr + bi * stride_cb + t * stride_cl + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        h = h * tl.exp(dt[:, None] * a) + (dt * x)[:, None] * bv[None, :]
        y = tl.sum(h * cv[None, :], axis=1) + d * x
        if HAS_Z:
            z = tl.load(z_ptr + bi * stride_zb + t * stride_zl + offs_e, mask=mask_e, other=0.0).to(
                tl.float32
            )
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + bi * stride_yb + t * stride_yl + offs_e, y, mask=mask_e)
    tl.store(hout_ptr + h_ptrs, h, mask=mask)


def selective_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None, h0: Tensor
) -> tuple[Tensor, Tensor]:
    """Mamba1: x, dt (softplus'ed), z: (b, l, e); A: (e, n) fp32; B, C: (b, l, n); D: (e,); h0: (b, e, n).

    Returns (y (b, l, e) fp32 including the D skip and the silu(z) gate, final state (b, e, n) fp32)."""
    b, length, e = x.shape
    n = A.shape[-1]
    for t in (x, dt, B, C) + ((z,) if z is not None else ()):
        assert t.stride(-1) == 1
    h0 = h0.float().contiguous()
    y = torch.empty(b, length, e, dtype=torch.float32, device=x.device)  # (b, l, e)
    h_out = torch.empty_like(h0)  # (b, e, n)
    block_e = min(64, triton.next_power_of_2(e))
    grid = (triton.cdiv(e, block_e), b)
    zs = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
    _scan_kernel[grid](
        x, dt, A, B, C, D, z, h0, y, h_out,
        length, e, n,
        x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), A.stride(0),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1), zs[0], zs[1],
        h0.stride(0), h0.stride(1), y.stride(0), y.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, BLOCK_E=block_e, BLOCK_N=triton.next_power_of_2(n),
        num_warps=4,
    )  # fmt: skip
    return y, h_out
