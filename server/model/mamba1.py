"""The Mamba1 mixer (state-spaces layout) with a selective scan that takes an initial state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from server.model.config import ModelConfig
from server.model.layers import PaddedRows, causal_conv_step, causal_conv_window

SCAN_BLOCK = 128  # timesteps whose decays are materialised at once: (b, SCAN_BLOCK, e, n) floats


def selective_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """x, dt: (b, l, e); A: (e, n); B, C: (b, l, n); state: (b, e, n) fp32.

    Returns (y (b, l, e) without the D skip, final state). Sequential in time, vectorised over
    channels; decays are computed a block of timesteps at a time to bound memory.
    """
    h = state.float()
    ys = []
    for start in range(0, x.shape[1], SCAN_BLOCK):
        sl = slice(start, start + SCAN_BLOCK)
        dtb = dt[:, sl].float()
        decay = torch.exp(dtb.unsqueeze(-1) * A.float())  # (b, t, e, n)
        feed = (dtb * x[:, sl].float()).unsqueeze(-1) * B[:, sl].float().unsqueeze(2)  # (b, t, e, n)
        cb = C[:, sl].float()
        for t in range(dtb.shape[1]):
            h = decay[:, t] * h + feed[:, t]
            ys.append(torch.einsum("ben,bn->be", h, cb[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape, dtype=torch.float32)
    return y, h


class Mamba1Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * e, bias=cfg.proj_bias)  # -> [x (e), z (e)]
        self.conv1d = nn.Conv1d(e, e, cfg.d_conv, groups=e, bias=cfg.conv_bias)  # weight (e, 1, k)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)  # -> [dt (r), B (n), C (n)]
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.zeros(e, n))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, cfg.d_model, bias=cfg.proj_bias)

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        dt, B, C = self.x_proj(x).split([cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt).float()), B, C

    def _A(self) -> Tensor:
        return -torch.exp(self.A_log.float())  # (e, n)

    def forward(self, u: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (b, l, d); conv_state: (b, e, k-1); ssm_state: (b, e, n) fp32 -> (out, conv, ssm)."""
        out, window, ssm_state = self._mix(u, conv_state, ssm_state, None)
        return out, window[:, :, window.shape[-1] - (self.cfg.d_conv - 1) :], ssm_state

    def forward_rows(
        self, u: Tensor, conv_state: Tensor, ssm_state: Tensor, rows: PaddedRows
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded rows: u (b, l, d), states as in `forward` -> (out (b, l, d), conv (t, e, k-1),
        ssm (t, e, n)) with the states at the rows' taps, which must all be row ends (no chunk states)."""
        out, window, ssm_state = self._mix(u, conv_state, ssm_state, rows.valid)
        return out, rows.conv_at(window), rows.ends_at(ssm_state)

    def _mix(
        self, u: Tensor, conv_state: Tensor, ssm_state: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (out (b, l, d), conv window (b, e, k-1+l), final ssm state (b, e, n)); dt = 0 where `valid`
        (b, l) is False, so the state passes through those steps unchanged."""
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x, window = causal_conv_window(x, conv_state, self.conv1d.weight, self.conv1d.bias)
        dt, B, C = self._ssm_inputs(x)  # (b, l, e) fp32, (b, l, n), (b, l, n)
        if valid is not None:
            dt = torch.where(valid.unsqueeze(-1), dt, 0.0)
        y, ssm_state = selective_scan(x, dt, self._A(), B, C, ssm_state)
        y = (y + x.float() * self.D.float()) * F.silu(z.float())
        return self.out_proj(y.to(u.dtype)), window, ssm_state

    def step(self, u: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (b, d), one token per row; states as in `forward`."""
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x, conv_state = causal_conv_step(x, conv_state, self.conv1d.weight, self.conv1d.bias)
        dt, B, C = self._ssm_inputs(x)  # (b, e), (b, n), (b, n)
        decay = torch.exp(dt.unsqueeze(-1) * self._A())  # (b, e, n)
        h = decay * ssm_state.float() + (dt * x.float()).unsqueeze(-1) * B.float().unsqueeze(1)
        y = torch.einsum("ben,bn->be", h, C.float()) + x.float() * self.D.float()
        y = y * F.silu(z.float())
        return self.out_proj(y.to(u.dtype)), conv_state, h
