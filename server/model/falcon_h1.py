"""Falcon-H1: every layer runs a Mamba2 mixer and attention side by side on the same normed input (their
outputs summed, a "parallel" block), then a gated SiLU MLP.

Where it differs from the other hybrids:
- the Mamba width is `mamba_d_ssm` (else expand x d_model), and its output is y * silu(z) without a norm
  unless `mamba_rms_norm`, then rmsnorm(y) * silu(z) (`mamba_norm_before_gate`, the default) or Mamba2's
  rmsnorm(y * silu(z)), normalised per group either way;
- µP multipliers scale the embedding, the logits (`lm_head_multiplier`), each projection's input or output
  (`attention_in/out_multiplier`, `key_multiplier`, `ssm_in/out_multiplier`, `mlp_multipliers`) and the five
  sections [z | x | B | C | dt] of the Mamba in_proj output (`ssm_multipliers`). The embedding and logits
  multipliers stay multipliers (the head may be tied); the rest are folded into the weights they scale at
  load, which computes the same function up to rounding.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from server.model.config import ConfigError
from server.model.hybrid_config import HybridConfig, MambaOutput, MLPConfig
from server.model.hybrid_keys import attention_config, common_fields, mamba_keys, silu_only, with_ffn

Scale = Tensor | float  # a factor for a projection's output rows: one per row (o,) or one for all


def falcon_config(raw: Mapping[str, Any]) -> HybridConfig:
    if bool(raw.get("mamba_proj_bias", False)) != bool(raw.get("projectors_bias", False)):
        raise ConfigError("a Mamba in_proj and out_proj that differ in bias are not supported")
    blocks = with_ffn(["parallel"] * int(raw["num_hidden_layers"]), "mlp")
    act = silu_only(raw)
    return HybridConfig(
        **common_fields(raw, "falcon_h1", blocks, float(raw.get("rms_norm_eps", 1e-5))),
        mamba=mamba_keys(raw, blocks),
        mamba_output=_mamba_output(raw),
        attention=attention_config(raw, rope=True),
        mlp=MLPConfig(int(raw["intermediate_size"]), act, gated=True, bias=bool(raw.get("mlp_bias", False))),
        embedding_multiplier=float(raw.get("embedding_multiplier", 1.0)),
        logits_scaling=1.0 / float(raw.get("lm_head_multiplier", 1.0)),
    )


def _mamba_output(raw: Mapping[str, Any]) -> MambaOutput:
    if not raw.get("mamba_rms_norm", False):
        return "gate"
    return "norm_gate" if raw.get("mamba_norm_before_gate", True) else "gated_norm"


def fold_multipliers(raw: Mapping[str, Any], cfg: HybridConfig, weights: dict[str, Tensor]) -> None:
    """Scale, in place, each projection's weight and bias (named as in `HybridLM`) by the µP multipliers
    that Falcon-H1 applies to its input or output."""
    scales = _scales(raw, cfg)
    for name, tensor in weights.items():
        match = re.fullmatch(r"blocks\.\d+\.(?P<module>\w+\.\w+)\.(?P<kind>weight|bias)", name)
        if match is None or match["module"] not in scales:
            continue
        scale = scales[match["module"]][match["kind"] == "bias"]
        if isinstance(scale, Tensor) and tensor.dim() == 2:
            scale = scale.unsqueeze(-1)  # (o, 1): one factor per output row
        weights[name] = (tensor.float() * scale).to(tensor.dtype)


def _scales(raw: Mapping[str, Any], cfg: HybridConfig) -> dict[str, tuple[Scale, Scale]]:
    """Module -> (its weight's factor, its bias's factor). An input multiplier scales the weight alone."""
    mult = {k: float(raw.get(k, 1.0)) for k in _SCALARS}
    attn_in, key = mult["attention_in_multiplier"], mult["key_multiplier"]
    mup = _mup_vector(raw, cfg)
    gate, down = (float(m) for m in raw.get("mlp_multipliers") or (1.0, 1.0))
    f = cfg.mlp.d_ff if cfg.mlp else 0
    gate_rows = torch.cat([torch.full((f,), gate), torch.ones(f)])  # up_proj is [gate | up]
    ssm_out, attn_out = mult["ssm_out_multiplier"], mult["attention_out_multiplier"]
    return {
        "mamba.in_proj": (mup * mult["ssm_in_multiplier"], mup),
        "mamba.out_proj": (ssm_out, ssm_out),
        "attention.q_proj": (attn_in, 1.0),
        "attention.k_proj": (attn_in * key, key),
        "attention.v_proj": (attn_in, 1.0),
        "attention.o_proj": (attn_out, attn_out),
        "ffn.up_proj": (gate_rows, gate_rows),
        "ffn.down_proj": (down, down),
    }


_SCALARS = (
    "attention_in_multiplier",
    "attention_out_multiplier",
    "key_multiplier",
    "ssm_in_multiplier",
    "ssm_out_multiplier",
)


def _mup_vector(raw: Mapping[str, Any], cfg: HybridConfig) -> Tensor:
    """The Mamba in_proj's per-row multipliers: (2e + 2gn + h,) over its sections [z | x | B | C | dt]."""
    mamba = cfg.mamba
    assert mamba is not None
    gn = mamba.ngroups * mamba.d_state
    sizes = (mamba.d_inner, mamba.d_inner, gn, gn, mamba.nheads)
    multipliers = raw.get("ssm_multipliers") or (1.0,) * 5
    if len(multipliers) != 5:
        raise ConfigError(f"ssm_multipliers must hold 5 numbers, got {multipliers!r}")
    return torch.cat([torch.full((n,), float(m)) for n, m in zip(sizes, multipliers, strict=True)])
