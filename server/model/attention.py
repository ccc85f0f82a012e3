"""Grouped-query attention with optional (partial) RoPE, and the KV of positions [0, p) it reads and extends.

Shapes: b rows, l new tokens, p tokens already in the KV, q query heads, kv key/value heads (each serves
q/kv consecutive query heads), dh head dim, r rotary dims (the leading r of each head).

`KVCache` is the contract between an attention layer and wherever its keys and values live. Here it is
`ContiguousKV`: one tensor per layer, all rows at the same position, grown by concatenation (O(p) a
step; fine on the CPU path). The paged pool in `paged_kv.py` (fixed-size blocks plus a block table per
sequence) implements the same two members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from server.model.hybrid_config import AttentionConfig

Rope = tuple[Tensor, Tensor]  # cos, sin: (l, r) in the model dtype


class KVCache(Protocol):
    """One attention layer's keys and values for positions [0, length) of b rows. `attend` returns the
    extended cache and never changes what this one holds in [0, length). `ContiguousKV` is a value, so a
    state can be resumed twice; a paged view (`paged_kv.PagedLayerKV`) appends in place and refuses to
    resume an older view (fork the sequence to continue a prefix two ways)."""

    @property
    def length(self) -> int: ...

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, KVCache]:
        """Causal attention of l new tokens at positions [length, length+l): q (b, l, q, dh), k and v
        (b, l, kv, dh) -> (out (b, l, q, dh), the cache of [0, length+l))."""
        ...


@dataclass(frozen=True)
class ContiguousKV:
    k: Tensor  # (b, kv, p, dh) model dtype
    v: Tensor  # (b, kv, p, dh)

    @classmethod
    def empty(
        cls, batch: int, cfg: AttentionConfig, dtype: torch.dtype, device: torch.device
    ) -> ContiguousKV:
        shape = (batch, cfg.n_kv_heads, 0, cfg.head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        )

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, ContiguousKV]:
        keys = torch.cat([self.k, k.transpose(1, 2).to(self.k.dtype)], dim=2)  # (b, kv, p+l, dh)
        values = torch.cat([self.v, v.transpose(1, 2).to(self.v.dtype)], dim=2)
        mask = causal_mask(q.shape[1], self.length, q.device)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )  # (b, q, l, dh)
        return out.transpose(1, 2), ContiguousKV(keys, values)


def causal_mask(new: int, past: int, device: torch.device) -> Tensor | None:
    """(l, p+l) bool, True where query i (at position p+i) may see key j: j <= p+i. None for one query,
    which sees every key."""
    if new == 1:
        return None
    keys = torch.arange(past + new, device=device)
    return keys <= past + torch.arange(new, device=device).unsqueeze(-1)


def rope_tables(cfg: AttentionConfig, positions: Tensor, dtype: torch.dtype) -> Rope | None:
    """cos and sin (l, r) at `positions` (l,), computed in fp32 and rounded to `dtype`; None without RoPE."""
    if cfg.rope_theta is None:
        return None
    r = cfg.rotary_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, r, 2, device=positions.device).float() / r)  # (r/2,)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (l, r/2)
    angles = torch.cat([angles, angles], dim=-1)  # (l, r): both halves of a rotated pair share a frequency
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate the leading r dims of every head: x (b, l, h, dh) -> (b, l, h, dh). Dim i pairs with dim
    i + r/2 (the "rotate half" layout of Llama and of these models' checkpoints)."""
    cos, sin = (t.unsqueeze(1) for t in rope)  # (l, 1, r)
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    first, second = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, d_model: int, cfg: AttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d_model, q, bias=cfg.bias)
        self.k_proj = nn.Linear(d_model, kv, bias=cfg.bias)
        self.v_proj = nn.Linear(d_model, kv, bias=cfg.bias)
        self.o_proj = nn.Linear(q, d_model, bias=cfg.bias)

    def forward(self, x: Tensor, kv: KVCache, rope: Rope | None) -> tuple[Tensor, KVCache]:
        """x (b, l, d) at positions [kv.length, kv.length+l), rope tables at those positions ->
        (out (b, l, d), the extended cache)."""
        heads = (*x.shape[:-1], -1, self.cfg.head_dim)
        q = self.q_proj(x).view(heads)  # (b, l, q, dh)
        k = self.k_proj(x).view(heads)  # (b, l, kv, dh)
        v = self.v_proj(x).view(heads)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out, kv = kv.attend(q, k, v, self.cfg.scale)
        return self.o_proj(out.flatten(-2)), kv
