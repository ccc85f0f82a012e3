"""Weight initialisation for a fresh MambaLM, following the published Mamba2 recipe.

- embedding: normal, std 0.02 (tied to the LM head);
- in/out projections and the depthwise conv: PyTorch's default uniform init, linear biases zero; each out_proj is then scaled by
  1/sqrt(n_layer) so the residual stream's variance does not grow with depth;
- dt_bias: the inverse softplus of a dt drawn log-uniformly from [dt_min, dt_max];
- A_log: log of A drawn uniformly from [1, 16]; D: ones; norms: ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from server.model.lm import MambaLM
from server.model.mamba2 import Mamba2Mixer

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
A_RANGE = (1.0, 16.0)


def _init_mixer(mixer: Mamba2Mixer, n_layer: int, gen: torch.Generator) -> None:
    h = mixer.A_log.shape[0]
    log_dt = torch.rand(h, generator=gen) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
    dt = log_dt.exp().clamp(min=DT_FLOOR)  # (h,)
    mixer.dt_bias.data.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) == dt
    a = torch.empty(h).uniform_(*A_RANGE, generator=gen)
    mixer.A_log.data.copy_(a.log())
    mixer.D.data.fill_(1.0)
    mixer.out_proj.weight.data.div_(math.sqrt(n_layer))


@torch.no_grad()
def init_weights(model: MambaLM, seed: int) -> None:
    """Deterministic for a given seed (re-runs every module's reset from a seeded generator)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv1d):
            module.reset_parameters()
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    nn.init.normal_(model.backbone.embedding.weight, std=0.02, generator=gen)
    for block in model.blocks():
        if isinstance(block.mixer, Mamba2Mixer):
            _init_mixer(block.mixer, model.cfg.n_layer, gen)
