"""Training one SISA run with several processes (hosts), each training the shards it holds.

Shards are assigned to processes round-robin (shard ``k`` -> process ``k % P``). Every process
computes the same partition from the same data set, trains its own shards with a local
:class:`~sisajax.engine.Engine` on its own devices and writes their slice checkpoints and data
copies itself (each row is its own file, so no process waits for another), then hands its shard
entries (file checksums) to process 0 as a small JSON file in ``run_dir/.parts/``. After a
barrier, process 0 writes the partition, the held-out split, ``config.json`` and the manifest
(the run is live once that file exists) and removes the hand-off files; a last barrier lets every
process return the opened run.

Bits: with ``shard_exec=map`` (required here) each shard's computation does not depend on the
process, device or number of shards it runs with (see :mod:`sisajax.engine`), so a multi-process
run's checkpoints equal a one-process run's bit for bit (tested), and the run is unlearned by
:func:`sisajax.forget` in one process like any other run.

Usage, on every process (before any other JAX call)::

    from sisajax import distributed
    distributed.initialize("host0:12345", num_processes=2, process_id=rank)  # or no args on Slurm
    run, cost = distributed.train_multiprocess(config, dataset, "shared/runs/a")

Needs a run directory every process can see (a shared file system), new or empty.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from sisajax.config import ConfigError, RunConfig
from sisajax.costs import CostReport
from sisajax.data.datasets import Dataset
from sisajax.errors import RunError, UserInputError
from sisajax.generation import Generation, id_hashing_record
from sisajax.generation_writer import Progress
from sisajax.planning import make_manifest, plan_training
from sisajax.plugins import load_plugins
from sisajax.retraining import train_generation
from sisajax.run import SisaRun
from sisajax.store.files import read_json, write_json
from sisajax.store.ledger import Ledger
from sisajax.store.manifest import parse_shard_entry, shard_entry_json
from sisajax.store.run_dir import RunDir

PARTS_DIR = ".parts"  # per-process shard entries, removed once the manifest is written


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


def train_multiprocess(
    config: RunConfig,
    dataset: Dataset,
    run_dir: str | Path,
    *,
    process_id: int | None = None,
    num_processes: int | None = None,
    devices: int | None = None,
    progress: Progress = None,
    plugins: tuple[str, ...] | list[str] = (),
) -> tuple[SisaRun, CostReport]:
    """Train a SISA run with every process of the JAX job; call it on all of them.

    Args:
      config: the run configuration (the same on every process).
      dataset: the full data set (the same on every process).
      run_dir: a new (or empty) directory on a file system shared by all processes.
      process_id / num_processes: checked against ``jax.process_index()`` /
        ``jax.process_count()`` when given.
      devices: how many of this process's devices to use (default: all).
      progress: optional ``progress(description, total_steps) -> advance(n)`` factory, for this
        process's shards.
      plugins: modules the run needs imported (plug-in models or data sets), imported here and
        recorded with their source hashes, as :func:`sisajax.train` records them.

    Returns:
      (the opened run, on every process; this process's :class:`CostReport`). Process 0's
      result file holds the whole job's cost and each process's report.

    Raises:
      ConfigError, PartitionError, UserInputError: on every process, before anything is written
        (also for ``shard_exec=vmap`` with several processes, and for a non-empty ``run_dir``:
        retrain an existing run in one process, which keeps its deletion history).
    """
    t_start = time.perf_counter()
    plugin_names = load_plugins(list(plugins))
    pid, nproc = jax.process_index(), jax.process_count()
    if (process_id is not None and process_id != pid) or (
        num_processes is not None and num_processes != nproc
    ):
        raise RunError(
            f"this is process {pid} of {nproc} for JAX, not {process_id} of {num_processes}: "
            "call sisajax.distributed.initialize(...) first"
        )
    files = RunDir(run_dir, must_exist=False)
    root = files.root
    if root.exists() and any(p.name != PARTS_DIR for p in root.iterdir()):
        raise UserInputError(
            f"{run_dir} is not empty: multi-process training writes a new run (retrain an "
            "existing run with sisajax.train(..., overwrite=True), which keeps its tombstones)"
        )
    plan = plan_training(config, dataset, None, devices, np.zeros(0, np.int64))
    if plan.config.sisa.shard_exec != "map" and nproc > 1:
        raise ConfigError(
            "multi-process training needs sisa.shard_exec=map: under vmap a shard's bits depend "
            "on how many shards its device runs, which differs between the processes here and a "
            "later forget in one process, so unlearning would not be exact"
        )
    mine = process_shards(config.sisa.shards, pid, nproc)

    barrier("sisajax_train_checked")
    if pid == 0:
        root.mkdir(parents=True, exist_ok=True)
        (root / PARTS_DIR).mkdir(exist_ok=True)
        files.make_dirs()
    barrier("sisajax_train_dir_ready")

    # every process writes its shards' files of generation 0; process 0 commits the manifest
    g = Generation(files, 0, "train")
    out = train_generation(
        plan,
        g,
        shards=mine,
        shared=(pid == 0),
        progress=progress,
        label=f"train (process {pid})",
    )
    write_json(
        root / PARTS_DIR / f"process_{pid:05d}.json",
        {
            "process": pid,
            "entries": {str(k): shard_entry_json(e) for k, e in out.entries.items()},
            "hosts": out.hosts,
            "cost": out.cost.to_dict(),
        },
    )
    barrier("sisajax_train_shards_trained")

    cost = out.cost
    if pid == 0:
        t_save = time.perf_counter()
        _write_run(g, plan, out, nproc, plugin_names)
        cost.save_s += time.perf_counter() - t_save
    cost.wall_s = time.perf_counter() - t_start
    barrier("sisajax_train_manifest_written")
    return SisaRun(root), cost


def _write_run(g: Generation, plan, out, num_processes: int, plugins: tuple[str, ...] = ()) -> None:
    """Process 0: gather every process's shard entries and write the manifest (run live)."""
    files = g.files
    parts = [
        read_json(files.root / PARTS_DIR / f"process_{p:05d}.json") for p in range(num_processes)
    ]
    r = plan.config.sisa.slices
    entries, hosts = {}, {}
    for part in parts:
        hosts.update(part["hosts"])
        for k, e in part["entries"].items():
            entries[int(k)] = parse_shard_entry(e, f"process {part['process']} shard {k}", r, 0)
    missing = sorted(set(range(plan.config.sisa.shards)) - set(entries))
    if missing:
        raise RunError(f"no process trained shards {missing}")
    layout = {**plan.engine.layout(), "num_processes": num_processes, "assignment": "round_robin"}
    id_hashing = None
    lc = plan.config.ledger
    if lc.hash_ids:
        id_hashing = id_hashing_record(Ledger(files.root, hash_ids=True, salt_file=lc.salt_file))
    manifest = make_manifest(
        plan,
        0,
        entries,
        out.partition,
        out.test_data,
        hosts,
        origin={"op": "train", "processes": num_processes},
        id_hashing=id_hashing,
        plugins=plugins,
        layout=layout,
        val_data=out.val_data,
    )
    g.commit(manifest, config=plan.config.to_dict())
    shutil.rmtree(files.root / PARTS_DIR)
    costs = [CostReport(**p["cost"]) for p in parts]
    total = CostReport(
        wall_s=max(c.wall_s for c in costs),
        compile_s=max(c.compile_s for c in costs),
        retrain_s=max(c.retrain_s for c in costs),
        save_s=max(c.save_s for c in costs),
        examples=sum(c.examples for c in costs),
        grad_steps=sum(c.grad_steps for c in costs),
        shard_slices=sum(c.shard_slices for c in costs),
        shards=plan.config.sisa.shards,
    )
    from sisajax.metrics import MetricsLog

    MetricsLog(files.root)(
        {
            "event": "train",
            "generation": 0,
            **total.to_dict(),
            "per_process": [c.to_dict() for c in costs],
            "num_processes": num_processes,
        }
    )


__all__ = ["barrier", "initialize", "process_shards", "train_multiprocess"]
