"""Load a hybrid Mamba2 + attention model from a directory (or Hub id) holding its Hugging Face
config.json and safetensors (single file or shards): Bamba, Granite 4.0-H, Nemotron-H, Falcon-H1.

Unlike pure Mamba checkpoints, whose sizes come from the weights (`loader.py`), a hybrid's layer pattern,
heads, experts and multipliers come from config.json; the weights must then match it exactly (every
tensor mapped, none missing, every shape as configured), or the load fails naming what does not.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from server.model.config import ConfigError
from server.model.ffn import Router
from server.model.hybrid import HybridLM
from server.model.hybrid_archs import hybrid_config, prepare_weights
from server.model.hybrid_config import HybridConfig, hybrid_arch
from server.model.hybrid_weights import WeightNameError, map_weights
from server.model.loader import (
    DTYPES,
    ModelLoadError,
    open_checkpoint,
    read_weights,
    skip_init,
)

log = logging.getLogger(__name__)


def load_hybrid(
    path_or_id: str | os.PathLike[str], *, device: str | torch.device = "cpu", dtype: str = "fp32"
) -> tuple[HybridConfig, HybridLM]:
    model_dir, raw = open_checkpoint(path_or_id, dtype)
    arch = hybrid_arch(raw)
    if arch is None:
        raise ModelLoadError(
            f"{model_dir}/config.json is not a supported hybrid (Bamba, Granite 4.0-H, Nemotron-H, Falcon-H1)"
        )
    try:
        cfg = hybrid_config(raw, arch)
        weights = map_weights(read_weights(model_dir), cfg)
        prepare_weights(raw, cfg, weights)
    except (ConfigError, WeightNameError) as exc:
        raise ModelLoadError(f"{model_dir}: {exc}") from exc
    model = _build(cfg, weights).to(device=device, dtype=DTYPES[dtype]).eval()
    _keep_fp32(model, weights, device)
    log.info("loaded %s %s (%s) from %s", arch, dtype, _pattern(cfg), model_dir)
    return cfg, model


def _build(cfg: HybridConfig, weights: dict[str, Tensor]) -> HybridLM:
    """The model on the CPU with the checkpoint's tensors assigned (no copy, no random init)."""
    with torch.device("meta"), skip_init():
        model = HybridLM(cfg)
    tied = cfg.tie_embeddings or "lm_head.weight" not in weights
    if tied:
        weights.pop("lm_head.weight", None)
    try:
        result = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as exc:  # a shape that differs from the config's
        raise ModelLoadError(f"weights do not match config.json: {exc}") from exc
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"weights do not match config.json: missing {missing}, unexpected {result.unexpected_keys}"
        )
    if tied:
        model.lm_head.weight = model.embedding.weight
    return model


def _keep_fp32(model: HybridLM, weights: dict[str, Tensor], device: str | torch.device) -> None:
    """Routers' correction biases stay fp32 in any model dtype: they decide near-ties between experts."""
    for name, module in model.named_modules():
        if isinstance(module, Router):
            source = weights.get(f"{name}.correction")
            if source is not None:
                module.correction = source.to(device=device, dtype=torch.float32)


def _pattern(cfg: HybridConfig) -> str:
    counts = {kind: cfg.blocks.count(kind) for kind in dict.fromkeys(cfg.blocks)}
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())
