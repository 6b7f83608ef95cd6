"""Training a SISA run: a new run directory, or a retrain in place that keeps its tombstones.

:func:`train` trains all S constituent models together and checkpoints every (shard, slice) as
training reaches it: each slice's states go to a background writer while the next slice trains
(:class:`GenerationWriter`), so checkpointing overlaps with compute. The manifest that makes the
files live is written only after every file is durable.

Retraining an existing run (``overwrite=True``) is a generation switch like a forget: it takes the
writer lock (waiting like ``forget``), finishes any interrupted request first, excludes every id
the run has forgotten (its tombstones; the source data set still holds those rows), carries the
ledger forward with a ``retrain`` request, and switches atomically. Only
``discard_deletion_history=True`` trains on forgotten ids again, and that is itself recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sisajax import host as host_mod
from sisajax.config import ConfigError, RunConfig
from sisajax.costs import CostReport, slice_schedule_cost
from sisajax.data.datasets import Dataset
from sisajax.data.partition import (
    Partition,
    PartitionError,
    fingerprint_ids,
    hash_partition,
    validation_mask,
)
from sisajax.engine import Engine, ShardData, ShardJob, SliceOutput, TrainStats
from sisajax.errors import RunError, UserInputError
from sisajax.layout import resolve_shard_exec
from sisajax.plugins import source_hashes
from sisajax.step import resolve_trip
from sisajax.store.faults import fault
from sisajax.store.files import sync_files, write_file
from sisajax.store.interrupted import (
    INTERRUPTED,
    InterruptedTraining,
    completed_slices,
    data_fingerprint,
    read_record,
    remove_record,
    write_record,
)
from sisajax.store.ledger import Ledger
from sisajax.store.locks import writer_lock
from sisajax.store.manifest import (
    MANIFEST,
    DatasetInfo,
    FileRef,
    Manifest,
    RowRef,
    ShardEntry,
    partition_file,
    row_file,
    shard_data_file,
    test_data_file,
    val_data_file,
)
from sisajax.store.rows import BackgroundWriter, encode_row, leaf_spec, read_row
from sisajax.store.run_dir import RunDir

PyTree = Any
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


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine the trained bits (recorded in every manifest)."""
    import importlib.metadata as md

    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "sisajax"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "unknown"
    out["backend"] = jax.default_backend()
    return out


def prefix_facts(data: ShardData, num_slices: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``(n_ids [R], fingerprints [R])`` of each slice prefix of a shard's data (ids sorted)."""
    n_ids, fps = [], []
    for j in range(num_slices):
        ids = data.ids[data.slices <= j]
        n_ids.append(len(ids))
        fps.append(fingerprint_ids(ids))
    return tuple(n_ids), tuple(fps)


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
        self.writer = BackgroundWriter(files.root)
        self.rows: dict[tuple[int, int], RowRef] = {}
        self.prefix: dict[int, tuple[tuple[int, ...], tuple[str, ...]]] = {}
        self.data_refs: dict[int, Future] = {}
        self.other: dict[str, Future] = {}
        self.metrics = metrics
        self.fetch_s = 0.0
        self.last_loss: float | None = None
        self._pending: tuple[SliceOutput, list[int]] | None = None

    def add_shard(self, k: int, data: ShardData) -> None:
        """Write shard ``k``'s data copy (in the background) and note its prefix fingerprints."""
        self.prefix[k] = prefix_facts(data, self.engine.config.sisa.slices)
        rel = shard_data_file(k, self.generation)
        self.data_refs[k] = self.writer.call(
            lambda: self._npz(rel, ids=data.ids, x=data.x, y=data.y, slices=data.slices)
        )

    def _npz(self, rel: str, **arrays: np.ndarray) -> FileRef:
        buf = io.BytesIO()  # one write instead of zipfile's many small ones
        np.savez(buf, **arrays)
        sha, size = write_file(self.files.path(rel), buf.getbuffer(), sync_dir=False, what=rel)
        return FileRef(rel, sha, size)

    def add_test(self, ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        rel = test_data_file(self.generation)
        self.other["test"] = self.writer.call(lambda: self._npz(rel, ids=ids, x=x, y=y))

    def add_val(self, ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Write the validation split (ids held out of training) of this generation."""
        rel = val_data_file(self.generation)
        self.other["val"] = self.writer.call(lambda: self._npz(rel, ids=ids, x=x, y=y))

    def add_partition(self, part: Partition) -> None:
        rel = partition_file(self.generation)

        def write() -> FileRef:
            sha, size = part.save(self.files.path(rel), durable=True)
            return FileRef(rel, sha, size)

        self.other["partition"] = self.writer.call(write)

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
        self.writer.call(lambda: self._write_slice(out, host, losses, shards, sums))

    def _write_slice(
        self,
        out: SliceOutput,
        host: Any,
        losses: dict[int, float],
        shards: list[int],
        sums: np.ndarray | None = None,
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
        self.writer.wait()
        self.writer.sync_dirs([self.files.root])
        self.writer.close()

    def abort(self) -> None:
        """Stop writing (after a failure); written files are superseded, collected later."""
        self._pending = None
        with contextlib.suppress(BaseException):  # the first failure is being raised already
            self.writer.wait()
        self.writer.close()

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


def shard_data_from(partition: Partition, dataset: Dataset, k: int) -> ShardData:
    """The rows of ``dataset`` that ``partition`` places in shard ``k`` (sorted by id)."""
    sel = partition.shard == k
    ids = partition.ids[sel]
    order = np.argsort(dataset.train_ids, kind="stable")
    pos = order[np.searchsorted(dataset.train_ids, ids, sorter=order)]
    return ShardData(ids, dataset.x_train[pos], dataset.y_train[pos], partition.slice[sel])


def check_partition(partition: Partition, config: RunConfig, num_train: int) -> None:
    """Every shard (and slice count) feasible, before anything is written."""
    sisa = config.sisa
    sizes = partition.sizes()
    empty = np.flatnonzero(sizes.sum(1) == 0)
    if len(empty) and not sisa.allow_empty_shards:
        raise PartitionError(
            f"shards {empty.tolist()} received no training examples ({num_train} ids over "
            f"{sisa.shards} shards); use fewer shards (or sisa.allow_empty_shards=true)"
        )
    if sisa.slices > sizes.sum(1).min() and not sisa.allow_empty_shards:
        raise ConfigError(
            f"{sisa.slices} slices but the smallest shard has {sizes.sum(1).min()} examples; "
            "use fewer slices or fewer shards"
        )


def build_engine(config: RunConfig, dataset: Dataset, devices: int | None = None) -> Engine:
    """The engine for ``config`` on ``dataset``, after checking the model accepts its inputs."""
    engine = Engine(
        config,
        dataset.feature_shape,
        dataset.x_train.dtype,
        dataset.num_classes,
        devices=devices,
        preprocessing=dataset.preprocessing,
    )
    try:
        engine.state_template()
    except Exception as e:  # shape errors surface from deep inside Flax: name the cause once
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ConfigError(
            f"model {config.model.name!r} cannot take {dataset.name} inputs of shape "
            f"{dataset.feature_shape}: {msg}"
        ) from None
    return engine


def plan_training(
    config: RunConfig,
    dataset: Dataset,
    partition: Partition | None,
    devices: int | None,
    removed: np.ndarray,
) -> TrainingPlan:
    """Everything a training needs, checked before anything is written.

    Args:
      config: the run configuration (``shard_exec`` resolved here).
      dataset: the data to train on (forgotten ids already excluded).
      partition: an explicit partition or None for the hash partition.
      devices: local devices to use (None: all).
      removed: tombstones (forgotten ids or their keys) carried into the new partition.
    """
    sisa = config.sisa
    explicit = partition is not None
    held_out = validation_mask(dataset.train_ids, config.data.val_fraction, sisa.seed)
    train_ids = dataset.train_ids[~held_out]
    if partition is None:
        if sisa.shards > len(train_ids):
            raise PartitionError(
                f"{sisa.shards} shards but only {len(train_ids)} training examples"
                + (
                    f" ({int(held_out.sum())} more are the validation split)"
                    if held_out.any()
                    else ""
                )
            )
        partition = hash_partition(train_ids, sisa.shards, sisa.slices, sisa.seed)
    else:
        if (partition.num_shards, partition.num_slices) != (sisa.shards, sisa.slices):
            raise ConfigError(
                f"the partition has {partition.num_shards} shards x {partition.num_slices} slices "
                f"but the config asks for {sisa.shards} x {sisa.slices}"
            )
        # an explicit partition covers the training ids, with or without the validation split
        # (the validation ids leave it; nobody else moves)
        if np.array_equal(partition.ids, np.sort(dataset.train_ids)):
            partition = partition.without(dataset.train_ids[held_out])
        elif not np.array_equal(partition.ids, np.sort(train_ids)):
            raise PartitionError(
                "the partition's ids are not the dataset's training ids (with or without its "
                "validation split)"
            )
    partition = dataclasses.replace(partition, removed=np.union1d(partition.removed, removed))
    check_partition(partition, config, len(train_ids))
    shard_exec = resolve_shard_exec(sisa.shard_exec)
    resolved = config.replace(
        sisa={"shard_exec": shard_exec, "chunk_trip": resolve_trip(sisa.chunk_trip, shard_exec)}
    )
    engine = build_engine(resolved, dataset, devices)
    data = [shard_data_from(partition, dataset, k) for k in range(sisa.shards)]
    capacity = int(-(-max(len(d) for d in data) // 8) * 8)
    val = np.flatnonzero(held_out)
    val = val[np.argsort(dataset.train_ids[val], kind="stable")]
    return TrainingPlan(
        resolved,
        dataset,
        partition,
        engine,
        explicit,
        data,
        capacity,
        (dataset.train_ids[val], dataset.x_train[val], dataset.y_train[val]),
    )


@dataclasses.dataclass
class TrainingPlan:
    """A checked training: config, data, partition, engine, per-shard data, row capacity, and
    the validation split ``(ids [V], x [V, *feat], y [V])`` (empty with ``val_fraction=0``)."""

    config: RunConfig
    dataset: Dataset
    partition: Partition
    engine: Engine
    explicit: bool
    data: list[ShardData]
    capacity: int
    validation: tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclasses.dataclass
class GenerationFiles:
    """What :func:`train_generation` wrote: shard entries, shared files, hosts, cost."""

    entries: dict[int, ShardEntry]
    partition: FileRef | None
    test_data: FileRef | None
    val_data: FileRef | None
    hosts: dict[str, dict[str, Any]]
    cost: CostReport


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where an interrupted training continues: ``completed`` slice steps are stored (``rows``
    per shard), ``states`` the state of each shard after the last of them (one shard, numpy)."""

    completed: int
    rows: dict[int, list[RowRef]]
    states: dict[int, Any]


def train_generation(
    plan: TrainingPlan,
    files: RunDir,
    generation: int,
    *,
    shards: list[int] | None = None,
    shared: bool = True,
    progress: Progress = None,
    metrics: MetricsSink = None,
    label: str = "train",
    resume: Resume | None = None,
    on_interrupt: Callable[[GenerationWriter], None] | None = None,
) -> GenerationFiles:
    """Train ``shards`` (default: all) and write their files for ``generation`` (not yet live).

    Args:
      shared: also write the partition, the held-out split and the validation split.
      resume: continue an interrupted training: its stored rows are kept and every shard
        starts from its state after the last completed slice step.
      on_interrupt: called with the writer (its finished rows) when Ctrl-C stops the training.
    """
    t0 = time.perf_counter()
    cfg, part, engine = plan.config, plan.partition, plan.engine
    sisa = cfg.sisa
    mine = list(range(sisa.shards)) if shards is None else list(shards)
    files.make_dirs()
    gen = GenerationWriter(files, generation, engine, cfg.fingerprint(), metrics)
    stats = TrainStats()
    start = 0 if resume is None else resume.completed
    if resume is not None:
        for k in mine:
            for j, ref in enumerate(resume.rows[k]):
                gen.rows[(k, j)] = ref
    try:
        for k in mine:
            gen.add_shard(k, plan.data[k])
        if shared:
            gen.add_partition(part)
            ds = plan.dataset
            gen.add_test(ds.test_ids, ds.x_test, ds.y_test)
            if len(plan.validation[0]) or cfg.data.val_fraction:
                gen.add_val(*plan.validation)
        starts = np.full(len(mine), start)
        total = slice_schedule_cost(part.sizes()[mine], sisa.shard_epochs, sisa.batch_size, starts)[
            1
        ]
        advance = gen.progress(progress, label, total)
        jobs = [
            ShardJob(k, plan.data[k], start, None if resume is None else resume.states[k])
            for k in mine
        ]
        _, stats = engine.run(
            jobs,
            capacity=plan.capacity,
            on_slice=gen.on_slice(mine),
            progress=advance,
        )
        t_wait = time.perf_counter()
        gen.finish()
    except KeyboardInterrupt:
        gen.abort()
        if on_interrupt is not None:
            on_interrupt(gen)
        raise
    except BaseException:
        gen.abort()
        raise
    cost = CostReport(
        wall_s=time.perf_counter() - t0,
        compile_s=stats.compile_s,
        retrain_s=stats.train_s,
        save_s=time.perf_counter() - t_wait,
        examples=stats.examples,
        grad_steps=stats.grad_steps,
        shard_slices=stats.shard_slices,
        shards=len(mine),
        writer_busy_s=gen.writer.busy_s,
    )
    return GenerationFiles(
        {k: gen.shard_entry(k) for k in mine},
        gen.other["partition"].result() if shared else None,
        gen.other["test"].result() if shared else None,
        gen.other["val"].result() if "val" in gen.other else None,
        gen.hosts,
        cost,
    )


def make_manifest(
    plan: TrainingPlan,
    generation: int,
    entries: dict[int, ShardEntry],
    partition: FileRef,
    test_data: FileRef,
    hosts: dict[str, dict[str, Any]],
    *,
    origin: dict[str, Any],
    id_hashing: dict[str, str] | None,
    plugins: tuple[str, ...] = (),
    layout: dict[str, Any] | None = None,
    val_data: FileRef | None = None,
) -> Manifest:
    """The manifest of a freshly trained generation (built in this one place)."""
    cfg, ds = plan.config, plan.dataset
    return Manifest(
        generation=generation,
        config=cfg.to_dict(),
        config_fingerprint=cfg.fingerprint(),
        layout=layout or plan.engine.layout(),
        capacity=plan.capacity,
        dataset=DatasetInfo(
            ds.name,
            tuple(ds.feature_shape),
            str(ds.x_train.dtype),
            ds.num_classes,
            len(plan.partition.ids),
            len(ds.test_ids),
            dict(ds.preprocessing),
        ),
        partition=partition,
        partition_kind="explicit" if plan.explicit else "hash",
        test_data=test_data,
        val_data=val_data,
        shards=tuple(entries[k] for k in range(cfg.sisa.shards)),
        hosts=hosts,
        versions=library_versions(),
        id_hashing=id_hashing,
        origin=origin,
        plugins=tuple(plugins),
        plugin_sources=source_hashes(plugins),  # what forget checks the plug-ins against
    )


def _train_generation(
    plan: TrainingPlan,
    files: RunDir,
    generation: int,
    *,
    origin: dict[str, Any],
    id_hashing: dict[str, str] | None,
    progress: Progress,
    metrics: MetricsSink,
    plugins: tuple[str, ...] = (),
) -> tuple[Manifest, CostReport]:
    """Train every shard and write generation ``generation`` (not yet live)."""
    out = train_generation(plan, files, generation, progress=progress, metrics=metrics)
    manifest = make_manifest(
        plan,
        generation,
        out.entries,
        out.partition,
        out.test_data,
        out.hosts,
        origin=origin,
        id_hashing=id_hashing,
        plugins=plugins,
        val_data=out.val_data,
    )
    return manifest, out.cost


def train(
    config: RunConfig,
    dataset: Dataset,
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    discard_deletion_history: bool = False,
    progress: Progress = None,
    partition: Partition | None = None,
    devices: int | None = None,
    metrics: MetricsSink = None,
    plugins: tuple[str, ...] = (),
    tensorboard: bool = False,
):
    """Train all S constituent models together, checkpointing every slice of every shard.

    Args:
      config: the run configuration.
      dataset: training ids/features/labels and the held-out split.
      run_dir: a new (or empty) directory, or an existing run with ``overwrite=True``.
      overwrite: retrain an existing run in place: takes its writer lock, finishes interrupted
        requests, excludes every id the run has forgotten and records a ``retrain`` request.
      discard_deletion_history: with ``overwrite``, train on forgotten ids again (their
        tombstones are dropped); recorded in the ledger.
      progress: optional ``progress(description, total_steps) -> advance(n)`` factory.
      partition: an explicit id -> (shard, slice) assignment (e.g. distribution-aware sharding);
        default: :func:`hash_partition` by ``config.sisa.seed``.
      devices: how many local devices to spread the shards over (default: all).
      metrics: where per-(shard, slice) training losses go: default the run's ``metrics.jsonl``,
        ``False`` nowhere, or a callback receiving each record.
      plugins: modules the run needs imported (plug-in models or data sets), recorded.
      tensorboard: also write the metrics as TensorBoard events (``tensorboardX``).

    Returns:
      (the opened :class:`~sisajax.run.SisaRun`, its :class:`~sisajax.costs.CostReport`).

    Raises:
      ConfigError, PartitionError, UserInputError: invalid input, before anything is written.
      StorageError: the disk filled up or is read-only; a new run directory is removed again, an
        existing run stays as it was.
    """
    from sisajax.run import SisaRun

    files = RunDir(run_dir, must_exist=False)
    root = files.root
    if root.exists() and not root.is_dir():
        raise UserInputError(f"{run_dir} exists and is not a directory")
    if (
        root.is_dir()
        and (root / INTERRUPTED).is_file()
        and not (root / MANIFEST).exists()
        and not discard_deletion_history
    ):
        return _continue_training(
            files, config, dataset, partition, devices, progress, metrics, plugins, tensorboard
        )
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise UserInputError(f"{run_dir} is not empty; pass overwrite=True to retrain it")
        if discard_deletion_history is not True and discard_deletion_history is not False:
            raise ConfigError("discard_deletion_history must be true or false")
        return _retrain_in_place(
            SisaRun(root),
            config,
            dataset,
            partition,
            devices,
            progress,
            metrics,
            plugins,
            discard_deletion_history,
            tensorboard,
        )
    if discard_deletion_history:
        raise UserInputError(
            "discard_deletion_history only applies when retraining an existing run"
        )
    ledger = Ledger(root, hash_ids=config.ledger.hash_ids, salt_file=config.ledger.salt_file)
    plan = plan_training(config, dataset, partition, devices, np.zeros(0, np.int64))
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with writer_lock(root, config.ledger.lock_timeout_s):
            id_hashing = None
            if config.ledger.hash_ids:
                ledger.load_salt(create=True)
                id_hashing = {
                    "salt_fingerprint": ledger.salt_fingerprint(),
                    "salt_source": ledger.salt_source(),
                }
            sink = metrics_sink(root, metrics, tensorboard)
            out = train_generation(
                plan,
                files,
                0,
                progress=progress,
                metrics=sink,
                on_interrupt=_keep_progress(root, plan, tuple(plugins), {}),
            )
            manifest = make_manifest(
                plan,
                0,
                out.entries,
                out.partition,
                out.test_data,
                out.hosts,
                origin={"op": "train"},
                id_hashing=id_hashing,
                plugins=tuple(plugins),
                val_data=out.val_data,
            )
            files.write_config(plan.config.to_dict())
            files.write_manifest(manifest)
            _log_train(sink, 0, out.cost)
    except KeyboardInterrupt:
        if not (root / INTERRUPTED).is_file():  # no slice step completed: nothing to keep
            _remove_new_run(root, created)
        raise
    except BaseException:
        _remove_new_run(root, created)
        raise
    return SisaRun(root), out.cost


def plan_fingerprint(plan: TrainingPlan) -> str:
    """sha256 of exactly what the shards of ``plan`` train on (ids, (shard, slice) of each, the
    rows' features and labels) and of the validation and test ids."""
    part = plan.partition
    arrays = [part.ids, part.shard, part.slice]
    for d in plan.data:
        arrays += [d.x, d.y]
    return data_fingerprint(*arrays, plan.validation[0], plan.dataset.test_ids)


def _keep_progress(
    root: Path, plan: TrainingPlan, plugins: tuple[str, ...], hosts: dict[str, dict[str, Any]]
) -> Callable[[GenerationWriter], None]:
    """An ``on_interrupt`` that records the completed slice steps of a new run, so that the same
    training (or ``sisajax resume``) continues from them. Without a completed slice step, or
    when the record cannot be written, nothing is recorded (the caller removes the directory)."""

    def keep(gen: GenerationWriter) -> None:
        shards = list(range(plan.config.sisa.shards))
        done = completed_slices(gen.rows, shards, plan.config.sisa.slices)
        if done == 0:
            return
        record = InterruptedTraining(
            plan.config.to_dict(),
            plan.config.fingerprint(),
            plan_fingerprint(plan),
            done,
            {k: [gen.rows[(k, j)] for j in range(done)] for k in shards},
            {**hosts, **gen.hosts},
            plugins,
        )
        try:
            write_record(root, record)
        except BaseException:  # a full disk or a second Ctrl-C: keep nothing half-written
            with contextlib.suppress(OSError):
                remove_record(root)

    return keep


def _continue_training(
    files: RunDir,
    config: RunConfig,
    dataset: Dataset,
    partition: Partition | None,
    devices: int | None,
    progress: Progress,
    metrics: MetricsSink,
    plugins: tuple[str, ...],
    tensorboard: bool,
):
    """Finish a new run that Ctrl-C interrupted: check that ``config`` and ``dataset`` are what
    it was training, restore every shard after the last completed slice step (rows checked
    against the record) and train the rest; bit-identical to an uninterrupted training."""
    from sisajax.run import SisaRun

    root = files.root
    plan = plan_training(config, dataset, partition, devices, np.zeros(0, np.int64))
    with writer_lock(root, config.ledger.lock_timeout_s):
        try:
            rec = read_record(root)
        except (ValueError, OSError) as e:
            raise RunError(
                f"{root}: the record of its interrupted training is unreadable ({e}); remove the "
                "directory and train again"
            ) from None
        if rec is None or (root / MANIFEST).exists():
            raise RunError(f"{root}: its interrupted training was finished by another process")
        if rec.config_fingerprint != plan.config.fingerprint():
            raise UserInputError(
                f"{root} holds an interrupted training of another configuration; continue it "
                f"with its own (`sisajax resume run_dir={root}`) or remove the directory"
            )
        if rec.data_fingerprint != plan_fingerprint(plan):
            raise UserInputError(
                f"{root} holds an interrupted training on other data; continue it with the same "
                "data (`sisajax resume` reloads it) or remove the directory"
            )
        engine = plan.engine
        template = engine.state_template()
        spec = leaf_spec(
            engine.leaf_paths(), [np.zeros(x.shape, x.dtype) for x in jax.tree.leaves(template)]
        )
        states = {}
        for k, refs in rec.rows.items():
            fps = prefix_facts(plan.data[k], plan.config.sisa.slices)[1]
            for j, ref in enumerate(refs):
                rel = row_file(k, j, ref.generation)
                header, leaves = read_row(files.path(rel), ref.sha256, spec, rel)
                want = (k, j, fps[j])
                got = (header.get("shard"), header.get("slice"), header.get("ids_fingerprint"))
                if got != want:
                    raise RunError(
                        f"{rel} is not the row the interrupted training recorded; remove the "
                        "directory and train again"
                    )
            states[k] = jax.tree.unflatten(
                jax.tree.structure(template), [np.array(x) for x in leaves]
            )
        id_hashing = None
        if config.ledger.hash_ids:
            ledger = Ledger(root, hash_ids=True, salt_file=config.ledger.salt_file)
            ledger.load_salt(create=True)
            id_hashing = {
                "salt_fingerprint": ledger.salt_fingerprint(),
                "salt_source": ledger.salt_source(),
            }
        sink = metrics_sink(root, metrics, tensorboard)
        out = train_generation(
            plan,
            files,
            0,
            progress=progress,
            metrics=sink,
            resume=Resume(rec.completed, rec.rows, states),
            on_interrupt=_keep_progress(root, plan, rec.plugins, rec.hosts),
        )
        manifest = make_manifest(
            plan,
            0,
            out.entries,
            out.partition,
            out.test_data,
            {**rec.hosts, **out.hosts},
            origin={"op": "train", "continued_after_slice_steps": rec.completed},
            id_hashing=id_hashing,
            plugins=tuple(plugins) or rec.plugins,
            val_data=out.val_data,
        )
        files.write_config(plan.config.to_dict())
        files.write_manifest(manifest)
        remove_record(root)
        _log_train(sink, 0, out.cost, continued_after_slice_steps=rec.completed)
    return SisaRun(root), out.cost


def continue_training(
    run_dir: str | Path,
    dataset: Dataset | None = None,
    *,
    progress: Progress = None,
    devices: int | None = None,
    metrics: MetricsSink = None,
):
    """Finish a new run that Ctrl-C interrupted, from its last completed slice step, with the
    configuration it was trained with (``dataset``: default, the configuration's registered
    data set loaded again; its plug-ins are imported first). Returns ``(run, cost)`` as
    :func:`train`.

    Raises:
      RunError: ``run_dir`` holds no interrupted training, or its record or rows are damaged.
      UserInputError: ``dataset`` is not the data it was training on.
    """

    root = RunDir(run_dir, must_exist=False).root
    try:
        rec = read_record(root)
    except (ValueError, OSError) as e:
        raise RunError(
            f"{root}: the record of its interrupted training is unreadable ({e})"
        ) from None
    if rec is None or (root / MANIFEST).exists():
        raise RunError(f"{root} holds no interrupted training")
    config = RunConfig.from_dict(rec.config)
    if rec.plugins:
        from sisajax.plugins import load_plugins

        load_plugins(list(rec.plugins))
    if dataset is None:
        from sisajax.data.datasets import load_dataset

        dataset = load_dataset(config.data.name, **config.data.params)
    return train(
        config,
        dataset,
        root,
        progress=progress,
        devices=devices,
        metrics=metrics,
        plugins=rec.plugins,
    )


def _log_train(sink, generation: int, cost: CostReport, **extra: Any) -> None:
    if sink:
        sink({"event": "train", "generation": generation, **cost.to_dict(), **extra})


def _remove_new_run(root: Path, created: bool) -> None:
    """Undo a failed new run: the directory we created (or the files we put in an empty one)."""
    if not root.is_dir() or root.is_symlink():
        return
    if created:
        shutil.rmtree(root, ignore_errors=True)
        return
    for p in root.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def tombstoned(ledger: Ledger, removed: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``[N]`` bool: which of ``ids`` the run has forgotten (raw ids or salted hashes)."""
    return np.isin(ledger.removed_keys(ids), removed)


def _retrain_in_place(
    run,
    config: RunConfig,
    dataset: Dataset,
    partition: Partition | None,
    devices: int | None,
    progress: Progress,
    metrics: MetricsSink,
    plugins: tuple[str, ...],
    discard: bool,
    tensorboard: bool = False,
):
    from sisajax.unlearning import prepare_ledger, resume

    old_hash = run.config.ledger.hash_ids
    if config.ledger.hash_ids != old_hash and not discard:
        raise ConfigError(
            f"ledger.hash_ids={config.ledger.hash_ids} but the run keeps its deletion history "
            f"with hash_ids={old_hash}; keep it (or discard the history explicitly)"
        )
    # retraining runs the current plug-in code from scratch (and records its hashes anew)
    with run.writer_lock(config.ledger.lock_timeout_s, replays=False):
        run.reload()
        old_ledger = run.ledger
        repaired = prepare_ledger(run)
        resume(run, _locked=True)
        run.reload()
        removed = np.zeros(0, np.int64) if discard else run.partition.removed
        if old_hash and not discard:
            old_ledger.check_salt((run.manifest.id_hashing or {}).get("salt_fingerprint"))
        drop = tombstoned(old_ledger, removed, dataset.train_ids) if len(removed) else None
        if drop is not None and drop.any():
            keep = ~drop
            dataset = dataclasses.replace(
                dataset,
                train_ids=dataset.train_ids[keep],
                x_train=dataset.x_train[keep],
                y_train=dataset.y_train[keep],
            )
            if partition is not None and np.isin(partition.ids, run.partition.removed).any():
                raise PartitionError("the explicit partition lists ids this run has forgotten")
        plan = plan_training(config, dataset, partition, devices, removed)
        ledger = Ledger(
            run.run_dir, hash_ids=config.ledger.hash_ids, salt_file=config.ledger.salt_file
        )
        id_hashing = run.manifest.id_hashing if not discard else None
        if config.ledger.hash_ids and id_hashing is None:
            ledger.load_salt(create=True)
            id_hashing = {
                "salt_fingerprint": ledger.salt_fingerprint(),
                "salt_source": ledger.salt_source(),
            }
        gen = run.generation + 1
        request_id = old_ledger.new_request_id()
        excluded = int(drop.sum()) if drop is not None else 0
        old_ledger.append(
            request_id,
            "pending",
            kind="retrain",
            generation_before=run.generation,
            generation_target=gen,
            config_fingerprint=plan.config.fingerprint(),
            excluded_forgotten=excluded,
            discard_deletion_history=bool(discard),
            forgotten_before=int(len(run.partition.removed)),
            repaired_ledger=repaired,
        )
        manifest, cost = _train_generation(
            plan,
            run.files,
            gen,
            origin={"op": "retrain", "request_id": request_id},
            id_hashing=id_hashing,
            progress=progress,
            metrics=(sink := metrics_sink(run.run_dir, metrics, tensorboard)),
            plugins=tuple(plugins),
        )
        run.files.write_config(plan.config.to_dict())
        fault("retrain_before_commit")
        removed_files, _ = run.files.commit(manifest, config.ledger.lock_timeout_s)
        fault("retrain_after_commit")
        old_ledger.append(
            request_id, "done", kind="retrain", generation=gen, files_removed=len(removed_files)
        )
    run.reload()
    _log_train(sink, gen, cost, retrain=True, excluded_forgotten=excluded)
    return run, cost


__all__ = [
    "GenerationWriter",
    "continue_training",
    "build_engine",
    "check_partition",
    "library_versions",
    "shard_data_from",
    "train",
]
