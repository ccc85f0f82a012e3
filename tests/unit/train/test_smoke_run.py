"""The --smoke training run on CPU writes a model directory that the server's loader and
transformers' tokenizer both read, with a model card; plus the schedule and init determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from server.model.lm import MambaLM
from server.model.loader import load_model
from server.model.runner import ModelRunner
from server.train import main
from server.train.config import TrainConfig, smoke_config
from server.train.init import init_weights
from server.train.loop import lr_at

_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md")


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("smoke")
    assert main(["--smoke", "--out-dir", str(root / "model"), "--slice-out", str(root / "slice.txt")]) == 0
    return root


def test_smoke_run_writes_the_model_directory(smoke_dir: Path) -> None:
    model_dir = smoke_dir / "model"
    assert all((model_dir / name).is_file() for name in _FILES)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    assert (smoke_dir / "slice.txt").stat().st_size > 1000


def test_smoke_model_loads_and_generates(smoke_dir: Path) -> None:
    cfg, model = load_model(smoke_dir / "model")
    expected = smoke_config()
    assert (cfg.arch, cfg.d_model, cfg.n_layer, cfg.vocab_size) == ("mamba2", 64, 2, expected.vocab_size)
    runner = ModelRunner(model, max_slots=1)
    logits = runner.prefill([0, 10, 11, 12], slot=0).last_logits
    assert logits.shape == (expected.vocab_size,) and torch.isfinite(logits).all()


def test_smoke_tokenizer_loads_with_its_chat_template(smoke_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(str(smoke_dir / "model"))
    text = hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_smoke_report_and_card(smoke_dir: Path) -> None:
    report = json.loads((smoke_dir / "model" / "train_report.json").read_text())
    assert 1 <= report["result"]["steps"] <= smoke_config().max_steps
    assert report["result"]["tokens_seen"] == report["result"]["steps"] * smoke_config().tokens_per_step
    assert 0 < report["heldout_bpb"] < 16 and math.isfinite(report["slice_bpb"])
    card = (smoke_dir / "model" / "README.md").read_text()
    for heading in ("## Reproduce", "## Sample completions", "## CPU speed", "## State restore fidelity"):
        assert heading in card
    assert "python -m server.train --smoke" in card and report["python_version"] in card
    assert f"{report['heldout_bpb']:.4f}" in card


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 0.0, cfg) == pytest.approx(1e-4)
    assert lr_at(10, 0.0, cfg) == pytest.approx(1e-3)
    assert lr_at(500, 0.5, cfg) == pytest.approx(0.55e-3)
    assert lr_at(900, 1.0, cfg) == pytest.approx(1e-4) == lr_at(950, 1.5, cfg)


def test_init_is_deterministic_per_seed() -> None:
    cfg = smoke_config().model_config()
    a, b, c = MambaLM(cfg), MambaLM(cfg), MambaLM(cfg)
    init_weights(a, 3)
    init_weights(b, 3)
    init_weights(c, 4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["backbone.embedding.weight"], sc["backbone.embedding.weight"])
    a_log = sa["backbone.layers.0.mixer.A_log"].exp()
    assert ((a_log >= 1) & (a_log <= 16)).all()
