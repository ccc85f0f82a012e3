"""Statistics for `bench/eval_cache.py`: confidence intervals and a KL divergence estimated from top-k logprobs.

- `wilson`: the Wilson score interval of a proportion (sound at 0 and at 1, unlike the normal approximation);
- `bootstrap_mean` / `bootstrap_paired_diff`: percentile bootstrap intervals, resampling whole clusters (a
  continuation's positions are not independent, so the unit resampled is the continuation);
- `topk_kl`: KL(P || Q) between two next-token distributions of which only the top-k logprobs are known.

Plain Python and numpy; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% confidence interval."""

    value: float
    low: float
    high: float

    def percent(self) -> str:
        return f"{self.value:.1%} [{self.low:.1%}, {self.high:.1%}]"

    def signed_percent(self) -> str:
        pts = lambda x: f"{100 * x:+.1f}"
        return f"{pts(self.value)} pts [{pts(self.low)}, {pts(self.high)}]"

    def sci(self) -> str:
        return f"{self.value:.2e} [{self.low:.2e}, {self.high:.2e}]"

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def wilson(successes: int, n: int) -> Interval:
    """The 95% Wilson score interval of successes / n (n = 0 gives nan)."""
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    p = successes / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean(clusters: Sequence[Sequence[float]], seed: int = 0) -> Interval:
    """Mean over all values, with a 95% percentile bootstrap interval that resamples whole clusters."""
    sums = np.array([sum(c) for c in clusters], dtype=np.float64)  # (c,)
    counts = np.array([len(c) for c in clusters], dtype=np.float64)  # (c,)
    if counts.sum() == 0:
        return Interval(math.nan, math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, len(sums), (BOOTSTRAP_SAMPLES, len(sums)))  # (B, c)
    means = sums[idx].sum(1) / np.maximum(counts[idx].sum(1), 1)  # (B,)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(sums.sum() / counts.sum()), float(low), float(high))


def bootstrap_paired_diff(a: Sequence[bool], b: Sequence[bool], seed: int = 0) -> Interval:
    """mean(a) - mean(b) over paired items (the same questions), with a 95% paired bootstrap interval."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)  # (n,)
    if diff.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, diff.size, (BOOTSTRAP_SAMPLES, diff.size))
    low, high = np.percentile(diff[idx].mean(1), [2.5, 97.5])
    return Interval(float(diff.mean()), float(low), float(high))


def topk_kl(p: Mapping[int, float], q: Mapping[int, float]) -> float:
    """KL(P || Q) in nats from two top-k logprob maps (token id -> logprob), with the tails lumped.

    The vocabulary is partitioned into the tokens both maps hold, each a bin of its own, and one bin of
    everything else, whose mass is 1 minus the listed ones on each side. Both distributions are known
    exactly on that partition, so this is the exact KL of the coarsened distributions and, by the
    data-processing inequality, a lower bound on the full-vocabulary KL (tight when the top-k hold nearly
    all the mass, as they do for a trained model)."""
    shared = p.keys() & q.keys()
    ps = np.array([p[t] for t in shared], dtype=np.float64)  # (s,) logprobs
    qs = np.array([q[t] for t in shared], dtype=np.float64)
    kl = float(np.sum(np.exp(ps) * (ps - qs)))
    p_tail = max(0.0, 1.0 - float(np.exp(ps).sum()))
    q_tail = max(0.0, 1.0 - float(np.exp(qs).sum()))
    if p_tail > 1e-12:
        kl += p_tail * math.log(p_tail / max(q_tail, 1e-12))
    return max(0.0, kl)
