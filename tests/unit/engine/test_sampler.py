"""Sampler: greedy, seeds, top-k / top-p / min-p masks, penalties, logprobs."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from server.engine.sampler import (
    Sampler,
    SamplingBatch,
    TokenCounts,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
)
from server.engine.types import SamplingParams

CPU = torch.device("cpu")


def _batch(*params: SamplingParams, seeds: tuple[int | None, ...] = ()) -> SamplingBatch:
    gens = []
    for i in range(len(params)):
        seed = seeds[i] if i < len(seeds) else None
        gens.append(torch.Generator().manual_seed(seed) if seed is not None else None)
    return SamplingBatch.build(params, gens, CPU)


def _logits(b: int = 4, v: int = 50, seed: int = 0) -> Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax() -> None:
    logits = _logits()
    out = Sampler().sample(logits, _batch(*[SamplingParams(temperature=0.0)] * 4))
    assert torch.equal(out.tokens, logits.argmax(-1))


def test_greedy_rows_stay_argmax_in_a_mixed_batch() -> None:
    logits = _logits()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=5)] * 2
    out = Sampler().sample(logits, _batch(*params, seeds=(None, 1, None, 2)))
    assert out.tokens[0] == logits[0].argmax() and out.tokens[2] == logits[2].argmax()


def _draw(seed: int, other_rows: int, steps: int = 20) -> list[int]:
    """Tokens of a seeded row 0 over `steps` steps, next to `other_rows` unseeded rows."""
    logits = torch.cat([_logits(b=1, v=200, seed=7), _logits(b=other_rows, v=200, seed=other_rows)])
    params = [SamplingParams(temperature=1.0)] * (1 + other_rows)
    gen = torch.Generator().manual_seed(seed)
    batch = SamplingBatch.build(params, [gen] + [None] * other_rows, CPU)
    return [int(Sampler().sample(logits, batch).tokens[0]) for _ in range(steps)]


def test_seed_reproduces_the_same_tokens_whatever_the_batch() -> None:
    assert _draw(seed=3, other_rows=0) == _draw(seed=3, other_rows=5)
    assert _draw(seed=3, other_rows=2) != _draw(seed=4, other_rows=2)


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen = torch.Generator().manual_seed(0)
    batch = SamplingBatch.build([SamplingParams(temperature=1.0)], [gen], CPU)
    draws = torch.stack([Sampler().sample(logits, batch).tokens[0] for _ in range(4000)])
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_top_k_keeps_the_k_best_per_row() -> None:
    logits = _logits()
    batch = _batch(
        SamplingParams(top_k=3), SamplingParams(top_k=0), SamplingParams(top_k=1), SamplingParams()
    )
    masked = apply_top_k_top_p(logits, batch)
    kept = torch.isfinite(masked).sum(-1).tolist()
    assert kept == [3, 50, 1, 50]
    assert set(masked[0].isfinite().nonzero().flatten().tolist()) == set(logits[0].topk(3).indices.tolist())


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    batch = _batch(SamplingParams(top_p=0.75), SamplingParams(top_p=0.85))
    kept = torch.isfinite(apply_top_k_top_p(logits, batch))
    assert kept.tolist() == [[True, True, False, False], [True, True, True, False]]


def test_top_p_always_keeps_the_best_token() -> None:
    logits = torch.log(torch.tensor([[0.9, 0.1]]))
    kept = torch.isfinite(apply_top_k_top_p(logits, _batch(SamplingParams(top_p=0.01))))
    assert kept.tolist() == [[True, False]]


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.27, 0.08, 0.05]]))
    kept = torch.isfinite(apply_min_p(logits, _batch(SamplingParams(min_p=0.1))))
    assert kept.tolist() == [[True, True, True, False]]


def test_sampled_tokens_respect_the_masks() -> None:
    logits = _logits(b=1, v=100)
    allowed = set(logits[0].topk(2).indices.tolist())
    params = SamplingParams(temperature=5.0, top_k=2)
    gen = torch.Generator().manual_seed(0)
    batch = SamplingBatch.build([params], [gen], CPU)
    assert {int(Sampler().sample(logits, batch).tokens[0]) for _ in range(200)} == allowed


def test_penalties_follow_their_definitions() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]] * 3)
    counts = torch.tensor([[2, 1, 0, 0]] * 3, dtype=torch.int32)
    prompt = torch.tensor([[False, False, True, False]] * 3)
    batch = _batch(
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(presence_penalty=0.25),
    )
    out = apply_penalties(logits, batch, counts, prompt)
    assert out[0].tolist() == [1.0, -4.0, 0.5, 0.5]
    assert out[1].tolist() == [1.0, -2.5, 1.0, 0.5]
    assert out[2].tolist() == [1.75, -2.25, 1.0, 0.5]


def test_penalty_can_change_the_greedy_choice() -> None:
    counts_state = TokenCounts(max_slots=2, vocab=3, device=CPU)
    counts_state.reset(1, prompt_tokens=[])
    counts_state.add(torch.tensor([1, 1]), torch.tensor([0, 0]))
    counts, prompt = counts_state.rows(torch.tensor([1]))
    assert counts.tolist() == [[2, 0, 0]]
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    batch = _batch(SamplingParams(temperature=0.0, frequency_penalty=1.0))
    assert int(Sampler().sample(logits, batch, counts, prompt).tokens[0]) == 1


def test_token_counts_reset_marks_the_prompt() -> None:
    state = TokenCounts(max_slots=2, vocab=5, device=CPU)
    state.add(torch.tensor([0]), torch.tensor([4]))
    state.reset(0, prompt_tokens=[1, 3, 3])
    counts, prompt = state.rows(torch.tensor([0]))
    assert counts.sum() == 0 and prompt[0].nonzero().flatten().tolist() == [1, 3]


def test_token_counts_reset_drops_ids_past_the_vocab_and_the_previous_prompt() -> None:
    state = TokenCounts(max_slots=2, vocab=5, device=CPU)
    state.reset(1, prompt_tokens=(0, 2))
    state.reset(1, prompt_tokens=(4, 7, -2, 4))
    _, prompt = state.rows(torch.tensor([1]))
    assert prompt[0].nonzero().flatten().tolist() == [4]
    state.reset(1, prompt_tokens=())
    assert not state.rows(torch.tensor([1]))[1].any()


def test_logprobs_are_the_raw_distribution() -> None:
    logits = _logits(b=2, v=10)
    params = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3, repetition_penalty=1.3)
    counts = torch.ones(2, 10, dtype=torch.int32)
    out = Sampler().sample(logits, _batch(params, params), counts, torch.zeros(2, 10, dtype=torch.bool))
    ref = logits.log_softmax(-1)
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    assert torch.allclose(out.logprobs, ref.gather(-1, out.tokens.unsqueeze(1)).squeeze(1))
    assert torch.equal(out.top_ids, ref.topk(3).indices)
    assert math.isclose(float(out.top_logprobs[0, 0]), float(ref[0].max()), rel_tol=1e-6)


def test_no_logprobs_unless_asked() -> None:
    out = Sampler().sample(_logits(), _batch(*[SamplingParams(temperature=0.0)] * 4))
    assert out.logprobs is None and out.top_ids is None


def test_token_counts_add_only_weighted_rows() -> None:
    counts = TokenCounts(max_slots=3, vocab=10, device=CPU)
    slots, tokens = torch.tensor([2, 0, 1]), torch.tensor([7, 7, 4])
    counts.add(slots, tokens, weights=torch.tensor([1, 0, 1], dtype=torch.int32))
    counts.add(slots, tokens, weights=torch.tensor([1, 0, 1], dtype=torch.int32))
    rows, _ = counts.rows(torch.tensor([0, 1, 2]))
    assert rows[2, 7] == 2 and rows[1, 4] == 2 and int(rows[0].sum()) == 0


def test_top_k_with_top_p_uses_the_same_k_as_top_k_alone() -> None:
    logits = _logits(seed=3)
    alone = apply_top_k_top_p(logits, _batch(*(SamplingParams(top_k=k) for k in (5, 2, 9, 1))))
    with_p = apply_top_k_top_p(logits, _batch(*(SamplingParams(top_k=k, top_p=0.999) for k in (5, 2, 9, 1))))
    for row in range(4):  # top_p=0.999 only ever trims inside what top_k kept
        assert set(with_p[row].isfinite().nonzero().flatten().tolist()) <= set(
            alone[row].isfinite().nonzero().flatten().tolist()
        )
    assert alone.isfinite().sum(-1).tolist() == [5, 2, 9, 1]
