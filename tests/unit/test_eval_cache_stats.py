"""bench/eval_stats.py: the Wilson interval, the cluster bootstrap and the top-k KL lower bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.eval_stats import bootstrap_mean, bootstrap_paired_diff, topk_kl, wilson


def _topk(logp: np.ndarray, k: int) -> dict[int, float]:
    order = np.argsort(-logp)[:k]
    return {int(t): float(logp[t]) for t in order}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()


def test_wilson_matches_the_closed_form_and_stays_in_bounds() -> None:
    ci = wilson(8, 10)
    assert (
        ci.value == 0.8
        and ci.low == pytest.approx(0.4902, abs=1e-4)
        and ci.high == pytest.approx(0.9433, abs=1e-4)
    )
    assert wilson(0, 5).low == 0.0 and wilson(5, 5).high == 1.0
    assert math.isnan(wilson(0, 0).value)


def test_bootstrap_intervals_hold_the_estimate() -> None:
    clusters = [[0.1, 0.2], [0.3], [0.05, 0.05, 0.5]]
    ci = bootstrap_mean(clusters)
    assert ci.value == pytest.approx(1.2 / 6) and ci.low <= ci.value <= ci.high
    same = bootstrap_paired_diff([True, False, True], [True, False, True])
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero()


def test_topk_kl_is_zero_on_equal_maps_and_a_lower_bound_of_the_full_kl() -> None:
    rng = np.random.default_rng(0)
    p = _log_softmax(rng.normal(0, 3, 500))
    q = _log_softmax(np.log(np.exp(p)) + rng.normal(0, 0.05, 500))
    full = float(np.sum(np.exp(p) * (p - q)))
    assert topk_kl(_topk(p, 20), _topk(p, 20)) == 0.0
    estimate = topk_kl(_topk(p, 20), _topk(q, 20))
    assert 0 < estimate <= full
