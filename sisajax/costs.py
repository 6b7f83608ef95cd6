"""Cost accounting: what a training or unlearning call cost, and the paper's analytic cost model.

Counts are in examples (real, unmasked rows through a gradient step) and gradient steps; wall
clock is split into compile, restore, retrain and save, measured after ``block_until_ready``.
Formulas follow Bourtoule et al., "Machine Unlearning" (IEEE S&P 2021).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sisajax.data.schedule import steps_for


@dataclasses.dataclass
class CostReport:
    """Measured cost of one operation (train, forget, or a full retrain).

    Attributes:
      wall_s: everything the caller waited for. compile_s: compiling programs. restore_s: reading
        the rows and data a forget starts from. retrain_s: the training loop. save_s: waiting
        for checkpoint writes after the loop, plus committing (the writes themselves overlap with
        training on a background thread that was busy ``writer_busy_s``).
      examples / grad_steps / shard_slices / shards: work done.
    """

    wall_s: float = 0.0
    compile_s: float = 0.0
    restore_s: float = 0.0
    retrain_s: float = 0.0
    save_s: float = 0.0
    examples: int = 0
    grad_steps: int = 0
    shard_slices: int = 0
    shards: int = 0
    writer_busy_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def slice_step_counts(
    sizes: np.ndarray, epochs: float, batch_size: int, start: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(n, steps)``, each ``[S, R]``: the ids each slice step trains on (the slice prefix) and
    its gradient steps, for shards trained from their start slice (0 before it).

    Args: as :func:`slice_schedule_cost`.
    """
    s, r = sizes.shape
    start = np.zeros(s, int) if start is None else np.asarray(start)
    per_step_epochs = 2.0 * epochs / (r + 1)
    n = np.zeros((s, r), np.int64)
    steps = np.zeros((s, r), np.int64)
    for k in range(s):
        prefix = np.cumsum(sizes[k])
        for j in range(int(start[k]), r):
            n[k, j] = int(prefix[j])
            steps[k, j] = steps_for(int(prefix[j]), per_step_epochs, batch_size)
    return n, steps


def slice_schedule_cost(
    sizes: np.ndarray, epochs: float, batch_size: int, start: np.ndarray | None = None
) -> tuple[int, int]:
    """(examples, gradient steps) of training shards from their start slice, without running it.

    Args:
      sizes: ``[S, R]`` ids per (shard, slice).
      epochs: e of the equivalent unsliced run.
      batch_size: B.
      start: ``[S]`` first slice to train per shard (default 0); ``R`` means "not trained".
    """
    ns, steps = slice_step_counts(sizes, epochs, batch_size, start)
    examples = 0
    for n, t in zip(ns.ravel().tolist(), steps.ravel().tolist(), strict=True):
        # full batches except the last of each epoch
        per_epoch = -(-n // batch_size) if n else 0
        full_epochs, rem = divmod(t, per_epoch) if per_epoch else (0, 0)
        examples += full_epochs * n + min(rem * batch_size, n)
    return examples, int(steps.sum())


def chunk_fill(
    sizes: np.ndarray,
    epochs: float,
    batch_size: int,
    chunk_steps: int,
    start: np.ndarray | None = None,
    *,
    together: bool = False,
) -> tuple[int, int]:
    """``(live, dispatched)`` gradient steps of training shards from their start slice when each
    slice step runs in chunks of ``chunk_steps`` with a static trip count (``sisa.chunk_trip=
    static``: the last chunk of a slice step is padded with masked no-op steps, which cost a live
    step's device time).

    Args: as :func:`slice_schedule_cost`, plus ``chunk_steps`` (C) and ``together``: False, each
      shard in its own program; True, all ``S`` shards in one vmapped program, where every
      position runs as many chunks as the longest shard of the slice step needs (positions not
      training that slice step run masked steps too).
    """
    _, steps = slice_step_counts(sizes, epochs, batch_size, start)
    chunks = -(-steps // chunk_steps)
    if together:
        dispatched = int(chunks.max(axis=0).sum()) * sizes.shape[0] * chunk_steps
    else:
        dispatched = int(chunks.sum()) * chunk_steps
    return int(steps.sum()), dispatched


def full_retrain_cost(n: int, epochs: float, batch_size: int) -> tuple[int, int]:
    """(examples, gradient steps) of training one model on ``n`` examples for ``epochs``."""
    return slice_schedule_cost(np.array([[n]]), epochs, batch_size)


# -- the paper's expected costs (uniform requests) --------------------------------------------


def expected_speedup_single(shards: int, slices: int) -> float:
    """Expected speedup of one uniform request vs full retrain: S * 3R / (2R + 1)."""
    return shards * 3 * slices / (2 * slices + 1)


def expected_cost_batched_sharding(n: int, shards: int, k: int) -> float:
    """Expected points retrained for K batched requests, sharding only: N(1-(1-1/S)^K) - K."""
    return n * (1 - (1 - 1 / shards) ** k) - k


def expected_cost_batched(n: int, shards: int, slices: int, k: int) -> float:
    """Expected sample-epochs (in units of e) for K batched uniform requests with S shards, R slices.

    Each hit shard restarts from the minimum slice u among its k requests; retraining from slice u
    costs ``D * (1 - (u-1)u / (R(R+1)))``. Summed over the binomial number of requests per
    shard; ``P(min >= j) = ((R-j+1)/R)^k``.
    """
    d = n / shards
    total = 0.0
    from math import comb

    p = 1 / shards
    for kk in range(1, k + 1):
        p_k = comb(k, kk) * p**kk * (1 - p) ** (k - kk)
        if p_k < 1e-15:
            continue
        exp_cost = 0.0
        for u in range(1, slices + 1):
            p_min_u = ((slices - u + 1) / slices) ** kk - ((slices - u) / slices) ** kk
            exp_cost += p_min_u * d * (1 - (u - 1) * u / (slices * (slices + 1)))
        total += shards * p_k * exp_cost
    return total


def expected_shards_hit(shards: int, k: int) -> float:
    """Expected number of shards hit by K uniform requests: S(1 - (1 - 1/S)^K)."""
    return shards * (1 - (1 - 1 / shards) ** k)


def expected_cost_sequential(n: int, shards: int, slices: int, k: int, epochs: float) -> float:
    """Expected sample-epochs of K uniform requests served one at a time (one retrain each):
    ``K * e * (N/S) * (2R+1) / (3R)``."""
    return k * epochs * (n / shards) * (2 * slices + 1) / (3 * slices)


def expected_single_request(sizes: np.ndarray, epochs: float, batch_size: int) -> float:
    """Expected examples retrained by one uniformly drawn request on an actual partition.

    Args:
      sizes: ``[S, R]`` ids per (shard, slice) (``Partition.sizes()``).
      epochs, batch_size: the run's e and B.

    Returns:
      sum over (shard k, slice j) of ``n_kj / N * cost(restart shard k at slice j without the
      point)``, with the exact step schedule (rounding included).
    """
    n = sizes.sum()
    total = 0.0
    for k in range(sizes.shape[0]):
        for j in range(sizes.shape[1]):
            if sizes[k, j]:
                left = sizes[k : k + 1].copy()
                left[0, j] -= 1  # the request's point is gone
                ex, _ = slice_schedule_cost(left, epochs, batch_size, np.array([j]))
                total += sizes[k, j] / n * ex
    return float(total)


def expected_cost_partition(
    sizes: np.ndarray, share: np.ndarray, k: int, epochs: float, mode: str
) -> tuple[float, float]:
    """``(expected sample-epochs, expected shard retrains)`` of K requests drawn with per-shard
    request shares ``share [S]`` on a partition of ``sizes [S]`` ids, R = 1 (each retrain costs
    its whole shard): batched ``e * sum n_k (1 - (1 - p_k)^K)``, sequential ``K e sum p_k n_k``."""
    sizes = np.asarray(sizes, np.float64)
    share = np.asarray(share, np.float64)
    if mode == "batched":
        hit = 1 - (1 - share) ** k
        return float(epochs * (sizes * hit).sum()), float(hit.sum())
    return float(k * epochs * (share * sizes).sum()), float(k)
