"""What the engine trains and hands back: shard data, jobs, per-slice outputs, cost counters,
helpers to stack one-shard states into ``[W, ...]`` pytrees, and the host-side inputs of every
chunk of a slice step (numpy, no compiled code)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from sisajax.data.schedule import slice_step_batches

PyTree = Any


def pad_rows(tree: PyTree, width: int) -> PyTree:
    """Pad axis 0 of every leaf to ``width`` with copies of row 0 (numpy; inert filler)."""

    def pad(a: Any) -> np.ndarray:
        a = np.asarray(a)
        if len(a) >= width:
            return a
        return np.concatenate([a, np.repeat(a[:1], width - len(a), axis=0)])

    return jax.tree.map(pad, tree)


def stack_states(states: Sequence[PyTree]) -> PyTree:
    """``[W]`` list of per-shard pytrees -> one pytree with a leading ``[W]`` axis (numpy)."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)


def unstack_state(states: PyTree, i: int) -> PyTree:
    """Row ``i`` of a stacked pytree."""
    return jax.tree.map(lambda x: x[i], states)


@dataclasses.dataclass
class TrainStats:
    """What a training call cost. ``examples`` counts real (unmasked) rows processed."""

    examples: int = 0
    grad_steps: int = 0
    shard_slices: int = 0
    compile_s: float = 0.0
    train_s: float = 0.0
    program_calls: int = 0

    def add(self, other: TrainStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclasses.dataclass(frozen=True)
class ShardData:
    """The retained training data of one shard, sorted by id.

    Attributes:
      ids: ``[n]`` int64.  x: ``[n, *feat]``.  y: ``[n]`` int32.  slices: ``[n]`` int32.
    """

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    slices: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def without(self, ids: np.ndarray) -> ShardData:
        keep = ~np.isin(self.ids, ids)
        return ShardData(self.ids[keep], self.x[keep], self.y[keep], self.slices[keep])

    def empty(self) -> ShardData:
        return ShardData(self.ids[:0], self.x[:0], self.y[:0], self.slices[:0])


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One shard to train: from ``start_slice`` to the last slice.

    Attributes:
      shard: the shard index (keys its init, batch order and dropout).
      data: its retained data.
      start_slice: first slice to (re)train (0-based); ``R`` trains nothing.
      start_state: its state just before ``start_slice`` (one shard, numpy); None = its initial
        state (requires ``start_slice == 0``).
    """

    shard: int
    data: ShardData
    start_slice: int = 0
    start_state: PyTree | None = None


@dataclasses.dataclass(frozen=True)
class SliceOutput:
    """The states after one slice step, handed to ``on_slice`` (nothing has waited for them).

    Attributes:
      slice: the slice index ``j``.
      states: stacked ``[W, ...]`` device arrays of every position (inert ones included).
      positions: ``{job index: position in states}`` of the jobs trained up to slice ``j``.
      losses: per program call of the slice step, the summed training loss ``[W]`` (device).
      examples: ``[W]`` real examples each position trained on in this slice step.
      step_examples: ``[calls, W, C]`` real examples of every step of every program call (0 for
        a masked no-op step), so each call's examples and live steps are known on the host.
    """

    slice: int
    states: PyTree
    positions: dict[int, int]
    losses: list[Any] = dataclasses.field(default_factory=list)
    examples: np.ndarray | None = None
    step_examples: np.ndarray | None = None

    def fetch(self) -> dict[int, PyTree]:
        """``{job index: one-shard numpy state}`` (waits for the slice to be computed)."""
        host = jax.device_get(self.states)
        return {
            i: jax.tree.map(lambda a, p=p: np.asarray(a[p]), host)
            for i, p in self.positions.items()
        }

    def call_losses(self) -> np.ndarray:
        """``[calls, W]`` float64 summed training loss of every program call (waits for them)."""
        if not self.losses:
            return np.zeros((0, len(self.examples) if self.examples is not None else 0))
        return np.stack([np.asarray(x, np.float64) for x in jax.device_get(self.losses)])

    def mean_loss(self, sums: np.ndarray | None = None) -> dict[int, float]:
        """``{job index: mean training loss per example over this slice step}``.

        Args:
          sums: :meth:`call_losses` when already fetched (else fetched here).
        """
        if not self.losses:
            return {i: float("nan") for i in self.positions}
        calls = self.call_losses() if sums is None else sums
        total = sum(calls[c] for c in range(len(calls)))
        n = self.examples if self.examples is not None else np.zeros(len(total))
        return {i: float(total[p] / max(n[p], 1)) for i, p in self.positions.items()}


def row_offsets(shard_exec: str, width: int, capacity: int, num_devices: int) -> np.ndarray:
    """``[W]`` what each position adds to its row indices: under ``map`` a device's program reads
    its block of shards as one flat ``[W_local * Ncap]`` array, so position ``p`` adds
    ``(p mod W_local) * Ncap``; under ``vmap`` each shard reads its own rows (0)."""
    if shard_exec == "vmap":
        return np.zeros(width, np.int64)
    local = width // num_devices
    return (np.arange(width) % local) * capacity


def chunk_inputs(
    batches: dict[int, Any],
    labels_of: dict[int, np.ndarray],
    width: int,
    n_chunks: int,
    offsets: np.ndarray,
    chunk_steps: int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, masks and labels of every chunk of a slice step, each ``[n_chunks, W, C, B]``.

    Args:
      batches: ``{position: StepBatches}`` of the shards this slice step trains.
      labels_of: ``{position: [n] labels of the shard's data rows}``.
      offsets: :func:`row_offsets`. Steps past a shard's budget stay masked (no-ops).
      chunk_steps, batch_size: C and B.
    """
    c, b = chunk_steps, batch_size
    total = n_chunks * c
    rows = np.zeros((width, total, b), np.int32)
    mask = np.zeros((width, total, b), bool)
    labels = np.zeros((width, total, b), np.int32)
    for p, sb in batches.items():
        t = sb.num_steps
        rows[p, :t] = sb.rows + offsets[p]
        mask[p, :t] = sb.mask
        labels[p, :t] = np.where(sb.mask, labels_of[p][sb.rows], 0)

    def chunks(a: np.ndarray) -> np.ndarray:
        return a.reshape(width, n_chunks, c, b).swapaxes(0, 1)

    return chunks(rows), chunks(mask), chunks(labels)


@dataclasses.dataclass(frozen=True)
class SliceStepInputs:
    """Host-side inputs of every chunk of one slice step of a stacked program.

    Attributes:
      rows, mask, labels: ``[n_chunks, W, C, B]`` (see :func:`chunk_inputs`).
      steps: ``[W]`` gradient steps each position takes in this slice step (0: inert).
      examples: ``[W]`` real examples each position sees in this slice step.
      active: ``{job index: position}`` of the jobs this slice step trains.
    """

    rows: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    steps: np.ndarray
    examples: np.ndarray
    active: dict[int, int]

    @property
    def n_chunks(self) -> int:
        return int(self.rows.shape[0])


def slice_step_inputs(
    jobs: Sequence[ShardJob],
    positions: Sequence[int],
    slice_index: int,
    *,
    width: int,
    offsets: np.ndarray,
    chunk_steps: int,
    batch_size: int,
    seed: int,
    epochs: int,
) -> SliceStepInputs:
    """Batches of slice step ``slice_index`` for every job that trains in it (a job starts at
    its ``start_slice``), laid out at each job's ``positions`` entry of a width-``width``
    program and cut into chunks of ``chunk_steps`` steps. The batches of a shard depend only on
    (seed, shard, slice, its data's ids), never on which other shards train beside it.
    """
    batches: dict[int, Any] = {}
    labels_of: dict[int, np.ndarray] = {}
    active: dict[int, int] = {}
    for i, job in enumerate(jobs):
        if job.start_slice > slice_index:
            continue
        d, p = job.data, positions[i]
        sel = d.slices <= slice_index
        batches[p] = slice_step_batches(
            d.ids[sel],
            np.flatnonzero(sel),
            seed=seed,
            shard=job.shard,
            slice_index=slice_index,
            epochs=epochs,
            batch_size=batch_size,
        )
        labels_of[p] = d.y
        active[i] = p
    steps = np.zeros(width, np.int64)
    examples = np.zeros(width, np.int64)
    for p, sb in batches.items():
        steps[p] = sb.num_steps
        examples[p] = sb.num_examples
    n_chunks = -(-int(steps.max(initial=0)) // chunk_steps)
    rows, mask, labels = chunk_inputs(
        batches, labels_of, width, n_chunks, offsets, chunk_steps, batch_size
    )
    return SliceStepInputs(rows, mask, labels, steps, examples, active)


__all__ = [
    "ShardData",
    "ShardJob",
    "SliceOutput",
    "SliceStepInputs",
    "TrainStats",
    "chunk_inputs",
    "pad_rows",
    "row_offsets",
    "slice_step_inputs",
    "stack_states",
    "unstack_state",
]
