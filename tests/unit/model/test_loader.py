"""Loading both checkpoint formats: config derivation, sharding, tied/untied heads, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server.model.export import save_pretrained
from server.model.loader import ModelLoadError, load_model, resolve_model_dir
from tests.tiny_models import hf_model, make_hf_checkpoint, make_state_spaces_checkpoint


def _assert_same_logits(a: Path, b: Path) -> None:
    ids = torch.arange(20).unsqueeze(0)
    (_, ma), (_, mb) = load_model(a), load_model(b)
    with torch.no_grad():
        torch.testing.assert_close(ma(ids)[..., :300], mb(ids)[..., :300], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["mamba2", "mamba1"])
def test_sharded_safetensors_load_like_single_file(tmp_path: Path, arch: str) -> None:
    make_hf_checkpoint(tmp_path / "one", arch, seed=1)
    make_hf_checkpoint(tmp_path / "many", arch, seed=1, shard=True)
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    _assert_same_logits(tmp_path / "one", tmp_path / "many")


def test_state_spaces_config_is_derived_from_weights(tmp_path: Path) -> None:
    make_state_spaces_checkpoint(tmp_path, "mamba2", ngroups=2, pad_multiple=64, vocab=300)
    cfg, model = load_model(tmp_path)
    assert (cfg.arch, cfg.ngroups, cfg.d_state, cfg.headdim, cfg.d_inner) == ("mamba2", 2, 16, 16, 64)
    assert (cfg.vocab_size, cfg.unpadded_vocab_size) == (320, 300)
    assert cfg.tie_embeddings and model.lm_head.weight is model.backbone.embedding.weight


def test_wrong_expand_in_config_is_ignored(tmp_path: Path) -> None:
    make_hf_checkpoint(tmp_path, "mamba1")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["expand"] = 16  # falcon-mamba style: the config's expand disagrees with the weights
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg, _ = load_model(tmp_path)
    assert cfg.d_inner == 64


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("fmt", ["hf", "state-spaces"])
def test_export_round_trip(tmp_path: Path, tie: bool, fmt: str) -> None:
    hf_model("mamba2", tie=tie).save_pretrained(tmp_path / "src")
    _, model = load_model(tmp_path / "src")
    save_pretrained(model, tmp_path / "dst", fmt=fmt)  # type: ignore[arg-type]
    cfg2, model2 = load_model(tmp_path / "dst")
    assert cfg2.tie_embeddings is tie and (model2.lm_head.weight is model2.backbone.embedding.weight) is tie
    _assert_same_logits(tmp_path / "src", tmp_path / "dst")


def test_missing_config_is_named(tmp_path: Path) -> None:
    make_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(tmp_path)


def test_missing_weights_are_named(tmp_path: Path) -> None:
    make_hf_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*pytorch_model\.bin"):
        load_model(tmp_path)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    make_hf_checkpoint(tmp_path, shard=True)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    make_state_spaces_checkpoint(tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    del state["backbone.layers.1.mixer.D"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"layers\.1\.mixer\.D"):
        load_model(tmp_path)


def test_bad_paths_and_dtypes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model_dir(tmp_path / "file")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(tmp_path, dtype="fp64")
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        resolve_model_dir("state-spaces/mamba2-130m")


def test_hub_id_resolves_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id is served from the HF cache layout when offline (the path a real download fills)."""
    cache = tmp_path / "hub"
    snap = cache / "models--tssc--tiny" / "snapshots" / ("0" * 40)
    make_hf_checkpoint(snap)
    (cache / "models--tssc--tiny" / "refs").mkdir()
    (cache / "models--tssc--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    assert resolve_model_dir("tssc/tiny") == snap
    cfg, _ = load_model("tssc/tiny")
    assert cfg.arch == "mamba2"
