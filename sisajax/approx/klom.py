"""KLOM-style distance: the KL divergence between the margin distributions of two populations
of models, per example.

In the spirit of KLOM ("KL divergence of margins", Georgiev et al., "Attribute-to-Delete:
Machine Unlearning via Datamodel Matching", 2024): train many models with an unlearning method
and many retrained from scratch (different seeds), record each model's margin on every example,
and compare the two empirical distributions example by example; 0 means the method's models are
distributed like retrained ones on that example. The distributions are estimated by histograms
with common, equal-width bins per example over the pooled range of both samples, smoothed by a
small pseudo-probability so that empty bins give a finite divergence. With few models per
population the estimate is noisy and biased upward; compare methods at equal population sizes.
"""

from __future__ import annotations

import numpy as np


def margins(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Margins ``[..., M]``: the true label's logit minus the largest other logit, from logits
    ``[..., M, C]`` and labels ``y [M]``."""
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y)
    true = np.take_along_axis(logits, np.broadcast_to(y[:, None], logits.shape[:-1] + (1,)), -1)
    other = np.where(np.arange(logits.shape[-1]) == y[:, None], -np.inf, logits)
    return true[..., 0] - other.max(-1)


def margin_kl(a: np.ndarray, b: np.ndarray, bins: int = 20, smoothing: float = 1e-6) -> np.ndarray:
    """``[M]`` estimates of ``KL(P_a || P_b)`` between the per-example margin distributions of
    two model populations.

    Args:
      a: ``[Na, M]`` margins of population A (e.g. models after approximate unlearning).
      b: ``[Nb, M]`` margins of population B (e.g. models retrained without the forget set).
      bins: equal-width histogram bins per example over the pooled range of ``a`` and ``b``.
      smoothing: added to every bin's probability before renormalising.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"margins must be [Na, M] and [Nb, M]; got {a.shape} and {b.shape}")
    lo = np.minimum(a.min(0), b.min(0))
    hi = np.maximum(a.max(0), b.max(0))
    width = np.where(hi > lo, (hi - lo) / bins, 1.0)

    def hist(s: np.ndarray) -> np.ndarray:
        idx = np.clip(np.floor((s - lo) / width).astype(np.int64), 0, bins - 1)  # [N, M]
        counts = np.zeros((bins, s.shape[1]))
        np.add.at(counts, (idx, np.broadcast_to(np.arange(s.shape[1]), idx.shape)), 1.0)
        p = counts / s.shape[0] + smoothing
        return p / p.sum(0)

    p, q = hist(a), hist(b)
    return np.sum(p * np.log(p / q), axis=0)


__all__ = ["margin_kl", "margins"]
