"""The hybrid model's blocks on the GPU path: what differs from the torch modules they wrap.

- `mamba_gpu`: a hybrid's Mamba2 mixer as `gpu_layers.Mamba2Gpu` (mamba-ssm's chunked scan for prefill,
  the pool-indexed step for decode); Falcon-H1's other outputs ("gate", "norm_gate") go through the torch
  mixer's own `_output`.
- `AttentionGpu`: prefill through the torch `Attention` on the paged views (`PagedLayerKV`: the new keys and
  values written into the slot's blocks, SDPA over the gathered prefix); decode through the Triton kernels
  of `paged_attention` on every row at its own position (device tensors, so the step is capturable).
- `moe_static`: `MoE.forward` without host synchronisation (every expert on every row, weighted by the
  router's weight for it, 0 where not chosen), for the decode graph; prefill keeps the torch `MoE`.

Shapes: b rows, d d_model, q / kv heads, dh head dim, r rotary dims, S slots, M table entries per slot.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from server.model.attention import Attention, Rope, apply_rope
from server.model.ffn import MLP, MoE, _hidden
from server.model.gpu_layers import ConvPrefill, Mamba2Gpu, SsmStep
from server.model.kernels import Kernels
from server.model.mamba2 import Mamba2Mixer
from server.model.mamba2_outputs import Mamba2OutputMixer
from server.model.paged_kv import PagedLayerKV


class Mamba2OutputGpu(Mamba2Gpu):
    """A Mamba2 mixer whose output is not the gated norm (Falcon-H1): the torch mixer computes it."""

    def _norm_out(self, y: Tensor, z: Tensor) -> Tensor:
        out: Tensor = self.m._output(y, z, z.dtype)
        return out


def mamba_gpu(
    mixer: Mamba2Mixer, kernels: Kernels, ops: ModuleType, ssm_step: SsmStep, conv: ConvPrefill
) -> Mamba2Gpu:
    cls = Mamba2OutputGpu if isinstance(mixer, Mamba2OutputMixer) else Mamba2Gpu
    return cls(mixer, kernels, ops, ssm_step, conv)


class AttentionGpu:
    def __init__(self, attn: Attention, ops: ModuleType) -> None:
        self.attn, self.cfg, self.ops = attn, attn.cfg, ops

    def prefill(self, h: Tensor, kv: PagedLayerKV, rope: Rope | None) -> tuple[Tensor, PagedLayerKV]:
        """h (1, l, d) at positions [kv.length, kv.length+l) -> (out (1, l, d), the extended view)."""
        out, view = self.attn(h, kv, rope)
        assert isinstance(view, PagedLayerKV)
        return out, view

    def step(
        self, h: Tensor, pages: Tensor, idx: Tensor, pos: Tensor, tables: Tensor, rope: Rope | None
    ) -> Tensor:
        """h (b, d), one token per row at position pos[r] of slot idx[r] (-1: padding); pages (N, 2, s, kv,
        dh) of this layer, the new keys and values written in place; tables (S, M) int32; rope (b, r) per
        row -> (b, d)."""
        attn, dh = self.attn, self.cfg.head_dim
        q = attn.q_proj(h).unflatten(-1, (-1, dh))  # (b, q, dh)
        k = attn.k_proj(h).unflatten(-1, (-1, dh))  # (b, kv, dh)
        v = attn.v_proj(h).unflatten(-1, (-1, dh)).contiguous()
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)  # cos (b, r) -> (b, 1, r) over the heads
        self.ops.kv_append(k.contiguous(), v, pages, idx, pos, tables)
        out = self.ops.decode_attention(q.contiguous(), pages, idx, pos, tables, self.cfg.scale)  # (b, q, dh)
        projected: Tensor = attn.o_proj(out.flatten(-2))
        return projected


def ffn_static(ffn: MLP | MoE, h: Tensor) -> Tensor:
    """The feed-forward block of a decode step, capturable: the MLP as is, a MoE through `moe_static`."""
    return moe_static(ffn, h) if isinstance(ffn, MoE) else ffn(h)


def moe_static(moe: MoE, x: Tensor) -> Tensor:
    """`MoE.forward` with no data-dependent shapes: x (t, d) -> (t, d). Each expert runs on all t rows and is
    weighted by combine (t, E) (the router's weight, 0 where not chosen); sums in expert order in fp32, as
    `Experts.forward` does, so a row gets the same sum plus exact zeros. Costs E / top_k times the routed
    experts' work, which a decode batch of a few rows reads anyway as weights."""
    weights, index = moe.router(x)  # (t, k) each
    inner = moe.latent_in(x) if moe.latent_in is not None else x  # (t, g)
    experts = moe.experts
    combine = torch.zeros(x.shape[0], experts.up.shape[0], dtype=torch.float32, device=x.device)
    combine.scatter_add_(1, index, weights.float())  # (t, E)
    routed = torch.zeros(inner.shape, dtype=torch.float32, device=x.device)
    for e in range(experts.up.shape[0]):
        hidden = _hidden(F.linear(inner, experts.up[e]), experts.cfg)
        routed += F.linear(hidden, experts.down[e]).float() * combine[:, e : e + 1]
    out = routed.to(inner.dtype)
    if moe.latent_out is not None:
        out = moe.latent_out(out)
    return out + moe.shared(x) if moe.shared is not None else out
