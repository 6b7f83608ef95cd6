"""Training a SISA run: a new run directory, or a retrain in place that keeps its tombstones.

:func:`train` trains all S constituent models together and checkpoints every (shard, slice) as
training reaches it: each slice's states go to a background writer while the next slice trains
(:class:`~sisajax.generation_writer.GenerationWriter`), so checkpointing overlaps with compute.
The manifest that makes the files live is written only after every file is durable.

Retraining an existing run (``overwrite=True``) is a generation switch like a forget
(:func:`~sisajax.retraining.retrain_in_place`): it takes the writer lock (waiting like
``forget``), finishes any interrupted request first, excludes every id the run has forgotten
(its tombstones; the source data set still holds those rows), carries the ledger forward with a
``retrain`` request, and switches atomically. Only ``discard_deletion_history=True`` trains on
forgotten ids again, and that is itself recorded.

Ctrl-C during the training of a new run keeps its completed slice steps
(``training.interrupted.json``); training the same configuration on the same data again, or
:func:`continue_training`, finishes it bit-identically.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sisajax.config import ConfigError, RunConfig
from sisajax.costs import CostReport
from sisajax.data.datasets import Dataset
from sisajax.data.partition import Partition
from sisajax.errors import RunError, UserInputError, storage_error
from sisajax.generation import Generation, id_hashing_record
from sisajax.generation_writer import (
    GenerationWriter,
    MetricsSink,
    Progress,
    metrics_sink,
    prefix_facts,
)
from sisajax.planning import (
    TrainingPlan,
    build_engine,
    check_partition,
    check_training_inputs,
    library_versions,
    make_manifest,
    plan_fingerprint,
    plan_training,
    shard_data_from,
)
from sisajax.plugins import source_hashes
from sisajax.retraining import Resume, log_train, retrain_in_place, train_generation
from sisajax.run import SisaRun
from sisajax.store.interrupted import (
    INTERRUPTED,
    InterruptedTraining,
    completed_slices,
    read_record,
    remove_record,
    write_record,
)
from sisajax.store.ledger import Ledger
from sisajax.store.locks import READER_LOCK, WRITER_LOCK, RunBusyError
from sisajax.store.manifest import MANIFEST, row_file
from sisajax.store.rows import leaf_spec, read_row
from sisajax.store.run_dir import RunDir


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
    val_metrics: bool = False,
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
      val_metrics: a new run logs its validation accuracy after every slice step (each shard's
        and the ensemble's, ``val_slice`` records; one forward pass of the split per shard and
        slice step).

    Returns:
      (the opened :class:`~sisajax.run.SisaRun`, its :class:`~sisajax.costs.CostReport`).

    Warns:
      RuntimeWarning: a shard's training loss ended as NaN or infinity (the training diverged).

    Raises:
      ConfigError, PartitionError, UserInputError: invalid input, before anything is written.
      StorageError: the disk filled up or is read-only; a new run directory is removed again, an
        existing run stays as it was.
    """
    check_training_inputs(config, dataset, partition)
    if not isinstance(run_dir, str | os.PathLike):
        raise UserInputError(f"run_dir must be a path, got {type(run_dir).__name__}")
    if overwrite is not True and overwrite is not False:
        raise ConfigError(f"overwrite must be true or false, got {overwrite!r}")
    if discard_deletion_history is not True and discard_deletion_history is not False:
        raise ConfigError(
            f"discard_deletion_history must be true or false, got {discard_deletion_history!r}"
        )
    files = RunDir(run_dir, must_exist=False)
    root = files.root
    if root.exists() and not root.is_dir():
        raise UserInputError(f"{run_dir} exists and is not a directory")
    interrupted = (
        root.is_dir() and (root / INTERRUPTED).is_file() and not (root / MANIFEST).exists()
    )
    if interrupted and discard_deletion_history:
        raise UserInputError(
            f"{run_dir} holds an interrupted training, not a run: it has no deletion history to "
            "discard; continue it (the same train, or `sisajax resume`) or remove the directory"
        )
    if interrupted:
        return _continue_training(
            files,
            config,
            dataset,
            partition,
            devices,
            progress,
            metrics,
            plugins,
            tensorboard,
            val_metrics,
        )
    if root.exists() and any(root.iterdir()):
        if not (root / MANIFEST).exists():
            raise UserInputError(
                f"{run_dir} is not empty and holds no sisajax run (no {MANIFEST}; a training "
                "killed before it recorded anything leaves such a folder): sisajax deletes "
                "nothing it cannot recognise, so choose another run_dir or delete the folder"
            )
        if not overwrite:
            raise UserInputError(f"{run_dir} is not empty; pass overwrite=True to retrain it")
        run = SisaRun(root)
        watch = FinalLossWatch(metrics_sink(run.run_dir, metrics, tensorboard), config.sisa.slices)
        out = retrain_in_place(
            run,
            config,
            dataset,
            partition,
            devices,
            progress,
            watch,
            plugins,
            discard_deletion_history,
            tensorboard,
        )
        watch.warn()
        return out
    if discard_deletion_history:
        raise UserInputError(
            "discard_deletion_history only applies when retraining an existing run"
        )
    ledger = Ledger(root, hash_ids=config.ledger.hash_ids, salt_file=config.ledger.salt_file)
    plan = plan_training(config, dataset, partition, devices, np.zeros(0, np.int64))
    created = _make_run_dir(root)
    owned = False  # True once this process holds the lock over a folder that is still empty
    try:
        with Generation.new_run(files, config.ledger.lock_timeout_s) as g:
            _check_still_empty(root, run_dir)
            owned = True
            id_hashing = id_hashing_record(ledger) if config.ledger.hash_ids else None
            sink = metrics_sink(root, metrics, tensorboard)
            watch = FinalLossWatch(sink, config.sisa.slices)
            out = train_generation(
                plan,
                g,
                progress=progress,
                metrics=watch,
                on_interrupt=_keep_progress(root, plan, tuple(plugins), {}),
                val_metrics=val_metrics,
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
            g.commit(manifest, config=plan.config.to_dict())
            log_train(sink, 0, out.cost)
    except KeyboardInterrupt:
        if owned and not (root / INTERRUPTED).is_file():  # no slice step done: nothing to keep
            _remove_new_run(root, created)
        raise
    except BaseException:
        if owned:  # never another process's files (it won the lock, or filled the folder)
            _remove_new_run(root, created)
        raise
    watch.warn()
    return SisaRun(root), out.cost


class FinalLossWatch:
    """A metrics sink that hands every record on to ``sink`` and notes the shards whose last
    slice step (of ``slices``) ended with a training loss that is NaN or infinite: their models
    diverged. It reads the per-slice records the writer makes for ``sink`` anyway; the training
    itself is untouched. Without a sink (``metrics=False``) it is false, so the writer makes no
    records for it and nothing is watched."""

    def __init__(self, sink: Callable[[dict[str, Any]], None] | None, slices: int):
        self.sink, self.last = sink, slices - 1
        self.diverged: set[int] = set()
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return self.sink is not None

    def __call__(self, record: dict[str, Any]) -> None:
        if record.get("event") == "train_slice" and record.get("slice") == self.last:
            loss = record.get("loss")
            if isinstance(loss, float) and not math.isfinite(loss):
                with self._lock:
                    self.diverged.add(int(record["shard"]))
        if self.sink is not None:
            self.sink(record)

    def warn(self) -> None:
        """One warning naming the diverged shards, if any."""
        if self.diverged:
            shards = ", ".join(str(k) for k in sorted(self.diverged))
            warnings.warn(
                f"the training loss of shard(s) {shards} ended as NaN or infinity: the training "
                "diverged and those models predict nothing useful (try a lower "
                "optim.learning_rate)",
                RuntimeWarning,
                stacklevel=3,
            )


def _make_run_dir(root: Path) -> bool:
    """Create ``root`` for a new run; whether this process created it (an existing empty folder,
    or one another process created meanwhile, is not ours to delete)."""
    try:
        root.mkdir(parents=True)
        return True
    except FileExistsError:
        return False
    except OSError as e:  # no run exists yet: nothing to resume
        raise storage_error(e, f"creating {root}", resumable=False) from None


def _check_still_empty(root: Path, given: Any) -> None:
    """Under the writer lock: the folder checked empty before is still empty but for the lock
    files. Another process that started a run in it first is refused, before anything of ours
    is written (its files are never touched)."""
    if any(p.name not in (WRITER_LOCK, READER_LOCK) for p in root.iterdir()):
        raise RunBusyError(
            f"another process started a run in {given} meanwhile; nothing was changed "
            "(pass overwrite=True after it finished to retrain it)"
        )


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
            source_hashes(plugins),
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
    val_metrics: bool = False,
):
    """Finish a new run that Ctrl-C interrupted: check that ``config`` and ``dataset`` are what
    it was training, restore every shard after the last completed slice step (rows checked
    against the record) and train the rest; bit-identical to an uninterrupted training."""
    root = files.root
    plan = plan_training(config, dataset, partition, devices, np.zeros(0, np.int64))
    with Generation.new_run(files, config.ledger.lock_timeout_s) as g:
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
        now = source_hashes(rec.plugins)
        changed = sorted(n for n, h in rec.plugin_sources.items() if now.get(n) != h)
        if changed:
            raise UserInputError(
                f"{root} holds an interrupted training whose plug-in(s) {', '.join(changed)} "
                "are not imported or changed since: its stored slice steps came from the code "
                "it recorded; import that code (plugins=[...]) or remove the directory"
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
            id_hashing = id_hashing_record(ledger)
        sink = metrics_sink(root, metrics, tensorboard)
        watch = FinalLossWatch(sink, config.sisa.slices)
        out = train_generation(
            plan,
            g,
            progress=progress,
            metrics=watch,
            resume=Resume(rec.completed, rec.rows, states),
            on_interrupt=_keep_progress(root, plan, rec.plugins, rec.hosts),
            val_metrics=val_metrics,
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
        g.commit(manifest, config=plan.config.to_dict())
        remove_record(root)
        log_train(sink, 0, out.cost, continued_after_slice_steps=rec.completed)
    watch.warn()
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
    data set loaded again). Its plug-ins must be imported by the caller (a run directory never
    imports code by itself); they must be the code it recorded. Returns ``(run, cost)`` as
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
    missing = [n for n in rec.plugins if n not in sys.modules]
    if missing:  # a run directory never imports code by itself: the caller names it
        raise UserInputError(
            f"{root}: its interrupted training used plug-in(s) {', '.join(missing)}; import them "
            "first (plugins=[...] on the command line, sisajax.load_plugins in Python)"
        )
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


def full_retrain(
    run: SisaRun, run_dir: str | Path, *, progress: Progress = None
) -> tuple[SisaRun, CostReport]:
    """The full-retrain baseline: the same engine with one shard and one slice, trained from
    scratch on the data ``run`` currently retains (same model, optimizer, epochs, batch, seed).
    """
    if not isinstance(run, SisaRun):
        raise UserInputError(
            f"run must be an open run (sisajax.open_run), got {type(run).__name__}"
        )
    cfg = run.config.replace(sisa={"shards": 1, "slices": 1})
    return train(cfg, run.retained_dataset(), run_dir, overwrite=True, progress=progress)


__all__ = [
    "GenerationWriter",
    "build_engine",
    "check_partition",
    "continue_training",
    "full_retrain",
    "library_versions",
    "shard_data_from",
    "train",
]
