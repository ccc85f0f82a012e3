"""Checkpoint tensor names of each hybrid architecture -> `HybridLM` parameter names.

Ours: `embedding.weight`, `blocks.{j}.norm.weight`, `blocks.{j}.{mamba,attention,ffn}.*`, `norm_f.weight`,
`lm_head.weight`, with j the block index (Bamba, Granite and Falcon-H1 layer i is blocks 2i (mixer) and
2i+1 (feed-forward); a Nemotron-H layer is one block). Mamba and attention parameters keep their
checkpoint names. The rest:
- a gated MLP's gate and up projections are one `up_proj` (2f, d) = [gate; up] (Bamba's and Falcon-H1's
  two are concatenated; Granite's `input_linear` already is);
- experts are stacked: `experts.up` (E, f or 2f, g), `experts.down` (E, g, f) (Nemotron-H's per-expert
  tensors are stacked; Granite's are already);
- routers are `router.weight` (E, d) and `router.correction` (E,).
Both the names in published checkpoints (what transformers' save_pretrained writes) and transformers'
in-memory names are accepted. Multi-token-prediction heads (`mtp.*`) are not used and are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from server.model.hybrid_config import HybridArch, HybridConfig

Merge = Literal["", "cat", "stack"]
LAYER = r"(?:model|backbone)\.layers\.(?P<layer>\d+)\."


class WeightNameError(ValueError):
    """A checkpoint tensor that no rule of its architecture maps (or experts that do not stack)."""


@dataclass(frozen=True)
class Rule:
    """Tensors whose name matches `pattern` go to `target`, a format string over the pattern's groups, the
    block indices `mix` (2i), `ffn` (2i+1) and `block` (i) of layer i, `op` (block i's module for its kind)
    and `shared` (a MoE's shared expert); `merge` joins several sources into one tensor, in the order of
    `part` (or of the pattern's `part` group). An empty target skips the tensor."""

    pattern: str
    target: str
    merge: Merge = ""
    part: int = 0


_EDGES = [
    Rule(r"(?:model\.embed_tokens|(?:model|backbone)\.embeddings)\.(?P<rest>.+)", "embedding.{rest}"),
    Rule(r"(?:model\.final_layernorm|model\.norm|(?:model|backbone)\.norm_f)\.(?P<rest>.+)", "norm_f.{rest}"),
    Rule(r"lm_head\.(?P<rest>.+)", "lm_head.{rest}"),
    Rule(r"mtp\..+", ""),
]
_MIXER_BLOCK = [  # Bamba, Granite, Falcon-H1: a layer's first block, its Mamba mixer or attention (or both)
    Rule(LAYER + r"input_layernorm\.(?P<rest>.+)", "blocks.{mix}.norm.{rest}"),
    Rule(LAYER + r"mamba\.(?P<rest>.+)", "blocks.{mix}.mamba.{rest}"),
    Rule(LAYER + r"self_attn\.(?P<rest>.+)", "blocks.{mix}.attention.{rest}"),
]
_BAMBA = [
    Rule(LAYER + r"pre_ff_layernorm\.(?P<rest>.+)", "blocks.{ffn}.norm.{rest}"),
    Rule(LAYER + r"feed_forward\.gate_proj\.(?P<rest>.+)", "blocks.{ffn}.ffn.up_proj.{rest}", "cat", 0),
    Rule(LAYER + r"feed_forward\.up_proj\.(?P<rest>.+)", "blocks.{ffn}.ffn.up_proj.{rest}", "cat", 1),
    Rule(LAYER + r"feed_forward\.down_proj\.(?P<rest>.+)", "blocks.{ffn}.ffn.down_proj.{rest}"),
]
_MOE = LAYER + r"block_sparse_moe\."
_GRANITE = [
    Rule(LAYER + r"post_attention_layernorm\.(?P<rest>.+)", "blocks.{ffn}.norm.{rest}"),
    Rule(LAYER + r"shared_mlp\.input_linear\.(?P<rest>.+)", "blocks.{ffn}.ffn.{shared}up_proj.{rest}"),
    Rule(LAYER + r"shared_mlp\.output_linear\.(?P<rest>.+)", "blocks.{ffn}.ffn.{shared}down_proj.{rest}"),
    Rule(_MOE + r"(?:input_linear\.weight|experts\.gate_up_proj)", "blocks.{ffn}.ffn.experts.up"),
    Rule(_MOE + r"(?:output_linear\.weight|experts\.down_proj)", "blocks.{ffn}.ffn.experts.down"),
    Rule(_MOE + r"router\.(?:layer\.)?weight", "blocks.{ffn}.ffn.router.weight"),
]
_MIXER = LAYER + r"mixer\."
_NEMOTRON = [
    Rule(LAYER + r"norm\.(?P<rest>.+)", "blocks.{block}.norm.{rest}"),
    Rule(_MIXER + r"gate\.weight", "blocks.{block}.ffn.router.weight"),
    Rule(_MIXER + r"gate\.e_score_correction_bias", "blocks.{block}.ffn.router.correction"),
    Rule(_MIXER + r"experts\.(?P<part>\d+)\.up_proj\.weight", "blocks.{block}.ffn.experts.up", "stack"),
    Rule(_MIXER + r"experts\.(?P<part>\d+)\.down_proj\.weight", "blocks.{block}.ffn.experts.down", "stack"),
    Rule(_MIXER + r"experts\.up_proj", "blocks.{block}.ffn.experts.up"),
    Rule(_MIXER + r"experts\.down_proj", "blocks.{block}.ffn.experts.down"),
    Rule(_MIXER + r"shared_experts\.(?P<rest>.+)", "blocks.{block}.ffn.shared.{rest}"),
    Rule(_MIXER + r"fc1_latent_proj\.(?P<rest>.+)", "blocks.{block}.ffn.latent_in.{rest}"),
    Rule(_MIXER + r"fc2_latent_proj\.(?P<rest>.+)", "blocks.{block}.ffn.latent_out.{rest}"),
    Rule(_MIXER + r"(?P<rest>.+)", "blocks.{block}.{op}.{rest}"),
]
RULES: dict[HybridArch, list[Rule]] = {
    "bamba": _EDGES + _MIXER_BLOCK + _BAMBA,
    "granitemoehybrid": _EDGES + _MIXER_BLOCK + _GRANITE,
    "nemotron_h": _EDGES + _NEMOTRON,
    "falcon_h1": _EDGES + _MIXER_BLOCK + _BAMBA,
}
MODULES = {"mamba": "mamba", "attention": "attention", "mlp": "ffn", "moe": "ffn"}


def map_weights(weights: Mapping[str, Tensor], cfg: HybridConfig) -> dict[str, Tensor]:
    """Checkpoint tensors -> our parameter names, merged where ours are one tensor. Raises WeightNameError
    for a tensor no rule maps."""
    parts: dict[str, tuple[Merge, dict[int, Tensor]]] = {}
    for name, tensor in weights.items():
        target, merge, part = _target(name, cfg)
        if target:
            parts.setdefault(target, (merge, {}))[1][part] = tensor
    return {target: _join(merge, pieces) for target, (merge, pieces) in parts.items()}


def _target(name: str, cfg: HybridConfig) -> tuple[str, Merge, int]:
    for rule in RULES[cfg.arch]:
        match = re.fullmatch(rule.pattern, name)
        if match is None:
            continue
        groups = match.groupdict()
        i = int(groups.pop("layer") or 0) if "layer" in groups else 0
        part = int(groups.pop("part")) if "part" in groups else rule.part
        shared = "shared." if cfg.moe is not None else ""
        op = MODULES.get(cfg.blocks[i], "") if i < len(cfg.blocks) else ""
        target = rule.target.format(mix=2 * i, ffn=2 * i + 1, block=i, op=op, shared=shared, **groups)
        return target, rule.merge, part
    raise WeightNameError(f"checkpoint tensor {name} has no place in a {cfg.arch} model")


def _join(merge: Merge, pieces: dict[int, Tensor]) -> Tensor:
    ordered = [pieces[k] for k in sorted(pieces)]
    if merge == "cat":
        return torch.cat(ordered, dim=0)
    if merge == "stack":
        if sorted(pieces) != list(range(len(pieces))):
            raise WeightNameError(f"experts {sorted(pieces)} are not numbered 0..{len(pieces) - 1}")
        return torch.stack(ordered)
    return ordered[0]
