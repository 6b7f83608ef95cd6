"""Unlearning: forget training ids exactly, by retraining only what saw them.

``plan_forget`` is pure: ids -> which shards restart at which slice. ``forget`` executes a plan:
for every affected shard, restore the state saved just before its earliest affected slice (or the
initial state for slice 0), drop the ids, retrain the remaining slices of all affected shards
together in one program, write new data copies and checkpoint blocks, and switch the run's
manifest to them in one atomic rename. Unaffected shards are not touched. The superseded files
(checkpoints of slices trained with a forgotten id, the old data copy) are deleted after the switch.

The result is bit-identical (on a deterministic backend) to training from scratch on the retained
ids with the same config, because the partition, the batch order and the init are pure functions
of (seed, shard, slice, epoch, id set), and the same compiled program runs both ways.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from sisajax.checkpoint import sync_filesystem
from sisajax.costs import CostReport, full_retrain_cost, slice_schedule_cost
from sisajax.data.partition import Partition, PartitionError
from sisajax.engine import ShardData, stack_states, unstack_state
from sisajax.faults import fault
from sisajax.run import Progress, SisaRun, _sha256, train, write_shard_files


class ForgetError(PartitionError):
    """A forget request is malformed or names ids that cannot be forgotten."""


@dataclasses.dataclass(frozen=True)
class ForgetPlan:
    """What a forget request will retrain.

    Attributes:
      ids: ``[K]`` sorted ids to forget now.
      already_forgotten: ids that were forgotten before (nothing to do for them).
      restart: ``{shard: first slice to retrain}`` for every affected shard.
      locations: ``{id: (shard, slice)}`` of every id to forget.
    """

    ids: np.ndarray
    already_forgotten: np.ndarray
    restart: dict[int, int]
    locations: dict[int, tuple[int, int]]

    @property
    def is_noop(self) -> bool:
        return len(self.ids) == 0


def normalise_ids(ids: Any) -> np.ndarray:
    """Validate a user's id list: 1-D integers, no duplicates. Returns ``[K]`` int64."""
    try:
        arr = np.asarray(ids)
    except Exception as e:  # ragged lists and the like
        raise ForgetError(f"ids must be a flat list of integers: {e}") from e
    if arr.ndim != 1:
        raise ForgetError(f"ids must be a flat list of integers, got shape {arr.shape}")
    if arr.size == 0:
        raise ForgetError("no ids given")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == object):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ForgetError(f"ids must be integers, got {arr.dtype} values such as {arr[:3]}")
    try:
        arr = arr.astype(np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise ForgetError(f"ids must be integers: {e}") from e
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise ForgetError(f"duplicate ids in one request: {uniq[counts > 1].tolist()}", uniq)
    return arr


def plan_forget(partition: Partition, ids: Any, test_ids: np.ndarray | None = None) -> ForgetPlan:
    """Pure planning: which shards restart at which slice for forgetting ``ids``.

    Raises:
      ForgetError: malformed ids, duplicates, test ids, or ids that were never training ids.
    """
    arr = normalise_ids(ids)
    if test_ids is not None:
        bad = arr[np.isin(arr, test_ids)]
        if bad.size:
            raise ForgetError(
                f"ids {bad.tolist()[:20]} belong to the test split, not the training set", bad
            )
    already = arr[np.isin(arr, partition.removed)]
    todo = np.sort(arr[~np.isin(arr, partition.removed)])
    unknown = todo[~partition.contains(todo)]
    if unknown.size:
        raise ForgetError(f"unknown ids (not training ids of this run): {unknown.tolist()[:20]}")
    restart: dict[int, int] = {}
    locations = {}
    if todo.size:
        shards, slices = partition.locate(todo)
        for i, k, j in zip(todo.tolist(), shards.tolist(), slices.tolist(), strict=True):
            locations[i] = (k, j)
            restart[k] = min(restart.get(k, j), j)
    return ForgetPlan(todo, np.sort(already), dict(sorted(restart.items())), locations)


def _width_bucket(n: int, total: int, shard_exec: str = "map") -> int:
    """How many shards the retraining program runs (the extra ones are inert).

    ``lax.map`` runs each shard by the same sequential program whatever the width, so the width
    is padded to a power of two (<= S): few distinct compiles. Under ``vmap`` the bits depend on
    the width on CPU once matrices are large (measured: a 600-128-100 MLP at width 8 differs from
    widths 1 and 2), so a vmapped run always retrains at its training width S.
    """
    if shard_exec == "vmap":
        return max(total, n)
    w = 1
    while w < n:
        w *= 2
    return min(w, max(total, n))


@dataclasses.dataclass
class ForgetReport:
    """What a forget did and cost, next to the full-retrain figures."""

    ids: list[int]
    already_forgotten: list[int]
    restart: dict[int, int]
    cost: CostReport
    full_retrain_examples: int
    full_retrain_steps: int
    generation: int
    removed_files: list[str]

    @property
    def examples_ratio(self) -> float:
        """Full-retrain examples / examples retrained (the speedup in examples)."""
        return self.full_retrain_examples / max(self.cost.examples, 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["restart"] = {str(k): v for k, v in self.restart.items()}
        d["examples_ratio"] = self.examples_ratio
        return d


def forget(
    run: SisaRun, ids: Any, *, progress: Progress = None, lock_timeout_s: float | None = None
) -> ForgetReport:
    """Forget ``ids`` from ``run`` exactly. Several ids = one batched retrain.

    Takes the run's writer lock (a concurrent ``forget`` waits up to ``lock_timeout_s``, default
    the run's ``ledger.lock_timeout_s``, then fails with :class:`RunBusyError`), first finishes any
    request an earlier crash left pending, then records this request as ``pending`` in the ledger,
    retrains, switches the run to the new files atomically and records ``done``.

    Args:
      run: an open run.
      ids: training ids to forget (ids forgotten earlier are reported, not retrained).
      progress: optional ``progress(description, total_steps) -> advance(n)`` factory.
      lock_timeout_s: override of the lock wait.

    Returns:
      a :class:`ForgetReport`; the run is switched to the new state when this returns.

    Raises:
      ForgetError: bad ids (unknown, test ids, duplicates, malformed, all ids); nothing changes.
      CheckpointError / RunError: corrupt or missing files; nothing changes.
    """
    with run.writer_lock(lock_timeout_s):
        run.reload()
        resume(run, progress=progress, _locked=True)
        return _forget_locked(run, ids, progress=progress)


def resume(run: SisaRun, *, progress: Progress = None, _locked: bool = False) -> list[ForgetReport]:
    """Finish every request an interrupted ``forget`` left pending; clean up partial files.

    The result is identical to an uninterrupted run: an interrupted request either committed its
    new manifest (then only the clean-up and the ``done`` record are left) or did not (then its
    partial files are deleted and it is redone from the committed state, deterministically).
    """
    if not _locked:
        with run.writer_lock():
            run.reload()
            return resume(run, progress=progress, _locked=True)
    ledger = run.ledger
    reports = []
    for rec in ledger.pending():
        ids = ledger.pending_ids(rec["request_id"])
        run.collect_garbage()
        if not run.partition.contains(np.asarray(ids, np.int64)).any():
            # committed before the crash: record it as done
            fault("before_done")
            ledger.append(
                rec["request_id"],
                "done",
                resumed=True,
                generation=run.generation,
                model_fingerprints=_model_fingerprints(run, rec.get("restart", {})),
                files_removed=[],
            )
            ledger.clear_pending_ids(rec["request_id"])
            continue
        reports.append(_forget_locked(run, ids, progress=progress, pending=rec))
    for orphan in ledger.orphan_pending_files():
        orphan.unlink()
    run.collect_garbage()
    return reports


def _removed_keys(run: SisaRun, ids: np.ndarray) -> np.ndarray:
    """How forgotten ids are kept in the partition: raw, or salted hashes (``hash_ids``)."""
    if not run.config.ledger.hash_ids:
        return np.asarray(ids, np.int64)
    ledger = run.ledger
    return np.array(
        [int(ledger.id_hash(int(i))[:16], 16) & 0x7FFFFFFFFFFFFFFF for i in ids], dtype=np.int64
    )


def _model_fingerprints(run: SisaRun, restart: dict) -> dict[str, str]:
    """sha256 over each retrained shard's checkpoint file checksums (what the ledger records)."""
    out = {}
    for k in restart:
        files = run.shard_entry(int(k))["checkpoint"]["files"]
        out[str(k)] = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return out


def _forget_locked(
    run: SisaRun, ids: Any, *, progress: Progress, pending: dict[str, Any] | None = None
) -> ForgetReport:
    t0 = time.perf_counter()
    ledger = run.ledger
    test_ids = run.test_data()[0]
    arr = normalise_ids(ids)
    keys = _removed_keys(run, arr)
    already_mask = np.isin(keys, run.partition.removed)
    already = np.sort(arr[already_mask])
    if already_mask.all():
        plan = ForgetPlan(np.zeros(0, np.int64), already, {}, {})
    else:
        plan = plan_forget(run.partition, arr[~already_mask], test_ids)
        plan = dataclasses.replace(plan, already_forgotten=already)
    run.check_layout()  # exact only on the device layout the run was trained on
    sisa = run.config.sisa
    n_left = len(run.partition.ids) - len(plan.ids)
    full_ex, full_steps = full_retrain_cost(n_left, sisa.epochs, sisa.batch_size)
    if plan.is_noop:
        cost = CostReport(wall_s=time.perf_counter() - t0)
        ledger.append(
            ledger.new_request_id(),
            "done",
            ids=[],
            already_forgotten=ledger.redact(plan.already_forgotten.tolist()),
            generation=run.generation,
        )
        return ForgetReport(
            [], plan.already_forgotten.tolist(), {}, cost, full_ex, full_steps, run.generation, []
        )
    if n_left == 0:
        raise ForgetError(
            "this request would forget every remaining training id; train a new run instead"
        )
    new_part = run.partition.drop(plan.ids, removed_keys=_removed_keys(run, plan.ids))
    shards = list(plan.restart)
    starts = [plan.restart[k] for k in shards]
    engine = run.engine

    # restore (checksums verified) before anything is written: corrupt files change nothing
    t_restore = time.perf_counter()
    old_blocks = {k: run.restore_block(k) for k in shards}
    data: list[ShardData] = []
    start_states = []
    for k, j in zip(shards, starts, strict=True):
        old = run.shard_data(k)
        keep = ~np.isin(old.ids, plan.ids)
        data.append(ShardData(old.ids[keep], old.x[keep], old.y[keep], old.slices[keep]))
        start_states.append(engine.init_state(k) if j == 0 else unstack_state(old_blocks[k], j - 1))
    restore_s = time.perf_counter() - t_restore

    if pending is None:
        request_id = ledger.new_request_id()
        ledger.write_pending_ids(request_id, plan.ids.tolist())
        ledger.append(
            request_id,
            "pending",
            ids=ledger.redact(plan.ids.tolist()),
            locations={
                str(i): loc
                for i, loc in zip(
                    ledger.redact(plan.ids.tolist()), plan.locations.values(), strict=True
                )
            },
            restart={str(k): j for k, j in plan.restart.items()},
            checkpoints_restored=[
                {"shard": k, "block": run.shard_entry(k)["checkpoint"]["block"], "row": j - 1}
                for k, j in plan.restart.items()
            ],
            generation_before=run.generation,
        )
    else:
        request_id = pending["request_id"]
    fault("after_pending")

    # pad to a width bucket with inert entries (start slice R: never trained)
    width = _width_bucket(len(shards), run.num_shards, run.engine.shard_exec)
    pad = width - len(shards)
    all_shards = shards + [shards[0]] * pad
    empty = ShardData(data[0].ids[:0], data[0].x[:0], data[0].y[:0], data[0].slices[:0])
    all_data = data + [empty] * pad
    all_starts = starts + [run.num_slices] * pad
    all_states = stack_states(start_states + [start_states[0]] * pad)

    per_slice: dict[int, Any] = {}

    def on_slice(j: int, st: Any) -> None:
        per_slice[j] = st
        fault("mid_retrain")

    sizes = new_part.sizes()[shards]
    total = slice_schedule_cost(sizes, sisa.epochs, sisa.batch_size, np.array(starts))[1]
    advance = progress("forget", total) if progress else None
    _, stats = engine.train_slices(
        all_shards,
        all_data,
        all_states,
        all_starts,
        capacity=run.capacity,
        on_slice=on_slice,
        progress=advance,
    )

    # save: new blocks = old rows before the restart slice + retrained rows, under new names
    t_save = time.perf_counter()
    gen = run.generation + 1
    manifest = copy.deepcopy(run.manifest)
    fp = run.manifest["config_fingerprint"]
    for i, (k, j) in enumerate(zip(shards, starts, strict=True)):
        rows = [
            unstack_state(old_blocks[k], r) if r < j else unstack_state(per_slice[r], i)
            for r in range(run.num_slices)
        ]
        manifest["shards"][str(k)] = write_shard_files(
            run, k, gen, data[i], stack_states(rows), run.store, fp, run.num_slices
        )
        fault("mid_save")
    part_file = f"partition.g{gen:06d}.npz"
    new_part.save(run.run_dir / part_file)
    manifest["partition"] = {
        **manifest["partition"],
        "file": part_file,
        "sha256": _sha256(run.run_dir / part_file),
    }
    manifest["generation"] = gen
    sync_filesystem(run.run_dir)  # every new file durable before the manifest names it
    fault("before_commit")
    removed = run.commit(manifest)
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
    )
    fault("before_done")
    ledger.append(
        request_id,
        "done",
        generation=gen,
        model_fingerprints=_model_fingerprints(run, plan.restart),
        files_removed=removed,
        cost=cost.to_dict(),
        resumed=pending is not None,
    )
    ledger.clear_pending_ids(request_id)
    return ForgetReport(
        plan.ids.tolist(),
        plan.already_forgotten.tolist(),
        plan.restart,
        cost,
        full_ex,
        full_steps,
        gen,
        removed,
    )


def full_retrain(
    run: SisaRun, run_dir: str | Path, *, progress: Progress = None
) -> tuple[SisaRun, CostReport]:
    """The full-retrain baseline: the same engine with one shard and one slice, trained from
    scratch on the data ``run`` currently retains (same model, optimizer, epochs, batch, seed).
    """
    cfg = run.config.replace(sisa={"shards": 1, "slices": 1})
    return train(cfg, run.retained_dataset(), run_dir, overwrite=True, progress=progress)
