"""The Mamba2 mixer (state-spaces layout), with an explicit (conv, ssm) state in and out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from server.model.config import ModelConfig
from server.model.layers import GatedRMSNorm, PaddedRows, causal_conv_step, causal_conv_window
from server.model.ssd import fitted_chunk, ssd_scan_states, ssd_step


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, h, c = cfg.d_inner, cfg.nheads, cfg.conv_dim
        self.in_proj = nn.Linear(
            cfg.d_model, cfg.d_in_proj, bias=cfg.proj_bias
        )  # -> [z (e), xBC (c), dt (h)]
        self.conv1d = nn.Conv1d(c, c, cfg.d_conv, groups=c, bias=cfg.conv_bias)  # weight (c, 1, k)
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.A_log = nn.Parameter(torch.zeros(h))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = GatedRMSNorm(e, group_size=cfg.norm_group_size, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(e, cfg.d_model, bias=cfg.proj_bias)

    def _split_proj(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        z, xbc, dt = zxbcdt.split([cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)
        return z, xbc, dt

    def _split_xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """xbc (..., c) after the conv -> x (..., h, p), B (..., g, n), C (..., g, n)."""
        cfg = self.cfg
        gn = cfg.ngroups * cfg.d_state
        x, B, C = xbc.split([cfg.d_inner, gn, gn], dim=-1)
        B, C = (t.unflatten(-1, (cfg.ngroups, cfg.d_state)) for t in (B, C))
        return x.unflatten(-1, (cfg.nheads, cfg.headdim)), B, C

    def _dt(self, dt: Tensor) -> Tensor:
        lo, hi = self.cfg.dt_limit
        return F.softplus(dt.float() + self.dt_bias.float()).clamp(lo, hi)

    def _A(self) -> Tensor:
        return -torch.exp(self.A_log.float())  # (h,)

    def _skip(self, x: Tensor) -> Tensor:
        # D is (h,) or, for D_has_hdim checkpoints, (h, p); x is (..., h, p)
        d = self.D.float()
        return x.float() * (d if d.dim() == 2 else d.unsqueeze(-1))

    def forward(self, u: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (b, l, d); conv_state: (b, c, k-1); ssm_state: (b, h, p, n) fp32 -> (out, conv, ssm)."""
        out, window, entering = self._mix(u, conv_state, ssm_state, None, self.cfg.chunk_size)
        return out, window[:, :, window.shape[-1] - (self.cfg.d_conv - 1) :], entering[:, -1]

    def forward_rows(
        self, u: Tensor, conv_state: Tensor, ssm_state: Tensor, rows: PaddedRows
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded rows: u (b, l, d), states as in `forward` -> (out (b, l, d), conv (t, c, k-1),
        ssm (t, h, p, n)) with the states at the rows' taps. Rows shorter than a chunk are scanned in
        one chunk of their padded length (`fitted_chunk`), not of the chunk size."""
        chunk = fitted_chunk(u.shape[1], self.cfg.chunk_size)
        out, window, entering = self._mix(u, conv_state, ssm_state, rows.valid, chunk)
        return out, rows.conv_at(window), rows.chunk_states_at(entering, chunk)

    def _mix(
        self, u: Tensor, conv_state: Tensor, ssm_state: Tensor, valid: Tensor | None, chunk: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (out (b, l, d), conv window (b, c, k-1+l), states entering each chunk (b, chunks+1, h, p, n));
        dt = 0 where `valid` (b, l) is False."""
        z, xbc, dt = self._split_proj(self.in_proj(u))
        xbc, window = causal_conv_window(xbc, conv_state, self.conv1d.weight, self.conv1d.bias)
        x, B, C = self._split_xbc(xbc)  # (b, l, h, p), (b, l, g, n), (b, l, g, n)
        dt = self._dt(dt)  # (b, l, h) fp32
        if valid is not None:
            dt = torch.where(valid.unsqueeze(-1), dt, 0.0)
        y, entering = ssd_scan_states(x, dt, self._A(), B, C, chunk, ssm_state)
        y = (y + self._skip(x)).flatten(-2)  # (b, l, e)
        return self._output(y, z, u.dtype), window, entering

    def step(self, u: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (b, d), one token per row; states as in `forward`."""
        z, xbc, dt = self._split_proj(self.in_proj(u))
        xbc, conv_state = causal_conv_step(xbc, conv_state, self.conv1d.weight, self.conv1d.bias)
        x, B, C = self._split_xbc(xbc)  # (b, h, p), (b, g, n), (b, g, n)
        y, ssm_state = ssd_step(x, self._dt(dt), self._A(), B, C, ssm_state)
        y = (y + self._skip(x)).flatten(-2)  # (b, e)
        return self._output(y, z, u.dtype), conv_state, ssm_state

    def _output(self, y: Tensor, z: Tensor, dtype: torch.dtype) -> Tensor:
        """y (the scan's output with the D skip), z (the gate): (..., e) -> out_proj(norm(y, z)) (..., d)."""
        return self.out_proj(self.norm(y, z).to(dtype))
