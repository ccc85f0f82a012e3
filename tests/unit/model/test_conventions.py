"""Model conventions a config.json settles: the gated norm's grouping flag, and warnings when the declared
architecture disagrees with the weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from server.model.config import NORM_PER_GROUP_KEY
from server.model.export import save_pretrained
from server.model.layers import GatedRMSNorm
from server.model.loader import ModelLoadError, load_model
from tests.tiny_models import make_hf_checkpoint, make_state_spaces_checkpoint

LOADER = "server.model.loader"


def _edit_config(model_dir: Path, **changes: Any) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _norm_group_sizes(model_dir: Path) -> set[int]:
    _, model = load_model(model_dir)
    sizes = set()
    for block in model.blocks():
        assert isinstance(block.mixer.norm, GatedRMSNorm)
        sizes.add(block.mixer.norm.group_size)
    return sizes


def _arch_warnings(caplog: pytest.LogCaptureFixture, model_dir: Path) -> tuple[str, list[str]]:
    with caplog.at_level(logging.WARNING, logger=LOADER):
        cfg, _ = load_model(model_dir)
    return cfg.arch, [r.getMessage() for r in caplog.records if "config.json declares" in r.getMessage()]


# ---- the gated norm's grouping ------------------------------------------------------------------


def test_norm_is_per_group_by_default(tmp_path: Path) -> None:
    make_hf_checkpoint(tmp_path, "mamba2", ngroups=2)
    assert _norm_group_sizes(tmp_path) == {64 // 2}


def test_flag_normalises_over_the_whole_width(tmp_path: Path) -> None:
    make_hf_checkpoint(tmp_path, "mamba2", ngroups=2)
    _edit_config(tmp_path, **{NORM_PER_GROUP_KEY: False})
    assert _norm_group_sizes(tmp_path) == {64}


def test_flag_must_be_a_boolean(tmp_path: Path) -> None:
    make_hf_checkpoint(tmp_path, "mamba2", ngroups=2)
    _edit_config(tmp_path, **{NORM_PER_GROUP_KEY: "no"})
    with pytest.raises(ModelLoadError, match=NORM_PER_GROUP_KEY):
        load_model(tmp_path)


@pytest.mark.parametrize("fmt", ["hf", "state-spaces"])
def test_export_keeps_the_flag(tmp_path: Path, fmt: str) -> None:
    make_hf_checkpoint(tmp_path / "src", "mamba2", ngroups=2)
    _edit_config(tmp_path / "src", **{NORM_PER_GROUP_KEY: False})
    _, model = load_model(tmp_path / "src")
    save_pretrained(model, tmp_path / "out", fmt=fmt)  # type: ignore[arg-type]
    assert json.loads((tmp_path / "out" / "config.json").read_text())[NORM_PER_GROUP_KEY] is False
    assert _norm_group_sizes(tmp_path / "out") == {64}


def test_default_export_writes_no_flag(tmp_path: Path) -> None:
    make_hf_checkpoint(tmp_path / "src", "mamba2", ngroups=2)
    save_pretrained(load_model(tmp_path / "src")[1], tmp_path / "out")
    assert NORM_PER_GROUP_KEY not in json.loads((tmp_path / "out" / "config.json").read_text())


# ---- declared architecture against the weights --------------------------------------------------


def test_hf_config_saying_mamba2_over_mamba1_weights_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_hf_checkpoint(tmp_path, "mamba1", seed=2)
    _edit_config(tmp_path, model_type="mamba2", architectures=["Mamba2ForCausalLM"])
    arch, warnings = _arch_warnings(caplog, tmp_path)
    assert arch == "mamba1" and len(warnings) == 2
    assert "model_type 'mamba2'" in warnings[0] and "Mamba2ForCausalLM" in warnings[1]
    assert all("weights are mamba1's" in w for w in warnings)


def test_state_spaces_layer_mamba2_over_mamba1_weights_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_state_spaces_checkpoint(tmp_path, "mamba1", seed=2)
    raw = json.loads((tmp_path / "config.json").read_text())
    _edit_config(tmp_path, ssm_cfg=raw["ssm_cfg"] | {"layer": "Mamba2"})
    arch, warnings = _arch_warnings(caplog, tmp_path)
    assert arch == "mamba1" and len(warnings) == 1 and "ssm_cfg.layer 'Mamba2'" in warnings[0]


def test_state_spaces_mamba2_weights_without_a_layer_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """mamba_ssm reads a missing `ssm_cfg.layer` as Mamba1."""
    make_state_spaces_checkpoint(tmp_path, "mamba2", seed=2)
    raw = json.loads((tmp_path / "config.json").read_text())
    _edit_config(tmp_path, ssm_cfg={k: v for k, v in raw["ssm_cfg"].items() if k != "layer"})
    arch, warnings = _arch_warnings(caplog, tmp_path)
    assert arch == "mamba2" and len(warnings) == 1 and "(the default)" in warnings[0]


@pytest.mark.parametrize("arch", ["mamba2", "mamba1"])
@pytest.mark.parametrize("fmt", ["hf", "state-spaces"])
def test_matching_declarations_do_not_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, arch: str, fmt: str
) -> None:
    make = make_hf_checkpoint if fmt == "hf" else make_state_spaces_checkpoint
    make(tmp_path, arch, seed=2)
    loaded, warnings = _arch_warnings(caplog, tmp_path)
    assert loaded == arch and warnings == []
