"""Forget-quality measures: the challenge's per-example epsilon and score, KLOM, U-LiRA."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sisajax.forget_quality import (
    bootstrap_mean_ci,
    challenge_points,
    challenge_score,
    klom,
    noise_floor,
    per_example_epsilon,
    ulira_accuracy,
)


def _brute_epsilon(a: np.ndarray, b: np.ndarray, delta: float) -> float:
    """The same bound, by counting each threshold's errors directly."""
    best = 0.0
    for t in np.unique(np.concatenate([a, b])):
        for says_a, says_b in (((a >= t), (b >= t)), ((a < t), (b < t))):  # both orientations
            fnr = max(np.mean(~says_a), 0.5 / len(a))
            fpr = max(np.mean(says_b), 0.5 / len(b))
            for x, y in ((fpr, fnr), (fnr, fpr)):
                if 1 - delta - x > 0:
                    best = max(best, math.log(1 - delta - x) - math.log(y))
    return best


def test_epsilon_matches_counting_and_separation_is_worst():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(16, 5)), rng.normal(0.7, 1.0, size=(12, 5))
    got = per_example_epsilon(a, b, delta=0.01)
    want = [_brute_epsilon(a[:, m], b[:, m], 0.01) for m in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    apart = per_example_epsilon(np.full((8, 1), 5.0) + np.arange(8)[:, None], np.zeros((8, 1)))
    assert apart[0] == pytest.approx(math.log((1 - 0.01 - 1 / 16) / (1 / 16)))
    below = per_example_epsilon(-np.full((8, 1), 5.0) - np.arange(8)[:, None], np.zeros((8, 1)))
    assert below[0] == apart[0]  # separated the other way round: just as distinguishable
    assert per_example_epsilon(np.zeros((8, 1)), np.zeros((8, 1)))[0] == 0.0  # no rule helps


def test_challenge_points_bins():
    np.testing.assert_allclose(
        challenge_points(np.array([0.0, 0.49, 0.5, 0.99, 1.2, 3.0])),
        [1.0, 1.0, 0.5, 0.5, 0.25, 2 / 2**7],
    )


def test_scores_rank_matching_above_shifted_populations():
    rng = np.random.default_rng(1)
    oracle_a = rng.normal(size=(64, 300))
    oracle_b = rng.normal(size=(64, 300))
    shifted = rng.normal(1.5, 1.0, size=(64, 300))
    floor = noise_floor(oracle_a, oracle_b)
    assert floor["challenge_score"] == challenge_score(oracle_a, oracle_b)
    bad = challenge_score(shifted, oracle_b)
    assert floor["challenge_score"] > bad + 0.1, (floor, bad)
    assert 0 < bad < floor["challenge_score"] <= 1
    k_same, k_shift = klom(oracle_a, oracle_b), klom(shifted, oracle_b)
    assert k_shift.mean() > 3 * k_same.mean() and (k_same >= 0).all()
    assert np.all(klom(oracle_a, oracle_a) == 0)
    assert np.all(klom(np.ones((4, 3)), np.ones((5, 3))) == 0)


def test_ulira_is_chance_at_the_floor_and_perfect_when_apart():
    rng = np.random.default_rng(2)
    su, so = rng.normal(size=(32, 400)), rng.normal(size=(32, 400))
    targets = rng.normal(size=(20, 400))
    truth = np.arange(20) % 2 == 0
    assert abs(ulira_accuracy(su, so, targets, truth) - 0.5) < 0.05
    su2 = rng.normal(4.0, 1.0, size=(32, 400))
    t2 = np.where(truth[:, None], rng.normal(4.0, 1.0, (20, 400)), rng.normal(size=(20, 400)))
    assert ulira_accuracy(su2, so, t2, truth) > 0.95
    with pytest.raises(ValueError, match="do not match"):
        ulira_accuracy(su, so, targets[:, :3], truth)


def test_bad_shapes_and_values_are_refused():
    with pytest.raises(ValueError, match=r"\[N, M\]"):
        per_example_epsilon(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="finite"):
        klom(np.array([[np.nan]]), np.zeros((2, 1)))
    mean, lo, hi = bootstrap_mean_ci(np.arange(100.0))
    assert lo < mean == 49.5 < hi
    assert bootstrap_mean_ci(np.arange(100.0)) == (mean, lo, hi)


def test_the_floor_test_separates_oracle_draws_from_shifted_ones():
    from sisajax.forget_quality import challenge_score_ci, floor_test

    rng = np.random.default_rng(3)
    oracle, floor, same = (rng.normal(size=(16, 40)) for _ in range(3))
    f, lo, hi = challenge_score_ci(same, oracle, n_boot=200)
    assert f == challenge_score(same, oracle) and lo <= f <= hi
    assert challenge_score_ci(same, oracle, n_boot=200) == (f, lo, hi)  # reproducible
    assert floor_test(same, floor, oracle, n_perm=50) > 0.05
    shifted = rng.normal(1.5, 1.0, size=(16, 40))
    assert floor_test(shifted, floor, oracle, n_perm=50) < 0.05
