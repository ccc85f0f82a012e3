"""Feed-forward blocks of the hybrid models: a dense MLP (gated or not) and a mixture of experts.

Shapes: t tokens (the leading dims flattened), d d_model, f one MLP's width, E experts, k experts per
token, g the experts' input width (d_model, or the MoE's latent width).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from server.model.hybrid_config import Activation, MLPConfig, MoEConfig


def _relu2(x: Tensor) -> Tensor:
    return F.relu(x).square()


ACTIVATIONS: dict[Activation, Callable[[Tensor], Tensor]] = {"silu": F.silu, "relu2": _relu2}


def _hidden(up: Tensor, cfg: MLPConfig) -> Tensor:
    """The MLP's hidden activations from its up projection: up (..., 2f) = [gate | up] when gated, (..., f)
    otherwise -> (..., f)."""
    act = ACTIVATIONS[cfg.act]
    if not cfg.gated:
        return act(up)
    gate, lin = up.chunk(2, dim=-1)
    return act(gate) * lin


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)) with up_proj: d -> 2f = [gate | up] when gated, else down(act(up(x)))."""

    def __init__(self, d_model: int, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.up_proj = nn.Linear(d_model, cfg.d_ff * (2 if cfg.gated else 1), bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d) -> (..., d)."""
        return self.down_proj(_hidden(self.up_proj(x), self.cfg))


class Router(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.n_experts, d_model))  # (E, d)
        # (E,) the sigmoid router's bias on the choice (not on the weights), fp32
        self.correction: Tensor | None
        self.register_buffer("correction", torch.zeros(cfg.n_experts) if cfg.router == "sigmoid" else None)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (t, d) -> (weights (t, k) fp32, expert indices (t, k))."""
        logits = F.linear(x.float(), self.weight.float())  # (t, E)
        if self.cfg.router == "softmax":
            top, index = logits.topk(self.cfg.top_k, dim=-1)
            return top.softmax(dim=-1), index
        return self._sigmoid_route(logits.sigmoid())

    def _sigmoid_route(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """scores (t, E) in (0, 1): choose among the best groups by score + correction, weigh by score."""
        cfg = self.cfg
        assert self.correction is not None
        choice = scores + self.correction.float()  # (t, E)
        if cfg.n_group > 1:
            groups = choice.unflatten(-1, (cfg.n_group, -1))  # (t, G, E/G)
            best = (
                groups.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices
            )  # (t, topk_group)
            keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)  # (t, G)
            choice = groups.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)
        index = choice.topk(cfg.top_k, dim=-1).indices  # (t, k)
        weights = scores.gather(1, index)
        if cfg.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scale, index


class Experts(nn.Module):
    """E MLPs stored as stacked weights: up (E, f or 2f, g), down (E, g, f)."""

    def __init__(self, width: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg.expert
        f = cfg.expert.d_ff
        self.up = nn.Parameter(torch.zeros(cfg.n_experts, f * (2 if cfg.expert.gated else 1), width))
        self.down = nn.Parameter(torch.zeros(cfg.n_experts, width, f))

    def forward(self, x: Tensor, weights: Tensor, index: Tensor) -> Tensor:
        """x (t, g), weights and index (t, k) -> sum over each token's k experts of weight * expert(x),
        (t, g), accumulated in fp32."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in torch.unique(index).tolist():
            token, slot = torch.where(index == e)
            hidden = _hidden(F.linear(x[token], self.up[e]), self.cfg)
            y = F.linear(hidden, self.down[e]).float() * weights[token, slot].unsqueeze(-1)
            out.index_add_(0, token, y)
        return out.to(x.dtype)


class MoE(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.router = Router(d_model, cfg)
        self.latent_in = nn.Linear(d_model, cfg.latent, bias=cfg.latent_bias) if cfg.latent else None
        self.experts = Experts(cfg.latent or d_model, cfg)
        self.latent_out = nn.Linear(cfg.latent, d_model, bias=cfg.latent_bias) if cfg.latent else None
        self.shared = MLP(d_model, cfg.shared) if cfg.shared is not None else None

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d) -> routed experts' sum + the shared expert, (..., d)."""
        flat = x.flatten(0, -2)  # (t, d)
        weights, index = self.router(flat)
        inner = self.latent_in(flat) if self.latent_in is not None else flat
        routed = self.experts(inner, weights, index)
        if self.latent_out is not None:
            routed = self.latent_out(routed)
        out = routed.view(x.shape)
        return out + self.shared(x) if self.shared is not None else out
