"""A hybrid model's state as the state cache stores it (`cache.StateCache(spec, kv=...)`).

The Mamba layers' states of one row are the cache's named tensors, stacked over the Mamba mixers:

    conv: (n_mamba, conv_dim, d_conv - 1)  model dtype
    ssm:  (n_mamba, nheads, headdim, d_state)  fp32

and the attention layers' KV is described by plain numbers (`KVSpec`); the live KV itself, a `PagedKV`, is
the `KVSource` a capture reads and the `KVSink` a restore appends to. The cache's KV block size need not
equal the pool's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cache import KVSpec
from cache.base import StateSpec
from server.model.attention import KVCache
from server.model.hybrid import HybridState
from server.model.hybrid_config import HybridConfig


def cache_specs(cfg: HybridConfig, dtype: torch.dtype, block_size: int = 16) -> tuple[StateSpec, KVSpec]:
    """The state spec and KV spec of a hybrid model (which must have Mamba and attention layers)."""
    mamba, attn = cfg.mamba, cfg.attention
    if mamba is None or attn is None or cfg.n_mamba == 0 or cfg.n_attention == 0:
        raise ValueError(f"a {cfg.arch} model needs Mamba and attention layers for hybrid checkpoints")
    spec = {
        "conv": ((cfg.n_mamba, mamba.conv_dim, mamba.d_conv - 1), dtype),
        "ssm": ((cfg.n_mamba, *mamba.ssm_state_shape()), torch.float32),
    }
    return spec, KVSpec(cfg.n_attention, attn.n_kv_heads, attn.head_dim, dtype, block_size)


def pack_row(state: HybridState, row: int = 0) -> dict[str, Tensor]:
    """Row `row`'s Mamba states as the cache's named tensors (new tensors: the capture may keep them)."""
    return {
        "conv": torch.stack([conv[row] for conv, _ in state.mamba]),  # (n_mamba, c, k-1)
        "ssm": torch.stack([ssm[row] for _, ssm in state.mamba]),  # (n_mamba, h, p, n)
    }


def unpack_row(values: dict[str, Tensor], position: int, kv: Sequence[KVCache]) -> HybridState:
    """A one-row state at `position` from restored named tensors and the per-layer KV (a restored
    `PagedKV`'s `views()`)."""
    mamba = tuple(
        (conv.unsqueeze(0), ssm.unsqueeze(0)) for conv, ssm in zip(values["conv"], values["ssm"], strict=True)
    )
    return HybridState(position, mamba, tuple(kv))
