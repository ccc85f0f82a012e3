"""A Mamba2 mixer whose output is not Mamba2's gated norm rmsnorm(y * silu(z)) (Falcon-H1's options).

- "norm_gate": rmsnorm(y) * silu(z), normalised per group like the gated norm (`norm.weight` (e,));
- "gate": y * silu(z), no norm and no norm weight.
The scan, conv and states are `Mamba2Mixer`'s; only what feeds out_proj differs. Computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from server.model.config import ModelConfig
from server.model.hybrid_config import MambaOutput
from server.model.mamba2 import Mamba2Mixer


class Mamba2OutputMixer(Mamba2Mixer):
    def __init__(self, cfg: ModelConfig, output: MambaOutput) -> None:
        super().__init__(cfg)
        if output not in ("norm_gate", "gate"):
            raise ValueError(f"Mamba2OutputMixer computes 'norm_gate' or 'gate', not {output!r}")
        self.output = output
        if output == "gate":
            del self.norm  # no norm weight in such checkpoints

    def _output(self, y: Tensor, z: Tensor, dtype: torch.dtype) -> Tensor:
        """y (the scan's output with the D skip), z (the gate): (..., e) -> out_proj(...) (..., d)."""
        gate = F.silu(z.float())
        if self.output == "gate":
            return self.out_proj((y.float() * gate).to(dtype))
        norm = self.norm
        grouped = y.float().unflatten(-1, (-1, norm.group_size))  # (..., g, e/g)
        normed = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + norm.eps)).flatten(-2)
        return self.out_proj((norm.weight * normed * gate).to(dtype))
