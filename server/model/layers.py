"""Small building blocks shared by both mixers: RMS norms, the causal depthwise conv with state, and
the description of a batched pass over right-padded rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    """Mamba2's norm: rmsnorm(y * silu(z)), normalised per group of `group_size` channels.

    Convention: Mamba2 normalises each of its n_groups groups of d_inner / n_groups channels on its own
    (`group_size = d_inner / n_groups`), as mamba_ssm's `RMSNormGated` does and as the published
    state-spaces and Codestral checkpoints were trained. transformers (5.17) normalises over the whole
    width instead; a checkpoint with n_groups > 1 trained with transformers' implementation needs
    `group_size = d_inner` (`ModelConfig.norm_per_group` False, `tssc_norm_per_group: false` in its
    config.json). With one group the two agree."""

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
    out, window = causal_conv_window(x, conv_state, weight, bias)
    return out, window[:, :, window.shape[-1] - (weight.shape[-1] - 1) :]


def causal_conv_window(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """`causal_conv`, returning the whole input window instead of the new state: (out (b, l, c),
    window (b, c, k-1+l) = [conv_state, x]); the conv state after t tokens is window[..., t : t+k-1]."""
    window = torch.cat([conv_state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # (b, c, k-1+l)
    out = F.conv1d(window, weight, bias, groups=weight.shape[0])  # (b, c, l)
    return F.silu(out).transpose(1, 2), window


def causal_conv_step(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One token of `causal_conv`. x: (b, c); conv_state: (b, c, k-1). Returns (out (b, c), new state)."""
    window = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (b, c, k)
    out = (window * weight[:, 0, :]).sum(-1)
    if bias is not None:
        out = out + bias
    return F.silu(out), window[:, :, 1:]


@dataclass(frozen=True)
class PaddedRows:
    """The rows of one batched pass, right-padded to a common length l, and the points whose states it
    returns. Row r is real at positions < lengths[r]; the mixers set dt = 0 on its padding, so the ssm
    state passes through unchanged (decay exp(0) = 1, input 0), and causality keeps the padding out of
    real outputs. Tap i asks for the state of row tap_row[i] after its first tap_pos[i] tokens; tap_pos
    is the row's length or (Mamba2 only) a positive multiple of the chunk size below it."""

    lengths: Tensor  # (b,) long, each in [1, l]
    valid: Tensor  # (b, l) bool: position < length
    tap_row: Tensor  # (t,) long
    tap_pos: Tensor  # (t,) long
    ends_only: bool  # every tap is at its row's end (all a pass without chunk states can give)

    @classmethod
    def build(
        cls, lengths: Sequence[int], width: int, taps: Sequence[tuple[int, int]], device: torch.device
    ) -> PaddedRows:
        """taps: (row, position) pairs."""
        lens = torch.tensor(list(lengths), dtype=torch.long, device=device)  # (b,)
        valid = torch.arange(width, device=device) < lens.unsqueeze(-1)  # (b, l)
        rows, pos = (torch.tensor([t[i] for t in taps], dtype=torch.long, device=device) for i in (0, 1))
        ends = all(p == lengths[r] for r, p in taps)
        return cls(lens, valid, rows, pos, ends)

    @classmethod
    def at_ends(cls, lengths: Tensor, width: int) -> PaddedRows:
        """Rows whose first `lengths` ((b,) long on the device) of `width` positions are real, each tapped at its
        end; from device tensors only (no host sync), so that a CUDA graph captures them with `lengths` a
        static input. A row of length 0 passes its state through unchanged (dt = 0 everywhere, the conv
        state taken before its first input)."""
        valid = torch.arange(width, device=lengths.device) < lengths.unsqueeze(-1)  # (b, l)
        return cls(lengths, valid, torch.arange(lengths.shape[0], device=lengths.device), lengths, True)

    def conv_at(self, window: Tensor) -> Tensor:
        """window (b, c, k-1+l) = [conv state, inputs] -> the conv state at each tap (t, c, k-1): the
        k-1 inputs before it (reaching into the old conv state for taps before k-1)."""
        k1 = window.shape[-1] - self.valid.shape[1]
        cols = self.tap_pos.unsqueeze(-1) + torch.arange(k1, device=window.device)  # (t, k-1)
        return window[self.tap_row.unsqueeze(-1), :, cols].transpose(1, 2)  # (t, k-1, c) -> (t, c, k-1)

    def chunk_states_at(self, entering: Tensor, chunk: int) -> Tensor:
        """entering (b, c+1, ...): the state entering each chunk, the last one the final state -> the
        state at each tap (t, ...). A row's padding has dt = 0, so its state after `length` tokens is
        the one entering chunk ceil(length / chunk)."""
        return entering[self.tap_row, (self.tap_pos + chunk - 1) // chunk]

    def ends_at(self, final: Tensor) -> Tensor:
        """final (b, ...) -> the state at each tap (t, ...), for a pass that keeps only final states."""
        if not self.ends_only:
            raise ValueError("this mixer has no chunk states: split the segment at interior captures")
        return final[self.tap_row]
