"""Batched sampling with per-row parameters; no host synchronisation inside the sampling math.

Order of operations per row (the usual one of OpenAI-compatible servers):
    logit_bias, and -inf on the stop tokens of a row short of its min_tokens (one sparse add)
    -> penalties (repetition, frequency, presence) -> temperature -> top-k -> top-p -> min-p
    -> sample: argmax(probs / q), q ~ Exp(1) drawn from the row's own torch.Generator when the
       request has a seed (gpt-fast style; reproducible per request whatever the batch), or argmax of
       the biased, penalised logits when temperature is 0.
`logprobs` / `top_logprobs` are those of the model's raw distribution (log-softmax of the logits
before logit_bias, penalties and temperature), for the chosen token and the row's `top_logprobs` best
tokens.

Shapes: b rows (sequences), v vocabulary entries.
"""

from __future__ import annotations

import array
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.types import SamplingParams
from server.model.defaults import to_device


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
    max_top_k: int  # host-side: the largest top_k of any row (0 = none)
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    use_penalties: bool
    all_greedy: bool
    top_logprobs: int  # max over rows; 0 = none
    want_logprobs: bool
    # sparse additions to the logits, (rows (m,) int64, token ids (m,) int64, values (m,) fp32): every row's
    # logit_bias entries and -inf for the tokens it may not sample yet; None when there are none
    logit_adds: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        device: torch.device,
        banned: Sequence[Collection[int]] = (),
    ) -> SamplingBatch:
        """`banned[i]`: token ids row i may not sample at this step (stop tokens before its min_tokens)."""
        # One (7, b) host tensor, pinned on CUDA, and one non-blocking copy: no per-field transfer.
        host = torch.tensor(
            [
                [
                    p.temperature,
                    p.top_k,
                    p.top_p,
                    p.min_p,
                    p.presence_penalty,
                    p.frequency_penalty,
                    p.repetition_penalty,
                ]
                for p in params
            ],
            dtype=torch.float32,
        ).T.contiguous()
        temperature, top_k, top_p, min_p, presence, frequency, repetition = to_device(host, device).unbind(0)
        return cls(
            temperature=temperature,
            top_k=top_k.long(),  # exact: top_k < 2**24
            top_p=top_p,
            min_p=min_p,
            presence=presence,
            frequency=frequency,
            repetition=repetition,
            generators=tuple(generators),
            max_top_k=max((p.top_k for p in params if not p.greedy), default=0),
            use_top_k=any(p.top_k > 0 and not p.greedy for p in params),
            use_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
            use_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
            use_penalties=any(has_penalty(p) for p in params),
            all_greedy=all(p.greedy for p in params),
            top_logprobs=max((p.top_logprobs for p in params if p.logprobs), default=0),
            want_logprobs=any(p.logprobs for p in params),
            logit_adds=sparse_adds(params, banned, device),
        )


def sparse_adds(
    params: Sequence[SamplingParams], banned: Sequence[Collection[int]], device: torch.device
) -> tuple[Tensor, Tensor, Tensor] | None:
    """(rows, ids, values) of every row's logit_bias and banned tokens (-inf), from one host tensor (3, m)
    copied at once; None when no row has any. fp64 holds row and token ids exactly."""
    entries = [(r, t, b) for r, p in enumerate(params) for t, b in p.logit_bias]
    entries += [(r, t, -math.inf) for r, ids in enumerate(banned) for t in ids]
    if not entries:
        return None
    host = torch.tensor(entries, dtype=torch.float64).T.contiguous()  # (3, m)
    rows, ids, values = to_device(host, device).unbind(0)
    return rows.long(), ids.long(), values.float()


def apply_logit_adds(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """logits (b, v) plus the batch's sparse additions, out of place (the raw logits stay for logprobs).
    Additions to one entry add up: a bias on a banned token leaves it at -inf."""
    if batch.logit_adds is None:
        return logits
    rows, ids, values = batch.logit_adds
    return logits.index_put((rows, ids), values, accumulate=True)


def penalised_rows(batch: SamplingBatch) -> Tensor:
    """(b,) int32 on the device: 1 where the row applies any penalty (its token counts matter)."""
    return ((batch.presence != 0) | (batch.frequency != 0) | (batch.repetition != 1)).to(torch.int32)


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


def apply_top_k(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Top-k alone: a topk of the largest k, not a sort of the whole row. Ties with the k-th value
    are kept. Rows with top_k 0 are untouched."""
    kmax = min(batch.max_top_k, logits.shape[-1])
    top = logits.topk(kmax, dim=-1).values  # (b, kmax), descending
    k = batch.top_k.clamp(1, kmax).unsqueeze(1) - 1  # (b, 1)
    kth = top.gather(-1, k)  # (b, 1)
    kth = torch.where(batch.top_k.unsqueeze(1) > 0, kth, torch.full_like(kth, float("-inf")))
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_k_top_p(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Mask (to -inf) what top-k and top-p exclude; both act on the sorted row."""
    if not batch.use_top_p:
        return apply_top_k(logits, batch)
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
        if not prompt_tokens:
            return
        ids = torch.frombuffer(array.array("q", prompt_tokens), dtype=torch.long)  # 4x a list's build
        ids = ids[(ids >= 0) & (ids < self.vocab)]
        prompt[slot, ids.to(self.device)] = True

    def add(self, slots: Tensor, tokens: Tensor, weights: Tensor | None = None) -> None:
        """slots, tokens (r,) int64 on the device: `weights` (r,) int32 more occurrences of each token
        (default 1); a weight of 0 leaves a row's counts alone without a host-side selection."""
        counts, _ = self._alloc()
        values = torch.ones_like(tokens, dtype=torch.int32) if weights is None else weights.to(torch.int32)
        counts.index_put_((slots, tokens), values, accumulate=True)

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
        x = apply_logit_adds(raw, batch)
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
