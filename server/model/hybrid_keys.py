"""config.json readers that several hybrid architectures share (see hybrid_archs.py and falcon_h1.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

from server.model.config import NORM_PER_GROUP_KEY, ConfigError, ModelConfig
from server.model.hybrid_config import WITH_MAMBA, Activation, AttentionConfig, BlockKind, HybridArch
from server.model.loader import json_number

ACTIVATION_NAMES: dict[str, Activation] = {"silu": "silu", "swish": "silu", "relu2": "relu2"}


def common_fields(
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


def with_ffn(mixers: list[BlockKind], ffn: BlockKind) -> tuple[BlockKind, ...]:
    """Two blocks per layer: its mixer, then its feed-forward block."""
    return tuple(kind for mixer in mixers for kind in (mixer, ffn))


def mamba_keys(raw: Mapping[str, Any], blocks: tuple[BlockKind, ...]) -> ModelConfig | None:
    """The Mamba2 mixers of Bamba, Granite and Falcon-H1 (`mamba_*` keys; width `mamba_d_ssm`, Falcon-H1's,
    or expand x d_model)."""
    d_inner = int(raw.get("mamba_d_ssm") or int(raw.get("mamba_expand", 2)) * int(raw["hidden_size"]))
    heads = int(raw.get("mamba_n_heads", 128))
    head_dim = raw.get("mamba_d_head", "auto")
    return mamba_config(
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


def mamba_config(
    raw: Mapping[str, Any], blocks: tuple[BlockKind, ...], *, limit_key: str = "", **shape: Any
) -> ModelConfig | None:
    """The Mamba2 section (None without Mamba mixers): `shape` as read by the caller, the dt limit from
    `time_step_limit` (or the legacy `limit_key`), the gated norm's grouping from `tssc_norm_per_group`."""
    n_layer = sum(kind in WITH_MAMBA for kind in blocks)
    if not n_layer:
        return None
    limit = raw.get("time_step_limit", raw.get(limit_key, (0.0, math.inf)))
    norm_per_group = raw.get(NORM_PER_GROUP_KEY, True)
    if not isinstance(norm_per_group, bool):
        raise ConfigError(f"config.json's {NORM_PER_GROUP_KEY} must be true or false, got {norm_per_group!r}")
    return ModelConfig(
        arch="mamba2",
        d_model=int(raw["hidden_size"]),
        n_layer=n_layer,
        vocab_size=int(raw["vocab_size"]),
        expand=max(1, shape["d_inner"] // int(raw["hidden_size"])),
        dt_limit=(json_number(limit[0]), json_number(limit[1])),
        norm_per_group=norm_per_group,
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        **shape,
    )


def attention_config(
    raw: Mapping[str, Any], *, rope: bool, partial_default: float = 1.0, head_dim_default: int = 0
) -> AttentionConfig:
    """GQA heads and head_dim (`head_dim` or `attention_head_dim`, else `head_dim_default`, else d_model /
    heads), scale head_dim^-0.5, and with `rope` the default RoPE on `partial_rotary_factor` (else
    `partial_default`) of each head."""
    heads = int(raw["num_attention_heads"])
    kv = int(raw.get("num_key_value_heads") or heads)
    given = raw.get("head_dim") or raw.get("attention_head_dim") or head_dim_default
    head_dim = int(given or int(raw["hidden_size"]) // heads)
    theta: float | None = None
    rotary = 0
    if rope:
        params = _rope_parameters(raw)
        factor = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", partial_default)))
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        rotary = int(head_dim * factor)
    bias = bool(raw.get("attention_bias", False))
    return AttentionConfig(heads, kv, head_dim, head_dim**-0.5, theta, rotary, bias)


def _rope_parameters(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """rope_parameters (transformers 5) or the legacy rope_scaling; only the default RoPE is supported."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"RoPE type {kind!r} is not supported (only the default RoPE)")
    return cast(Mapping[str, Any], params)


def silu_only(raw: Mapping[str, Any]) -> Activation:
    """Bamba, Granite and Falcon-H1 use `hidden_act` for the MLP and the Mamba conv alike; the conv is SiLU."""
    act = activation(raw.get("hidden_act", "silu"))
    if act != "silu":
        raise ConfigError(f"hidden_act must be silu (it is also the Mamba conv's activation), got {act!r}")
    return act


def activation(name: Any) -> Activation:
    """A config.json activation name -> ours; ConfigError for one we do not implement."""
    if name not in ACTIVATION_NAMES:
        raise ConfigError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATION_NAMES)})")
    return ACTIVATION_NAMES[name]
