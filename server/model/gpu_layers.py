"""The mixers on the GPU kernels: one object per layer wrapping the torch mixer's weights.

`prefill(u, conv, ssm)` runs a segment of one sequence from its state (the conv carried by our Triton
`conv_prefill`, or torch's conv1d on a transposed copy; the scan with mamba-ssm's chunked SSD kernel or our
Mamba1 scan, both from an initial state);
`step(u, conv_pool, ssm_pool, idx)` runs one token per row directly on the live pool's layer slice,
rows addressed by slot index (-1 = padding, untouched), so no state is gathered or scattered.
Shapes as in `server.model.config`; S is the number of slots in the pool.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from server.model.kernels import Kernels
from server.model.layers import causal_conv
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

    def prefill(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """x: (1, l, c) from `state` (1, c, k-1) -> (silu(conv) (1, l, c) contiguous, new state)."""
        if self.prefill_kind == "triton":
            out, new_state = self.ops.conv_prefill(x, state, self.weight3, self.bias)
            return out, new_state
        out, new_state = causal_conv(x, state, self.weight3, self.bias)
        return out.contiguous(), new_state

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
        """y, z: (..., e) -> out_proj(rmsnorm(y * silu(z)) per group) (..., d)."""
        norm = self.m.norm
        gated = self.k.gated_rmsnorm
        assert gated is not None
        normed = gated(
            y, norm.weight, None, z=z, eps=norm.eps, group_size=norm.group_size, norm_before_gate=False
        )
        out: Tensor = self.m.out_proj(normed)
        return out

    def prefill(self, u: Tensor, conv: Tensor, ssm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (1, l, d); conv: (1, c, k-1); ssm: (1, h, p, n) fp32 -> (out (1, l, d), conv, ssm)."""
        cfg, m = self.cfg, self.m
        z, xbc, dt = m._split_proj(m.in_proj(u))  # (1, l, e), (1, l, c), (1, l, h)
        xbc, conv = self.conv.prefill(xbc, conv)
        x, B, C = self._split_xbc(xbc)  # (1, l, h, p), (1, l, g, n) x2
        scan = self.k.chunk_scan
        assert scan is not None
        y, ssm = scan(
            x, dt, self.A, B, C, cfg.chunk_size, D=self.D, z=None, dt_bias=self.dt_bias, initial_states=ssm,
            dt_softplus=True, dt_limit=cfg.dt_limit, return_final_states=True,
        )  # fmt: skip
        return self._norm_out(y.flatten(-2), z), conv, ssm

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
        """u: (1, l, d); conv: (1, e, k-1); ssm: (1, e, n) fp32 -> (out (1, l, d), conv, ssm)."""
        m = self.m
        x, z = m.in_proj(u).chunk(2, dim=-1)  # (1, l, e) each
        x, conv = self.conv.prefill(x, conv)  # (1, l, e) contiguous
        dt_raw, B, C = self._dt_bc(x)
        dt = F.softplus(dt_raw.float() + self.dt_bias)  # (1, l, e)
        y, ssm = self.ops.selective_scan(x, dt, self.A, B, C, self.D, z, ssm)
        return m.out_proj(y.to(u.dtype)), conv, ssm

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
