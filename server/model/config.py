"""One frozen model config for Mamba2 and Mamba1, built from either checkpoint format.

Shape letters used across `server/model`:
    b  batch            l  sequence length     d  d_model          e  d_inner (expand * d_model)
    h  ssm heads        p  head dim            g  B/C groups       n  d_state
    k  conv kernel      c  conv_dim (e + 2*g*n for Mamba2, e for Mamba1)
    v  padded vocab     r  dt rank (Mamba1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Arch = Literal["mamba2", "mamba1"]
NORM_PER_GROUP_KEY = "tssc_norm_per_group"  # config.json: false for transformers' whole-width gated norm
Format = Literal["state-spaces", "hf"]


class ConfigError(ValueError):
    """A config that cannot describe a supported model."""


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch
    d_model: int
    n_layer: int
    vocab_size: int  # padded: the embedding's row count
    d_state: int = 128
    d_conv: int = 4
    d_inner: int = 0  # 0: expand * d_model
    expand: int = 2
    headdim: int = 64  # Mamba2 only
    ngroups: int = 1  # Mamba2 only
    dt_rank: int = 0  # Mamba1 only; 0: ceil(d_model / 16)
    chunk_size: int = 256
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    conv_bias: bool = True
    proj_bias: bool = False
    dt_limit: tuple[float, float] = (0.0, math.inf)
    unpadded_vocab_size: int = 0  # 0: same as vocab_size
    # Mamba2's gated RMSNorm: per group of d_inner / ngroups channels (mamba_ssm, state-spaces, Codestral),
    # or over the whole d_inner (transformers' implementation); config.json key `tssc_norm_per_group`
    norm_per_group: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.arch not in ("mamba2", "mamba1"):
            raise ConfigError(f"unsupported architecture {self.arch!r} (supported: mamba2, mamba1)")
        if self.d_inner == 0:
            object.__setattr__(self, "d_inner", self.expand * self.d_model)
        if self.dt_rank == 0:
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        if self.unpadded_vocab_size == 0:
            object.__setattr__(self, "unpadded_vocab_size", self.vocab_size)
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "d_inner", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_conv < 2:
            raise ConfigError("d_conv must be >= 2")
        if self.arch == "mamba2":
            if self.d_inner % self.headdim:
                raise ConfigError(f"d_inner {self.d_inner} is not a multiple of headdim {self.headdim}")
            if self.nheads % self.ngroups:
                raise ConfigError(f"nheads {self.nheads} is not a multiple of ngroups {self.ngroups}")

    @property
    def nheads(self) -> int:
        """Mamba2 heads; Mamba1 is treated as d_inner heads of dim 1 where a count is needed."""
        return self.d_inner // self.headdim if self.arch == "mamba2" else self.d_inner

    @property
    def norm_group_size(self) -> int:
        """Channels the Mamba2 gated RMSNorm normalises together (`norm_per_group`)."""
        return self.d_inner // self.ngroups if self.norm_per_group else self.d_inner

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state if self.arch == "mamba2" else self.d_inner

    @property
    def d_in_proj(self) -> int:
        if self.arch == "mamba2":
            return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads
        return 2 * self.d_inner

    def ssm_state_shape(self) -> tuple[int, ...]:
        """One layer's ssm state for one sequence: (h, p, n) for Mamba2, (e, n) for Mamba1."""
        if self.arch == "mamba2":
            return (self.nheads, self.headdim, self.d_state)
        return (self.d_inner, self.d_state)

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    # ---- serialisation to the two checkpoint formats -------------------------------------------

    def to_state_spaces(self) -> dict[str, Any]:
        ssm_cfg: dict[str, Any] = {"d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand}
        if self.arch == "mamba2":
            ssm_cfg |= {"layer": "Mamba2", "headdim": self.headdim, "ngroups": self.ngroups}
            ssm_cfg |= {"chunk_size": self.chunk_size}
        else:
            ssm_cfg |= {"dt_rank": self.dt_rank}
        return {
            "d_model": self.d_model,
            "d_intermediate": 0,
            "n_layer": self.n_layer,
            "vocab_size": self.unpadded_vocab_size,
            "ssm_cfg": ssm_cfg,
            "rms_norm": True,
            "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": True,
            "pad_vocab_size_multiple": _largest_pad_multiple(self.vocab_size, self.unpadded_vocab_size),
            "tie_embeddings": self.tie_embeddings,
        } | self._norm_flag()

    def _norm_flag(self) -> dict[str, Any]:
        """The norm convention's config.json key, written only when it is not the default (per group)."""
        return {} if self.norm_per_group else {NORM_PER_GROUP_KEY: False}

    def to_hf(self) -> dict[str, Any]:
        common = {
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "vocab_size": self.vocab_size,
            "state_size": self.d_state,
            "conv_kernel": self.d_conv,
            "expand": self.expand,
            "layer_norm_epsilon": self.norm_eps,
            "residual_in_fp32": self.residual_in_fp32,
            "use_bias": self.proj_bias,
            "use_conv_bias": self.conv_bias,
            "tie_word_embeddings": self.tie_embeddings,
        }
        if self.arch == "mamba2":
            return (
                common
                | {
                    "model_type": "mamba2",
                    "architectures": ["Mamba2ForCausalLM"],
                    "num_heads": self.nheads,
                    "head_dim": self.headdim,
                    "n_groups": self.ngroups,
                    "chunk_size": self.chunk_size,
                }
                | _strict_json_limit(self.dt_limit)
                | self._norm_flag()
            )
        return common | {
            "model_type": "mamba",
            "architectures": ["MambaForCausalLM"],
            "intermediate_size": self.d_inner,
            "time_step_rank": self.dt_rank,
        }


def _strict_json_limit(limit: tuple[float, float]) -> dict[str, Any]:
    """transformers' default dt limit is (0, inf); omit it then, since strict JSON has no Infinity."""
    return {} if limit == (0.0, math.inf) else {"time_step_limit": list(limit)}


def _largest_pad_multiple(padded: int, unpadded: int) -> int:
    """A pad multiple that maps `unpadded` to `padded` (1 when they are equal)."""
    if padded == unpadded:
        return 1
    for m in (128, 64, 32, 16, 8, 4, 2):
        if padded % m == 0 and padded - unpadded < m:
            return m
    raise ConfigError(f"no pad multiple maps vocab {unpadded} to {padded}")
