"""The mixers on the GPU kernels: one object per layer wrapping the torch mixer's weights.

`prefill(u, conv, ssm)` runs a segment of one sequence from its state (the conv carried by our Triton
`conv_prefill`, or torch's conv1d on a transposed copy; the scan with mamba-ssm's chunked SSD kernel or our
Mamba1 scan, both from an initial state);
`prefill_rows(u, conv, ssm, rows)` runs right-padded segments of many sequences at once (`PaddedRows`):
dt is computed outside the scan and set to 0 on the padding, so every row's state passes through its
padding unchanged; it returns the states at the rows' taps: their ends and, for Mamba2, chunk-aligned
points, whose fp32 states come out of the scan's stages (`chunk_scan_states`);
`prefill_slots(u, conv_pool, ssm_pool, slots, rows)` is `prefill_rows` on the live pool's slots, the Mamba2
ssm states read and written inside the scan's state passing (`gpu_ops.state_pass`) instead of gathered into
a batch and scattered back;
`step(u, conv_pool, ssm_pool, idx)` runs one token per row directly on the live pool's layer slice,
rows addressed by slot index (-1 = padding, untouched), so no state is gathered or scattered.
Shapes as in `server.model.config`; S is the number of slots in the pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from server.model.gpu_packed import PackedRows
from server.model.kernels import Kernels, SsdParts
from server.model.layers import PaddedRows, causal_conv
from server.model.mamba1 import Mamba1Mixer
from server.model.mamba2 import Mamba2Mixer

SsmStep = Literal["tssc", "mamba_ssm"]
# triton (default): gpu_ops.conv_prefill, one pass in the row-major layout; torch: conv1d on a transposed copy,
# which on an H100 costs 2.6x the device time (mamba2-2.7b, 8k tokens: 62 ms of cat + conv + SiLU + copy
# across 64 layers against 13 ms; bench/gpu_profile.py)
ConvPrefill = Literal["torch", "triton"]


class ConvStep:
    """One conv token on the pool: causal-conv1d's update kernel when built, else our Triton kernel."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None, kernels: Kernels, ops: ModuleType, prefill: ConvPrefill
    ) -> None:
        self.weight3 = weight  # (c, 1, k)
        self.weight = weight[:, 0, :]  # (c, k)
        self.bias = bias
        self.kernels, self.ops, self.prefill_kind = kernels, ops, prefill

    def prefill(
        self, x: Tensor, state: Tensor, rows: Tensor | None = None, pos: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x: (b, l, c) from `state` (b, c, k-1) -> (silu(conv) (b, l, c) contiguous, the conv states at
        the points (rows, pos) of `gpu_ops.conv_window`: by default each row's after all l inputs)."""
        if self.prefill_kind == "triton":
            out, states = self.ops.conv_prefill(x, state, self.weight3, self.bias, rows=rows, pos=pos)
            return out, states
        out, _ = causal_conv(x, state, self.weight3, self.bias)
        return out.contiguous(), self.ops.conv_window(x, state, rows, pos)

    def __call__(self, x: Tensor, pool: Tensor, idx: Tensor) -> Tensor:
        """x: (b, c); pool: (S, c, k-1) in place; idx: (b,) int32 -> silu(conv) (b, c)."""
        if self.kernels.conv_update is not None:
            out: Tensor = self.kernels.conv_update(
                x.contiguous(), pool, self.weight, self.bias, "silu", None, idx
            )
            return out
        stepped: Tensor = self.ops.conv_step(x, pool, self.weight, self.bias, idx)
        return stepped


class Mamba2Gpu:
    def __init__(
        self, mixer: Mamba2Mixer, kernels: Kernels, ops: ModuleType, ssm_step: SsmStep, conv: ConvPrefill
    ) -> None:
        cfg = mixer.cfg
        self.m, self.cfg, self.k, self.ops, self.ssm_step = mixer, cfg, kernels, ops, ssm_step
        h, p, n = cfg.nheads, cfg.headdim, cfg.d_state
        self.A = -torch.exp(mixer.A_log.detach().float())  # (h,)
        self.dt_bias = mixer.dt_bias.detach().float()  # (h,)
        self.D = mixer.D.detach().float()  # (h,) or (h, p)
        self.conv = ConvStep(mixer.conv1d.weight.detach(), _maybe(mixer.conv1d.bias), kernels, ops, conv)
        # head-tied views for mamba-ssm's selective_state_update (stride 0 over p and n)
        self.A_hpn = self.A[:, None, None].expand(h, p, n)
        self.dt_bias_hp = self.dt_bias[:, None].expand(h, p)
        self.D_hp = self.D if self.D.dim() == 2 else self.D[:, None].expand(h, p)
        self.default_limit = cfg.dt_limit == (0.0, math.inf)

    def _split_xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        gn = cfg.ngroups * cfg.d_state
        x, B, C = xbc.split([cfg.d_inner, gn, gn], dim=-1)
        x = x.unflatten(-1, (cfg.nheads, cfg.headdim))  # (..., h, p)
        return x, B.unflatten(-1, (cfg.ngroups, cfg.d_state)), C.unflatten(-1, (cfg.ngroups, cfg.d_state))

    def _norm_out(self, y: Tensor, z: Tensor) -> Tensor:
        """y, z: (..., e) -> out_proj(rmsnorm(y * silu(z)) per group of `norm.group_size`) (..., d): the
        config's convention, per B/C group or over the whole width (`ModelConfig.norm_group_size`)."""
        norm = self.m.norm
        gated = self.k.gated_rmsnorm
        assert gated is not None
        normed = gated(
            y, norm.weight, None, z=z, eps=norm.eps, group_size=norm.group_size, norm_before_gate=False
        )
        out: Tensor = self.m.out_proj(normed)
        return out

    def prefill(self, u: Tensor, conv: Tensor, ssm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (b, l, d); conv: (b, c, k-1); ssm: (b, h, p, n) -> (out (b, l, d), conv, ssm fp32)."""
        cfg, m = self.cfg, self.m
        z, xbc, dt = m._split_proj(m.in_proj(u))  # (b, l, e), (b, l, c), (b, l, h)
        xbc, conv = self.conv.prefill(xbc, conv)
        x, B, C = self._split_xbc(xbc)  # (b, l, h, p), (b, l, g, n) x2
        scan = self.k.chunk_scan
        assert scan is not None
        y, ssm = scan(
            x, dt, self.A, B, C, cfg.chunk_size, D=self.D, z=None, dt_bias=self.dt_bias, initial_states=ssm,
            dt_softplus=True, dt_limit=cfg.dt_limit, return_final_states=True,
        )  # fmt: skip
        return self._norm_out(y.flatten(-2), z), conv, ssm

    def prefill_rows(
        self, u: Tensor, conv: Tensor, ssm: Tensor, rows: PaddedRows
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded rows: u (b, l, d); conv (b, c, k-1); ssm (b, h, p, n) -> (out (b, l, d), conv
        (t, c, k-1), ssm (t, h, p, n) fp32), the states at the rows' taps. dt is softplus'ed and clamped
        here and zeroed on the padding; the scan then runs without softplus, bias or clamp (a clamp with
        a positive lower bound would lift the padding's dt above 0)."""
        m = self.m
        z, xbc, dt = m._split_proj(m.in_proj(u))  # (b, l, e), (b, l, c), (b, l, h)
        xbc, conv_taps = self.conv.prefill(xbc, conv, rows.tap_row, rows.tap_pos)
        x, B, C = self._split_xbc(xbc)  # (b, l, h, p), (b, l, g, n) x2
        y, ssm_taps = self._scan_rows(x, self._dt(dt, rows.valid), B, C, ssm.float(), rows)
        return self._norm_out(y.flatten(-2), z), conv_taps, ssm_taps

    def prefill_slots(
        self, u: Tensor, conv_pool: Tensor, ssm_pool: Tensor, slots: Tensor, rows: PaddedRows
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`prefill_rows` on the live pool: conv_pool (S, c, k-1) and ssm_pool (S, h, p, n) are this layer's
        slices, slots (b,) long the rows' slots. Each row continues its slot's state and leaves there its state
        after its real tokens; the first b taps of `rows` must be the rows' ends -> (out (b, l, d), conv and
        ssm fp32 states at the other taps (t - b, ...)). The ssm states go from and to the slots inside the
        scan's state passing (`gpu_ops.state_pass`): no gather, scatter or copy of them."""
        m, b = self.m, u.shape[0]
        z, xbc, dt = m._split_proj(m.in_proj(u))  # (b, l, e), (b, l, c), (b, l, h)
        xbc, conv_taps = self.conv.prefill(xbc, conv_pool[slots], rows.tap_row, rows.tap_pos)
        conv_pool[slots] = conv_taps[:b]
        x, B, C = self._split_xbc(xbc)  # (b, l, h, p), (b, l, g, n) x2
        dt = self._dt(dt, rows.valid)
        parts, chunk = self.k.ssd_parts, self.cfg.chunk_size
        if parts is None:
            y, ssm = self._scan_rows(x, dt, B, C, ssm_pool[slots].float(), rows)
            ssm_pool[slots] = ssm[:b].to(ssm_pool.dtype)
            return self._norm_out(y.flatten(-2), z), conv_taps[b:], ssm[b:]
        y, entering = chunk_scan_slots(parts, self.ops, x, dt, self.A, B, C, chunk, self.D, ssm_pool, slots)
        return (
            self._norm_out(y.flatten(-2), z),
            conv_taps[b:],
            _taps_in_pool(entering, ssm_pool, slots, rows, chunk),
        )

    def prefill_packed(
        self, u: Tensor, conv_pool: Tensor, ssm_pool: Tensor, rows: PackedRows, spare: int
    ) -> Tensor:
        """Fresh sequences packed back to back in one row (`server.model.gpu_packed`): u (1, T, d) -> out
        (1, T, d). Each sequence starts from the zero state and leaves its final conv and ssm states in its
        slot, `rows.slots`; those past the real rows, on the `spare` slot, leave their conv states there and
        no ssm state."""
        m = self.m
        z, xbc, dt = m._split_proj(m.in_proj(u))  # (1, T, e), (1, T, c), (1, T, h)
        zero = conv_pool.new_zeros((1, *conv_pool.shape[1:]))  # (1, c, k-1)
        xbc, conv = self.ops.conv_prefill(
            xbc, zero, self.conv.weight3, self.conv.bias, rows=rows.point_rows, pos=rows.ends, start=rows.start,
            point_start=rows.seq_start,
        )  # fmt: skip
        conv_pool[rows.slots] = conv
        x, B, C = self._split_xbc(xbc)  # (1, T, h, p), (1, T, g, n) x2
        parts = self.k.ssd_parts
        assert parts is not None
        y = chunk_scan_packed(parts, self.ops, x, dt, self.A, B, C, self.cfg.chunk_size, self.D, rows, ssm_pool,
                              spare, self.dt_bias, self.cfg.dt_limit)  # fmt: skip
        return self._norm_out(y.flatten(-2), z)

    def _dt(self, dt: Tensor, valid: Tensor | None = None) -> Tensor:
        """dt (b, l, h) raw -> softplus(dt + dt_bias) within dt_limit, fp32, 0 where `valid` (b, l) is False."""
        dt = F.softplus(dt.float() + self.dt_bias)
        if not self.default_limit:
            dt = dt.clamp(*self.cfg.dt_limit)
        return dt if valid is None else dt.masked_fill(~valid.unsqueeze(-1), 0.0)

    def _scan_rows(
        self, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, init: Tensor, rows: PaddedRows
    ) -> tuple[Tensor, Tensor]:
        """-> (y (b, l, h, p) with the D skip, the fp32 state at each tap (t, h, p, n))."""
        chunk, parts = self.cfg.chunk_size, self.k.ssd_parts
        if parts is None:  # the public scan keeps the final states only: every tap is a row end (grain 0)
            scan = self.k.chunk_scan
            assert scan is not None
            y, final = scan(
                x, dt, self.A, B, C, chunk, D=self.D, initial_states=init, return_final_states=True
            )
            return y, rows.ends_at(final)
        y, entering, final = chunk_scan_states(parts, self.ops, x, dt, self.A, B, C, chunk, self.D, init)
        return y, _states_at(entering, final, rows, chunk)

    def step(self, u: Tensor, conv_pool: Tensor, ssm_pool: Tensor, idx: Tensor) -> Tensor:
        """u: (b, d); conv_pool: (S, c, k-1); ssm_pool: (S, h, p, n) fp32, both in place -> (b, d)."""
        m = self.m
        z, xbc, dt = m._split_proj(m.in_proj(u))  # (b, e), (b, c), (b, h)
        x, B, C = self._split_xbc(self.conv(xbc, conv_pool, idx))
        if self.ssm_step == "tssc":
            y = self.ops.ssm_step(ssm_pool, x, dt, self.dt_bias, self.A, B, C, self.D, idx, self.cfg.dt_limit)
        else:
            y = self._upstream_step(ssm_pool, x, dt, B, C, idx)
        return self._norm_out(y.flatten(-2), z)

    def _upstream_step(
        self, pool: Tensor, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, idx: Tensor
    ) -> Tensor:
        ssu = self.k.selective_state_update
        assert ssu is not None
        b, h, p = x.shape
        bias, softplus = self.dt_bias_hp, True
        if not self.default_limit:  # the kernel has no dt_limit: apply softplus and the clamp here
            lo, hi = self.cfg.dt_limit
            dt, bias, softplus = (
                F.softplus(dt.float() + self.dt_bias).clamp(lo, hi),
                self.dt_bias_hp * 0,
                False,
            )
        y: Tensor = ssu(
            pool, x, dt.unsqueeze(-1).expand(b, h, p), self.A_hpn, B, C, self.D_hp, z=None, dt_bias=bias,
            dt_softplus=softplus, state_batch_indices=idx,
        )  # fmt: skip
        return y


class Mamba1Gpu:
    def __init__(self, mixer: Mamba1Mixer, kernels: Kernels, ops: ModuleType, conv: ConvPrefill) -> None:
        self.m, self.cfg, self.k, self.ops = mixer, mixer.cfg, kernels, ops
        self.A = -torch.exp(mixer.A_log.detach().float())  # (e, n)
        self.D = mixer.D.detach().float()  # (e,)
        self.dt_bias = mixer.dt_proj.bias.detach().float()  # (e,)
        self.conv = ConvStep(mixer.conv1d.weight.detach(), _maybe(mixer.conv1d.bias), kernels, ops, conv)

    def _dt_bc(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (..., e) -> dt before bias and softplus (..., e), B, C (..., n)."""
        cfg = self.cfg
        dt, B, C = self.m.x_proj(x).split([cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        return F.linear(dt, self.m.dt_proj.weight), B.contiguous(), C.contiguous()

    def prefill(self, u: Tensor, conv: Tensor, ssm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (b, l, d); conv: (b, e, k-1); ssm: (b, e, n) -> (out (b, l, d), conv, ssm fp32)."""
        return self._mix(u, conv, ssm, None)

    def prefill_rows(
        self, u: Tensor, conv: Tensor, ssm: Tensor, rows: PaddedRows
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded rows, as `Mamba2Gpu.prefill_rows`; every tap must be a row end (Mamba1 has no
        chunk states: the runner's capture grain is 0). dt = 0 on the padding keeps h unchanged there."""
        out, conv_taps, final = self._mix(u, conv, ssm, rows)
        return out, conv_taps, rows.ends_at(final)

    def _mix(
        self, u: Tensor, conv: Tensor, ssm: Tensor, rows: PaddedRows | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (out (b, l, d), conv states (each row's after l inputs, or at the taps of `rows`), final ssm)."""
        m = self.m
        x, z = m.in_proj(u).chunk(2, dim=-1)  # (b, l, e) each
        points = (None, None) if rows is None else (rows.tap_row, rows.tap_pos)
        x, conv = self.conv.prefill(x, conv, *points)  # (b, l, e) contiguous
        dt_raw, B, C = self._dt_bc(x)
        dt = F.softplus(dt_raw.float() + self.dt_bias)  # (b, l, e)
        if rows is not None:
            dt = dt.masked_fill(~rows.valid.unsqueeze(-1), 0.0)
        y, ssm = self.ops.selective_scan(x, dt, self.A, B, C, self.D, z, ssm)
        return m.out_proj(y.to(u.dtype)), conv, ssm

    def prefill_slots(
        self, u: Tensor, conv_pool: Tensor, ssm_pool: Tensor, slots: Tensor, rows: PaddedRows
    ) -> tuple[Tensor, Tensor, Tensor]:
        """As `Mamba2Gpu.prefill_slots`, on states gathered from the slots and written back."""
        b = u.shape[0]
        out, conv, ssm = self.prefill_rows(u, conv_pool[slots], ssm_pool[slots].float(), rows)
        conv_pool[slots] = conv[:b]
        ssm_pool[slots] = ssm[:b].to(ssm_pool.dtype)
        return out, conv[b:], ssm[b:]

    def step(self, u: Tensor, conv_pool: Tensor, ssm_pool: Tensor, idx: Tensor) -> Tensor:
        """u: (b, d); conv_pool: (S, e, k-1); ssm_pool: (S, e, n) fp32, both in place -> (b, d)."""
        m = self.m
        x, z = m.in_proj(u).chunk(2, dim=-1)  # (b, e) each
        x = self.conv(x, conv_pool, idx)
        dt, B, C = self._dt_bc(x)
        ssu = self.k.selective_state_update
        assert ssu is not None
        y = ssu(ssm_pool, x, dt, self.A, B, C, self.D, z=z, dt_bias=self.dt_bias, dt_softplus=True,
                state_batch_indices=idx)  # fmt: skip
        out: Tensor = m.out_proj(y)
        return out


def _maybe(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.detach()


# the chunked scan's state passing: (each chunk's own end state (b, c, h, p*n) fp32, the log decay across each
# chunk (b, h, c)) -> the states entering the chunks (b, c, h, p*n) fp32
Passing = Callable[[Tensor, Tensor], Tensor]


def _scan_stages(
    parts: SsdParts, ops: ModuleType, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int,
    D: Tensor, passing: Passing, seq_idx: Tensor | None = None, dt_bias: Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """mamba-ssm's chunked scan, stage by stage as in its `_mamba_chunk_scan_combined_fwd`, its state passing
    given (and with `seq_idx` (b, l) int32, sequences packed in a row, none seeing another's tokens) -> (y, the
    states entering the chunks (b, c, h, p, n) fp32, the dA cumsum and the dt per chunk (b, h, c, chunk)).
    With `dt_bias` (h,), dt is raw and the chunk cumsum's kernel applies the bias, the softplus and the clamp to
    `dt_limit`: no kernels of their own. The outputs' stage is ours (`gpu_ops.chunk_scan`), and so is the
    chunks' own states' for a packed row (`gpu_ops.chunk_state`): faster where measured, same maths."""
    softplus = dt_bias is not None
    # (b, h, c, chunk) fp32 each
    dA_cumsum, dt = parts.chunk_cumsum(dt, A, chunk, dt_bias=dt_bias, dt_softplus=softplus, dt_limit=dt_limit)
    # (b, c, h, p, n): each chunk's own end state, from 0 in each chunk
    if seq_idx is None:
        own = parts.chunk_state(B, x, dt, dA_cumsum, states_in_fp32=True)
    else:
        own = ops.chunk_state(B, x, dt, dA_cumsum, seq_idx)
    entering = passing(own.flatten(-2), dA_cumsum[:, :, :, -1]).unflatten(-1, (-1, B.shape[-1]))
    cb = parts.bmm_chunk(C, B, chunk, seq_idx=seq_idx, output_dtype=torch.float32)  # (b, c, g, chunk, chunk)
    y = ops.chunk_scan(cb, x, dt, dA_cumsum, C, entering, D, seq_idx)
    return y, entering, dA_cumsum, dt


def chunk_scan_states(
    parts: SsdParts,
    ops: ModuleType,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk: int,
    D: Tensor,
    init: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """mamba-ssm's chunked scan, stage by stage, on a dt already softplus'ed, keeping the states entering the
    chunks in fp32 (the public function rounds them to C's dtype). `_chunk_scan_fwd` reads them in any dtype
    and rounds them to C's dtype for its product, so y is what the public function computes.

    x: (b, l, h, p); dt: (b, l, h) fp32; A: (h,); B, C: (b, l, g, n), channels contiguous; D: (h,) or
    (h, p); init: (b, h, p, n) fp32 -> (y (b, l, h, p) in x's dtype with the D skip, entering
    (b, c, h, p, n) fp32 for c = ceil(l / chunk) chunks, final state (b, h, p, n) fp32)."""
    finals: list[Tensor] = []

    def passing(own: Tensor, decay: Tensor) -> Tensor:
        entering, final = parts.state_passing(
            own, decay, initial_states=init.flatten(-2), chunk_size=chunk, out_dtype=torch.float32
        )
        finals.append(final)
        return entering

    y, entering, _, _ = _scan_stages(parts, ops, x, dt, A, B, C, chunk, D, passing)
    return y, entering, finals[0].unflatten(-1, (-1, B.shape[-1]))


def chunk_scan_slots(
    parts: SsdParts, ops: ModuleType, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int,
    D: Tensor, pool: Tensor, slots: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """`chunk_scan_states` with row r's initial state in slot slots[r] of `pool` (S, h, p, n), which gets its
    final state (rounded to the pool's dtype) -> (y (b, l, h, p), entering (b, c, h, p, n) fp32)."""
    flat = pool.flatten(-2)
    y, entering, _, _ = _scan_stages(
        parts, ops, x, dt, A, B, C, chunk, D, lambda own, decay: ops.state_pass(own, decay, flat, slots)
    )
    return y, entering


def chunk_scan_packed(
    parts: SsdParts, ops: ModuleType, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int,
    D: Tensor, rows: PackedRows, pool: Tensor, spare: int, dt_bias: Tensor, dt_limit: tuple[float, float],
) -> Tensor:  # fmt: skip
    """The chunked scan over fresh sequences packed in one row (`PackedRows`), each from the zero state:
    x (1, T, h, p); dt (1, T, h) raw, before `dt_bias` (h,) fp32, the softplus and the clamp to `dt_limit`,
    which the scan's chunk cumsum applies (a packed row has no padding to zero) -> y (1, T, h, p). Each
    sequence's final state goes straight into its slot of `pool` (S, h, p, n) (`gpu_ops.final_states`), but
    for those on the `spare` slot."""
    seq_idx = rows.seq_idx

    def passing(own: Tensor, decay: Tensor) -> Tensor:
        entering, _ = parts.state_passing(
            own, decay, seq_idx=seq_idx, chunk_size=chunk, out_dtype=torch.float32
        )
        return entering

    y, entering, dA_cumsum, dtc = _scan_stages(
        parts, ops, x, dt, A, B, C, chunk, D, passing, seq_idx, dt_bias, dt_limit
    )
    ops.final_states(x[0], B[0], dtc[0], dA_cumsum[0], entering[0], rows.cu, pool, rows.slots, spare)
    return y


def _taps_in_pool(entering: Tensor, pool: Tensor, slots: Tensor, rows: PaddedRows, chunk: int) -> Tensor:
    """The fp32 ssm state at each tap after the first b (the rows' ends, already in their slots): a row end's
    from its slot, an inner tap's (a multiple of the chunk size, below the row's length) from `entering`."""
    b = slots.shape[0]
    tap_row, tap_pos = rows.tap_row[b:], rows.tap_pos[b:]
    if tap_row.numel() == 0:
        return entering.new_empty((0, *entering.shape[2:]))
    ends = tap_pos == rows.lengths[tap_row]
    inner = entering[tap_row, (tap_pos // chunk).clamp(max=entering.shape[1] - 1)]  # (t - b, ...)
    at_end = pool[slots[tap_row]].float()
    return torch.where(ends.view(-1, *[1] * (inner.dim() - 1)), at_end, inner)


def _states_at(entering: Tensor, final: Tensor, rows: PaddedRows, chunk: int) -> Tensor:
    """entering (b, c, ...): the states entering the c chunks; final (b, ...) -> the state at each tap
    (t, ...). A row's padding has dt = 0, so its state after `pos` tokens is the one entering chunk
    ceil(pos / chunk), or the final one past the last chunk."""
    idx = (rows.tap_pos + chunk - 1) // chunk  # (t,)
    count = entering.shape[1]
    inner = entering[rows.tap_row, idx.clamp(max=count - 1)]  # (t, ...)
    past = (idx == count).view(-1, *[1] * (inner.dim() - 1))
    return torch.where(past, final[rows.tap_row], inner)
