"""Small building blocks shared by both mixers: RMS norms and the causal depthwise conv with state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba2's norm: rmsnorm(y * silu(z)), normalised per group of `group_size` channels."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        # y, z: (..., e)
        gated = y.float() * F.silu(z.float())
        grouped = gated.unflatten(-1, (-1, self.group_size))  # (..., g, e/g)
        normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.flatten(-2).to(self.weight.dtype)


def causal_conv(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv over a segment that continues from `conv_state`, then SiLU.

    x: (b, l, c); conv_state: (b, c, k-1), the last k-1 inputs before the segment;
    weight: (c, 1, k). Returns (out (b, l, c), new conv_state (b, c, k-1)).
    """
    k = weight.shape[-1]
    window = torch.cat([conv_state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # (b, c, k-1+l)
    out = F.conv1d(window, weight, bias, groups=weight.shape[0])  # (b, c, l)
    return F.silu(out).transpose(1, 2), window[:, :, window.shape[-1] - (k - 1) :]


def causal_conv_step(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One token of `causal_conv`. x: (b, c); conv_state: (b, c, k-1). Returns (out (b, c), new state)."""
    window = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (b, c, k)
    out = (window * weight[:, 0, :]).sum(-1)
    if bias is not None:
        out = out + bias
    return F.silu(out), window[:, :, 1:]
