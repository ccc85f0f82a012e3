"""The hybrid Mamba2 + attention language model (Bamba, Granite 4.0-H, Nemotron-H, Falcon-H1), torch path.

    embedding (x embedding_multiplier) -> residual blocks x + m * op(rmsnorm(x)) -> rmsnorm -> lm_head
    (/ logits_scaling)

with op a Mamba2 mixer, attention, both side by side, an MLP or a MoE (`HybridConfig`). The state of
a sequence after p tokens is `HybridState`: each Mamba mixer's (conv, ssm) state, as for a pure Mamba2
model, and each attention layer's keys and values of positions [0, p). `run` continues a state over any number of
tokens (a one-shot prefill from `zero_state`, or a prefill resumed at any position) and `step` decodes
one token; both return the new state and leave the old one usable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from server.model.attention import Attention, ContiguousKV, KVCache, Rope, rope_tables
from server.model.ffn import MLP, MoE
from server.model.hybrid_config import WITH_ATTENTION, WITH_MAMBA, BlockKind, HybridConfig
from server.model.layers import RMSNorm
from server.model.mamba2 import Mamba2Mixer
from server.model.mamba2_outputs import Mamba2OutputMixer

MambaState = tuple[Tensor, Tensor]  # conv (b, c, k-1) model dtype, ssm (b, h, p, n) fp32


@dataclass(frozen=True)
class HybridState:
    """b rows after the same `position` tokens: per block with a Mamba mixer, in order, its (conv, ssm)
    state; per block with attention, in order, its KV of positions [0, position)."""

    position: int
    mamba: tuple[MambaState, ...]
    kv: tuple[KVCache, ...]

    def per_block(self, blocks: Sequence[BlockKind]) -> list[BlockState]:
        mamba, kv = iter(self.mamba), iter(self.kv)
        return [
            BlockState(next(mamba) if k in WITH_MAMBA else None, next(kv) if k in WITH_ATTENTION else None)
            for k in blocks
        ]

    @classmethod
    def from_blocks(cls, position: int, states: Sequence[BlockState]) -> HybridState:
        """The inverse of `per_block`."""
        mamba = tuple(s.mamba for s in states if s.mamba is not None)
        return cls(position, mamba, tuple(s.kv for s in states if s.kv is not None))


@dataclass(frozen=True)
class BlockState:
    """What one block carries from call to call: its Mamba mixer's state, its attention's KV (or None)."""

    mamba: MambaState | None = None
    kv: KVCache | None = None


class HybridBlock(nn.Module):
    """op(rmsnorm(x)), which the model adds (times residual_multiplier) to the residual stream x. The op is
    a Mamba2 mixer, attention, both side by side ("parallel"), or a feed-forward block."""

    def __init__(self, cfg: HybridConfig, kind: BlockKind) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mamba = _mamba_mixer(cfg) if kind in WITH_MAMBA else None
        self.attention = (
            Attention(cfg.d_model, cfg.attention) if cfg.attention and kind in WITH_ATTENTION else None
        )
        self.ffn = _ffn(cfg, kind)

    def forward(
        self, x: Tensor, state: BlockState, rope: Rope | None, decode: bool
    ) -> tuple[Tensor, BlockState]:
        """x (b, l, d), the residual stream -> (op(rmsnorm(x)) (b, l, d) in the model dtype, the block's new
        state). `decode`: one token (l = 1), through the Mamba mixer's recurrent step instead of its scan."""
        h = self.norm(x.to(self.norm.weight.dtype))
        if self.ffn is not None:
            return self.ffn(h), state
        outs: list[Tensor] = []
        mamba, kv = state.mamba, state.kv
        if self.mamba is not None and mamba is not None:
            out, mamba = self._mamba(self.mamba, h, mamba, decode)
            outs.append(out)
        if self.attention is not None and kv is not None:
            out, kv = self.attention(h, kv, rope)
            outs.append(out)
        if len(outs) != (self.mamba is not None) + (self.attention is not None):
            raise ValueError(f"a {self.kind} block got the state {state}")
        return sum(outs[1:], outs[0]), BlockState(mamba, kv)

    @staticmethod
    def _mamba(mixer: Mamba2Mixer, h: Tensor, state: MambaState, decode: bool) -> tuple[Tensor, MambaState]:
        if decode:
            out, conv, ssm = mixer.step(h[:, 0], *state)
            return out.unsqueeze(1), (conv, ssm)
        out, conv, ssm = mixer(h, *state)
        return out, (conv, ssm)


def _mamba_mixer(cfg: HybridConfig) -> Mamba2Mixer:
    assert cfg.mamba is not None
    if cfg.mamba_output == "gated_norm":
        return Mamba2Mixer(cfg.mamba)
    return Mamba2OutputMixer(cfg.mamba, cfg.mamba_output)


def _ffn(cfg: HybridConfig, kind: BlockKind) -> MLP | MoE | None:
    if kind == "mlp" and cfg.mlp is not None:
        return MLP(cfg.d_model, cfg.mlp)
    if kind == "moe" and cfg.moe is not None:
        return MoE(cfg.d_model, cfg.moe)
    return None


class HybridLM(nn.Module):
    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(HybridBlock(cfg, kind) for kind in cfg.blocks)
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def layers(self) -> Iterator[HybridBlock]:
        for block in self.blocks:
            assert isinstance(block, HybridBlock)
            yield block

    def zero_state(self, batch: int, device: torch.device | str | None = None) -> HybridState:
        """The state before any token: zero Mamba states, empty KV."""
        dev = torch.device(device) if device is not None else self.embedding.weight.device
        mamba = tuple(self._zero_mamba(batch, dev) for _ in range(self.cfg.n_mamba))
        attn = self.cfg.attention
        kv = tuple(
            ContiguousKV.empty(batch, attn, self.dtype, dev) for _ in range(self.cfg.n_attention) if attn
        )
        return HybridState(0, mamba, kv)

    def _zero_mamba(self, batch: int, device: torch.device) -> MambaState:
        cfg = self.cfg.mamba
        assert cfg is not None
        conv = torch.zeros(batch, cfg.conv_dim, cfg.d_conv - 1, dtype=self.dtype, device=device)
        return conv, torch.zeros(batch, *cfg.ssm_state_shape(), dtype=torch.float32, device=device)

    def run(self, input_ids: Tensor, state: HybridState) -> tuple[Tensor, HybridState]:
        """input_ids (b, l) at positions [p, p+l) continuing `state` (at p) -> (logits (b, l, v) fp32,
        the state at p+l). Any l >= 0: a prompt from `zero_state`, or the rest of a split prefill."""
        if input_ids.shape[1] == 0:
            return torch.zeros(*input_ids.shape, self.cfg.vocab_size, device=input_ids.device), state
        residual, new_state = self._blocks(input_ids, state, decode=False)
        return self.head(residual), new_state

    def step(self, token_ids: Tensor, state: HybridState) -> tuple[Tensor, HybridState]:
        """One token per row: token_ids (b,) -> (logits (b, v) fp32, the state one position on)."""
        residual, new_state = self._blocks(token_ids.unsqueeze(1), state, decode=True)
        return self.head(residual[:, 0]), new_state

    def forward(self, input_ids: Tensor) -> Tensor:
        """Scoring from the empty state: input_ids (b, l) -> logits (b, l, v) fp32."""
        logits, _ = self.run(input_ids, self.zero_state(input_ids.shape[0]))
        return logits

    def _blocks(self, input_ids: Tensor, state: HybridState, decode: bool) -> tuple[Tensor, HybridState]:
        """-> (the residual stream after the last block (b, l, d), the new state)."""
        residual = self.embed(input_ids)  # (b, l, d)
        length = input_ids.shape[1]
        rope = self.rope(torch.arange(state.position, state.position + length, device=input_ids.device))
        new_states = []
        for block, block_state in zip(self.layers(), state.per_block(self.cfg.blocks), strict=True):
            out, block_state = block(residual, block_state, rope, decode)
            residual = self.add(residual, out)
            new_states.append(block_state)
        return residual, HybridState.from_blocks(state.position + length, new_states)

    # The pieces around the blocks, shared with the GPU runner (`GpuHybridRunner`), which runs the blocks itself.

    def embed(self, ids: Tensor) -> Tensor:
        """ids (...) -> the residual stream (..., d), fp32 if the config keeps it so."""
        cfg = self.cfg
        residual = self.embedding(ids) * cfg.embedding_multiplier
        return residual.to(torch.float32 if cfg.residual_in_fp32 else self.dtype)

    def add(self, residual: Tensor, out: Tensor) -> Tensor:
        """A block's output added to the residual stream (times residual_multiplier)."""
        return residual + (out * self.cfg.residual_multiplier).to(residual.dtype)

    def rope(self, positions: Tensor) -> Rope | None:
        attn = self.cfg.attention
        return rope_tables(attn, positions, self.dtype) if attn is not None else None

    def head(self, residual: Tensor) -> Tensor:
        """residual (..., d) -> logits (..., v) fp32."""
        logits = self.lm_head(self.norm_f(residual.to(self.dtype))).float()
        return logits / self.cfg.logits_scaling
