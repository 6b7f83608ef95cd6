"""The background writer of one new generation's files: shard data copies, the partition, the
held-out and validation splits, and every (shard, slice) row, written while training goes on.

Slice step j's states are fetched when slice step j + 1 has been dispatched, so checkpointing
overlaps with compute; the rows are encoded, hashed and written on the writer thread. Nothing
written here is live until a manifest naming it is committed
(:class:`~sisajax.generation.Generation`).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sisajax import host as host_mod
from sisajax.data.partition import Partition, prefix_fingerprints
from sisajax.engine import Engine, ShardData, SliceOutput
from sisajax.store.faults import fault
from sisajax.store.files import sync_files, write_file
from sisajax.store.manifest import (
    FileRef,
    RowRef,
    ShardEntry,
    partition_file,
    row_file,
    shard_data_file,
    test_data_file,
    val_data_file,
)
from sisajax.store.rows import BackgroundWriter, encode_row
from sisajax.store.run_dir import RunDir

Progress = Callable[[str, int], Callable[[int], None]] | None
MetricsSink = Callable[[dict[str, Any]], None] | bool | None


def metrics_sink(
    run_dir: Path, metrics: MetricsSink, tensorboard: bool = False
) -> Callable[[dict[str, Any]], None] | None:
    """The metrics callback to use: the caller's, none (``False``), or by default the run's
    ``metrics.jsonl`` (:class:`~sisajax.metrics.MetricsLog`, with TensorBoard events if asked)."""
    if metrics is False:
        return None
    if metrics is None or metrics is True:
        from sisajax.metrics import MetricsLog

        return MetricsLog(run_dir, tensorboard=tensorboard)
    return metrics


def prefix_facts(data: ShardData, num_slices: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``(n_ids [R], fingerprints [R])`` of each slice prefix of a shard's data (ids sorted)."""
    counts = np.bincount(np.asarray(data.slices, np.int64), minlength=num_slices)[:num_slices]
    n_ids = np.cumsum(counts)
    fps = prefix_fingerprints(data.ids, data.slices, num_slices)
    return tuple(int(n) for n in n_ids), tuple(fps)


class GenerationWriter:
    """Writes the files of one new generation in the background while training produces them.

    Args:
      files: the run directory (its ``data/`` and ``checkpoints/`` exist).
      generation: the generation being written (it names every file).
      engine: the engine training it (state layout).
      config_fingerprint: recorded in every row's header.
      metrics: optional callback receiving, per (shard, slice), one ``train_chunk`` record per
        program call (:func:`chunk_records`) and one ``train_slice`` record with its mean loss.
    """

    def __init__(
        self,
        files: RunDir,
        generation: int,
        engine: Engine,
        config_fingerprint: str,
        metrics: MetricsSink = None,
    ):
        self.files, self.generation, self.engine = files, generation, engine
        self.config_fp = config_fingerprint
        self.host_id, self.host_info = host_mod.current()
        self.paths = engine.leaf_paths()
        self.background = BackgroundWriter(files.root)
        self.rows: dict[tuple[int, int], RowRef] = {}
        self.prefix: dict[int, tuple[tuple[int, ...], tuple[str, ...]]] = {}
        self.data_refs: dict[int, Future] = {}
        self.partition_file: Future | None = None
        self.test_file: Future | None = None
        self.val_file: Future | None = None
        self.metrics = metrics
        self.fetch_s = 0.0
        self.last_loss: float | None = None
        self._pending: tuple[SliceOutput, list[int]] | None = None
        self._val: tuple[np.ndarray, np.ndarray] | None = None

    def add_shard(self, k: int, data: ShardData) -> None:
        """Write shard ``k``'s data copy (in the background) and note its prefix fingerprints."""
        self.prefix[k] = prefix_facts(data, self.engine.config.sisa.slices)
        rel = shard_data_file(k, self.generation)
        self.data_refs[k] = self.background.call(
            lambda: self._npz(rel, ids=data.ids, x=data.x, y=data.y, slices=data.slices)
        )

    def _npz(self, rel: str, **arrays: np.ndarray) -> FileRef:
        buf = io.BytesIO()  # one write instead of zipfile's many small ones
        np.savez(buf, **arrays)
        sha, size = write_file(self.files.path(rel), buf.getbuffer(), sync_dir=False, what=rel)
        return FileRef(rel, sha, size)

    def add_test(self, ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        rel = test_data_file(self.generation)
        self.test_file = self.background.call(lambda: self._npz(rel, ids=ids, x=x, y=y))

    def add_val(self, ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Write the validation split (ids held out of training) of this generation."""
        rel = val_data_file(self.generation)
        self.val_file = self.background.call(lambda: self._npz(rel, ids=ids, x=x, y=y))

    def track_validation(self, x: np.ndarray, y: np.ndarray) -> None:
        """Score every slice step's models on the validation split ``x [V, *feat]``, ``y [V]``:
        one ``val_slice`` metrics record per slice step with each trained shard's accuracy and,
        when the step trained every shard, the ensemble's vote and mean-probability accuracy.
        Costs one forward pass of the split per shard and slice step, on the training thread
        (the rows and their bits are unaffected)."""
        if len(y):
            self._val = (np.asarray(x), np.asarray(y))

    def _val_record(self, out: SliceOutput, host: Any, shards: list[int]) -> dict[str, Any]:
        from sisajax import aggregation as agg

        x, y = self._val
        order = sorted(out.positions.items(), key=lambda t: shards[t[0]])
        ks = [shards[i] for i, _ in order]
        pos = np.array([p for _, p in order])
        logits = self.engine.logits(jax.tree.map(lambda a: np.asarray(a)[pos], host), x)
        j = out.slice
        rec: dict[str, Any] = {
            "event": "val_slice",
            "generation": self.generation,
            "slice": j,
            "examples": int(len(y)),
            "shard_accuracy": {
                str(k): float((logits[n].argmax(-1) == y).mean()) for n, k in enumerate(ks)
            },
        }
        if len(ks) == self.engine.config.sisa.shards:  # the whole ensemble at slice step j
            active = np.array([self.prefix[k][0][j] > 0 for k in ks])
            rec["vote_accuracy"] = agg.accuracy(agg.aggregate(logits, "vote", active), y)
            rec["mean_prob_accuracy"] = agg.accuracy(agg.aggregate(logits, "mean_prob", active), y)
        return rec

    def add_partition(self, part: Partition) -> None:
        rel = partition_file(self.generation)

        def write() -> FileRef:
            sha, size = part.save(self.files.path(rel), durable=True)
            return FileRef(rel, sha, size)

        self.partition_file = self.background.call(write)

    def on_slice(self, shards: list[int]) -> Callable[[SliceOutput], None]:
        """An ``on_slice`` for :meth:`Engine.run` whose job ``i`` is shard ``shards[i]``.

        Slice step j's states are fetched when slice step j + 1 has been dispatched (the device
        computes j + 1 meanwhile), on the calling thread: JAX arrays are only ever touched by
        one thread (fetching sharded arrays from the writer thread while the main thread
        dispatched raced inside jax and failed); the device-to-host copies are started as soon as
        a slice step is handed over, so the fetch finds them done. Encoding, hashing and writing
        the rows happen on the writer thread; :meth:`finish` fetches the last slice step."""

        def handle(out: SliceOutput) -> None:
            for leaf in jax.tree.leaves(out.states):
                leaf.copy_to_host_async()  # the transfer starts when the slice step is computed
            self._fetch_pending()
            self._pending = (out, shards)
            fault("mid_retrain")

        return handle

    def _fetch_pending(self) -> None:
        if self._pending is None:
            return
        out, shards = self._pending
        self._pending = None
        t0 = time.perf_counter()
        host = jax.device_get(out.states)  # waits for that slice step only
        sums = out.call_losses()
        losses = out.mean_loss(sums)
        finite = [v for v in losses.values() if v == v]
        if finite:
            self.last_loss = float(np.mean(finite))
        self.fetch_s += time.perf_counter() - t0
        val = self._val_record(out, host, shards) if self._val and self.metrics else None
        self.background.call(lambda: self._write_slice(out, host, losses, shards, sums, val))

    def _write_slice(
        self,
        out: SliceOutput,
        host: Any,
        losses: dict[int, float],
        shards: list[int],
        sums: np.ndarray | None = None,
        val: dict[str, Any] | None = None,
    ) -> None:
        leaves = jax.tree.leaves(host)
        j = out.slice
        written = []
        for i, p in out.positions.items():
            k = shards[i]
            n_ids, fps = self.prefix[k]
            header = {
                "shard": k,
                "slice": j,
                "generation": self.generation,
                "config_fingerprint": self.config_fp,
                "ids_fingerprint": fps[j],
                "n_ids": n_ids[j],
                "host": self.host_id,
            }
            rel = row_file(k, j, self.generation)
            path = self.files.path(rel)
            sha, size = write_file(
                path,
                encode_row(header, self.paths, [np.asarray(a[p]) for a in leaves]),
                durable=False,
                sync_dir=False,
                what=rel,
            )
            written.append(path)
            self.rows[(k, j)] = RowRef(self.generation, sha, size, self.host_id)
            fault("mid_save")
            if self.metrics:
                for rec in chunk_records(out, host, sums, p):
                    self.metrics({"generation": self.generation, "shard": k, "slice": j, **rec})
                self.metrics(
                    {
                        "event": "train_slice",
                        "generation": self.generation,
                        "shard": k,
                        "slice": j,
                        "loss": losses.get(i),
                        "examples": int(out.examples[p]) if out.examples is not None else None,
                    }
                )
        if val is not None:
            self.metrics(val)
        sync_files(self.files.root, written)  # one durable sync per slice step, not per row

    def progress(self, factory: Progress, label: str, total: int) -> Callable[[int], None] | None:
        """The engine's ``progress(n)`` from a ``factory(label, total) -> advance``; an
        ``advance(n, loss)`` taking two arguments also gets the latest slice's mean loss."""
        if not factory:
            return None
        advance = factory(label, total)
        try:
            with_loss = len(inspect.signature(advance).parameters) >= 2
        except (TypeError, ValueError):
            with_loss = False
        if not with_loss:
            return advance
        return lambda n: advance(n, self.last_loss)

    def finish(self) -> None:
        """Write the last slice step, wait for every write; make the new folders durable."""
        self._fetch_pending()
        self.background.wait()
        self.background.sync_dirs([self.files.root])
        self.background.close()

    def abort(self) -> None:
        """Stop writing (after a failure); written files are superseded, collected later."""
        self._pending = None
        with contextlib.suppress(BaseException):  # the first failure is being raised already
            self.background.wait()
        self.background.close()

    def shard_entry(self, k: int, old: ShardEntry | None = None, restart: int = 0) -> ShardEntry:
        """Shard ``k``'s entry: rows before ``restart`` kept from ``old``, the rest new."""
        n_ids, fps = self.prefix[k]
        r = self.engine.config.sisa.slices
        rows = tuple(
            old.rows[j] if (old is not None and j < restart) else self.rows[(k, j)]
            for j in range(r)
        )
        return ShardEntry(self.data_refs[k].result(), rows, n_ids, fps)

    @property
    def hosts(self) -> dict[str, dict[str, Any]]:
        return {self.host_id: self.host_info}

    @property
    def busy_s(self) -> float:
        """Seconds the background thread spent writing."""
        return self.background.busy_s

    @property
    def partition_ref(self) -> FileRef | None:
        """The new partition file (after :meth:`finish`), if this generation writes one."""
        return None if self.partition_file is None else self.partition_file.result()

    @property
    def test_ref(self) -> FileRef | None:
        """The held-out split's file (after :meth:`finish`), if this generation writes one."""
        return None if self.test_file is None else self.test_file.result()

    @property
    def val_ref(self) -> FileRef | None:
        """The validation split's file (after :meth:`finish`), if this generation writes one."""
        return None if self.val_file is None else self.val_file.result()


def chunk_records(
    out: SliceOutput, host: Any, sums: np.ndarray | None, p: int
) -> list[dict[str, Any]]:
    """One ``train_chunk`` record per program call that trained position ``p`` in this slice
    step: its mean loss per example, its examples, the index of its first step in the slice step
    (``first_step``), the steps done in the slice step after it (``step``) and the shard's total
    gradient steps after it (``global_step``, from the state's step counter)."""
    if sums is None or out.step_examples is None or not len(sums):
        return []
    per_step = out.step_examples[:, p]  # [calls, C]
    examples = per_step.sum(1)
    steps = (per_step > 0).sum(1)
    done = np.cumsum(steps)
    step_now = getattr(host, "step", None)
    base = int(np.asarray(step_now)[p]) - int(done[-1]) if step_now is not None else None
    return [
        {
            "event": "train_chunk",
            "chunk": c,
            "first_step": int(done[c] - steps[c]),
            "step": int(done[c]),
            "global_step": None if base is None else base + int(done[c]),
            "steps": int(steps[c]),
            "loss": float(sums[c, p] / examples[c]),
            "examples": int(examples[c]),
        }
        for c in range(len(sums))
        if examples[c] > 0
    ]


__all__ = ["GenerationWriter", "MetricsSink", "Progress", "chunk_records", "metrics_sink"]
