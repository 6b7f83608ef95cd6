"""Seeded streams of deletion requests, and running them sequentially or batched.

Distributions over the retained ids, as in the paper's experiments: ``uniform``; ``exponential``
and ``pareto`` make some ids far more likely to be deleted than others. Which ids are "popular" is
itself a keyed hash permutation of the ids (by ``seed``), so a stream is reproducible from
(seed, distribution, parameters, id set) alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sisajax.costs import CostReport
from sisajax.data.partition import hash64
from sisajax.run import SisaRun

DISTRIBUTIONS = ("uniform", "exponential", "pareto")


def request_weights(
    ids: np.ndarray, distribution: str, seed: int, rate: float = 5.0, alpha: float = 1.16
) -> np.ndarray:
    """``[N]`` deletion probabilities of ``ids`` (sum to 1).

    Args:
      ids: ``[N]`` candidate ids.
      distribution: ``uniform``; ``exponential`` (``p ∝ exp(-rate * rank / N)``); ``pareto``
        (``p ∝ (rank + 1) ** -(alpha + 1)``; alpha = 1.16 is the 80/20 rule).
      seed: keys the popularity ranking.
    """
    ids = np.asarray(ids, np.int64)
    n = len(ids)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown request distribution {distribution!r}; use one of {DISTRIBUTIONS}"
        )
    if distribution == "uniform":
        return np.full(n, 1.0 / n)
    rank = np.empty(n, np.int64)
    rank[np.argsort(hash64(ids, seed, 0xD1E7E), kind="stable")] = np.arange(n)
    if distribution == "exponential":
        w = np.exp(-rate * rank / n)
    else:
        w = (rank + 1.0) ** -(alpha + 1.0)
    return w / w.sum()


def sample_requests(
    ids: np.ndarray, k: int, distribution: str = "uniform", seed: int = 0, **params: float
) -> np.ndarray:
    """``[K]`` distinct ids drawn without replacement from ``request_weights``."""
    ids = np.sort(np.asarray(ids, np.int64))
    if not 0 < k <= len(ids):
        raise ValueError(f"cannot draw {k} requests from {len(ids)} ids")
    p = request_weights(ids, distribution, seed, **params)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E0]))
    return rng.choice(ids, size=k, replace=False, p=p)


@dataclasses.dataclass
class StreamReport:
    """Cost of serving a stream of requests."""

    mode: str
    requests: list[list[int]]
    costs: list[CostReport]
    full_retrain_examples: int

    @property
    def total(self) -> CostReport:
        out = CostReport()
        for c in self.costs:
            for f in dataclasses.fields(CostReport):
                setattr(out, f.name, getattr(out, f.name) + getattr(c, f.name))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "requests": self.requests,
            "costs": [c.to_dict() for c in self.costs],
            "total": self.total.to_dict(),
            "full_retrain_examples": self.full_retrain_examples,
        }


def serve_requests(
    run: SisaRun, ids: np.ndarray, mode: str = "batched", progress=None
) -> StreamReport:
    """Forget ``ids`` one request at a time (``sequential``) or as one request (``batched``)."""
    from sisajax.unlearning import forget

    ids = [int(i) for i in np.asarray(ids).ravel()]
    if mode == "sequential":
        batches = [[i] for i in ids]
    elif mode == "batched":
        batches = [ids]
    else:
        raise ValueError(f"unknown mode {mode!r}; use 'sequential' or 'batched'")
    costs, full = [], 0
    for b in batches:
        rep = forget(run, b, progress=progress)
        costs.append(rep.cost)
        full += rep.full_retrain_examples
    return StreamReport(mode, batches, costs, full)
