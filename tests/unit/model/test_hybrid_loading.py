"""Loading hybrid checkpoints: config conventions (legacy keys, the gated norm's grouping, dt limits, tied
heads, shards) and clear errors, including from the serving loader, which does not serve hybrids yet."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.model.hybrid_archs import hybrid_config
from server.model.hybrid_loader import load_hybrid
from server.model.layers import GatedRMSNorm
from server.model.loader import ModelLoadError, load_model
from server.model.mamba2 import Mamba2Mixer
from tests.tiny_hybrids import VOCAB, tiny_hybrid
from tests.tiny_models import make_hf_checkpoint

oracle = pytest.mark.skipif(
    importlib.util.find_spec("mamba_ssm") is not None,
    reason="transformers swaps in mamba_ssm kernels when importable; not a torch oracle then",
)
WEIGHTS = "model.safetensors"


def _ids(length: int = 27) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(0))


def _save(path: Path, variant: str, **changes: Any) -> torch.nn.Module:
    model = tiny_hybrid(variant, seed=4, **changes)
    model.save_pretrained(path, safe_serialization=True)
    return model


def _edit_config(path: Path, **changes: Any) -> None:
    cfg = path / "config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | changes))


def _assert_matches(path: Path, reference: torch.nn.Module) -> None:
    _, ours = load_hybrid(path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)


# ---- conventions --------------------------------------------------------------------------------


@oracle
def test_sharded_and_tied_checkpoints_load(tmp_path: Path) -> None:
    reference = tiny_hybrid("bamba", seed=4, tie_word_embeddings=True)
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, ours = load_hybrid(tmp_path)
    assert ours.lm_head.weight is ours.embedding.weight
    _assert_matches(tmp_path, reference)


@oracle
def test_two_groups_flagged_whole_width_match_transformers(tmp_path: Path) -> None:
    """transformers' Granite normalises the gated norm over the whole width; with n_groups = 2 that is the
    `tssc_norm_per_group: false` convention, and unflagged the norm is per group (mamba_ssm's)."""
    reference = _save(tmp_path, "granite-dense", mamba_n_groups=2)
    _, unflagged = load_hybrid(tmp_path)
    norms = [m.norm for m in unflagged.modules() if isinstance(m, Mamba2Mixer)]
    assert norms and all(isinstance(n, GatedRMSNorm) and n.group_size == 32 for n in norms)
    _edit_config(tmp_path, tssc_norm_per_group=False)
    _assert_matches(tmp_path, reference)


@oracle
def test_a_stated_dt_limit_is_honoured(tmp_path: Path) -> None:
    """transformers' Nemotron-H clamps dt at time_step_min in its prefill; a config.json that states that
    bound as time_step_limit gets the same prefill from us (and the same bound in decode)."""
    reference = _save(tmp_path, "nemotron_h", time_step_min=0.3)
    _, unstated = load_hybrid(tmp_path)
    with torch.no_grad():
        assert not torch.allclose(unstated(_ids()), reference(_ids()).logits, atol=1e-3)
    _edit_config(tmp_path, time_step_limit=[0.3, {"__float__": "Infinity"}])
    cfg, _ = load_hybrid(tmp_path)
    assert cfg.mamba is not None and cfg.mamba.dt_limit == (0.3, math.inf)
    _assert_matches(tmp_path, reference)


def test_nemotron_legacy_keys_read_like_current_ones() -> None:
    current = {
        "model_type": "nemotron_h", "hidden_size": 32, "vocab_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 4, "mamba_head_dim": 16,
        "ssm_state_size": 8, "intermediate_size": 48, "n_routed_experts": 4, "moe_intermediate_size": 16,
        "layers_block_type": ["mamba", "attention", "mlp", "moe"], "n_groups": 2, "conv_kernel": 3,
        "chunk_size": 16,
    }  # fmt: skip
    legacy = {
        k: v
        for k, v in current.items()
        if k not in ("layers_block_type", "n_groups", "conv_kernel", "chunk_size")
    }
    legacy |= {
        "hybrid_override_pattern": "M*-E",
        "mamba_n_groups": 2,
        "mamba_d_conv": 3,
        "mamba_chunk_size": 16,
    }
    a, b = hybrid_config(current, "nemotron_h"), hybrid_config(legacy, "nemotron_h")
    assert a == b and a.blocks == ("mamba", "attention", "mlp", "moe")
    assert a.mamba is not None and (a.mamba.ngroups, a.mamba.d_conv, a.mamba.chunk_size) == (2, 3, 16)


def test_nemotron_head_dim_defaults_to_transformers_128() -> None:
    raw = {"hidden_size": 64, "vocab_size": 64, "num_attention_heads": 4, "layers_block_type": ["attention"]}
    cfg = hybrid_config(raw, "nemotron_h")
    assert cfg.attention is not None and cfg.attention.head_dim == 128
    cfg = hybrid_config(raw | {"attention_head_dim": 32}, "nemotron_h")
    assert cfg.attention is not None and cfg.attention.head_dim == 32


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["bamba", "granite-moe", "nemotron_h", "falcon_h1"])
def test_the_pure_mamba_loader_refuses_hybrids(tmp_path: Path, variant: str) -> None:
    _save(tmp_path, variant)
    with pytest.raises(ModelLoadError, match="hybrid Mamba2 \\+ attention model"):
        load_model(tmp_path)


def test_other_hybrids_are_named_unsupported(tmp_path: Path) -> None:
    _save(tmp_path, "bamba")
    _edit_config(tmp_path, model_type="zamba2", architectures=["Zamba2ForCausalLM"])
    with pytest.raises(ModelLoadError, match="zamba2 model, which is not supported"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="not a supported hybrid"):
        load_hybrid(tmp_path)


def test_a_pure_mamba_checkpoint_is_not_a_hybrid(tmp_path: Path) -> None:
    make_hf_checkpoint(tmp_path)
    with pytest.raises(ModelLoadError, match="not a supported hybrid"):
        load_hybrid(tmp_path)


def _edit_weights(path: Path, drop: str = "", add: str = "") -> None:
    weights = load_file(str(path / WEIGHTS))
    if drop:
        del weights[drop]
    if add:
        weights[add] = torch.zeros(3)
    save_file(weights, str(path / WEIGHTS), metadata={"format": "pt"})


def test_a_missing_tensor_is_named(tmp_path: Path) -> None:
    _save(tmp_path, "nemotron_h")
    _edit_weights(tmp_path, drop="backbone.layers.5.mixer.experts.1.up_proj.weight")
    with pytest.raises(ModelLoadError, match="experts"):
        load_hybrid(tmp_path)


def test_an_unknown_tensor_is_named(tmp_path: Path) -> None:
    _save(tmp_path, "bamba")
    _edit_weights(tmp_path, add="model.layers.0.adapter.weight")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.adapter\.weight"):
        load_hybrid(tmp_path)


def test_a_shape_that_contradicts_the_config_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path, "granite-moe")
    _edit_config(tmp_path, num_key_value_heads=4)
    with pytest.raises(ModelLoadError, match=r"do not match config\.json"):
        load_hybrid(tmp_path)


def test_an_unsupported_rope_type_is_named(tmp_path: Path) -> None:
    _save(tmp_path, "bamba")
    _edit_config(tmp_path, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(ModelLoadError, match="'yarn'"):
        load_hybrid(tmp_path)
