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
from sisajax.errors import RunStateError, UserInputError
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


class StreamInterrupted(RunStateError):
    """A request of a sequential stream failed after earlier requests of it changed the run
    (exit code 1 whatever the failure: the run is no longer as it was). ``report`` holds the
    requests that were done; the failure is the exception's ``__cause__``."""

    def __init__(self, message: str, report: StreamReport, requested: int):
        super().__init__(message)
        self.report = report
        self.requested = requested


def check_stream(run: SisaRun, ids: Any) -> np.ndarray:
    """Refuse, before its first request runs, a sequential stream that the planner would refuse
    as one batched request: malformed or duplicate ids, test ids, ids that are not training ids
    of the run (validation ids and ids forgotten before are fine), or a stream that would forget
    every remaining training id. Returns the ids (``[K]`` int64, in the stream's order).

    Raises:
      ForgetError: the stream is wrong (exit code 2); nothing was changed.
    """
    from sisajax.planning import ForgetError, normalise_ids, plan_forget

    arr = normalise_ids(ids)
    hashed = run.config.ledger.hash_ids
    if hashed:
        run.ledger.check_salt((run.manifest.id_hashing or {}).get("salt_fingerprint"))
    val = run.val_data() if run.has_validation else None
    plan = plan_forget(
        run.partition,
        arr,
        run.test_data()[0],
        run.ledger.removed_keys(arr) if hashed else None,
        redact=hashed,
        val_ids=None if val is None else val[0],
    )
    if plan.trained.size and plan.trained.size >= len(run.partition.ids):
        raise ForgetError(
            "this stream would forget every remaining training id; train a new run instead"
        )
    return arr


def serve_requests(
    run: SisaRun,
    ids: np.ndarray,
    mode: str = "batched",
    progress=None,
    *,
    evaluate: bool = False,
    on_request=None,
    metrics=None,
    lock_timeout_s: float | None = None,
) -> StreamReport:
    """Forget ``ids`` one request at a time (``sequential``) or as one request (``batched``).

    A sequential stream holds the run's writer lock from start to end and is checked as a whole
    before its first request (:func:`check_stream`), so a wrong id fails it before anything
    changes.

    Args:
      run: an open run.
      ids: the ids to forget (a flat list or array of integers, no duplicates).
      mode: ``sequential`` (one retrain per id) or ``batched`` (one retrain for all).
      progress: a progress factory for the retraining.
      evaluate: also evaluate the ensemble on the test split after every request.
      on_request: called as ``on_request(index, ForgetReport, accuracy or None)`` after each.
      metrics: where each request's training losses and cost go (see :func:`sisajax.forget`).
      lock_timeout_s: how long to wait for another writer (default: the run's).

    Raises:
      ForgetError: wrong ids (exit code 2); nothing was changed.
      StreamInterrupted: a sequential request failed after earlier ones were done (exit code 1).
    """
    from sisajax.generation import prepare_ledger, writer_session
    from sisajax.planning import normalise_ids
    from sisajax.unlearning import forget, forget_in

    if mode not in ("sequential", "batched"):
        raise UserInputError(f"requests.mode must be batched or sequential; got {mode!r}")
    if mode == "batched":
        ids = normalise_ids(ids).tolist()
        rep = forget(run, ids, progress=progress, lock_timeout_s=lock_timeout_s, metrics=metrics)
        acc = run.evaluate().accuracy if evaluate else None
        if on_request is not None:
            on_request(0, rep, acc)
        return _stream_report(run, mode, [ids], [rep], [] if acc is None else [acc])
    reps, accuracy = [], []
    with writer_session(run, lock_timeout_s):
        batches = [[i] for i in check_stream(run, ids).tolist()]
        for n, b in enumerate(batches):
            try:
                if n:
                    prepare_ledger(run)  # as every forget does before writing
                reps.append(forget_in(run, b, progress=progress, metrics=metrics))
                acc = run.evaluate().accuracy if evaluate else None
                if acc is not None:
                    accuracy.append(acc)
                if on_request is not None:
                    on_request(n, reps[-1], acc)
            except Exception as e:
                if not reps:
                    raise  # nothing was done: the failure is reported as it is
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                partial = _stream_report(run, mode, batches[: len(reps)], reps, accuracy)
                if len(reps) == n:  # its forget failed
                    what = f"request {n + 1} of {len(batches)} of the sequential stream failed"
                    what += f"; the {n} before it were done"
                else:  # its forget was done, what followed it failed
                    what = f"the sequential stream stopped after request {n + 1} of {len(batches)}"
                raise StreamInterrupted(f"{what}: {why}", partial, len(batches)) from e
    return _stream_report(run, mode, batches, reps, accuracy)


def _stream_report(run: SisaRun, mode: str, batches, reps, accuracy) -> StreamReport:
    fulls = [rep.full_retrain_examples for rep in reps]
    redacted = [run.ledger.redact(b) for b in batches] if run.config.ledger.hash_ids else None
    costs = [rep.cost for rep in reps]
    return StreamReport(mode, batches, costs, sum(fulls), redacted, accuracy, fulls)
