"""Planning, before anything is written: what a training trains and what a forget retrains.

:func:`plan_training` checks a configuration against its data (partition, validation split,
engine, per-shard data, row capacity) and :func:`make_manifest` is the one place a freshly
trained generation's manifest is built. :func:`plan_forget` is pure: ids -> which shards restart
at which slice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import jax
import numpy as np

from sisajax.config import ConfigError, RunConfig
from sisajax.data.datasets import Dataset
from sisajax.data.partition import (
    Partition,
    PartitionError,
    hash_partition,
    validation_mask,
)
from sisajax.data.schedule import steps_for
from sisajax.engine import Engine, ShardData
from sisajax.errors import UserInputError
from sisajax.layout import resolve_shard_exec
from sisajax.plugins import source_hashes
from sisajax.step import resolve_chunk_steps, resolve_trip
from sisajax.store.interrupted import data_fingerprint
from sisajax.store.manifest import (
    DatasetInfo,
    FileRef,
    Manifest,
    ShardEntry,
)


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
            "use fewer slices or fewer shards (or sisa.allow_empty_shards=true, which also "
            "trains shards with empty slices, as deletions can leave them)"
        )


def check_training_inputs(config: Any, dataset: Any, partition: Any = None) -> None:
    """The types of a training's inputs, before anything reads them.

    Raises:
      ConfigError: ``config`` is not a :class:`RunConfig`.
      UserInputError: ``dataset`` is not a :class:`Dataset`, or ``partition`` neither a
        :class:`Partition` nor None.
    """
    if not isinstance(config, RunConfig):
        raise ConfigError(
            f"config must be a RunConfig (RunConfig.from_dict builds one from a mapping), got "
            f"{type(config).__name__}"
        )
    if not isinstance(dataset, Dataset):
        raise UserInputError(
            f"dataset must be a sisajax Dataset (sisajax.load_dataset loads one), got "
            f"{type(dataset).__name__}"
        )
    if partition is not None and not isinstance(partition, Partition):
        raise UserInputError(
            f"partition must be a Partition or None, got {type(partition).__name__}"
        )


def check_unroll(sisa: Any, trip: str) -> None:
    """Refuse ``sisa.unroll > 1`` with a ``dynamic`` chunk loop (``trip``: the resolved
    ``sisa.chunk_trip``), which runs one step per loop iteration: the option would change the
    fingerprint and the chunk size without changing the program."""
    if trip == "dynamic" and sisa.unroll > 1:
        chosen = "dynamic" if sisa.chunk_trip == "dynamic" else f"{sisa.chunk_trip}, here dynamic"
        raise ConfigError(
            f"sisa.unroll={sisa.unroll} needs a static chunk loop, but sisa.chunk_trip is "
            f"{chosen} (its loop runs one step per iteration); set sisa.unroll=1 or "
            "sisa.chunk_trip=static"
        )


# The most host memory the batch schedule of one slice step may take (its rows, masks and
# labels, cut into chunks for every shard position of the program): far above what real runs
# need (one model trained 90 epochs over 1.3M examples at batch 256 takes about 3.3 GiB), and a
# clear error instead of an allocation failure for an epoch count or batch size that cannot be
# meant.
MAX_SCHEDULE_BYTES = 8 * 2**30
_SCHEDULE_BYTES_PER_INDEX = 5 + 16  # each shard's rows and mask, and the copy's temporaries
_CHUNK_BYTES_PER_INDEX = 9  # rows, mask and labels of every chunk of every position


def check_schedule_size(config: RunConfig, sizes: list[int], width: int, chunk_steps: int) -> None:
    """Refuse a plan whose batch schedule for one slice step would not fit
    :data:`MAX_SCHEDULE_BYTES` of host memory, before anything is allocated.

    Args:
      config: the run configuration.
      sizes: ``[S]`` training ids per shard (the last slice step trains on all of them, the
        largest prefix).
      width: shard positions of the training program.
      chunk_steps: the resolved ``sisa.chunk_steps``.

    Raises:
      ConfigError: the schedule would need more; says how many steps and bytes.
    """
    sisa = config.sisa
    b = sisa.batch_size
    epochs = sisa.epochs_per_slice_step
    steps: list[float] = []
    for n in sizes:
        per_epoch = -(-n // b) if n > 0 else 0
        raw = epochs * per_epoch
        # steps_for rounds a product it can hold exactly; beyond 2**52 the plan is far too big
        steps.append(steps_for(n, epochs, b) if raw < 2**52 else raw)
    longest = max(steps, default=0)
    total = sum(steps)
    padded = math.ceil(longest / chunk_steps) * chunk_steps if math.isfinite(longest) else longest
    need = b * (_SCHEDULE_BYTES_PER_INDEX * total + _CHUNK_BYTES_PER_INDEX * width * padded)
    if need > MAX_SCHEDULE_BYTES:
        raise ConfigError(
            f"sisa.epochs={sisa.epochs:g} at sisa.batch_size={b} plans {_count(longest)} gradient "
            f"steps in the longest slice step of a shard ({_count(total)} over {len(sizes)} "
            f"shards), whose batch schedule needs about {_bytes(need)} of host memory, more than "
            f"the {_bytes(MAX_SCHEDULE_BYTES)} allowed; lower sisa.epochs, sisa.batch_size or "
            "sisa.chunk_steps"
        )


def _count(n: float) -> str:
    if not math.isfinite(n):
        return "more than 1e308"
    return f"{int(n):,}" if n < 1e15 else f"{n:.3g}"


def _bytes(n: float) -> str:
    if not math.isfinite(n):
        return "more than 1e308 bytes"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


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
      config: the run configuration (``shard_exec``, ``chunk_trip`` and ``chunk_steps``
        resolved here).
      dataset: the data to train on (forgotten ids already excluded).
      partition: an explicit partition or None for the hash partition.
      devices: local devices to use (None: all).
      removed: tombstones (forgotten ids or their keys) carried into the new partition.
    """
    check_training_inputs(config, dataset, partition)
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
    trip = resolve_trip(sisa.chunk_trip, shard_exec)
    check_unroll(sisa, trip)
    chunk_steps = resolve_chunk_steps(sisa.chunk_steps, trip, sisa.unroll)
    resolved = config.replace(
        sisa={"shard_exec": shard_exec, "chunk_trip": trip, "chunk_steps": chunk_steps}
    )
    engine = build_engine(resolved, dataset, devices)
    check_schedule_size(config, partition.sizes().sum(1).tolist(), engine.vmap_width, chunk_steps)
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


def plan_fingerprint(plan: TrainingPlan) -> str:
    """sha256 of exactly what the shards of ``plan`` train on (ids, (shard, slice) of each, the
    rows' features and labels, the input map the model applies to them, the number of classes)
    and of the validation and test ids."""
    part = plan.partition
    arrays = [part.ids, part.shard, part.slice]
    for d in plan.data:
        arrays += [d.x, d.y]
    ds = plan.dataset
    recipe = json.dumps(
        {"preprocessing": ds.preprocessing, "num_classes": int(ds.num_classes)},
        sort_keys=True,
        default=str,
    )
    arrays.append(np.frombuffer(recipe.encode(), np.uint8))
    return data_fingerprint(*arrays, plan.validation[0], ds.test_ids)


class ForgetError(PartitionError):
    """A forget request is malformed or names ids that cannot be forgotten (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class ForgetPlan:
    """What a forget request will retrain.

    Attributes:
      ids: ``[K]`` sorted ids to forget now.
      already_forgotten: ids that were forgotten before (nothing to do for them).
      restart: ``{shard: first slice to retrain}`` for every affected shard.
      locations: ``{id: (shard, slice)}`` of every id to forget that a shard trained on.
      validation: ``[V]`` sorted ids among ``ids`` that belong to the run's validation split
        (never trained on: they leave its copy of the split, nothing is retrained for them).
    """

    ids: np.ndarray
    already_forgotten: np.ndarray
    restart: dict[int, int]
    locations: dict[int, tuple[int, int]]
    validation: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def trained(self) -> np.ndarray:
        """``[K - V]`` the ids to forget that shards trained on."""
        return self.ids[~np.isin(self.ids, self.validation)]

    @property
    def is_noop(self) -> bool:
        return len(self.ids) == 0


def normalise_ids(ids: Any) -> np.ndarray:
    """Validate a user's id list: a flat list of integers, no duplicates. Returns ``[K]`` int64.

    Accepts a list, tuple, range or 1-D integer array. Floats (even ``45.0``), booleans, strings
    and nested lists are refused: an id is an integer.
    """
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ForgetError(f"ids must be a flat array of integers, got {ids.dtype} {ids.shape}")
        if ids.dtype.kind == "u" and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
            raise ForgetError("ids must fit in 64-bit integers")  # not wrapped to negatives
        out = ids.astype(np.int64)
    elif isinstance(ids, list | tuple | range):
        bad = [v for v in ids if isinstance(v, bool) or not isinstance(v, int | np.integer)]
        if bad:
            raise ForgetError(
                f"ids must be integers; {len(bad)} value(s) are not (e.g. of type "
                f"{type(bad[0]).__name__})"
            )
        try:
            out = np.array([int(v) for v in ids], dtype=np.int64)
        except OverflowError:
            raise ForgetError("ids must fit in 64-bit integers") from None
    else:
        raise ForgetError(f"ids must be a list of integers, got {type(ids).__name__}")
    if out.size == 0:
        raise ForgetError("no ids given")
    uniq, counts = np.unique(out, return_counts=True)
    if (counts > 1).any():
        raise ForgetError(f"{int((counts > 1).sum())} id(s) appear more than once in one request")
    return out


_INT_TOKEN = re.compile(r"-?[0-9]{1,19}")


def parse_id_token(token: str) -> int | None:
    """The integer an id token of a text request or ids file spells (ASCII digits, optional
    minus sign, within 64 bits), or None: other digits (``'²'``, ``'٣'``), signs and words are
    not ids."""
    if not _INT_TOKEN.fullmatch(token):
        return None
    v = int(token)
    return v if -(2**63) <= v < 2**63 else None


def plan_forget(
    partition: Partition,
    ids: Any,
    test_ids: np.ndarray | None = None,
    removed_keys: np.ndarray | None = None,
    *,
    redact: bool = False,
    val_ids: np.ndarray | None = None,
) -> ForgetPlan:
    """Pure planning: which shards restart at which slice for forgetting ``ids``.

    Args:
      partition: the run's partition.
      ids: the ids to forget.
      test_ids: the run's held-out ids (never training ids).
      removed_keys: how ``ids`` appear in ``partition.removed`` (default: the ids themselves;
        salted hashes for runs with ``ledger.hash_ids``).
      redact: name no id in error messages (``ledger.hash_ids``).
      val_ids: the run's validation ids (training ids held out of every shard), if any.

    Raises:
      ForgetError: malformed ids, duplicates, test ids, or ids that were never training ids.
    """
    arr = normalise_ids(ids)
    keys = arr if removed_keys is None else np.asarray(removed_keys, np.int64)

    def name(bad: np.ndarray) -> str:
        return f"{len(bad)} id(s)" if redact else f"ids {bad.tolist()[:20]}"

    if test_ids is not None:
        bad = arr[np.isin(arr, test_ids)]
        if bad.size:
            raise ForgetError(f"{name(bad)} belong to the test split, not the training set")
    gone = np.isin(keys, partition.removed)
    already, todo = np.sort(arr[gone]), np.sort(arr[~gone])
    held_out = np.isin(todo, val_ids) if val_ids is not None else np.zeros(len(todo), bool)
    trained = todo[~held_out]
    unknown = trained[~partition.contains(trained)]
    if unknown.size:
        raise ForgetError(f"{name(unknown)} are not training ids of this run")
    restart: dict[int, int] = {}
    locations = {}
    if trained.size:
        shards, slices = partition.locate(trained)
        for i, k, j in zip(trained.tolist(), shards.tolist(), slices.tolist(), strict=True):
            locations[i] = (k, j)
            restart[k] = min(restart.get(k, j), j)
    return ForgetPlan(todo, already, dict(sorted(restart.items())), locations, todo[held_out])


__all__ = [
    "ForgetError",
    "ForgetPlan",
    "TrainingPlan",
    "build_engine",
    "check_partition",
    "check_schedule_size",
    "check_training_inputs",
    "check_unroll",
    "library_versions",
    "make_manifest",
    "normalise_ids",
    "parse_id_token",
    "plan_fingerprint",
    "plan_forget",
    "plan_training",
    "shard_data_from",
]
