"""Batch schedules: which rows each gradient step of a slice step uses.

The order is a pure function of (seed, shard, slice, epoch) and of the *set* of ids being trained
on: each epoch sorts the prefix ids by a keyed hash. Removing an id removes it from every epoch's
order and leaves the relative order of all others unchanged, so an unlearning retrain replays
exactly the batches a from-scratch run on the retained ids would use.

Budgets are counted in steps: a slice step over ``n`` ids runs
``ceil(epochs_per_step * ceil(n / B))`` gradient steps (the last batch of each epoch may be
partial and is masked), taking batches epoch after epoch until the budget is spent. Any non-empty
prefix gets at least one step, so no slice step is skipped when the per-step epoch budget is < 1.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sisajax.data.partition import hash64


def steps_for(n: int, epochs: float, batch_size: int) -> int:
    """Gradient steps for ``epochs`` epochs over ``n`` examples (0 when n = 0)."""
    if n <= 0:
        return 0
    per_epoch = math.ceil(n / batch_size)
    return max(1, math.ceil(round(epochs * per_epoch, 6)))


@dataclasses.dataclass(frozen=True)
class StepBatches:
    """Batches for one slice step of one shard.

    Attributes:
      rows: ``[T, B]`` int32 row indices into the shard's data (0 where masked).
      mask: ``[T, B]`` bool, True for real examples.
    """

    rows: np.ndarray
    mask: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.rows.shape[0])

    @property
    def num_examples(self) -> int:
        return int(self.mask.sum())


def slice_step_batches(
    ids: np.ndarray,
    rows: np.ndarray,
    *,
    seed: int,
    shard: int,
    slice_index: int,
    epochs: float,
    batch_size: int,
) -> StepBatches:
    """Batches for training one shard on a prefix of slices.

    Args:
      ids: ``[n]`` int64 ids of the prefix (any order).
      rows: ``[n]`` row of each id in the shard's data array.
      seed, shard, slice_index: the key of this slice step.
      epochs: epoch budget of this step (may be fractional).
      batch_size: B.

    Returns:
      :class:`StepBatches` with ``T = steps_for(n, epochs, B)`` steps.
    """
    ids = np.asarray(ids, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int32)
    n, b = len(ids), batch_size
    total = steps_for(n, epochs, b)
    out_rows = np.zeros((total, b), dtype=np.int32)
    out_mask = np.zeros((total, b), dtype=bool)
    if total == 0:
        return StepBatches(out_rows, out_mask)
    per_epoch = math.ceil(n / b)
    padded = per_epoch * b
    done, epoch = 0, 0
    while done < total:
        order = np.argsort(hash64(ids, seed, shard, slice_index, epoch), kind="stable")
        ep_rows = np.zeros(padded, dtype=np.int32)
        ep_mask = np.zeros(padded, dtype=bool)
        ep_rows[:n] = rows[order]
        ep_mask[:n] = True
        take = min(per_epoch, total - done)
        out_rows[done : done + take] = ep_rows.reshape(per_epoch, b)[:take]
        out_mask[done : done + take] = ep_mask.reshape(per_epoch, b)[:take]
        done += take
        epoch += 1
    return StepBatches(out_rows, out_mask)
