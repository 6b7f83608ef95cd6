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

from sisajax.config import int_value
from sisajax.costs import CostReport
from sisajax.data.partition import hash64
from sisajax.errors import UserInputError
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
        raise UserInputError(
            f"requests.distribution must be one of {', '.join(DISTRIBUTIONS)}; got {distribution!r}"
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


def group_weights(
    ids: np.ndarray, groups: list[dict[str, float]], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-id deletion probabilities of a grouped population (the paper's SVHN scenario).

    Args:
      ids: ``[N]`` ids.
      groups: ``[{"fraction": share of ids, "p": per-id deletion probability}, ...]``; each id
        falls in a group by a keyed hash of (seed, id).
      seed: keys the grouping.

    Returns:
      ``(p [N], group index [N])``.
    """
    from sisajax.data.partition import uniform_hash

    ids = np.asarray(ids, np.int64)
    frac = np.array([float(g["fraction"]) for g in groups])
    p = np.array([float(g["p"]) for g in groups])
    if not len(groups) or (frac <= 0).any() or (p < 0).any():
        raise UserInputError("groups need fraction > 0 and p >= 0")
    u = uniform_hash(ids, int(seed), stream=0x6A0)
    g = np.minimum(np.searchsorted(np.cumsum(frac) / frac.sum(), u, side="right"), len(p) - 1)
    return p[g], g


def sample_requests(
    ids: np.ndarray,
    k: int,
    distribution: str = "uniform",
    seed: int = 0,
    *,
    weights: np.ndarray | None = None,
    **params: float,
) -> np.ndarray:
    """``[K]`` distinct ids drawn without replacement from ``request_weights`` (or from the
    given per-id ``weights``, aligned with ``ids`` in sorted order)."""
    order = np.argsort(np.asarray(ids, np.int64), kind="stable")
    ids = np.asarray(ids, np.int64)[order]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 < k <= len(ids):
        raise UserInputError(
            f"requests.k must be an integer in 1..{len(ids)} (the retained ids); got {k!r}"
        )
    seed = int_value(seed, "requests.seed", 0)
    if weights is None:
        p = request_weights(ids, distribution, seed, **params)
    else:
        w = np.asarray(weights, np.float64)[order]
        p = w / w.sum()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E0]))
    return rng.choice(ids, size=k, replace=False, p=p)


@dataclasses.dataclass
class StreamReport:
    """Cost of serving a stream of requests (and, when asked, accuracy after each).

    ``requests`` holds the caller's raw ids in memory; :meth:`to_dict` (what goes into files)
    holds them as the run's ledger does (salted hashes with ``ledger.hash_ids``).
    """

    mode: str
    requests: list[list[int]]
    costs: list[CostReport]
    full_retrain_examples: int
    redacted_requests: list[list[Any]] | None = None
    accuracy: list[float] = dataclasses.field(default_factory=list)
    full_per_request: list[int] = dataclasses.field(default_factory=list)

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
            "requests": self.redacted_requests
            if self.redacted_requests is not None
            else self.requests,
            "costs": [c.to_dict() for c in self.costs],
            "total": self.total.to_dict(),
            "full_retrain_examples": self.full_retrain_examples,
            "accuracy": self.accuracy,
            "full_per_request": self.full_per_request,
        }


def serve_requests(
    run: SisaRun,
    ids: np.ndarray,
    mode: str = "batched",
    progress=None,
    *,
    evaluate: bool = False,
    on_request=None,
    metrics=None,
) -> StreamReport:
    """Forget ``ids`` one request at a time (``sequential``) or as one request (``batched``).

    Args:
      run: an open run.
      ids: the ids to forget.
      mode: ``sequential`` (one retrain per id) or ``batched`` (one retrain for all).
      progress: a progress factory for the retraining.
      evaluate: also evaluate the ensemble on the test split after every request.
      on_request: called as ``on_request(index, ForgetReport, accuracy or None)`` after each.
      metrics: where each request's training losses and cost go (see :func:`sisajax.forget`).
    """
    from sisajax.unlearning import forget

    ids = [int(i) for i in np.asarray(ids).ravel()]
    if mode == "sequential":
        batches = [[i] for i in ids]
    elif mode == "batched":
        batches = [ids]
    else:
        raise UserInputError(f"requests.mode must be batched or sequential; got {mode!r}")
    costs, fulls, accuracy = [], [], []
    for n, b in enumerate(batches):
        rep = forget(run, b, progress=progress, metrics=metrics)
        costs.append(rep.cost)
        fulls.append(rep.full_retrain_examples)
        acc = run.evaluate().accuracy if evaluate else None
        if acc is not None:
            accuracy.append(acc)
        if on_request is not None:
            on_request(n, rep, acc)
    redacted = [run.ledger.redact(b) for b in batches] if run.config.ledger.hash_ids else None
    return StreamReport(mode, batches, costs, sum(fulls), redacted, accuracy, fulls)
