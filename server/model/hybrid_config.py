"""The frozen config of a hybrid Mamba2 + attention language model (Bamba, Granite 4.0-H, Nemotron-H,
Falcon-H1).

A hybrid is a flat stack of residual blocks, `x + m * op(rmsnorm(x))`, each op one of:
- "mamba": a Mamba2 mixer (`server.model.mamba2.Mamba2Mixer`, configured by `mamba`, a `ModelConfig`
  whose n_layer counts the blocks with a Mamba mixer; its output per `mamba_output`);
- "attention": grouped-query attention, with RoPE or without (`attention`);
- "parallel": a Mamba2 mixer and attention side by side on the same input, their outputs summed;
- "mlp": a dense MLP, gated or not (`mlp`);
- "moe": routed experts plus an optional shared expert (`moe`).
Bamba, Granite and Falcon-H1 layers are two blocks each (mixer, then MLP or MoE); a Nemotron-H layer is
one block.

Shape letters (besides config.py's): q query heads, kv key/value heads, dh attention head dim, f MLP
width, E experts, t tokens (b*l flattened).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from server.model.config import ConfigError, ModelConfig

BlockKind = Literal["mamba", "attention", "parallel", "mlp", "moe"]
BLOCK_KINDS: tuple[BlockKind, ...] = ("mamba", "attention", "parallel", "mlp", "moe")
WITH_MAMBA: tuple[BlockKind, ...] = ("mamba", "parallel")
WITH_ATTENTION: tuple[BlockKind, ...] = ("attention", "parallel")
Activation = Literal["silu", "relu2"]
HybridArch = Literal["bamba", "granitemoehybrid", "nemotron_h", "falcon_h1"]
RouterKind = Literal["softmax", "sigmoid"]
# The Mamba2 mixer's output from the scan's y and the gate z, before out_proj:
# "gated_norm" rmsnorm(y * silu(z)) (Mamba2's), "norm_gate" rmsnorm(y) * silu(z), "gate" y * silu(z)
MambaOutput = Literal["gated_norm", "norm_gate", "gate"]


@dataclass(frozen=True)
class AttentionConfig:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float  # multiplies q.k (head_dim ** -0.5, or Granite's attention_multiplier)
    rope_theta: float | None = None  # None: no positional encoding (NoPE)
    rotary_dim: int = 0  # the leading dims of each head that RoPE rotates (partial RoPE); 0 without RoPE
    bias: bool = False

    def __post_init__(self) -> None:
        if min(self.n_heads, self.n_kv_heads, self.head_dim) < 1:
            raise ConfigError("attention heads and head_dim must be >= 1")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"{self.n_heads} query heads do not group into {self.n_kv_heads} kv heads")
        if (self.rope_theta is None) != (self.rotary_dim == 0):
            raise ConfigError("rope_theta and rotary_dim must be given together")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(f"rotary_dim {self.rotary_dim} must be even and <= head_dim {self.head_dim}")


@dataclass(frozen=True)
class MLPConfig:
    d_ff: int  # f
    act: Activation
    gated: bool  # down(act(gate(x)) * up(x)), else down(act(up(x)))
    bias: bool = False

    def __post_init__(self) -> None:
        if self.d_ff < 1:
            raise ConfigError(f"MLP width must be >= 1, got {self.d_ff}")


@dataclass(frozen=True)
class MoEConfig:
    """Routed experts: each token goes to `top_k` of `n_experts` experts, weighted by the router.

    Routers: "softmax" takes the top-k router logits and softmaxes them (Granite); "sigmoid" scores
    experts by sigmoid(logit), picks the top-k of score + correction bias among the best `topk_group` of
    `n_group` expert groups, weights them by their scores (normalised if `norm_topk`) times `routed_scale`
    (Nemotron-H, DeepSeek-V3 style)."""

    n_experts: int
    top_k: int
    expert: MLPConfig  # one expert's width and activation
    router: RouterKind
    shared: MLPConfig | None = None  # an expert every token also goes through
    n_group: int = 1
    topk_group: int = 1
    norm_topk: bool = False
    routed_scale: float = 1.0
    latent: int = 0  # experts work at this width, projected from and to d_model (0: at d_model)
    latent_bias: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(f"top_k {self.top_k} must lie in [1, {self.n_experts}]")
        if self.n_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(
                f"{self.n_experts} experts do not form {self.n_group} groups (top {self.topk_group})"
            )
        if self.router == "sigmoid" and self.n_group > 1 and self.n_experts // self.n_group < 2:
            raise ConfigError("group-limited routing scores each group by its best two experts")


@dataclass(frozen=True)
class HybridConfig:
    arch: HybridArch
    d_model: int
    vocab_size: int  # the embedding's row count
    blocks: tuple[BlockKind, ...]
    norm_eps: float
    mamba: ModelConfig | None = None
    mamba_output: MambaOutput = "gated_norm"
    attention: AttentionConfig | None = None
    mlp: MLPConfig | None = None
    moe: MoEConfig | None = None
    residual_in_fp32: bool = False
    tie_embeddings: bool = False
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0  # scales every block's output before it joins the residual
    logits_scaling: float = 1.0  # logits are divided by it
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if min(self.d_model, self.vocab_size, len(self.blocks)) < 1:
            raise ConfigError("d_model, vocab_size and the block count must be >= 1")
        for kind in self.blocks:
            if kind not in BLOCK_KINDS:
                raise ConfigError(f"unknown block kind {kind!r} (known: {', '.join(BLOCK_KINDS)})")
            for section in _sections(kind):
                if getattr(self, section) is None:
                    raise ConfigError(f"a {kind} block needs the config's {section} section")
        if self.mamba is not None:
            if self.mamba.arch != "mamba2" or self.mamba.n_layer != self.n_mamba:
                raise ConfigError("the mamba section must be a Mamba2 config with one layer per Mamba mixer")
            if self.mamba.d_model != self.d_model:
                raise ConfigError("the mamba section's d_model differs from the model's")

    @property
    def n_mamba(self) -> int:
        """Blocks with a Mamba mixer (each holds one (conv, ssm) state)."""
        return sum(kind in WITH_MAMBA for kind in self.blocks)

    @property
    def n_attention(self) -> int:
        """Blocks with attention (each holds one KV)."""
        return sum(kind in WITH_ATTENTION for kind in self.blocks)


def _sections(kind: BlockKind) -> tuple[str, ...]:
    """The config sections a block kind needs."""
    return ("mamba", "attention") if kind == "parallel" else (kind,)


# ---- which config.json is a hybrid's ------------------------------------------------------------

HYBRID_MODEL_TYPES: dict[str, HybridArch] = {
    "bamba": "bamba",
    "granitemoehybrid": "granitemoehybrid",
    "nemotron_h": "nemotron_h",
    "falcon_h1": "falcon_h1",
}
HYBRID_CLASSES: dict[str, HybridArch] = {
    "BambaForCausalLM": "bamba",
    "GraniteMoeHybridForCausalLM": "granitemoehybrid",
    "NemotronHForCausalLM": "nemotron_h",
    "FalconH1ForCausalLM": "falcon_h1",
}
# hybrids (and other models with attention) that no loader here reads yet
UNSUPPORTED_MODEL_TYPES = ("zamba", "zamba2", "jamba", "plamo2", "lfm2", "qwen3_next")


def hybrid_arch(raw: Mapping[str, Any]) -> HybridArch | None:
    """The supported hybrid architecture that config.json declares (`model_type`, else `architectures`)."""
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type in HYBRID_MODEL_TYPES:
        return HYBRID_MODEL_TYPES[model_type]
    classes = raw.get("architectures")
    for name in classes if isinstance(classes, list) else []:
        if isinstance(name, str) and name in HYBRID_CLASSES:
            return HYBRID_CLASSES[name]
    return None
