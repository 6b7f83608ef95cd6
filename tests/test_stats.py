"""Paired bootstrap intervals and McNemar's test for accuracy gaps."""

import numpy as np
import pytest

from sisajax.stats import (
    mcnemar_p,
    pack_correct,
    paired_bootstrap_gap,
    seed_t_interval,
    unpack_correct,
)


def test_pack_roundtrip_any_length():
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 1001):
        c = rng.random(n) < 0.5
        assert np.array_equal(unpack_correct(pack_correct(c), n), c)


def test_identical_and_opposite_models():
    rng = np.random.default_rng(1)
    a = rng.random((3, 500)) < 0.7
    same = paired_bootstrap_gap(a, a)
    assert same["gap"] == same["lo"] == same["hi"] == 0.0
    full = paired_bootstrap_gap(np.ones((2, 50), bool), np.zeros((2, 50), bool))
    assert full["gap"] == full["lo"] == full["hi"] == 1.0


def test_interval_covers_the_true_gap_and_shrinks_with_more_examples():
    """Two simulated models with true accuracies 0.80 and 0.75 (correlated, as two models on the
    same test set are): the 95% interval covers 0.05 in most of 40 draws, and a 4x larger test
    set halves its width."""
    rng = np.random.default_rng(2)
    covered, widths = 0, {}
    for m in (1000, 4000):
        w = []
        for t in range(40 if m == 1000 else 5):
            easy = rng.random((2, m))
            a = easy < 0.80
            b = easy < 0.75  # b is right only where a is: a paired design
            flip = rng.random((2, m)) < 0.02
            b = b ^ flip
            r = paired_bootstrap_gap(a, b, n_boot=400, seed=t)
            truth = 0.80 - (0.75 * 0.98 + 0.25 * 0.02)
            covered += (r["lo"] <= truth <= r["hi"]) if m == 1000 else 0
            w.append(r["boot_hi"] - r["boot_lo"])
            assert r["lo"] <= r["boot_lo"] and r["hi"] >= r["boot_hi"]
        widths[m] = float(np.mean(w))
    assert covered >= 34  # ~95% of 40
    assert widths[4000] == pytest.approx(widths[1000] / 2, rel=0.35)


def test_seed_t_interval_values():
    lo, hi = seed_t_interval(np.array([1.0, 2.0, 3.0]))
    half = 4.302652729911275 / np.sqrt(3)  # t(2) at 0.975, sd 1
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))
    assert all(np.isnan(seed_t_interval(np.array([0.5]))))


def test_seeds_that_disagree_widen_the_interval_beyond_the_bootstrap():
    """Three seeds whose gaps differ much more than their test sets' noise: the bootstrap over
    3 seeds understates that spread; the reported interval is the seeds' t-interval."""
    rng = np.random.default_rng(3)
    m = 20_000
    base = rng.random((3, m))
    a = base < 0.80
    b = base < np.array([[0.79], [0.74], [0.69]])  # gaps of 1, 6 and 11 points
    r = paired_bootstrap_gap(a, b, n_boot=400)
    assert r["seed_t_lo"] < r["boot_lo"] and r["seed_t_hi"] > r["boot_hi"]
    assert (r["lo"], r["hi"]) == (r["seed_t_lo"], r["seed_t_hi"])
    assert r["lo"] < 0.0 < 0.06 < r["hi"]  # three seeds cannot pin the mean gap down


def test_mcnemar_exact_values():
    a = np.array([True] * 10 + [True] * 5)
    b = np.array([False] * 10 + [True] * 5)
    assert mcnemar_p(a, b) == pytest.approx(2 / 1024)
    assert mcnemar_p(a, a) == 1.0
    c = np.array([True, False] * 20)
    assert mcnemar_p(c, ~c) == pytest.approx(1.0)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError):
        paired_bootstrap_gap(np.ones((2, 5), bool), np.ones((3, 5), bool))
