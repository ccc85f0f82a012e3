"""The handoff invariant: prefill(A+B) == restore(state after A) + prefill(B) == token-by-token
decode, for every interesting split point; and batched decode == one-by-one decode."""

from __future__ import annotations

import pytest
import torch

from server.model.lm import MambaLM
from server.model.loader import load_model
from server.model.runner import ModelRunner
from tests.tiny_models import hf_model

CHUNK, K, LENGTH = 8, 4, 27  # the conv window is K-1 = 3 tokens; chunk boundaries at 8, 16, 24


@pytest.fixture(scope="module", params=["mamba2", "mamba2-groups", "mamba1"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> MambaLM:
    arch, groups = (
        ("mamba1", 1) if request.param == "mamba1" else ("mamba2", 2 if "groups" in request.param else 1)
    )
    path = tmp_path_factory.mktemp(request.param)
    hf_model(arch, ngroups=groups, chunk_size=CHUNK, seed=7).save_pretrained(path)
    return load_model(path)[1]


def _tokens(n: int = LENGTH, seed: int = 0) -> list[int]:
    return torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _decode_each(runner: ModelRunner, tokens: list[int], slot: int) -> torch.Tensor:
    return torch.stack([runner.decode([t], [slot])[0] for t in tokens])


SPLITS = sorted({0, 1, 2, 3, *(c + d for c in (CHUNK, 2 * CHUNK) for d in (-1, 0, 1)), LENGTH})


@pytest.mark.parametrize("split", SPLITS)
def test_restore_then_prefill_equals_one_prefill(model: MambaLM, split: int) -> None:
    tokens = _tokens()
    runner = ModelRunner(model, max_slots=2)
    whole = runner.prefill(tokens, 0, all_logits=True)
    head = runner.prefill(tokens[:split], 1)
    saved = runner.capture(1)
    runner.reset(1)
    runner.restore(1, saved)
    tail = runner.prefill(tokens[split:], 1, all_logits=True)
    if split < LENGTH:
        assert tail.all_logits is not None and whole.all_logits is not None
        torch.testing.assert_close(tail.all_logits, whole.all_logits[split:], atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(head.last_logits, whole.last_logits, atol=1e-5, rtol=1e-4)
    for name, tensor in runner.capture(0).items():
        torch.testing.assert_close(runner.capture(1)[name], tensor, atol=1e-5, rtol=1e-4)


def test_prefill_equals_token_by_token_decode(model: MambaLM) -> None:
    tokens = _tokens()
    runner = ModelRunner(model, max_slots=2)
    whole = runner.prefill(tokens, 0, all_logits=True)
    assert whole.all_logits is not None
    torch.testing.assert_close(_decode_each(runner, tokens, 1), whole.all_logits, atol=1e-5, rtol=1e-4)
    for name, tensor in runner.capture(0).items():
        torch.testing.assert_close(runner.capture(1)[name], tensor, atol=1e-5, rtol=1e-4)


def test_captures_equal_states_after_each_prefix(model: MambaLM) -> None:
    tokens = _tokens()
    points = [1, 3, CHUNK, CHUNK + 1, LENGTH]
    runner = ModelRunner(model, max_slots=2)
    result = runner.prefill(tokens, 0, capture_at=points)
    assert sorted(result.captures) == points
    for p in points:
        runner.reset(1)
        runner.prefill(tokens[:p], 1)
        for name, tensor in runner.capture(1).items():
            torch.testing.assert_close(result.captures[p][name], tensor, atol=1e-5, rtol=1e-4)


def test_empty_segment_keeps_state(model: MambaLM) -> None:
    runner = ModelRunner(model, max_slots=1)
    runner.prefill(_tokens(5), 0)
    before = runner.capture(0)
    assert runner.prefill([], 0).last_logits.numel() == 0
    for name, tensor in runner.capture(0).items():
        assert torch.equal(tensor, before[name])


def test_batched_decode_with_permuted_and_padded_slots(model: MambaLM) -> None:
    prompts = [_tokens(5 + i, seed=i) for i in range(3)]
    nxt = [11, 22, 33]
    solo = ModelRunner(model, max_slots=3)
    expected = []
    for i, p in enumerate(prompts):
        solo.prefill(p, i)
        expected.append(solo.decode([nxt[i]], [i])[0])
    batched = ModelRunner(model, max_slots=5)
    slots = [4, 0, 2]
    for s, p in zip(slots, prompts, strict=True):
        batched.prefill(p, s)
    # order permuted, with padding rows (-1) interleaved
    order = [2, 0, 1]
    logits = batched.decode(
        [nxt[order[0]], 0, nxt[order[1]], 0, nxt[order[2]]],
        [slots[order[0]], -1, slots[order[1]], -1, slots[order[2]]],
    )
    for row, i in zip([0, 2, 4], order, strict=True):
        torch.testing.assert_close(logits[row], expected[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            batched.capture(slots[i])["ssm"], solo.capture(i)["ssm"], atol=1e-5, rtol=1e-4
        )
    assert torch.equal(batched.capture(1)["ssm"], torch.zeros_like(batched.capture(1)["ssm"]))


def test_decode_rejects_duplicate_and_out_of_range_slots(model: MambaLM) -> None:
    runner = ModelRunner(model, max_slots=2)
    with pytest.raises(ValueError, match="twice"):
        runner.decode([1, 2], [0, 0])
    with pytest.raises(IndexError):
        runner.decode([1], [2])
    with pytest.raises(ValueError, match="capture positions"):
        runner.prefill([1, 2], 0, capture_at=[3])
