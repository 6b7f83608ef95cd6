"""A SISA run on disk: train it, open it, predict and evaluate with it.

Run directory layout (every file the run depends on is named, with a checksum, by MANIFEST.json;
switching to a new state is one atomic rename of that file)::

    run_dir/
      MANIFEST.json                 live generation: partition, per-shard data and checkpoint blocks
      config.json                   the resolved RunConfig (for people; MANIFEST holds the same)
      partition.g000000.npz         id -> (shard, slice) for retained ids, and the removed ids
      data/test.npz                 the held-out split
      data/shard_003.g000000.npz    retained training rows of shard 3 (ids, x, y, slices)
      checkpoints/shard_003.g000000 Orbax block: shard 3's state after every slice, [R, ...]
      results/*.json                one JSON result per command
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sisajax import aggregation as agg
from sisajax.checkpoint import CheckpointError, CheckpointStore, fsync_dir, sync_filesystem
from sisajax.config import ConfigError, RunConfig
from sisajax.costs import CostReport
from sisajax.data.datasets import Dataset
from sisajax.data.partition import Partition, PartitionError, fingerprint_ids, hash_partition
from sisajax.engine import (
    Engine,
    LayoutError,
    ShardData,
    layout_options,
    resolve_shard_exec,
    stack_states,
    unstack_state,
)

MANIFEST = "MANIFEST.json"
FORMAT = 1
PyTree = Any
Progress = Callable[[str, int], Callable[[int], None]] | None


class RunError(RuntimeError):
    """The run directory is missing, incomplete or inconsistent."""


class RunBusyError(RunError):
    """Another process holds the run's lock for longer than we were willing to wait."""


class RunLock:
    """An ``fcntl.flock`` on a file in the run directory (released on exit or process death).

    The writer lock (``.writer.lock``, exclusive) serialises ``forget``/``resume``/``train``; the
    reader lock (``.reader.lock``) is held shared while a reader loads a consistent generation and
    exclusively while a writer switches generations and deletes superseded files.
    """

    def __init__(self, path: Path, *, exclusive: bool, timeout_s: float, what: str):
        self.path, self.exclusive, self.timeout_s, self.what = path, exclusive, timeout_s, what
        self._f = None

    def __enter__(self) -> RunLock:
        import fcntl

        self._f = open(self.path, "a+")
        mode = (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self._f, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._f.seek(0)
                    holder = self._f.read().strip() or "another process"
                    self._f.close()
                    raise RunBusyError(
                        f"{self.what}: {self.path.parent} is locked by {holder}; gave up after "
                        f"{self.timeout_s:g}s (nothing was changed; try again when it finishes)"
                    ) from None
                time.sleep(0.05)
        if self.exclusive:
            self._f.seek(0)
            self._f.truncate()
            self._f.write(f"pid {os.getpid()}")
            self._f.flush()
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via temp file + fsync + rename + fsync of the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_npz_atomic(path: Path, durable: bool = True, **arrays: np.ndarray) -> str:
    """Write an npz atomically (temp + rename; fsynced unless ``durable=False``, for callers that
    make a whole batch of files durable with one ``sync_filesystem``); return its sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return _sha256(path)


def library_versions() -> dict[str, str]:
    import flax
    import optax
    import orbax.checkpoint

    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax-checkpoint": orbax.checkpoint.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
    }


@dataclasses.dataclass
class EvalReport:
    """Accuracy of every constituent model and of the aggregate.

    Attributes:
      shard_accuracy: ``[S]`` accuracy of each constituent model (NaN for empty shards).
      vote_accuracy / mean_prob_accuracy: aggregate accuracy by each aggregation.
      aggregation: the run's configured aggregation; ``accuracy`` is that one's value.
    """

    shard_accuracy: list[float]
    vote_accuracy: float
    mean_prob_accuracy: float
    aggregation: str
    num_examples: int
    active_shards: int

    @property
    def accuracy(self) -> float:
        return self.vote_accuracy if self.aggregation == "vote" else self.mean_prob_accuracy

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "accuracy": self.accuracy}


class SisaRun:
    """Handle on a run directory. Cheap to open; loads data and checkpoints lazily."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).absolute()
        path = self.run_dir / MANIFEST
        if not path.is_file():
            raise RunError(f"{self.run_dir} is not a sisajax run directory (no {MANIFEST})")
        self._engine: Engine | None = None
        self._layout_error: LayoutError | None = None
        self._block_template: PyTree | None = None
        self.store = CheckpointStore(self.run_dir / "checkpoints")
        self.reload()

    def reload(self) -> None:
        """Re-read the manifest (another process may have switched generations)."""
        path = self.run_dir / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunError(f"{path} is unreadable: {e}") from e
        if manifest.get("format") != FORMAT:
            raise RunError(f"{path}: unsupported format {manifest.get('format')}")
        self.manifest: dict[str, Any] = manifest
        self.config = RunConfig.from_dict(manifest["config"])
        self._partition: Partition | None = None
        self._final: PyTree | None = None
        self._final_manifest: dict[str, Any] | None = None

    def writer_lock(self, timeout_s: float | None = None) -> RunLock:
        t = self.config.ledger.lock_timeout_s if timeout_s is None else timeout_s
        return RunLock(self.run_dir / ".writer.lock", exclusive=True, timeout_s=t, what="writer")

    def reader_lock(self, exclusive: bool = False) -> RunLock:
        return RunLock(
            self.run_dir / ".reader.lock",
            exclusive=exclusive,
            timeout_s=self.config.ledger.lock_timeout_s,
            what="reader",
        )

    @property
    def ledger(self):
        from sisajax.ledger import Ledger

        return Ledger(self.run_dir, hash_ids=self.config.ledger.hash_ids)

    # -- basic facts ----------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return self.config.sisa.shards

    @property
    def num_slices(self) -> int:
        return self.config.sisa.slices

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def capacity(self) -> int:
        return int(self.manifest["capacity"])

    def shard_entry(self, k: int) -> dict[str, Any]:
        return self.manifest["shards"][str(k)]

    @property
    def partition(self) -> Partition:
        if self._partition is None:
            path = self.run_dir / self.manifest["partition"]["file"]
            self._check_file(path, self.manifest["partition"]["sha256"])
            self._partition = Partition.load(path)
        return self._partition

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            ds = self.manifest["dataset"]
            cfg = self.config.replace(sisa={"shard_exec": self.manifest["shard_exec"]})
            args = (cfg, tuple(ds["feature_shape"]), np.dtype(ds["x_dtype"]), ds["num_classes"])
            try:
                self._engine = Engine(*args, **layout_options(self.manifest.get("layout")))
            except LayoutError as e:
                # predict/evaluate still work on any layout; forget/verify must refuse
                self._layout_error = e
                self._engine = Engine(*args)
        return self._engine

    def check_layout(self) -> None:
        """Raise :class:`LayoutError` unless this process can reproduce the run's device layout
        (needed for exact unlearning; see ``engine.layout_options``)."""
        _ = self.engine
        if self._layout_error is not None:
            raise self._layout_error

    def active_shards(self) -> np.ndarray:
        """``[S]`` bool: shards that still hold training data (the others drop out)."""
        m = self._final_manifest or self.manifest
        return np.array([m["shards"][str(k)]["n_ids"][-1] > 0 for k in range(self.num_shards)])

    def _check_file(self, path: Path, sha: str) -> None:
        if not path.is_file():
            raise RunError(f"{path} is missing")
        if _sha256(path) != sha:
            raise RunError(f"{path} is corrupt (checksum mismatch)")

    # -- data -----------------------------------------------------------------------------------
    def shard_data(self, k: int) -> ShardData:
        """Retained training rows of shard ``k``, sorted by id."""
        e = self.shard_entry(k)
        path = self.run_dir / e["data"]
        self._check_file(path, e["data_sha256"])
        with np.load(path) as z:
            return ShardData(z["ids"], z["x"], z["y"], z["slices"])

    def test_data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids [M], x [M, *feat], y [M])`` of the held-out split."""
        t = self.manifest["test_data"]
        path = self.run_dir / t["file"]
        self._check_file(path, t["sha256"])
        with np.load(path) as z:
            return z["ids"], z["x"], z["y"]

    # -- checkpoints ----------------------------------------------------------------------------
    def block_template(self) -> PyTree:
        """Abstract ``[R, ...]`` stacked state (computed once: ``eval_shape`` costs ~40 ms)."""
        if self._block_template is None:
            r = self.num_slices
            self._block_template = jax.tree.map(
                lambda s: jax.ShapeDtypeStruct((r, *s.shape), s.dtype),
                self.engine.state_template(),
            )
        return self._block_template

    def restore_block(self, k: int) -> PyTree:
        """Shard ``k``'s stacked states ``[R, ...]`` (row j = after slice j), checksum-verified."""
        return self.store.restore(self.shard_entry(k)["checkpoint"], self.block_template())

    def final_states(self) -> PyTree:
        """Stacked ``[S, ...]`` states after the last slice (numpy).

        Loaded under the shared reader lock from the latest committed generation, so a reader sees
        the models either before or after a concurrent ``forget``, never a mix.
        """
        if self._final is None:
            with self.reader_lock():
                self.reload()
                rows = [unstack_state(self.restore_block(k), -1) for k in range(self.num_shards)]
                self._final = stack_states(rows)
                self._final_manifest = self.manifest
        return self._final

    def final_params(self) -> PyTree:
        return self.final_states().params

    # -- inference ------------------------------------------------------------------------------
    def logits(self, x: np.ndarray) -> np.ndarray:
        """``[S, M, C]`` logits of every constituent model."""
        return self.engine.logits(self.final_params(), np.asarray(x))

    def predict(self, x: np.ndarray, aggregation: str | None = None) -> np.ndarray:
        """Aggregate labels ``[M]`` for ``x`` ``[M, *feat]`` (empty shards drop out)."""
        method = aggregation or self.config.sisa.aggregation
        return agg.aggregate(self.logits(x), method, self.active_shards())

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Mean probability ``[M, C]`` over active shards."""
        return agg.mean_prob(self.logits(x), self.active_shards())

    def evaluate(
        self,
        x: np.ndarray | None = None,
        y: np.ndarray | None = None,
        aggregation: str | None = None,
    ) -> EvalReport:
        """Accuracy per shard and aggregated (both ways); defaults to the run's test split.

        ``aggregation`` names which of the two ``EvalReport.accuracy`` reports (default: the
        run's configured one).
        """
        if x is None or y is None:
            _, x, y = self.test_data()
        logits = self.logits(x)
        active = self.active_shards()
        shard_acc = [
            agg.accuracy(logits[k].argmax(-1), y) if active[k] else float("nan")
            for k in range(self.num_shards)
        ]
        return EvalReport(
            shard_acc,
            agg.accuracy(agg.vote(logits, active), y),
            agg.accuracy(agg.mean_prob(logits, active).argmax(-1), y),
            aggregation or self.config.sisa.aggregation,
            len(y),
            int(active.sum()),
        )

    def retained_dataset(self) -> Dataset:
        """The data this run currently holds (retained training ids + test split) as a Dataset."""
        parts = [self.shard_data(k) for k in range(self.num_shards)]
        ids = np.concatenate([d.ids for d in parts])
        order = np.argsort(ids)
        test_ids, x_test, y_test = self.test_data()
        return Dataset(
            self.manifest["dataset"]["name"],
            ids[order],
            np.concatenate([d.x for d in parts])[order],
            np.concatenate([d.y for d in parts])[order],
            test_ids,
            x_test,
            y_test,
            int(self.manifest["dataset"]["num_classes"]),
        )

    # -- results --------------------------------------------------------------------------------
    def write_result(self, name: str, obj: dict[str, Any]) -> Path:
        path = self.run_dir / "results" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        write_json_atomic(path, obj)
        return path

    # -- committing a new generation ----------------------------------------------------------
    def commit(self, manifest: dict[str, Any]) -> list[str]:
        """Make ``manifest`` live (atomic rename), then delete files no longer referenced.

        Holds the reader lock exclusively, so no reader is mid-load while files go away.
        Returns the removed files (relative paths).
        """
        from sisajax.faults import fault

        with self.reader_lock(exclusive=True):
            write_json_atomic(self.run_dir / MANIFEST, manifest)
            fault("after_commit")
            self.reload()
            return self.collect_garbage()

    def live_files(self) -> set[Path]:
        m = self.manifest
        live = {self.run_dir / m["partition"]["file"], self.run_dir / m["test_data"]["file"]}
        for e in m["shards"].values():
            live.add(self.run_dir / e["data"])
        return live

    def collect_garbage(self) -> list[str]:
        """Delete data, partition and checkpoint files the live manifest does not name."""
        removed = [
            f"checkpoints/{name}"
            for name in self.store.remove_unreferenced(
                {e["checkpoint"]["block"] for e in self.manifest["shards"].values()}
            )
        ]
        live = self.live_files()
        candidates = list(self.run_dir.glob("partition.*")) + list(
            (self.run_dir / "data").iterdir()
        )
        candidates += list(self.run_dir.glob("*.tmp"))
        for p in candidates:
            if p not in live:
                p.unlink()
                removed.append(str(p.relative_to(self.run_dir)))
        fsync_dir(self.run_dir / "data")
        fsync_dir(self.run_dir)
        return removed


def _shard_data_from(partition: Partition, dataset: Dataset, k: int) -> ShardData:
    sel = partition.shard == k
    ids = partition.ids[sel]
    order = np.argsort(dataset.train_ids, kind="stable")
    pos = order[np.searchsorted(dataset.train_ids, ids, sorter=order)]
    return ShardData(ids, dataset.x_train[pos], dataset.y_train[pos], partition.slice[sel])


def write_shard_files(
    run: SisaRun | Path,
    k: int,
    generation: int,
    data: ShardData,
    block: PyTree,
    store: CheckpointStore,
    config_fp: str,
    num_slices: int,
) -> dict[str, Any]:
    """Write shard ``k``'s data copy and checkpoint block; return its manifest entry (not live)."""
    run_dir = run.run_dir if isinstance(run, SisaRun) else run
    rel = f"data/shard_{k:03d}.g{generation:06d}.npz"
    sha = save_npz_atomic(
        run_dir / rel, durable=False, ids=data.ids, x=data.x, y=data.y, slices=data.slices
    )
    n_ids = [int((data.slices <= j).sum()) for j in range(num_slices)]
    fps = [fingerprint_ids(data.ids[data.slices <= j]) for j in range(num_slices)]
    meta = {"generation": generation, "config_fingerprint": config_fp, "n_ids": n_ids}
    # a checkpoint says exactly which ids it was trained on: row j saw ids with slice <= j
    meta.update(fingerprints=fps, ids=data.ids.tolist(), slices=data.slices.tolist())
    ckpt = store.write_block(k, generation, block, meta)
    return {
        "data": rel,
        "data_sha256": sha,
        "checkpoint": ckpt,
        "generation": generation,
        "n_ids": n_ids,
        "fingerprints": fps,
    }


def train(
    config: RunConfig,
    dataset: Dataset,
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: Progress = None,
    partition: Partition | None = None,
    devices: int | None = None,
) -> tuple[SisaRun, CostReport]:
    """Train all S constituent models together, checkpointing every slice of every shard.

    Args:
      config: the run configuration.
      dataset: training ids/features/labels and the held-out split.
      run_dir: a new (or empty) directory; ``overwrite=True`` replaces an existing run.
      progress: optional ``progress(description, total_steps) -> advance(n)`` factory.
      partition: an explicit id -> (shard, slice) assignment (e.g. distribution-aware sharding);
        default: :func:`hash_partition` by ``config.sisa.seed``. Its ids must be exactly the
        dataset's training ids and its shape must match ``config.sisa``.
      devices: how many local devices to spread the shards over (default: all); recorded in the
        manifest so later forgets reproduce the layout.

    Returns:
      (the opened :class:`SisaRun`, its :class:`CostReport`).

    Raises:
      ConfigError, PartitionError, RunError: on invalid input, before anything is written.
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir).absolute()
    sisa = config.sisa
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunError(f"{run_dir} is not empty; pass overwrite=True to replace it")
        if not (run_dir / MANIFEST).is_file():
            raise RunError(f"refusing to overwrite {run_dir}: it is not a sisajax run directory")
    explicit_partition = partition is not None
    if partition is None:
        partition = hash_partition(dataset.train_ids, sisa.shards, sisa.slices, sisa.seed)
    else:
        if (partition.num_shards, partition.num_slices) != (sisa.shards, sisa.slices):
            raise ConfigError(
                f"the partition has {partition.num_shards} shards x {partition.num_slices} slices "
                f"but the config asks for {sisa.shards} x {sisa.slices}"
            )
        if not np.array_equal(partition.ids, np.sort(dataset.train_ids)):
            raise PartitionError("the partition's ids are not the dataset's training ids")
    sizes = partition.sizes()
    empty = np.flatnonzero(sizes.sum(1) == 0)
    if len(empty) and not sisa.allow_empty_shards:
        raise PartitionError(
            f"shards {empty.tolist()} received no training examples "
            f"({len(dataset.train_ids)} ids over {sisa.shards} shards); use fewer shards"
        )
    if sisa.slices > sizes.sum(1).min() and not sisa.allow_empty_shards:
        raise ConfigError(
            f"{sisa.slices} slices but the smallest shard has {sizes.sum(1).min()} examples; "
            "use fewer slices or fewer shards"
        )
    resolved = config.replace(sisa={"shard_exec": resolve_shard_exec(sisa.shard_exec)})
    engine = Engine(
        resolved, dataset.feature_shape, dataset.x_train.dtype, dataset.num_classes, devices=devices
    )
    data = [_shard_data_from(partition, dataset, k) for k in range(sisa.shards)]
    capacity = int(-(-max(len(d) for d in data) // 8) * 8)

    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "data").mkdir(parents=True)
    store = CheckpointStore(run_dir / "checkpoints")

    per_slice: list[PyTree] = []
    starts = stack_states([engine.init_state(k) for k in range(sisa.shards)])
    total_steps = _schedule_steps(sizes, sisa)
    advance = progress("train", total_steps) if progress else None
    final, stats = engine.train_slices(
        list(range(sisa.shards)),
        data,
        starts,
        [0] * sisa.shards,
        capacity=capacity,
        on_slice=lambda j, st: per_slice.append(st),
        progress=advance,
    )
    t_save = time.perf_counter()
    blocks = stack_states(per_slice)  # [R, S, ...]
    fp = resolved.fingerprint()
    shards = {}
    for k in range(sisa.shards):
        block_k = jax.tree.map(lambda a, k=k: a[:, k], blocks)
        shards[str(k)] = write_shard_files(run_dir, k, 0, data[k], block_k, store, fp, sisa.slices)
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
        "layout": engine.layout(),
        "capacity": capacity,
        "dataset": {
            "name": dataset.name,
            "feature_shape": list(dataset.feature_shape),
            "x_dtype": str(dataset.x_train.dtype),
            "num_classes": dataset.num_classes,
            "num_train": len(dataset.train_ids),
            "num_test": len(dataset.test_ids),
        },
        "partition": {
            "file": part_file,
            "sha256": _sha256(run_dir / part_file),
            "kind": "explicit" if explicit_partition else "hash",
        },
        "test_data": {"file": "data/test.npz", "sha256": test_sha},
        "shards": shards,
        "versions": library_versions(),
    }
    write_json_atomic(run_dir / "config.json", resolved.to_dict())
    sync_filesystem(run_dir)
    write_json_atomic(run_dir / MANIFEST, manifest)
    save_s = time.perf_counter() - t_save
    cost = CostReport(
        wall_s=time.perf_counter() - t_start,
        compile_s=stats.compile_s,
        retrain_s=stats.train_s,
        save_s=save_s,
        examples=stats.examples,
        grad_steps=stats.grad_steps,
        shard_slices=stats.shard_slices,
        shards=sisa.shards,
    )
    run = SisaRun(run_dir)
    run.write_result("train", {"cost": cost.to_dict(), "sizes": sizes.tolist()})
    return run, cost


def _schedule_steps(sizes: np.ndarray, sisa: Any, start: np.ndarray | None = None) -> int:
    from sisajax.costs import slice_schedule_cost

    return slice_schedule_cost(sizes, sisa.epochs, sisa.batch_size, start)[1]


def open_run(run_dir: str | Path) -> SisaRun:
    """Open an existing run directory (raises :class:`RunError` if it is not one)."""
    return SisaRun(run_dir)


__all__ = [
    "CheckpointError",
    "EvalReport",
    "RunError",
    "SisaRun",
    "open_run",
    "train",
]
