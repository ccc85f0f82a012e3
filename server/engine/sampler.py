"""Batched sampling with per-row parameters; no host synchronisation inside the sampling math.

Order of operations per row (the usual one of OpenAI-compatible servers):
    penalties (repetition, frequency, presence) -> temperature -> top-k -> top-p -> min-p
    -> sample: argmax(probs / q), q ~ Exp(1) drawn from the row's own torch.Generator when the
       request has a seed (gpt-fast style; reproducible per request whatever the batch), or argmax of
       the penalised logits when temperature is 0.
`logprobs` / `top_logprobs` are those of the model's raw distribution (log-softmax of the logits
before penalties and temperature), for the chosen token and the row's `top_logprobs` best tokens.

Shapes: b rows (sequences), v vocabulary entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.types import SamplingParams


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row parameters as tensors (b,), plus host-side flags that skip unused stages."""

    temperature: Tensor  # (b,) fp32; 0 = greedy
    top_k: Tensor  # (b,) int64; 0 = off
    top_p: Tensor  # (b,) fp32
    min_p: Tensor  # (b,) fp32
    presence: Tensor  # (b,) fp32
    frequency: Tensor  # (b,) fp32
    repetition: Tensor  # (b,) fp32
    generators: tuple[torch.Generator | None, ...]
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    use_penalties: bool
    all_greedy: bool
    top_logprobs: int  # max over rows; 0 = none
    want_logprobs: bool

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        device: torch.device,
    ) -> SamplingBatch:
        def f32(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        return cls(
            temperature=f32([p.temperature for p in params]),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=f32([p.top_p for p in params]),
            min_p=f32([p.min_p for p in params]),
            presence=f32([p.presence_penalty for p in params]),
            frequency=f32([p.frequency_penalty for p in params]),
            repetition=f32([p.repetition_penalty for p in params]),
            generators=tuple(generators),
            use_top_k=any(p.top_k > 0 and not p.greedy for p in params),
            use_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
            use_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
            use_penalties=any(has_penalty(p) for p in params),
            all_greedy=all(p.greedy for p in params),
            top_logprobs=max((p.top_logprobs for p in params if p.logprobs), default=0),
            want_logprobs=any(p.logprobs for p in params),
        )


def has_penalty(p: SamplingParams) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


@dataclass(frozen=True)
class SampleOutput:
    tokens: Tensor  # (b,) int64
    logprobs: Tensor | None = None  # (b,) fp32, of the chosen tokens
    top_ids: Tensor | None = None  # (b, k) int64
    top_logprobs: Tensor | None = None  # (b, k) fp32


def apply_penalties(logits: Tensor, batch: SamplingBatch, counts: Tensor, prompt_mask: Tensor) -> Tensor:
    """logits (b, v); counts (b, v) int: output-token occurrences; prompt_mask (b, v) bool."""
    counts_f = counts.to(logits.dtype)
    seen = prompt_mask | (counts > 0)  # (b, v)
    rep = batch.repetition.unsqueeze(1)  # (b, 1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - batch.frequency.unsqueeze(1) * counts_f
    return logits - batch.presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_top_k_top_p(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Mask (to -inf) what top-k and top-p exclude; both act on the sorted row."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (b, v)
    rank = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)  # (1, v)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if batch.use_top_k:
        k = torch.where(batch.top_k > 0, batch.top_k, logits.shape[-1]).unsqueeze(1)  # (b, 1)
        drop |= rank >= k
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if batch.use_top_p:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (b, v)
        active = (batch.top_p < 1.0).unsqueeze(1)  # (b, 1): rounding never trims a top_p=1 row
        drop |= (mass_before >= batch.top_p.unsqueeze(1)) & (rank > 0) & active
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: Tensor, batch: SamplingBatch) -> Tensor:
    probs = logits.softmax(dim=-1)  # (b, v)
    floor = batch.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values  # (b, 1)
    return logits.masked_fill(probs < floor, float("-inf"))


def exponential_noise(shape: tuple[int, int], batch: SamplingBatch, device: torch.device) -> Tensor:
    """q (b, v) ~ Exp(1); a row with its own generator draws from it (one draw per step)."""
    q = torch.empty(shape, dtype=torch.float32, device=device).exponential_()
    for row, gen in enumerate(batch.generators):
        if gen is not None:
            q[row].exponential_(generator=gen)
    return q


class TokenCounts:
    """Per-slot token statistics for the penalties, allocated on first use.

    counts: (slots, v) int32  occurrences of each token in the request's output so far
    prompt: (slots, v) bool   tokens present in the request's prompt (repetition penalty)
    """

    def __init__(self, max_slots: int, vocab: int, device: torch.device) -> None:
        self.max_slots, self.vocab, self.device = max_slots, vocab, device
        self._counts: Tensor | None = None
        self._prompt: Tensor | None = None

    def _alloc(self) -> tuple[Tensor, Tensor]:
        if self._counts is None or self._prompt is None:
            shape = (self.max_slots, self.vocab)
            self._counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self._prompt = torch.zeros(shape, dtype=torch.bool, device=self.device)
        return self._counts, self._prompt

    def reset(self, slot: int, prompt_tokens: Sequence[int]) -> None:
        counts, prompt = self._alloc()
        counts[slot].zero_()
        prompt[slot].zero_()
        ids = torch.tensor([t for t in prompt_tokens if 0 <= t < self.vocab], dtype=torch.long)
        prompt[slot, ids.to(self.device)] = True

    def add(self, slots: Tensor, tokens: Tensor) -> None:
        """slots, tokens (r,) int64 on the device: one more occurrence of each token."""
        counts, _ = self._alloc()
        counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)

    def rows(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """(counts (b, v), prompt (b, v)) of the given slots."""
        counts, prompt = self._alloc()
        return counts.index_select(0, slots), prompt.index_select(0, slots)


class Sampler:
    """Stateless: `sample(logits, batch, ...)` -> SampleOutput (tokens stay on the device)."""

    def sample(
        self,
        logits: Tensor,
        batch: SamplingBatch,
        counts: Tensor | None = None,
        prompt_mask: Tensor | None = None,
    ) -> SampleOutput:
        """logits (b, v) fp32; counts / prompt_mask (b, v) when `batch.use_penalties`."""
        raw = logits.float()
        x = raw
        if batch.use_penalties:
            if counts is None or prompt_mask is None:
                raise ValueError("penalties need counts and prompt_mask")
            x = apply_penalties(x, batch, counts, prompt_mask)
        greedy_tokens = x.argmax(dim=-1)  # (b,)
        tokens = greedy_tokens if batch.all_greedy else self._sample_tokens(x, batch, greedy_tokens)
        return self._with_logprobs(raw, tokens, batch)

    def _sample_tokens(self, x: Tensor, batch: SamplingBatch, greedy_tokens: Tensor) -> Tensor:
        is_greedy = batch.temperature == 0  # (b,)
        temp = torch.where(is_greedy, torch.ones_like(batch.temperature), batch.temperature)
        x = x / temp.unsqueeze(1)
        if batch.use_top_k or batch.use_top_p:
            x = apply_top_k_top_p(x, batch)
        if batch.use_min_p:
            x = apply_min_p(x, batch)
        probs = x.softmax(dim=-1)  # (b, v)
        q = exponential_noise((x.shape[0], x.shape[1]), batch, x.device)
        sampled = (probs / q).argmax(dim=-1)  # (b,)
        return torch.where(is_greedy, greedy_tokens, sampled)

    def _with_logprobs(self, raw: Tensor, tokens: Tensor, batch: SamplingBatch) -> SampleOutput:
        if not batch.want_logprobs:
            return SampleOutput(tokens)
        logp = raw.log_softmax(dim=-1)  # (b, v)
        chosen = logp.gather(-1, tokens.unsqueeze(1)).squeeze(1)  # (b,)
        if batch.top_logprobs == 0:
            return SampleOutput(tokens, chosen)
        top = logp.topk(min(batch.top_logprobs, logp.shape[-1]), dim=-1)
        return SampleOutput(tokens, chosen, top.indices, top.values)
