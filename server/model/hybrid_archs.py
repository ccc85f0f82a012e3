"""Hybrid configs from the Hugging Face config.json of each supported architecture.

What differs between them, and where it lands in `HybridConfig`:

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

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, cast

from server.model.config import NORM_PER_GROUP_KEY, ConfigError, ModelConfig
from server.model.hybrid_config import (
    Activation,
    AttentionConfig,
    BlockKind,
    HybridArch,
    HybridConfig,
    MLPConfig,
    MoEConfig,
)
from server.model.loader import json_number

ACTIVATION_NAMES: dict[str, Activation] = {"silu": "silu", "swish": "silu", "relu2": "relu2"}
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
        return {"bamba": _bamba, "granitemoehybrid": _granite, "nemotron_h": _nemotron}[arch](raw)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{arch} config.json: {exc!r}") from exc


# ---- per architecture ---------------------------------------------------------------------------


def _bamba(raw: Mapping[str, Any]) -> HybridConfig:
    attn = set(raw.get("attn_layer_indices") or [])
    mixers: list[BlockKind] = [
        "attention" if i in attn else "mamba" for i in range(int(raw["num_hidden_layers"]))
    ]
    act, blocks = _silu_only(raw), _with_ffn(mixers, "mlp")
    return HybridConfig(
        **_common(raw, "bamba", blocks, float(raw.get("rms_norm_eps", 1e-5))),
        mamba=_mamba_v1_keys(raw, blocks),
        attention=_attention(raw, rope=True, partial_default=0.5) if "attention" in blocks else None,
        mlp=MLPConfig(int(raw["intermediate_size"]), act, gated=True, bias=bool(raw.get("mlp_bias", False))),
    )


def _granite(raw: Mapping[str, Any]) -> HybridConfig:
    n = int(raw["num_hidden_layers"])
    mixers = [HF_KINDS[LEGACY_KINDS.get(t, t)] for t in raw.get("layer_types") or ["mamba"] * n]
    act = _silu_only(raw)
    shared = MLPConfig(int(raw.get("shared_intermediate_size", 1024)), act, gated=True)
    experts = int(raw.get("num_local_experts", 8))
    moe = None
    if experts > 0:
        expert = MLPConfig(int(raw["intermediate_size"]), act, gated=True)
        moe = MoEConfig(experts, int(raw.get("num_experts_per_tok", 2)), expert, "softmax", shared=shared)
    blocks = _with_ffn(mixers, "moe" if moe else "mlp")
    return HybridConfig(
        **_common(raw, "granitemoehybrid", blocks, float(raw.get("rms_norm_eps", 1e-6))),
        mamba=_mamba_v1_keys(raw, blocks),
        attention=_granite_attention(raw) if "attention" in blocks else None,
        mlp=None if moe else shared,
        moe=moe,
        embedding_multiplier=float(raw.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(raw.get("residual_multiplier", 1.0)),
        logits_scaling=float(raw.get("logits_scaling", 1.0)),
    )


def _granite_attention(raw: Mapping[str, Any]) -> AttentionConfig:
    base = _attention(raw, rope=raw.get("position_embedding_type") == "rope", partial_default=1.0)
    return replace(base, scale=float(raw.get("attention_multiplier", 1.0)))


def _nemotron(raw: Mapping[str, Any]) -> HybridConfig:
    blocks = _nemotron_blocks(raw)
    act, bias = _activation(raw.get("mlp_hidden_act", "relu2")), bool(raw.get("mlp_bias", False))
    return HybridConfig(
        **_common(raw, "nemotron_h", blocks, float(raw.get("layer_norm_epsilon", 1e-5))),
        mamba=_nemotron_mamba(raw, blocks),
        attention=_attention(raw, rope=False, partial_default=1.0) if "attention" in blocks else None,
        mlp=MLPConfig(int(raw["intermediate_size"]), act, gated=False, bias=bias)
        if "mlp" in blocks
        else None,
        moe=_nemotron_moe(raw, act, bias) if "moe" in blocks else None,
        residual_in_fp32=bool(raw.get("residual_in_fp32", False)),
    )


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


# ---- shared pieces ------------------------------------------------------------------------------


def _common(
    raw: Mapping[str, Any], arch: HybridArch, blocks: tuple[BlockKind, ...], eps: float
) -> dict[str, Any]:
    """The HybridConfig fields every architecture reads alike."""
    return {
        "arch": arch,
        "d_model": int(raw["hidden_size"]),
        "vocab_size": int(raw["vocab_size"]),
        "blocks": blocks,
        "norm_eps": eps,
        "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "extra": {"model_type": raw.get("model_type", arch)},
    }


def _with_ffn(mixers: list[BlockKind], ffn: BlockKind) -> tuple[BlockKind, ...]:
    """Two blocks per layer: its mixer, then its feed-forward block."""
    return tuple(kind for mixer in mixers for kind in (mixer, ffn))


def _mamba_v1_keys(raw: Mapping[str, Any], blocks: tuple[BlockKind, ...]) -> ModelConfig | None:
    """The Mamba2 mixers of Bamba and Granite (`mamba_*` keys, width expand x d_model)."""
    d = int(raw["hidden_size"])
    d_inner = int(raw.get("mamba_expand", 2)) * d
    heads = int(raw.get("mamba_n_heads", 128))
    head_dim = raw.get("mamba_d_head", "auto")
    return _mamba(
        raw, blocks,
        d_inner=d_inner,
        headdim=d_inner // heads if head_dim in ("auto", None) else int(head_dim),
        ngroups=int(raw.get("mamba_n_groups", 1)),
        d_state=int(raw.get("mamba_d_state", 256)),
        d_conv=int(raw.get("mamba_d_conv", 4)),
        chunk_size=int(raw.get("mamba_chunk_size", 256)),
        conv_bias=bool(raw.get("mamba_conv_bias", True)),
        proj_bias=bool(raw.get("mamba_proj_bias", False)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
    )  # fmt: skip


def _nemotron_mamba(raw: Mapping[str, Any], blocks: tuple[BlockKind, ...]) -> ModelConfig | None:
    """Nemotron-H's mixers; its config.json may use either the current or the legacy `mamba_*` keys."""
    if raw.get("mamba_hidden_act", "silu") not in ("silu", "swish"):
        raise ConfigError(f"the Mamba mixer's activation must be silu, got {raw.get('mamba_hidden_act')!r}")

    def key(name: str, legacy: str, default: Any) -> Any:
        return raw.get(name, raw.get(legacy, default))

    head_dim = int(raw.get("mamba_head_dim", 64))
    return _mamba(
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


def _mamba(
    raw: Mapping[str, Any], blocks: tuple[BlockKind, ...], *, limit_key: str = "", **shape: Any
) -> ModelConfig | None:
    if "mamba" not in blocks:
        return None
    limit = raw.get("time_step_limit", raw.get(limit_key, (0.0, math.inf)))
    norm_per_group = raw.get(NORM_PER_GROUP_KEY, True)
    if not isinstance(norm_per_group, bool):
        raise ConfigError(f"config.json's {NORM_PER_GROUP_KEY} must be true or false, got {norm_per_group!r}")
    return ModelConfig(
        arch="mamba2",
        d_model=int(raw["hidden_size"]),
        n_layer=blocks.count("mamba"),
        vocab_size=int(raw["vocab_size"]),
        expand=max(1, shape["d_inner"] // int(raw["hidden_size"])),
        dt_limit=(json_number(limit[0]), json_number(limit[1])),
        norm_per_group=norm_per_group,
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        **shape,
    )


def _attention(raw: Mapping[str, Any], *, rope: bool, partial_default: float) -> AttentionConfig:
    heads = int(raw["num_attention_heads"])
    kv = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or int(raw["hidden_size"]) // heads)
    theta, rotary = (None, 0)
    if rope:
        params = _rope_parameters(raw)
        factor = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", partial_default)))
        theta, rotary = (
            float(params.get("rope_theta", raw.get("rope_theta", 10000.0))),
            int(head_dim * factor),
        )
    return AttentionConfig(
        heads, kv, head_dim, head_dim**-0.5, theta, rotary, bool(raw.get("attention_bias", False))
    )


def _rope_parameters(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """rope_parameters (transformers 5) or the legacy rope_scaling; only the default RoPE is supported."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"RoPE type {kind!r} is not supported (only the default RoPE)")
    return cast(Mapping[str, Any], params)


def _silu_only(raw: Mapping[str, Any]) -> Activation:
    """Bamba and Granite use `hidden_act` for the MLP and the Mamba conv alike; the conv is SiLU."""
    act = _activation(raw.get("hidden_act", "silu"))
    if act != "silu":
        raise ConfigError(f"hidden_act must be silu (it is also the Mamba conv's activation), got {act!r}")
    return act


def _activation(name: Any) -> Activation:
    if name not in ACTIVATION_NAMES:
        raise ConfigError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATION_NAMES)})")
    return ACTIVATION_NAMES[name]
