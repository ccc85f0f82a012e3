"""The Mamba language model: embedding, residual blocks of (RMSNorm, mixer), final norm, LM head.

Parameter names follow the state-spaces layout (`backbone.embedding.weight`,
`backbone.layers.{i}.norm.weight`, `backbone.layers.{i}.mixer.*`, `backbone.norm_f.weight`,
`lm_head.weight`). The recurrent state is passed in and out explicitly, one (conv, ssm) pair per
layer, so the caller decides where states live.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from server.model.config import ModelConfig
from server.model.layers import PaddedRows, RMSNorm
from server.model.mamba1 import Mamba1Mixer
from server.model.mamba2 import Mamba2Mixer

LayerStates = list[tuple[Tensor, Tensor]]  # per layer: (conv (b, c, k-1), ssm (b, h, p, n) | (b, e, n))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer: Mamba2Mixer | Mamba1Mixer = Mamba2Mixer(cfg) if cfg.arch == "mamba2" else Mamba1Mixer(cfg)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class MambaLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embedding.weight.dtype

    def blocks(self) -> Sequence[Block]:
        return [b for b in self.backbone.layers if isinstance(b, Block)]

    def zero_states(self, batch: int, device: torch.device | str | None = None) -> LayerStates:
        cfg, dev = self.cfg, device or self.backbone.embedding.weight.device
        conv = (batch, cfg.conv_dim, cfg.d_conv - 1)
        ssm = (batch, *cfg.ssm_state_shape())
        return [
            (
                torch.zeros(conv, dtype=self.dtype, device=dev),
                torch.zeros(ssm, dtype=torch.float32, device=dev),
            )
            for _ in range(cfg.n_layer)
        ]

    def _residual_dtype(self) -> torch.dtype:
        return torch.float32 if self.cfg.residual_in_fp32 else self.dtype

    def _head(self, residual: Tensor) -> Tensor:
        return self.lm_head(self.backbone.norm_f(residual.to(self.dtype))).float()

    def run(self, input_ids: Tensor, states: LayerStates) -> tuple[Tensor, LayerStates]:
        """input_ids (b, l) continuing from `states` -> (logits (b, l, v) fp32, new states)."""
        residual, new_states = self._layers(input_ids, states, None)
        return self._head(residual), new_states

    def run_rows(
        self, input_ids: Tensor, states: LayerStates, rows: PaddedRows
    ) -> tuple[Tensor, LayerStates]:
        """Right-padded rows (see `PaddedRows`): input_ids (b, l), row r continuing from states[.][r]
        -> (logits (b, v) fp32 at each row's last real token, per layer the states at the taps (t, ...))."""
        residual, taps = self._layers(input_ids, states, rows)  # (b, l, d)
        last = residual[torch.arange(residual.shape[0], device=residual.device), rows.lengths - 1]  # (b, d)
        return self._head(last), taps

    def _layers(
        self, input_ids: Tensor, states: LayerStates, rows: PaddedRows | None
    ) -> tuple[Tensor, LayerStates]:
        """-> (residual stream after the last block (b, l, d), per layer the new states, or with `rows`
        the states at its taps)."""
        residual = self.backbone.embedding(input_ids).to(self._residual_dtype())  # (b, l, d)
        new_states: LayerStates = []
        for block, (conv, ssm) in zip(self.blocks(), states, strict=True):
            hidden = block.norm(residual.to(self.dtype))
            if rows is None:
                out, conv, ssm = block.mixer(hidden, conv, ssm)
            else:
                out, conv, ssm = block.mixer.forward_rows(hidden, conv, ssm, rows)
            residual = residual + out.to(residual.dtype)
            new_states.append((conv, ssm))
        return residual, new_states

    def step(self, token_ids: Tensor, states: LayerStates) -> tuple[Tensor, LayerStates]:
        """One token per row: token_ids (b,) -> (logits (b, v) fp32, new states)."""
        residual = self.backbone.embedding(token_ids).to(self._residual_dtype())  # (b, d)
        new_states: LayerStates = []
        for block, (conv, ssm) in zip(self.blocks(), states, strict=True):
            out, conv, ssm = block.mixer.step(block.norm(residual.to(self.dtype)), conv, ssm)
            residual = residual + out.to(residual.dtype)
            new_states.append((conv, ssm))
        return self._head(residual), new_states

    def forward(self, input_ids: Tensor) -> Tensor:
        """Training / scoring: input_ids (b, l) from a zero state -> logits (b, l, v) fp32."""
        logits, _ = self.run(input_ids, self.zero_states(input_ids.shape[0]))
        return logits
