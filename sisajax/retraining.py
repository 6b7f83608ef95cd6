"""Training the shards of one generation, and retraining an existing run in place.

:func:`train_generation` trains shards from a :class:`~sisajax.planning.TrainingPlan` while the
transaction's background writer stores every slice step (nothing is live until the caller
commits). :func:`retrain_in_place` is a generation switch like a forget: it takes the writer
lock (waiting like ``forget``), finishes any interrupted request first, excludes every id the
run has forgotten (its tombstones; the source data set still holds those rows), carries the
ledger forward with a ``retrain`` request, and switches atomically.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sisajax.config import ConfigError, RunConfig
from sisajax.costs import CostReport, slice_schedule_cost
from sisajax.data.datasets import Dataset
from sisajax.data.partition import Partition, PartitionError
from sisajax.engine import ShardJob, TrainStats
from sisajax.generation import Generation, id_hashing_record, writer_session
from sisajax.generation_writer import GenerationWriter, MetricsSink, Progress, metrics_sink
from sisajax.planning import TrainingPlan, make_manifest, plan_training
from sisajax.run import SisaRun
from sisajax.store.ledger import Ledger
from sisajax.store.manifest import FileRef, RowRef, ShardEntry
from sisajax.unlearning import finish_pending


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
    g: Generation,
    *,
    shards: list[int] | None = None,
    shared: bool = True,
    progress: Progress = None,
    metrics: MetricsSink = None,
    label: str = "train",
    resume: Resume | None = None,
    on_interrupt: Callable[[GenerationWriter], None] | None = None,
    val_metrics: bool = False,
) -> GenerationFiles:
    """Train ``shards`` (default: all) and write their files for generation ``g`` (not yet live).

    Args:
      shared: also write the partition, the held-out split and the validation split.
      resume: continue an interrupted training: its stored rows are kept and every shard
        starts from its state after the last completed slice step.
      on_interrupt: called with the writer (its finished rows) when Ctrl-C stops the training.
      val_metrics: log the validation accuracy of every slice step (``val_slice`` records).
    """
    t0 = time.perf_counter()
    cfg, part, engine = plan.config, plan.partition, plan.engine
    sisa = cfg.sisa
    mine = list(range(sisa.shards)) if shards is None else list(shards)
    g.files.make_dirs()
    gen = g.start_writer(engine, cfg.fingerprint(), metrics)
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
            if val_metrics and len(plan.validation[0]):
                gen.track_validation(plan.validation[1], plan.validation[2])
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
            on_slice=g.on_slice(mine),
            progress=advance,
        )
        t_wait = time.perf_counter()
        g.finish_writing()
    except KeyboardInterrupt:
        g.abort()
        if on_interrupt is not None:
            on_interrupt(gen)
        raise
    except BaseException:
        g.abort()
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
        writer_busy_s=gen.busy_s,
    )
    return GenerationFiles(
        {k: gen.shard_entry(k) for k in mine},
        gen.partition_ref,
        gen.test_ref,
        gen.val_ref,
        gen.hosts,
        cost,
    )


def tombstoned(ledger: Ledger, removed: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``[N]`` bool: which of ``ids`` the run has forgotten (raw ids or salted hashes)."""
    return np.isin(ledger.removed_keys(ids), removed)


def retrain_in_place(
    run: SisaRun,
    config: RunConfig,
    dataset: Dataset,
    partition: Partition | None,
    devices: int | None,
    progress: Progress,
    metrics: MetricsSink,
    plugins: tuple[str, ...],
    discard: bool,
    tensorboard: bool = False,
) -> tuple[SisaRun, CostReport]:
    """Retrain ``run`` from scratch with ``config`` as its next generation (see
    :func:`sisajax.train` with ``overwrite=True``); ``discard`` drops its tombstones."""
    old_hash = run.config.ledger.hash_ids
    if config.ledger.hash_ids != old_hash and not discard:
        raise ConfigError(
            f"ledger.hash_ids={config.ledger.hash_ids} but the run keeps its deletion history "
            f"with hash_ids={old_hash}; keep it (or discard the history explicitly)"
        )
    # retraining runs the current plug-in code from scratch (and records its hashes anew)
    with writer_session(run, config.ledger.lock_timeout_s, replays=False) as repaired:
        old_ledger = run.ledger
        finish_pending(run)
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
        if config.ledger.hash_ids and id_hashing is not None:
            # the kept history was hashed with the run's salt: a retrain naming another salt
            # file would leave a run whose later forgets cannot match its ledger
            ledger.check_salt(id_hashing.get("salt_fingerprint"))
        if config.ledger.hash_ids and id_hashing is None:
            id_hashing = id_hashing_record(ledger)
        excluded = int(drop.sum()) if drop is not None else 0
        record = {
            "generation_before": run.generation,
            "generation_target": run.generation + 1,
            "config_fingerprint": plan.config.fingerprint(),
            "excluded_forgotten": excluded,
            "discard_deletion_history": bool(discard),
            "forgotten_before": int(len(run.partition.removed)),
            "repaired_ledger": repaired,
        }
        with Generation.begin(run, "retrain", record) as g:
            sink = metrics_sink(run.run_dir, metrics, tensorboard)
            out = train_generation(plan, g, progress=progress, metrics=sink)
            manifest = make_manifest(
                plan,
                g.number,
                out.entries,
                out.partition,
                out.test_data,
                out.hosts,
                origin={"op": "retrain", "request_id": g.request_id},
                id_hashing=id_hashing,
                plugins=tuple(plugins),
                val_data=out.val_data,
            )
            removed_files = g.commit(
                manifest,
                config=plan.config.to_dict(),
                lock_timeout_s=config.ledger.lock_timeout_s,
            )
            g.done(generation=g.number, files_removed=len(removed_files))
    log_train(sink, g.number, out.cost, retrain=True, excluded_forgotten=excluded)
    return run, out.cost


def log_train(sink, generation: int, cost: CostReport, **extra: Any) -> None:
    """The ``train`` metrics record of a finished training."""
    if sink:
        sink({"event": "train", "generation": generation, **cost.to_dict(), **extra})


__all__ = [
    "GenerationFiles",
    "Resume",
    "log_train",
    "retrain_in_place",
    "tombstoned",
    "train_generation",
]
