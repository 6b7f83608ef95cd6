"""Unlearning: forget training ids exactly, by retraining only what saw them.

``plan_forget`` (:mod:`sisajax.planning`) is pure: ids -> which shards restart at which slice.
``forget`` executes a plan as one :class:`~sisajax.generation.Generation`:
for every affected shard, read the one stored state from just before its earliest affected slice
(or build the initial state for slice 0), drop the ids, retrain the remaining slices of all
affected shards together in one program while their new checkpoints are written in the
background, and switch the run's manifest to the new files in one atomic rename. Checkpoints
before the restart slice are kept by name (never rewritten); the superseded ones (trained with a
forgotten id) and the old data copy are deleted after the switch.

The result is bit-identical (on a deterministic backend, same program, same host) to training
from scratch on the retained ids with the same config, because the partition, the batch order,
the init and the dropout keys are pure functions of (seed, shard, slice, epoch, step, id set).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import numpy as np

from sisajax.costs import CostReport, full_retrain_cost, slice_schedule_cost
from sisajax.engine import ShardJob, TrainStats
from sisajax.generation import (
    Generation,
    prepare_ledger,
    remove_uncommitted_files,
    writer_session,
)
from sisajax.generation_writer import MetricsSink, Progress, metrics_sink
from sisajax.planning import ForgetError, ForgetPlan, normalise_ids, plan_forget
from sisajax.run import SisaRun
from sisajax.store.faults import fault
from sisajax.store.ledger import LedgerError, id_key


@dataclasses.dataclass
class ForgetReport:
    """What a forget did and cost, next to the full-retrain figures.

    ``ids`` / ``already_forgotten`` hold the caller's raw ids in memory; :meth:`to_dict` (what
    goes into files) holds them as the run's ledger does (salted hashes with ``hash_ids``).
    """

    ids: list[int]
    already_forgotten: list[int]
    restart: dict[int, int]
    cost: CostReport
    full_retrain_examples: int
    full_retrain_steps: int
    generation: int
    removed_files: list[str]
    redacted_ids: list[Any] | None = None
    redacted_already: list[Any] | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    validation_ids: int = 0  # how many of ``ids`` were validation ids (nothing retrained)

    @property
    def is_noop(self) -> bool:
        return not self.ids

    @property
    def examples_ratio(self) -> float | None:
        """Full-retrain examples / examples retrained (None for a request that retrained nothing)."""
        if self.cost.examples == 0:
            return None
        return self.full_retrain_examples / self.cost.examples

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ids"] = self.redacted_ids if self.redacted_ids is not None else self.ids
        d["already_forgotten"] = (
            self.redacted_already if self.redacted_already is not None else self.already_forgotten
        )
        d.pop("redacted_ids")
        d.pop("redacted_already")
        d["restart"] = {str(k): v for k, v in self.restart.items()}
        d["examples_ratio"] = self.examples_ratio
        return d


def forget(
    run: SisaRun,
    ids: Any,
    *,
    progress: Progress = None,
    lock_timeout_s: float | None = None,
    metrics: MetricsSink = None,
) -> ForgetReport:
    """Forget ``ids`` from ``run`` exactly. Several ids = one batched retrain.

    Takes the run's writer lock (a concurrent writer waits up to ``lock_timeout_s``, default the
    run's ``ledger.lock_timeout_s``, then fails with ``RunBusyError``), repairs an interrupted
    ledger append, then :func:`forget_in`: finishes any request an earlier crash left pending,
    records this request as ``pending``, retrains, switches the run to the new files atomically
    and records ``done``.

    Args:
      run: an open run.
      ids: training ids to forget (ids forgotten earlier are reported, not retrained).
      progress: optional ``progress(description, total_steps) -> advance(n)`` factory.
      lock_timeout_s: override of the lock wait.
      metrics: where training losses and the request's cost go: default the run's
        ``metrics.jsonl``, ``False`` nowhere, or a callback.

    Returns:
      a :class:`ForgetReport`; the run is switched to the new state when this returns.

    Raises:
      ForgetError: bad ids (unknown, test ids, duplicates, malformed, all ids); nothing changes.
      UserInputError: ``run`` is not an open run (a path must be opened with ``open_run``).
      RunError / RowError / LedgerError / StorageError: damaged files or a full/read-only disk;
        nothing changes, or the request is left pending for ``resume``.
    """
    with writer_session(run, lock_timeout_s):
        return forget_in(run, ids, progress=progress, metrics=metrics)


def layout_after_retraining(
    layout: dict[str, Any], retrained_on: dict[str, Any] | None
) -> dict[str, Any]:
    """The run's recorded layout after rows were retrained on an engine of layout
    ``retrained_on`` (None: nothing retrained): once any row came from a program that is not
    deterministic (a GPU without XLA's determinism flags, allowed by
    ``SISAJAX_ALLOW_NONDETERMINISTIC=1``), the run says so for good."""
    if retrained_on is None or retrained_on.get("deterministic", True):
        return layout
    return {**layout, "deterministic": False}


def forget_in(
    run: SisaRun,
    ids: Any,
    *,
    progress: Progress = None,
    metrics: MetricsSink = None,
    pending: dict[str, Any] | None = None,
) -> ForgetReport:
    """:func:`forget` for a caller that holds the run's writer session
    (:func:`~sisajax.generation.writer_session`; a long-lived server,
    :class:`sisajax.serve.ForgetServer`): finishes the requests left pending first, then forgets
    ``ids`` as one :class:`~sisajax.generation.Generation`.

    Args:
      pending: the ledger's ``pending`` record of an interrupted forget of ``ids`` to redo
        (:func:`resume`) instead of recording a new request.
    """
    metrics = metrics_sink(run.run_dir, metrics)
    if pending is None and run.ledger.pending():
        finish_pending(run, progress=progress)
    t0 = time.perf_counter()
    ledger = run.ledger
    hashed = run.config.ledger.hash_ids
    if hashed:
        ledger.check_salt((run.manifest.id_hashing or {}).get("salt_fingerprint"))
    arr = normalise_ids(ids)
    test_ids = run.test_data()[0]
    val = run.val_data() if run.has_validation else None
    plan = plan_forget(
        run.partition,
        arr,
        test_ids,
        ledger.removed_keys(arr) if hashed else None,
        redact=hashed,
        val_ids=None if val is None else val[0],
    )
    sisa = run.config.sisa
    trained = plan.trained
    n_left = len(run.partition.ids) - len(trained)
    full_ex, full_steps = full_retrain_cost(n_left, sisa.epochs, sisa.batch_size)
    redacted_already = ledger.redact(plan.already_forgotten) if hashed else None
    if plan.is_noop:
        ledger.append(
            ledger.new_request_id(),
            "done",
            kind="forget",
            ids=[],
            already_forgotten=ledger.redact(plan.already_forgotten),
            generation=run.generation,
        )
        return ForgetReport(
            [],
            plan.already_forgotten.tolist(),
            {},
            CostReport(wall_s=time.perf_counter() - t0),
            full_ex,
            full_steps,
            run.generation,
            [],
            [] if hashed else None,
            redacted_already,
        )
    if n_left == 0:
        raise ForgetError(
            "this request would forget every remaining training id; train a new run instead"
        )
    shards = list(plan.restart)
    if shards:
        run.check_layout()  # exact only on a layout that reproduces the run's bits
    warnings = run.warn_foreign_hosts(
        shards, "the retrained rows come from this host, so a shard mixes hosts"
    )
    new_part = run.partition.drop(trained, removed_keys=ledger.removed_keys(trained)).tombstone(
        ledger.removed_keys(plan.validation)
    )
    engine = run.engine
    gen = run.generation + 1

    # read what the retrain starts from (checksums verified) before anything is written
    t_restore = time.perf_counter()
    jobs = []
    for k in shards:
        j = plan.restart[k]
        stored = run.shard_data(k)
        # the rows kept and the one read: intact and the manifest's own; the last is the start
        start = run.check_shard(k, stored, j)
        data = stored.without(trained)
        jobs.append(ShardJob(k, data, j, start))
    restore_s = time.perf_counter() - t_restore

    redacted = ledger.redact(plan.ids)
    record = {
        "ids": redacted,
        "locations": {
            str(r): list(plan.locations.get(i, (-1, -1)))  # (-1, -1): a validation id
            for r, i in zip(redacted, plan.ids.tolist(), strict=True)
        },
        "restart": {str(k): j for k, j in plan.restart.items()},
        "restored_rows": [
            {
                "shard": k,
                "slice": j - 1,
                "generation": run.manifest.shards[k].rows[j - 1].generation,
                "sha256": run.manifest.shards[k].rows[j - 1].sha256,
            }
            for k, j in plan.restart.items()
            if j > 0
        ],
        "model_fingerprints_before": model_fingerprints(run, plan.restart),
        "generation_before": run.generation,
        "generation_target": gen,
    }
    request_id = None if pending is None else pending["request_id"]
    with Generation.begin(run, "forget", record, request_id=request_id) as g:
        writer = g.start_writer(engine, run.manifest.config_fingerprint, metrics)
        for job in jobs:
            writer.add_shard(job.shard, job.data)
        writer.add_partition(new_part)
        if plan.validation.size:  # the stored validation split drops them too
            keep = ~np.isin(val[0], plan.validation)
            writer.add_val(val[0][keep], val[1][keep], val[2][keep])
        stats = TrainStats()
        if jobs:
            total = slice_schedule_cost(
                new_part.sizes()[shards],
                sisa.shard_epochs,
                sisa.batch_size,
                np.array([plan.restart[k] for k in shards]),
            )[1]
            advance = writer.progress(progress, "forget", total)
            _, stats = engine.run(
                jobs, capacity=run.capacity, on_slice=g.on_slice(shards), progress=advance
            )
        t_save = time.perf_counter()
        g.finish_writing()
        manifest = run.manifest
        for k in shards:
            manifest = manifest.with_shard(
                k, writer.shard_entry(k, manifest.shards[k], plan.restart[k])
            )
        live_hosts = {r.host for e in manifest.shards for r in e.rows}
        hosts = {h: i for h, i in {**manifest.hosts, **writer.hosts}.items() if h in live_hosts}
        manifest = manifest.replace(
            generation=gen,
            partition=writer.partition_ref,
            hosts=hosts,
            origin={"op": "forget", "request_id": g.request_id},
            layout=layout_after_retraining(manifest.layout, engine.layout() if shards else None),
        )
        if writer.val_file is not None:
            manifest = manifest.replace(val_data=writer.val_ref)
        removed = g.commit(manifest, partition=new_part)
        save_s = time.perf_counter() - t_save
        cost = CostReport(
            wall_s=time.perf_counter() - t0,
            compile_s=stats.compile_s,
            restore_s=restore_s,
            retrain_s=stats.train_s,
            save_s=save_s,
            examples=stats.examples,
            grad_steps=stats.grad_steps,
            shard_slices=stats.shard_slices,
            shards=len(shards),
            writer_busy_s=writer.busy_s,
        )
        g.done(
            generation=gen,
            model_fingerprints=model_fingerprints(run, plan.restart),
            files_removed=removed,
            cost=cost.to_dict(),
            resumed=pending is not None,
        )
    cost.wall_s = time.perf_counter() - t0
    if metrics:
        metrics(
            {
                "event": "forget",
                "generation": gen,
                "ids": len(plan.ids),
                "shards": len(shards),
                "restart": {str(k): j for k, j in plan.restart.items()},
                **{k: v for k, v in cost.to_dict().items() if k != "shards"},
                "full_retrain_examples": full_ex,
            }
        )
    return ForgetReport(
        plan.ids.tolist(),
        plan.already_forgotten.tolist(),
        plan.restart,
        cost,
        full_ex,
        full_steps,
        gen,
        removed,
        redacted if hashed else None,
        redacted_already,
        warnings,
        int(plan.validation.size),
    )


def resume(run: SisaRun, *, progress: Progress = None) -> list[ForgetReport]:
    """Finish every request an interrupted command left pending; clean up partial files.

    Takes the run's writer session (:func:`~sisajax.generation.writer_session`), then
    :func:`finish_pending`.
    """
    with writer_session(run):
        return finish_pending(run, progress=progress)


def finish_pending(run: SisaRun, *, progress: Progress = None) -> list[ForgetReport]:
    """:func:`resume` for a caller that holds the run's writer session.

    A pending ``forget`` either committed its new manifest (then only its ``done`` record is
    missing) or did not (then its partial files are deleted and it is redone from the committed
    state, deterministically): the result is identical to an uninterrupted run. A pending
    ``retrain`` that never committed is recorded as ``aborted`` (the run kept its generation).
    """
    ledger = run.ledger
    timeout = run.config.ledger.lock_timeout_s
    repair_after_commit(run)
    reports = []
    for rec in ledger.pending():
        run.reload()
        rid = rec["request_id"]
        committed = run.manifest.origin.get("request_id") == rid
        if rec.get("kind") == "retrain":
            if committed:  # its config.json may not have been written before the crash
                run.files.write_config(run.manifest.config)
            state = "done" if committed else "aborted"
            ledger.append(rid, state, kind="retrain", resumed=True, generation=run.generation)
            continue
        # Superseded files (the old data copies and checkpoints that still hold the ids) go
        # before any "done" is written: the ledger never says done while they exist.
        run.files.remove_superseded(run.manifest, timeout)
        if committed:
            fault("before_done")
            ledger.append(
                rid,
                "done",
                kind="forget",
                resumed=True,
                generation=run.generation,
                model_fingerprints=model_fingerprints(run, rec.get("restart", {})),
            )
            continue
        ids = pending_ids(run, rec)
        if len(ids) == 0:  # every id of it was forgotten already
            ledger.append(rid, "done", kind="forget", resumed=True, generation=run.generation)
            continue
        reports.append(forget_in(run, ids, progress=progress, metrics=False, pending=rec))
    run.reload()
    run.files.remove_superseded(run.manifest, timeout)
    return reports


def repair_after_commit(run: SisaRun) -> list[str]:
    """Finish what a training left undone after its manifest went live (a crash or a full disk
    between the commit and the last files): the interrupted-training record, stale once a
    manifest exists, is removed, and a missing ``config.json`` is written from the manifest.
    Returns what was repaired. The caller holds the run's writer session."""
    from sisajax.store.interrupted import INTERRUPTED, remove_record

    repaired = []
    root = run.run_dir
    if (root / INTERRUPTED).is_file():
        remove_record(root)
        repaired.append(INTERRUPTED)
    if not (root / "config.json").exists():
        run.files.write_config(run.manifest.config)
        repaired.append("config.json")
    return repaired


def pending_ids(run: SisaRun, rec: dict[str, Any]) -> np.ndarray:
    """``[K]`` int64 raw ids of an uncommitted pending forget ``rec`` that are still in the run.

    Every id the record stores (raw, or salted hashes with ``hash_ids``) must be found in the
    run or among its forgotten ids: a record that names ids this run cannot place (a wrong id
    salt, a ledger from another run) raises :class:`LedgerError` before anything is written,
    rather than being closed as "done" with its ids still trained on.
    """
    ledger = run.ledger
    stored = list(rec.get("ids", []))
    if run.config.ledger.hash_ids:
        ledger.check_salt((run.manifest.id_hashing or {}).get("salt_fingerprint"))
    shards = sorted({int(loc[0]) for loc in rec.get("locations", {}).values()} - {-1})
    candidates = [run.shard_data(k).ids for k in shards]
    if run.has_validation:
        candidates.append(run.val_data()[0])
    candidates = np.concatenate(candidates or [np.zeros(0, np.int64)])
    ids = ledger.resolve(stored, candidates)
    if len(ids) < len(stored):
        found = set(ledger.redact(ids))
        missing = [v for v in stored if v not in found]
        if ledger.hash_ids:
            keys = np.array([id_key(str(v)) for v in missing], np.int64)
        else:
            keys = np.asarray(missing, np.int64)
        unplaced = int(np.sum(~np.isin(keys, run.partition.removed)))
        if unplaced:
            raise LedgerError(
                f"pending request {rec['request_id']} names {unplaced} id(s) that are neither in "
                "this run's data nor forgotten (another run's ledger, or the wrong id salt); "
                "nothing was changed"
            )
    return ids


def model_fingerprints(run: SisaRun, restart: dict) -> dict[str, str]:
    """sha256 over each retrained shard's row checksums (what the ledger records)."""
    out = {}
    for k in restart:
        shas = [r.sha256 for r in run.manifest.shards[int(k)].rows]
        out[str(k)] = hashlib.sha256("".join(shas).encode()).hexdigest()
    return out


__all__ = [
    "ForgetError",
    "ForgetPlan",
    "ForgetReport",
    "finish_pending",
    "forget",
    "forget_in",
    "normalise_ids",
    "pending_ids",
    "plan_forget",
    "prepare_ledger",
    "remove_uncommitted_files",
    "repair_after_commit",
    "resume",
]
