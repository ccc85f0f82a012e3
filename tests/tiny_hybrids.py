"""Seeded tiny transformers hybrids (Mamba2 + attention), one per supported architecture and variant.

Every variant has several Mamba2 layers (chunk size 8, so a 27-token prompt spans chunk boundaries),
at least one GQA attention layer (4 query heads over 2 kv heads), and the MoE variants 4 experts, top 2.
Falcon-H1 has a Mamba2 mixer and attention in every layer, side by side.
Weights are drawn wider than transformers' init (std 0.1) and A, dt, D, the norms and the router
corrections are perturbed, so that every path changes the logits.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK = 8
VOCAB = 96
VARIANTS = (
    "bamba",
    "granite-dense",
    "granite-moe",
    "nemotron_h",
    "nemotron_h-latent",
    "falcon_h1",
    "falcon_h1-norm",
)
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
_MAMBA: dict[str, Any] = {
    "mamba_n_heads": 4,
    "mamba_d_state": 8,
    "mamba_n_groups": 1,
    "mamba_chunk_size": CHUNK,
}


def _bamba(**changes: Any) -> Any:
    from transformers import BambaConfig, BambaForCausalLM

    cfg = BambaConfig(**_COMMON, **_MAMBA, num_hidden_layers=4, attn_layer_indices=[1], intermediate_size=48)
    return BambaForCausalLM(_changed(cfg, changes))


def _granite(moe: bool, **changes: Any) -> Any:
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    cfg = GraniteMoeHybridConfig(
        **_COMMON,
        **_MAMBA,
        num_hidden_layers=4,
        layer_types=["mamba", "mamba", "attention", "mamba"],
        intermediate_size=24,
        shared_intermediate_size=40,
        num_local_experts=4 if moe else 0,
        num_experts_per_tok=2,
        position_embedding_type="rope" if moe else None,  # Granite 4.0-H itself has no RoPE
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.3,
        logits_scaling=1.5,
    )
    return GraniteMoeHybridForCausalLM(_changed(cfg, changes))


def _nemotron(latent: bool, **changes: Any) -> Any:
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = NemotronHConfig(
        **_COMMON,
        layers_block_type=["mamba", "attention", "mamba", "mlp", "mamba", "moe"],
        head_dim=8,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=8,
        n_groups=2,
        chunk_size=CHUNK,
        intermediate_size=48,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        moe_latent_size=12 if latent else None,
        time_step_min=1e-6,  # transformers clamps its prefill's dt at time_step_min (see hybrid_archs)
    )
    return NemotronHForCausalLM(_changed(cfg, changes))


def _falcon(norm: bool, **changes: Any) -> Any:
    """Falcon-H1 with every µP multiplier away from 1; with `norm`, rmsnorm(y) * silu(z) over 2 groups."""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    cfg = FalconH1Config(
        **_COMMON,
        **(_MAMBA | {"mamba_n_groups": 2 if norm else 1}),
        num_hidden_layers=3,
        head_dim=12,
        intermediate_size=48,
        mamba_d_ssm=48,
        mamba_rms_norm=norm,
        embedding_multiplier=2.0,
        lm_head_multiplier=0.7,
        mlp_multipliers=[1.5, 0.6],
        key_multiplier=1.3,
        attention_in_multiplier=0.8,
        attention_out_multiplier=1.2,
        ssm_in_multiplier=0.9,
        ssm_out_multiplier=1.1,
        ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.7],
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
    )
    return FalconH1ForCausalLM(_changed(cfg, changes))


def _changed(cfg: Any, changes: dict[str, Any]) -> Any:
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def tiny_hybrid(variant: str, *, seed: int = 0, **changes: Any) -> Any:
    """A seeded tiny transformers hybrid of `variant` (one of VARIANTS), in eval mode; `changes` set
    config attributes before the model is built."""
    torch.manual_seed(seed)
    builders = {
        "bamba": lambda: _bamba(**changes),
        "granite-dense": lambda: _granite(False, **changes),
        "granite-moe": lambda: _granite(True, **changes),
        "nemotron_h": lambda: _nemotron(False, **changes),
        "nemotron_h-latent": lambda: _nemotron(True, **changes),
        "falcon_h1": lambda: _falcon(False, **changes),
        "falcon_h1-norm": lambda: _falcon(True, **changes),
    }
    model = builders[variant]()
    _perturb(model)
    return model.eval()


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "D")) or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) - 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))


def make_chat_hybrid_dir(path: Any, variant: str, seed: int, tok_vocab: int = 300) -> Any:
    """A seeded tiny hybrid of `variant` (vocab 320, chunk 8) with a byte-level tokenizer of `tok_vocab` ids
    and a chat template, in `path`: a model directory `tssc serve` can load."""
    from tests.tiny_models import make_tokenizer

    tiny_hybrid(variant, seed=seed, vocab_size=320).save_pretrained(path, safe_serialization=True)
    make_tokenizer(path, vocab=tok_vocab)
    return path
