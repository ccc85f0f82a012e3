"""bench/fidelity.py --mode state: fp32 against itself is exact (KL 0, every token agrees), and bf16 against
fp32 gives a table row with sane numbers, on a seeded tiny model."""

from __future__ import annotations

import pytest
import torch

from bench.fidelity import measure_state, state_table
from server.model.lm import MambaLM
from server.model.loader import load_model
from tests.tiny_models import hf_model

TOKENS = 12


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> MambaLM:
    path = tmp_path_factory.mktemp("fidelity-state")
    hf_model("mamba2", chunk_size=8, seed=7).save_pretrained(path)
    return load_model(path)[1]


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (5, 19)]


def test_an_fp32_state_against_itself_is_exact(model: MambaLM) -> None:
    f = measure_state(model, _prompts(), TOKENS, "cpu", state_dtype="fp32")
    assert (f.mean_kl, f.max_kl, f.top1, f.free_run, f.steps) == (0.0, 0.0, 1.0, (TOKENS, TOKENS), 2 * TOKENS)


def test_a_bf16_state_gives_a_row(model: MambaLM) -> None:
    f = measure_state(model, _prompts(), TOKENS, "cpu")
    assert 0.0 <= f.mean_kl <= f.max_kl < 1e-2 and 0.0 <= f.top1 <= 1.0
    assert all(0 <= n <= TOKENS for n in f.free_run)
    row = state_table([("tiny", "fp32", f)]).splitlines()[-1]
    assert row.startswith("| tiny | fp32 | bf16 vs fp32 |") and f"2 prompts x {TOKENS} tokens" in row
