"""The bundled demo model (server/assets/demo-mamba2): size cap, bits per byte on the shipped
held-out slice within 10% of the model card's figure, and a plausible completion.
Skipped when the model has not been shipped yet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.model.loader import load_model
from server.train.evaluate import file_bpb
from server.train.samples import generate
from server.train.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[3]
MODEL_DIR = ROOT / "server" / "assets" / "demo-mamba2"
SLICE = ROOT / "tests" / "data" / "heldout_slice.txt"

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").is_file() or not SLICE.is_file(),
    reason="the demo model or the held-out slice is not shipped",
)


def _report() -> dict[str, object]:
    return json.loads((MODEL_DIR / "train_report.json").read_text())


def test_weights_fit_the_10_mb_cap() -> None:
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 10_000_000


def test_slice_bits_per_byte_within_10_percent_of_the_card() -> None:
    report = _report()
    _, model = load_model(MODEL_DIR)
    seq_len = int(report["config"]["seq_len"])  # type: ignore[index]
    card_bpb = float(report["heldout_bpb"])  # type: ignore[arg-type]
    assert f"{card_bpb:.4f} bits per byte" in (MODEL_DIR / "README.md").read_text()
    got = file_bpb(model, load_tokenizer(MODEL_DIR), SLICE, seq_len)
    assert abs(got - card_bpb) / card_bpb < 0.10, (got, card_bpb)


def test_completes_a_function_with_an_indented_body() -> None:
    _, model = load_model(MODEL_DIR)
    out = generate(model, load_tokenizer(MODEL_DIR), "def fibonacci(n):", max_new_tokens=32)
    first_line = out.split("\n")[1]
    assert out.startswith("\n    ") and first_line.strip(), out  # a body, indented under the def
    assert "<|" not in out
