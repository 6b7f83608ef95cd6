"""Uncertainty of accuracy gaps: paired bootstrap over test examples and seeds widened by a
t-interval over seeds, exact McNemar.

Two models scored on the same test examples (and trained with the same seeds) are compared
pairwise: their per-example correctness is resampled together, so the interval reflects the
noise of *this* test split and of the seeds, not of two independent samples. Correctness arrays
are stored with results as packed bits (:func:`pack_correct`), so a gap's interval can be
recomputed from the stored results alone.
"""

from __future__ import annotations

import base64
import math

import numpy as np

# seeds needed before an interval measures seed-to-seed variance (a t-interval needs two)
MIN_SEEDS = 2


def pack_correct(correct: np.ndarray) -> str:
    """``[M]`` bool -> base64 text of the packed bits (1/8 byte per example)."""
    bits = np.packbits(np.asarray(correct, bool))
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack_correct(text: str, n: int) -> np.ndarray:
    """Inverse of :func:`pack_correct` for ``n`` examples: ``[n]`` bool."""
    bits = np.frombuffer(base64.b64decode(text.encode("ascii")), np.uint8)
    return np.unpackbits(bits)[:n].astype(bool)


def paired_bootstrap_gap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy of ``a`` minus accuracy of ``b`` with a paired bootstrap interval.

    Args:
      a, b: ``[S, M]`` bool, per seed (row ``s`` of both from the same seed) and per test
        example (the same examples in the same order), whether the model was right.
      n_boot: bootstrap replicates; each resamples the M examples and the S seeds with
        replacement, the same indices for ``a`` and ``b``.
      level: coverage of the percentile interval.
      seed: the resampling's own seed (the interval is reproducible).

    Returns:
      ``{"gap", "lo", "hi", ...}``: the observed mean gap over seeds and the interval's bounds,
      as fractions (x100 for points). With two or more seeds ``lo``/``hi`` are the wider of the
      bootstrap's percentile interval (``boot_lo``/``boot_hi``) and the Student-t interval over
      the per-seed gaps (``seed_t_lo``/``seed_t_hi``, :func:`seed_t_interval`). With one seed
      there is no seed-to-seed variance to measure: ``lo``/``hi`` are the bootstrap over that
      seed's test examples alone and ``seed_t_lo``/``seed_t_hi`` are NaN. Also ``n_examples``,
      ``n_seeds`` and ``seed_variance`` (whether the interval covers seed-to-seed variance:
      ``n_seeds >= 2``; :func:`interval_text` says which interval it is).
    """
    a = np.atleast_2d(np.asarray(a, bool))
    b = np.atleast_2d(np.asarray(b, bool))
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired arrays must have one non-empty shape, got {a.shape}, {b.shape}")
    s, m = a.shape
    diff = a.astype(np.float64) - b.astype(np.float64)  # [S, M] per-example differences
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    chunk = max(1, 2_000_000 // max(m, 1))
    for lo in range(0, n_boot, chunk):
        k = min(chunk, n_boot - lo)
        ex = rng.integers(0, m, (k, m))
        sd = rng.integers(0, s, (k, s))
        per_seed = diff[:, ex].mean(axis=2)  # [S, k]
        stats[lo : lo + k] = np.take_along_axis(per_seed.T, sd, axis=1).mean(axis=1)
    alpha = (1.0 - level) / 2
    boot_lo, boot_hi = float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))
    t_lo, t_hi = seed_t_interval(diff.mean(axis=1), level)
    return {
        "gap": float(diff.mean()),
        # the wider of the two: resampling 2-3 seeds understates how much seeds vary
        "lo": min(boot_lo, t_lo) if s > 1 else boot_lo,
        "hi": max(boot_hi, t_hi) if s > 1 else boot_hi,
        "boot_lo": boot_lo,
        "boot_hi": boot_hi,
        "seed_t_lo": t_lo,
        "seed_t_hi": t_hi,
        "n_examples": int(m),
        "n_seeds": int(s),
        "seed_variance": bool(s >= MIN_SEEDS),
    }


def interval_text(n_seeds: int) -> str:
    """What the interval of :func:`paired_bootstrap_gap` is for ``n_seeds`` seeds, for reports."""
    if n_seeds >= MIN_SEEDS:
        return (
            "the wider of a paired bootstrap over test examples and seeds and a t-interval over "
            "the per-seed gaps"
        )
    return (
        "a paired bootstrap over the test examples of one seed only: seed-to-seed variance is "
        f"not measured (that needs >= {MIN_SEEDS} seeds)"
    )


def seed_t_interval(per_seed: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of ``[S]`` per-seed gaps (seed-to-seed variance alone,
    which a bootstrap over few seeds understates); ``(nan, nan)`` for fewer than 2 seeds."""
    from scipy.stats import t

    g = np.asarray(per_seed, np.float64)
    if g.size < 2:
        return float("nan"), float("nan")
    half = float(t.ppf(0.5 + level / 2, g.size - 1)) * float(g.std(ddof=1)) / math.sqrt(g.size)
    return float(g.mean()) - half, float(g.mean()) + half


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value for two models on the same examples (``[M]`` bool each):
    the binomial test of the discordant pairs (a right and b wrong vs the reverse)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n01 = int(np.sum(a & ~b))
    n10 = int(np.sum(~a & b))
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return float(min(1.0, 2.0 * tail))


__all__ = [
    "MIN_SEEDS",
    "interval_text",
    "mcnemar_p",
    "pack_correct",
    "paired_bootstrap_gap",
    "seed_t_interval",
    "unpack_correct",
]
