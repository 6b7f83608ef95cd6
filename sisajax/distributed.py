"""Training one SISA run with several processes (hosts), each training the shards it holds.

Shards are assigned to processes round-robin (shard ``k`` -> process ``k % P``). Every process
computes the same partition from the same data set and trains its own shards with a local
:class:`~sisajax.engine.Engine` on its own devices, then hands each shard's states after every
slice (``[R, ...]``) to process 0 as a checksummed npz in ``run_dir/.parts/``. After a barrier,
process 0 writes every shard's data copy and Orbax block, the partition, the test split,
``config.json`` and the manifest (the run is live once that file exists), and removes the
hand-off files; a last barrier lets every process return the opened run.

Why process 0 writes the Orbax blocks: in a multi-process JAX job Orbax writes numpy leaves from
process 0 only (other processes' saves silently hold no data) and refuses single-device arrays,
so a process cannot save blocks of its own. Process 0 saves with itself as the only process of
each save (no cross-process barriers). Training, the expensive part, is spread; the writes are
~50 ms per shard.

Bits: with ``shard_exec=map`` (required here) each shard's computation does not depend on the
process, device or number of shards it runs with (see :mod:`sisajax.engine`), so a multi-process
run's blocks equal a one-process run's bit for bit (tested), and the run is unlearned by
:func:`sisajax.forget` in one process like any other run. (Under ``vmap`` the bits can depend on
the shards per device, which a later one-process forget would change.)

Usage, on every process (before any other JAX call)::

    from sisajax import distributed
    distributed.initialize("host0:12345", num_processes=2, process_id=rank)  # or no args on Slurm
    run, cost = distributed.train_multiprocess(config, dataset, "shared/runs/a")

Needs a run directory every process can see (a shared file system).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sisajax.checkpoint import CheckpointStore, sync_filesystem
from sisajax.config import ConfigError, RunConfig
from sisajax.costs import CostReport, slice_schedule_cost
from sisajax.data.datasets import Dataset
from sisajax.data.partition import Partition, PartitionError, hash_partition
from sisajax.engine import Engine, resolve_shard_exec, stack_states
from sisajax.run import (
    FORMAT,
    MANIFEST,
    Progress,
    RunError,
    SisaRun,
    _sha256,
    _shard_data_from,
    library_versions,
    save_npz_atomic,
    write_json_atomic,
    write_shard_files,
)

PARTS_DIR = ".parts"  # per-process manifest entries, removed once the manifest is written


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join a multi-process JAX job; call on every process before any other JAX call.

    CPU collectives (the barriers) go over gloo. With no arguments JAX detects the cluster
    (Slurm, Open MPI, ...) from the environment.

    Args:
      coordinator_address: ``host:port`` of process 0's coordination service.
      num_processes: number of processes in the job.
      process_id: this process's rank in ``[0, num_processes)``.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def process_shards(num_shards: int, process_id: int, num_processes: int) -> list[int]:
    """The shards process ``process_id`` trains: ``[process_id, process_id + P, ...]``."""
    return list(range(process_id, num_shards, num_processes))


def barrier(name: str) -> None:
    """Wait until every process of the job reaches the barrier ``name`` (no-op for one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _process_local_store(root: Path, process_id: int) -> CheckpointStore:
    """A :class:`CheckpointStore` whose Orbax saves involve this process only.

    Orbax's default makes every process of the job meet at barriers inside each save.
    """
    store = CheckpointStore(root)
    if jax.process_count() > 1:  # CheckpointStore has no option for this yet: swap its checkpointer
        store._ckptr.close()
        store._ckptr = ocp.StandardCheckpointer(
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=process_id,
                active_processes={process_id},
                barrier_sync_key_prefix=f"sisajax_p{process_id}",
            )
        )
    return store


def _check_partition(partition: Partition, config: RunConfig, num_train: int) -> None:
    """The checks :func:`sisajax.run.train` makes before writing anything."""
    sisa = config.sisa
    sizes = partition.sizes()
    empty = np.flatnonzero(sizes.sum(1) == 0)
    if len(empty) and not sisa.allow_empty_shards:
        raise PartitionError(
            f"shards {empty.tolist()} received no training examples "
            f"({num_train} ids over {sisa.shards} shards); use fewer shards"
        )
    if sisa.slices > sizes.sum(1).min() and not sisa.allow_empty_shards:
        raise ConfigError(
            f"{sisa.slices} slices but the smallest shard has {sizes.sum(1).min()} examples; "
            "use fewer slices or fewer shards"
        )


def train_multiprocess(
    config: RunConfig,
    dataset: Dataset,
    run_dir: str | Path,
    *,
    process_id: int | None = None,
    num_processes: int | None = None,
    overwrite: bool = False,
    devices: int | None = None,
    progress: Progress = None,
) -> tuple[SisaRun, CostReport]:
    """Train a SISA run with every process of the JAX job; call it on all of them.

    Args:
      config: the run configuration (the same on every process).
      dataset: the full data set (the same on every process).
      run_dir: a new (or empty) directory on a file system shared by all processes;
        ``overwrite=True`` replaces an existing run.
      process_id / num_processes: checked against ``jax.process_index()`` /
        ``jax.process_count()`` when given.
      devices: how many of this process's devices to use (default: all).
      progress: optional ``progress(description, total_steps) -> advance(n)`` factory, for this
        process's shards.

    Returns:
      (the opened run, on every process; this process's :class:`CostReport`). Process 0's
      ``results/train.json`` holds the whole job's cost (times: the slowest process, plus
      process 0's writing; counts: summed) and each process's report.

    Raises:
      ConfigError, PartitionError, RunError: on every process, before anything is written
        (also ConfigError for ``shard_exec=vmap`` with several processes).
    """
    t_start = time.perf_counter()
    pid, nproc = jax.process_index(), jax.process_count()
    if (process_id is not None and process_id != pid) or (
        num_processes is not None and num_processes != nproc
    ):
        raise RunError(
            f"this is process {pid} of {nproc} for JAX, not {process_id} of {num_processes}: "
            "call sisajax.distributed.initialize(...) first"
        )
    run_dir = Path(run_dir).absolute()
    sisa = config.sisa
    if run_dir.exists() and any(p.name != PARTS_DIR for p in run_dir.iterdir()):
        if not overwrite:
            raise RunError(f"{run_dir} is not empty; pass overwrite=True to replace it")
        if not (run_dir / MANIFEST).is_file():
            raise RunError(f"refusing to overwrite {run_dir}: it is not a sisajax run directory")
    partition = hash_partition(dataset.train_ids, sisa.shards, sisa.slices, sisa.seed)
    _check_partition(partition, config, len(dataset.train_ids))
    resolved = config.replace(sisa={"shard_exec": resolve_shard_exec(sisa.shard_exec)})
    if resolved.sisa.shard_exec != "map" and nproc > 1:
        raise ConfigError(
            "multi-process training needs sisa.shard_exec=map: under vmap a shard's bits depend "
            "on how many shards its device runs, which differs between the processes here and a "
            "later forget in one process, so unlearning would not be exact"
        )
    engine = Engine(
        resolved, dataset.feature_shape, dataset.x_train.dtype, dataset.num_classes, devices=devices
    )
    sizes = partition.sizes()
    capacity = int(-(-int(sizes.sum(1).max()) // 8) * 8)  # as run.train: the same for all
    mine = process_shards(sisa.shards, pid, nproc)

    barrier("sisajax_train_checked")
    if pid == 0:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        (run_dir / "data").mkdir(parents=True)
        (run_dir / PARTS_DIR).mkdir()
    barrier("sisajax_train_dir_ready")

    parts = run_dir / PARTS_DIR
    handoff: dict[str, str] = {}
    cost = CostReport(shards=len(mine))
    if mine:
        data = [_shard_data_from(partition, dataset, k) for k in mine]
        per_slice: list[Any] = []
        total = slice_schedule_cost(sizes[mine], sisa.epochs, sisa.batch_size)[1]
        _, stats = engine.train_slices(
            mine,
            data,
            stack_states([engine.init_state(k) for k in mine]),
            [0] * len(mine),
            capacity=capacity,
            on_slice=lambda j, st: per_slice.append(st),
            progress=progress(f"train (process {pid})", total) if progress else None,
        )
        t_save = time.perf_counter()
        leaves = jax.tree.leaves(stack_states(per_slice))  # each [R, W, ...]
        for i, k in enumerate(mine):
            rows = {f"leaf_{n:03d}": leaf[:, i] for n, leaf in enumerate(leaves)}
            handoff[str(k)] = save_npz_atomic(parts / f"shard_{k:03d}.npz", **rows)
        cost = CostReport(
            compile_s=stats.compile_s,
            retrain_s=stats.train_s,
            save_s=time.perf_counter() - t_save,
            examples=stats.examples,
            grad_steps=stats.grad_steps,
            shard_slices=stats.shard_slices,
            shards=len(mine),
        )
    cost.wall_s = time.perf_counter() - t_start
    write_json_atomic(
        parts / f"process_{pid:05d}.json",
        {"process": pid, "shards": handoff, "cost": cost.to_dict()},
    )
    barrier("sisajax_train_shards_trained")

    if pid == 0:
        t_save = time.perf_counter()
        _write_run(run_dir, resolved, engine, dataset, partition, capacity, nproc)
        cost.save_s += time.perf_counter() - t_save
        cost.wall_s = time.perf_counter() - t_start
    barrier("sisajax_train_manifest_written")
    return SisaRun(run_dir), cost


def _write_run(
    run_dir: Path,
    resolved: RunConfig,
    engine: Engine,
    dataset: Dataset,
    partition: Partition,
    capacity: int,
    num_processes: int,
) -> None:
    """Process 0: write every shard's files from the hand-offs, then the manifest (run live)."""
    t0 = time.perf_counter()
    sisa = resolved.sisa
    parts = [
        json.loads((run_dir / PARTS_DIR / f"process_{p:05d}.json").read_text())
        for p in range(num_processes)
    ]
    handoff = {int(k): sha for part in parts for k, sha in part["shards"].items()}
    missing = sorted(set(range(sisa.shards)) - set(handoff))
    if missing:
        raise RunError(f"no process trained shards {missing}")
    template = engine.state_template()
    treedef = jax.tree.structure(template)
    store = _process_local_store(run_dir / "checkpoints", 0)
    fp = resolved.fingerprint()
    shards = {}
    for k in range(sisa.shards):
        path = run_dir / PARTS_DIR / f"shard_{k:03d}.npz"
        if _sha256(path) != handoff[k]:
            raise RunError(f"{path} is corrupt (checksum mismatch)")
        with np.load(path) as z:
            block = jax.tree.unflatten(treedef, [z[f"leaf_{n:03d}"] for n in range(len(z.files))])
        data = _shard_data_from(partition, dataset, k)
        shards[str(k)] = write_shard_files(run_dir, k, 0, data, block, store, fp, sisa.slices)
    store.close()
    part_file = "partition.g000000.npz"
    partition.save(run_dir / part_file)
    test_sha = save_npz_atomic(
        run_dir / "data/test.npz", ids=dataset.test_ids, x=dataset.x_test, y=dataset.y_test
    )
    manifest = {
        "format": FORMAT,
        "generation": 0,
        "config": resolved.to_dict(),
        "config_fingerprint": fp,
        "shard_exec": engine.shard_exec,
        "capacity": capacity,
        "dataset": {
            "name": dataset.name,
            "feature_shape": list(dataset.feature_shape),
            "x_dtype": str(dataset.x_train.dtype),
            "num_classes": dataset.num_classes,
            "num_train": len(dataset.train_ids),
            "num_test": len(dataset.test_ids),
        },
        "partition": {"file": part_file, "sha256": _sha256(run_dir / part_file)},
        "test_data": {"file": "data/test.npz", "sha256": test_sha},
        "shards": shards,
        "layout": {**engine.layout(), "num_processes": num_processes, "assignment": "round_robin"},
        "versions": library_versions(),
    }
    write_json_atomic(run_dir / "config.json", resolved.to_dict())
    sync_filesystem(run_dir)  # every shard's files durable before the manifest names them
    write_json_atomic(run_dir / MANIFEST, manifest)
    shutil.rmtree(run_dir / PARTS_DIR)
    costs = [CostReport(**p["cost"]) for p in parts]
    written_s = time.perf_counter() - t0  # process 0 writing every shard's files
    total = CostReport(
        wall_s=max(c.wall_s for c in costs) + written_s,
        compile_s=max(c.compile_s for c in costs),
        retrain_s=max(c.retrain_s for c in costs),
        save_s=max(c.save_s for c in costs) + written_s,
        examples=sum(c.examples for c in costs),
        grad_steps=sum(c.grad_steps for c in costs),
        shard_slices=sum(c.shard_slices for c in costs),
        shards=sisa.shards,
    )
    SisaRun(run_dir).write_result(
        "train",
        {
            "cost": total.to_dict(),
            "per_process": [c.to_dict() for c in costs],
            "sizes": partition.sizes().tolist(),
            "num_processes": num_processes,
        },
    )


__all__ = ["barrier", "initialize", "process_shards", "train_multiprocess"]
