"""HybridRunner (the engine's runner for hybrid models) against the hybrid model's own forward: prefill and
decode through slots, paged KV and the state pool give the model's logits; split prefill + decode equals one
shot; rows at different positions decode in one call; reset and restore return the slot's KV blocks."""

from __future__ import annotations

import pytest
import torch

from server.model.hybrid import HybridLM
from server.model.hybrid_loader import load_hybrid
from server.model.hybrid_runner import HybridRunner
from server.model.runner import PrefillSeg
from tests.tiny_hybrids import VOCAB, tiny_hybrid

PROMPT = 21
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module", params=("bamba", "granite-moe", "nemotron_h", "falcon_h1"))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> HybridLM:
    path = tmp_path_factory.mktemp(request.param)
    tiny_hybrid(request.param, seed=2).save_pretrained(path, safe_serialization=True)
    return load_hybrid(path)[1]


def _make_runner(model: HybridLM, slots: int = 3, max_len: int = 64) -> HybridRunner:
    return HybridRunner(model, slots, max_model_len=max_len, block_size=8)


def _tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference(model: HybridLM, tokens: list[int]) -> torch.Tensor:
    """The model's own one-shot logits (l, v) over `tokens`."""
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0]


def test_prefill_then_decode_equals_the_models_forward(model: HybridLM) -> None:
    tokens = _tokens(PROMPT + 5)
    runner = _make_runner(model)
    out = runner.prefill(tokens[:PROMPT], slot=1, all_logits=True)
    ref = _reference(model, tokens)
    assert out.all_logits is not None
    torch.testing.assert_close(out.all_logits, ref[:PROMPT], **TOL)
    for i in range(PROMPT, len(tokens)):
        step = runner.decode([tokens[i]], [1])
        torch.testing.assert_close(step[0], ref[i], **TOL)


@pytest.mark.parametrize("split", [1, 3, 8, 9, 16, PROMPT - 1])
def test_split_prefill_equals_one_shot(model: HybridLM, split: int) -> None:
    tokens = _tokens(PROMPT, seed=split)
    one, two = _make_runner(model), _make_runner(model)
    whole = one.prefill(tokens, slot=0).last_logits
    two.prefill(tokens[:split], slot=0)
    torch.testing.assert_close(two.prefill(tokens[split:], slot=0).last_logits, whole, **TOL)
    torch.testing.assert_close(two.decode([5], [0]), one.decode([5], [0]), **TOL)


def test_decode_rows_at_different_positions_in_one_call(model: HybridLM) -> None:
    runner = _make_runner(model)
    prompts = [_tokens(n, seed=n) for n in (5, 12, 12)]
    runner.prefill_batch([PrefillSeg(prompt, slot) for slot, prompt in enumerate(prompts)])
    logits = runner.decode([7, -1, 8, 9], [0, -1, 1, 2])
    for row, (slot, token) in zip((0, 2, 3), ((0, 7), (1, 8), (2, 9)), strict=True):
        ref = _reference(model, [*prompts[slot], token])[-1]
        torch.testing.assert_close(logits[row], ref, **TOL)
    assert not logits[1].any()


def test_captures_hold_the_mamba_state_and_the_kv_source_its_prefix(model: HybridLM) -> None:
    tokens = _tokens(PROMPT)
    runner, other = _make_runner(model), _make_runner(model)
    out = runner.prefill(tokens, slot=0, capture_at=[9])
    other.prefill(tokens[:9], slot=0)
    for name, value in other.capture(0).items():
        torch.testing.assert_close(out.captures[9][name], value, atol=0, rtol=0)
    torch.testing.assert_close(runner.kv_source(0).read(0, 9), other.kv_source(0).read(0, 9), atol=0, rtol=0)


def test_reset_and_restore_free_the_slots_blocks(model: HybridLM) -> None:
    runner = _make_runner(model, slots=2, max_len=32)
    free = runner.kv.allocator.free
    assert free == 2 * 4
    runner.prefill(_tokens(20), slot=0)
    runner.prefill(_tokens(9), slot=1)
    assert runner.kv.allocator.free == free - 3 - 2
    runner.reset(0)
    assert runner.kv.allocator.free == free - 2 and runner.position(0) == 0
    prefix = runner.kv_source(1).read(0, 9)
    sink = runner.kv_sink(1)
    assert runner.kv.allocator.free == free and sink.length == 0
    sink.append(prefix)
    assert runner.position(1) == 9 and runner.kv.allocator.free == free - 2


def test_reset_many_empties_the_slots_kv_and_zeroes_their_states(model: HybridLM) -> None:
    runner = _make_runner(model, slots=3, max_len=32)
    free = runner.kv.allocator.free
    for slot in range(3):
        runner.prefill(_tokens(9 + slot, seed=slot), slot=slot)
    kept = {name: t.clone() for name, t in runner.slot_state(1).items()}
    runner.reset_many([0, 2])
    assert [runner.position(s) for s in range(3)] == [0, 10, 0]
    assert runner.kv.allocator.free == free - 2
    for name, tensor in runner.slot_state(1).items():
        assert torch.equal(tensor, kept[name]) and not runner.slot_state(0)[name].any(), name
        assert not runner.slot_state(2)[name].any(), name


def test_a_slot_never_holds_more_than_max_model_len(model: HybridLM) -> None:
    runner = _make_runner(model, slots=1, max_len=16)
    runner.prefill(_tokens(16), slot=0)
    with pytest.raises(ValueError, match="max_model_len"):
        runner.decode([1], [0])
    with pytest.raises(ValueError, match="max_model_len"):
        runner.prefill([1], slot=0)
