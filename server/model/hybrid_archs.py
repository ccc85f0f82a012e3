"""Hybrid configs from the Hugging Face config.json of each supported architecture (Falcon-H1's, with its
parallel blocks and µP multipliers, is in falcon_h1.py; the readers they share in hybrid_keys.py).

What differs between the others, and where it lands in `HybridConfig`:

| | Bamba | Granite 4.0-H (granitemoehybrid) | Nemotron-H |
|---|---|---|---|
| layer pattern | `attn_layer_indices` | `layer_types` | `layers_block_type` / `hybrid_override_pattern` |
| blocks per layer | mixer + gated MLP | mixer + (MoE + shared MLP, or the shared MLP alone) | one of M / * / - / E |
| Mamba width | expand x d_model | expand x d_model | mamba_num_heads x mamba_head_dim |
| gated norm | per group (see below) | per group (see below) | per group |
| attention | RoPE on half of each head | RoPE or none (`position_embedding_type`) | no RoPE |
| attention scale | head_dim^-0.5 | `attention_multiplier` | head_dim^-0.5 |
| MLP | SiLU, gated | SiLU, gated | ReLU^2, not gated |
| router | none | softmax of the top-k logits | sigmoid, group-limited, correction bias |
| multipliers | none | embedding, residual, 1/logits | none |
| residual | model dtype | model dtype | fp32 if `residual_in_fp32` |

The Mamba2 gated norm normalises per group of d_inner / n_groups channels (mamba_ssm's `RMSNormGated`,
which these models were trained with, and vLLM); transformers' Bamba and Granite normalise the whole width
instead, which only differs when n_groups > 1: `tssc_norm_per_group: false` in config.json selects it, as
for pure Mamba2 checkpoints.

dt: softplus(dt + dt_bias) is clamped to `time_step_limit` (default (0, inf): no clamp). transformers'
Nemotron-H clamps its prefill (not its decode) at `time_step_min` instead, which is the initialisation
range of dt_bias, not a runtime bound; vLLM and mamba_ssm do not clamp there, nor do we.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from torch import Tensor

from server.model.config import ConfigError, ModelConfig
from server.model.falcon_h1 import falcon_config, fold_multipliers
from server.model.hybrid_config import (
    Activation,
    AttentionConfig,
    BlockKind,
    HybridArch,
    HybridConfig,
    MLPConfig,
    MoEConfig,
)
from server.model.hybrid_keys import (
    activation,
    attention_config,
    common_fields,
    mamba_config,
    mamba_keys,
    silu_only,
    with_ffn,
)

LEGACY_KINDS = {"mamba": "linear_attention", "attention": "full_attention"}  # old layer-type names
HF_KINDS: dict[str, BlockKind] = {
    "linear_attention": "mamba",
    "full_attention": "attention",
    "mlp": "mlp",
    "moe": "moe",
}
NEMOTRON_PATTERN: dict[str, BlockKind] = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


def hybrid_config(raw: Mapping[str, Any], arch: HybridArch) -> HybridConfig:
    """The config of a supported hybrid from its config.json; ConfigError names what does not fit."""
    try:
        readers = {
            "bamba": _bamba,
            "granitemoehybrid": _granite,
            "nemotron_h": _nemotron,
            "falcon_h1": falcon_config,
        }
        return readers[arch](raw)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{arch} config.json: {exc!r}") from exc


def prepare_weights(raw: Mapping[str, Any], cfg: HybridConfig, weights: dict[str, Tensor]) -> None:
    """What an architecture does to its (mapped) weights at load, in place: Falcon-H1 folds its µP
    multipliers into them."""
    if cfg.arch == "falcon_h1":
        fold_multipliers(raw, cfg, weights)


# ---- per architecture ---------------------------------------------------------------------------


def _bamba(raw: Mapping[str, Any]) -> HybridConfig:
    attn = set(raw.get("attn_layer_indices") or [])
    mixers: list[BlockKind] = [
        "attention" if i in attn else "mamba" for i in range(int(raw["num_hidden_layers"]))
    ]
    act, blocks = silu_only(raw), with_ffn(mixers, "mlp")
    return HybridConfig(
        **common_fields(raw, "bamba", blocks, float(raw.get("rms_norm_eps", 1e-5))),
        mamba=mamba_keys(raw, blocks),
        attention=attention_config(raw, rope=True, partial_default=0.5) if "attention" in blocks else None,
        mlp=MLPConfig(int(raw["intermediate_size"]), act, gated=True, bias=bool(raw.get("mlp_bias", False))),
    )


def _granite(raw: Mapping[str, Any]) -> HybridConfig:
    n = int(raw["num_hidden_layers"])
    mixers = [HF_KINDS[LEGACY_KINDS.get(t, t)] for t in raw.get("layer_types") or ["mamba"] * n]
    act = silu_only(raw)
    shared = MLPConfig(int(raw.get("shared_intermediate_size", 1024)), act, gated=True)
    experts = int(raw.get("num_local_experts", 8))
    moe = None
    if experts > 0:
        expert = MLPConfig(int(raw["intermediate_size"]), act, gated=True)
        moe = MoEConfig(experts, int(raw.get("num_experts_per_tok", 2)), expert, "softmax", shared=shared)
    blocks = with_ffn(mixers, "moe" if moe else "mlp")
    return HybridConfig(
        **common_fields(raw, "granitemoehybrid", blocks, float(raw.get("rms_norm_eps", 1e-6))),
        mamba=mamba_keys(raw, blocks),
        attention=_granite_attention(raw) if "attention" in blocks else None,
        mlp=None if moe else shared,
        moe=moe,
        embedding_multiplier=float(raw.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(raw.get("residual_multiplier", 1.0)),
        logits_scaling=float(raw.get("logits_scaling", 1.0)),
    )


def _granite_attention(raw: Mapping[str, Any]) -> AttentionConfig:
    base = attention_config(raw, rope=raw.get("position_embedding_type") == "rope")
    return replace(base, scale=float(raw.get("attention_multiplier", 1.0)))


def _nemotron(raw: Mapping[str, Any]) -> HybridConfig:
    blocks = _nemotron_blocks(raw)
    act, bias = activation(raw.get("mlp_hidden_act", "relu2")), bool(raw.get("mlp_bias", False))
    return HybridConfig(
        **common_fields(raw, "nemotron_h", blocks, float(raw.get("layer_norm_epsilon", 1e-5))),
        mamba=_nemotron_mamba(raw, blocks),
        attention=_nemotron_attention(raw) if "attention" in blocks else None,
        mlp=MLPConfig(int(raw["intermediate_size"]), act, gated=False, bias=bias)
        if "mlp" in blocks
        else None,
        moe=_nemotron_moe(raw, act, bias) if "moe" in blocks else None,
        residual_in_fp32=bool(raw.get("residual_in_fp32", False)),
    )


def _nemotron_attention(raw: Mapping[str, Any]) -> AttentionConfig:
    """No RoPE; head_dim defaults to 128 (transformers' NemotronHConfig), not d_model / heads."""
    return attention_config(raw, rope=False, head_dim_default=128)


def _nemotron_blocks(raw: Mapping[str, Any]) -> tuple[BlockKind, ...]:
    kinds = raw.get("layers_block_type") or raw.get("layer_types")
    if kinds:
        return tuple(HF_KINDS[LEGACY_KINDS.get(k, k)] for k in kinds)
    pattern = raw.get("hybrid_override_pattern")
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError("nemotron_h config.json has neither layers_block_type nor hybrid_override_pattern")
    return tuple(NEMOTRON_PATTERN[c] for c in pattern)


def _nemotron_moe(raw: Mapping[str, Any], act: Activation, bias: bool) -> MoEConfig:
    shared_width = int(raw.get("moe_shared_expert_intermediate_size", 7688))
    shared = (
        MLPConfig(shared_width, act, gated=False, bias=bias) if int(raw.get("n_shared_experts", 1)) else None
    )
    return MoEConfig(
        n_experts=int(raw.get("n_routed_experts", 8)),
        top_k=int(raw.get("num_experts_per_tok", 2)),
        expert=MLPConfig(int(raw.get("moe_intermediate_size", 7688)), act, gated=False),
        router="sigmoid",
        shared=shared,
        n_group=int(raw.get("n_group", 1)),
        topk_group=int(raw.get("topk_group", 1)),
        norm_topk=bool(raw.get("norm_topk_prob", True)),
        routed_scale=float(raw.get("routed_scaling_factor", 1.0)),
        latent=int(raw.get("moe_latent_size") or 0),
        latent_bias=bias,
    )


def _nemotron_mamba(raw: Mapping[str, Any], blocks: tuple[BlockKind, ...]) -> ModelConfig | None:
    """Nemotron-H's mixers; its config.json may use either the current or the legacy `mamba_*` keys."""
    if raw.get("mamba_hidden_act", "silu") not in ("silu", "swish"):
        raise ConfigError(f"the Mamba mixer's activation must be silu, got {raw.get('mamba_hidden_act')!r}")

    def key(name: str, legacy: str, default: Any) -> Any:
        return raw.get(name, raw.get(legacy, default))

    head_dim = int(raw.get("mamba_head_dim", 64))
    return mamba_config(
        raw, blocks,
        d_inner=int(raw.get("mamba_num_heads", 128)) * head_dim,
        headdim=head_dim,
        ngroups=int(key("n_groups", "mamba_n_groups", 8)),
        d_state=int(raw.get("ssm_state_size", 128)),
        d_conv=int(key("conv_kernel", "mamba_d_conv", 4)),
        chunk_size=int(key("chunk_size", "mamba_chunk_size", 128)),
        conv_bias=bool(key("use_conv_bias", "mamba_conv_bias", True)),
        proj_bias=bool(raw.get("use_bias", False)),
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        limit_key="mamba_dt_limit",
    )  # fmt: skip
