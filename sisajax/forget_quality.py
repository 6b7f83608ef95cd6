"""Forget quality against the right oracle: how far a population of unlearned models is from a
population of models retrained without the forget set, per example.

Every measure here compares two populations of per-example scores, ``a [N, M]`` and
``b [N', M]`` (N models, M examples), where a score is the logit-scaled confidence of the true
label, ``phi = log(p_y / (1 - p_y))`` (:func:`sisajax.mia.scaled_logit`; for an ensemble, of its
mean probability, :func:`sisajax.mia.prob_scaled_logit`). The oracle population is the *same
configuration* retrained from scratch on the retained data: for SISA the retrained ensemble, for
a single model the single model. Exact unlearning draws from the oracle's distribution, so it
scores at the noise floor that two independent oracle populations of the same sizes give
(:func:`noise_floor` makes that comparison explicit); approximate methods are judged against
that floor, never against zero.

- :func:`per_example_epsilon` and :func:`challenge_score`: the scoring of the NeurIPS 2023
  machine-unlearning challenge. For each example, every threshold on the pooled scores is an
  attack that tells "unlearned" from "oracle"; its false positive and false negative rates
  bound the (epsilon, delta)-indistinguishability, and the example's epsilon is the worst over
  thresholds. Epsilons are binned (width 0.5); an example in bin ``n`` (``n = 1`` for
  ``[0, 0.5)``) scores ``2 / 2**n``, and the forget quality F is the mean: 1 is perfect.
- :func:`klom`: KL divergence, per example, between the histograms of the two populations'
  margins (a KLOM-style distance; 0 when the distributions match).
- :func:`ulira_accuracy`: a per-example likelihood-ratio attack whose Gaussians are fitted on
  shadow populations (models unlearned by the method under test vs oracle models); its accuracy
  on held-out target models is 0.5 at the floor and 1.0 when every target is told apart.
"""

from __future__ import annotations

import math

import numpy as np


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not a.size or not b.size:
        raise ValueError(f"expected [N, M] and [N', M] scores, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores must be finite")
    return a, b


def per_example_epsilon(a: np.ndarray, b: np.ndarray, delta: float = 0.01) -> np.ndarray:
    """``[M]`` epsilon per example from threshold attacks on ``a [N, M]`` vs ``b [N', M]``.

    For each threshold t (every pooled value) an attack says "a" when the score is >= t, and
    its reverse when it is < t; with a rule's false positive rate FPR (b called a) and false
    negative rate FNR (a called b), epsilon >= max(log((1 - delta - FPR) / FNR),
    log((1 - delta - FNR) / FPR)).
    Rates of 0 are clamped to half a model (1 / (2N)), so finite populations give finite
    epsilons; terms whose numerator is not positive are ignored.
    """
    a, b = _pair(a, b)
    na, nb = len(a), len(b)
    out = np.zeros(a.shape[1])
    for m in range(a.shape[1]):
        ts = np.unique(np.concatenate([a[:, m], b[:, m]]))
        # rule "score >= t means a": FNR = P_a(score < t), FPR = P_b(score >= t); the reversed
        # rule "score < t means a" has the complements (every threshold, both orientations)
        fnr = np.searchsorted(np.sort(a[:, m]), ts, side="left") / na
        fpr = 1.0 - np.searchsorted(np.sort(b[:, m]), ts, side="left") / nb
        eps = 0.0
        for f_p, f_n in ((fpr, fnr), (1.0 - fpr, 1.0 - fnr)):
            f_p = np.maximum(f_p, 0.5 / nb)
            f_n = np.maximum(f_n, 0.5 / na)
            for x, y in ((f_p, f_n), (f_n, f_p)):  # both inequalities of the definition
                num = 1.0 - delta - x
                ok = num > 0
                if ok.any():
                    eps = max(eps, float(np.max(np.log(num[ok]) - np.log(y[ok]))))
        out[m] = eps
    return out


def challenge_points(eps: np.ndarray, bin_width: float = 0.5) -> np.ndarray:
    """``[M]`` points per example: ``2 / 2**n`` for epsilon in bin ``n = floor(eps / w) + 1``."""
    n = np.floor(np.asarray(eps, dtype=np.float64) / bin_width) + 1
    return 2.0 / np.power(2.0, n)


def challenge_score(a: np.ndarray, b: np.ndarray, delta: float = 0.01) -> float:
    """Forget quality F in (0, 1]: the mean of :func:`challenge_points` over the examples of
    ``a [N, M]`` (unlearned) vs ``b [N', M]`` (oracle). 1 means no threshold attack separates
    them on any example."""
    return float(np.mean(challenge_points(per_example_epsilon(a, b, delta))))


def klom(a: np.ndarray, b: np.ndarray, bins: int = 20, smoothing: float = 0.5) -> np.ndarray:
    """``[M]`` KL(a || b) per example between histograms of ``a [N, M]`` and ``b [N', M]`` on
    ``bins`` equal bins over the pooled range, each bin count plus ``smoothing`` (so an empty
    bin of ``b`` does not make it infinite)."""
    a, b = _pair(a, b)
    out = np.zeros(a.shape[1])
    for m in range(a.shape[1]):
        lo = min(a[:, m].min(), b[:, m].min())
        hi = max(a[:, m].max(), b[:, m].max())
        if hi <= lo:
            continue  # every score identical: the same distribution
        edges = np.linspace(lo, hi, bins + 1)
        p = np.histogram(a[:, m], edges)[0] + smoothing
        q = np.histogram(b[:, m], edges)[0] + smoothing
        p, q = p / p.sum(), q / q.sum()
        out[m] = float(np.sum(p * (np.log(p) - np.log(q))))
    return out


def ulira_accuracy(
    shadow_unlearned: np.ndarray,
    shadow_oracle: np.ndarray,
    targets: np.ndarray,
    target_unlearned: np.ndarray,
) -> float:
    """Accuracy of a per-example likelihood-ratio attack at telling unlearned from oracle.

    Args:
      shadow_unlearned: ``[N, M]`` scores of shadow models trained with the examples and then
        unlearned by the method under test.
      shadow_oracle: ``[N', M]`` scores of shadow models retrained without them.
      targets: ``[T, M]`` scores of held-out target models.
      target_unlearned: ``[T]`` bool, which targets were unlearned (the rest are oracles).

    Each example fits one Gaussian per shadow population (variances pooled across examples
    when a population has fewer than 2 models); a target's guess on an example is "unlearned"
    when its log likelihood ratio is > 0. Returns the fraction of (target, example) guesses
    that are right: 0.5 when the populations match, up to 1.0.
    """
    u, o = _pair(shadow_unlearned, shadow_oracle)
    t = np.asarray(targets, dtype=np.float64)
    truth = np.asarray(target_unlearned, bool)
    if t.ndim != 2 or t.shape[1] != u.shape[1] or len(truth) != len(t):
        raise ValueError(
            f"targets {t.shape} and labels {truth.shape} do not match [T, {u.shape[1]}]"
        )

    def fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        var = x.var(0, ddof=1) if len(x) > 1 else np.full(x.shape[1], x.var())
        return x.mean(0), np.maximum(var, 1e-6)

    mu_u, var_u = fit(u)
    mu_o, var_o = fit(o)

    def loglik(x: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
        return -0.5 * (np.log(2 * np.pi * var) + (x - mu) ** 2 / var)

    guess = loglik(t, mu_u, var_u) - loglik(t, mu_o, var_o) > 0  # [T, M]
    return float(np.mean(guess == truth[:, None]))


def noise_floor(
    oracle_a: np.ndarray, oracle_b: np.ndarray, delta: float = 0.01
) -> dict[str, float]:
    """The scores two independent oracle populations ``[N, M]``, ``[N', M]`` get against each
    other: what exact unlearning should match (``{"challenge_score", "klom_mean"}``)."""
    return {
        "challenge_score": challenge_score(oracle_a, oracle_b, delta),
        "klom_mean": float(np.mean(klom(oracle_a, oracle_b))),
    }


def bootstrap_mean_ci(
    values: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` of ``values [M]`` with a percentile bootstrap interval over examples
    (the resampling has its own seed, so the interval is reproducible)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if not v.size:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def challenge_score_ci(
    a: np.ndarray,
    b: np.ndarray,
    *,
    delta: float = 0.01,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(F, lo, hi)``: :func:`challenge_score` of ``a [N, M]`` vs ``b [N', M]`` with a
    percentile bootstrap interval over the examples (the per-example points resampled) with
    the models fixed. The noise of drawing the models is not in it, so it is no interval for
    the population's forget quality: two independent oracle populations scored against the
    same oracle can get disjoint intervals (some pairs in the stored studies do). Label
    it "over forget examples, models fixed" and do not decide anything by whether two of them
    overlap: :func:`floor_test`, a permutation test over the models against a second oracle
    draw, is the verdict."""
    pts = challenge_points(per_example_epsilon(a, b, delta))
    return bootstrap_mean_ci(pts, n_boot=n_boot, level=level, seed=seed)


def floor_test_can_reject(n_perm: int, tests: int = 1, alpha: float = 0.05) -> bool:
    """Whether :func:`floor_test` with ``n_perm`` permutations can reject at ``alpha`` after a
    Bonferroni correction over ``tests`` tests (p x tests < alpha): its smallest p-value is
    ``1 / (n_perm + 1)``, so only when ``tests / (n_perm + 1) < alpha``. With 100 permutations
    that allows at most 5 tests; from 6 on every population would pass as "at the floor".
    Fewer than one permutation never can."""
    return int(n_perm) >= 1 and int(tests) / (int(n_perm) + 1) < alpha


def min_permutations(tests: int, alpha: float = 0.05) -> int:
    """The fewest permutations with which :func:`floor_test_can_reject` holds for ``tests``
    Bonferroni-corrected tests at ``alpha`` (20 for one test, 120 for six)."""
    n = max(1, math.floor(int(tests) / alpha))
    while not floor_test_can_reject(n, tests, alpha):
        n += 1
    while n > 1 and floor_test_can_reject(n - 1, tests, alpha):
        n -= 1
    return n


def floor_test(
    u: np.ndarray,
    floor: np.ndarray,
    oracle: np.ndarray,
    *,
    delta: float = 0.01,
    n_perm: int = 100,
    seed: int = 0,
    tests: int = 1,
    alpha: float = 0.05,
) -> float:
    """p-value that population ``u [N, M]`` scores as well against ``oracle [N'', M]`` as a
    second, independent oracle population ``floor [N', M]`` does (a permutation test: under
    the hypothesis that ``u`` is drawn like an oracle, its models and the floor's are
    exchangeable). Small p: ``u``'s forget quality is below the oracle-vs-oracle floor beyond
    the noise of drawing N models.

    The p-value is ``(hits + 1) / (n_perm + 1)``, never below ``1 / (n_perm + 1)``. ``tests``
    is the number of such tests the caller corrects together (Bonferroni: p x tests against
    ``alpha``); a configuration in which that correction could never reject is refused, since
    every population would then read as "at the floor" (:func:`floor_test_can_reject`).

    Raises:
      ValueError: ``tests / (n_perm + 1) >= alpha`` (use :func:`min_permutations` or more).
    """
    if not floor_test_can_reject(n_perm, tests, alpha):
        raise ValueError(
            f"floor_test: {n_perm} permutations give p >= 1/{n_perm + 1}, so a Bonferroni "
            f"correction over {tests} tests can never reject at {alpha:g}; use "
            f"n_perm >= {min_permutations(tests, alpha)}"
        )
    u, floor = _pair(u, floor)
    observed = challenge_score(floor, oracle, delta) - challenge_score(u, oracle, delta)
    pool, n = np.concatenate([u, floor]), len(u)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_perm):
        idx = rng.permutation(len(pool))
        d = challenge_score(pool[idx[n:]], oracle, delta) - challenge_score(
            pool[idx[:n]], oracle, delta
        )
        hits += d >= observed
    return float((hits + 1) / (n_perm + 1))
