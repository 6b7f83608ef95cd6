"""Exactness verification: retrain shards from scratch and compare them with the stored checkpoints.

SISA's unlearning claim is that after ``forget`` every stored state is *exactly* the state that
training from scratch on the retained ids would produce. :func:`verify` checks that claim for a run
directory as it is now:

1. It takes the ids the run holds (:meth:`~sisajax.run.SisaRun.retained_dataset`) and recomputes
   their (shard, slice) assignment from scratch with :func:`~sisajax.data.hash_partition` (the
   run's seed), independently of the stored partition and data copies.
2. It retrains the chosen shards from their initial state with the run's engine (same config,
   seeds, ``shard_exec`` and fixed row capacity as ``sj.train``), keeping every slice's state in
   memory.
3. It compares every stored row (``run.read_row(k, j)``; ``run.restore_block(k)`` stacks a
   shard's rows ``[R, ...]``) with the retrained state after the same slice: bit-for-bit, and by
   maximum absolute difference (the useful number on a backend that is not deterministic).
4. It checks that the id fingerprints each row records (in the manifest and in the row file's own
   header) name exactly the retained ids of that (shard, slice prefix).

Bit-identity is promised for training states produced by the same program on the same host
(:mod:`sisajax.host`: jax/jaxlib versions, backend, device kind, CPU ISA features, XLA flags).
When a verified checkpoint was written on another host, a bitwise comparison is not meaningful:
the report says so and compares within a tolerance it reports (``cross_host_tolerance``, or the
given ``atol``). See ``docs/forgetting-evidence.md`` for the conditions and GPU flags.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sisajax import host as host_mod
from sisajax.config import ConfigError, float_value, int_value
from sisajax.data.datasets import Dataset
from sisajax.data.partition import (
    Partition,
    hash_partition,
    prefix_fingerprints,
    validation_mask,
)
from sisajax.engine import ShardData, ShardJob, SliceOutput, stack_states
from sisajax.errors import RunError, UserInputError
from sisajax.planning import library_versions
from sisajax.run import SisaRun
from sisajax.store.manifest import Manifest, row_file
from sisajax.store.rows import RowError, read_row
from sisajax.training import train

CROSS_HOST_TOLERANCE = 1e-3

PyTree = Any


class VerifyError(UserInputError, ValueError):
    """The shards to verify were specified incorrectly."""


def _finite_or_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


@dataclasses.dataclass
class ShardVerification:
    """Verification of one shard's stored block against a from-scratch retrain.

    Attributes:
      shard: shard index ``k``.
      n_ids: retained training ids of the shard (from the from-scratch partition).
      slice_identical: ``[R]`` whether the stored state after slice ``j`` is bit-identical.
      slice_max_abs_diff: ``[R]`` max |stored - retrained| over every leaf of the state after
        slice ``j`` (params, optimizer state and step counter).
      fingerprints_match: ``[R]`` whether the manifest's fingerprint of slice prefix ``j`` names
        exactly the retained ids of that prefix.
      meta_fingerprints_match: the same for the fingerprints stored in the block's own metadata.
      error: why the stored block could not be read (checksum mismatch, missing files), or None.
    """

    shard: int
    n_ids: int
    slice_identical: list[bool]
    slice_max_abs_diff: list[float]
    fingerprints_match: list[bool]
    meta_fingerprints_match: list[bool]
    error: str | None = None

    @property
    def identical(self) -> bool:
        """Every slice's stored state is bit-identical to the retrain."""
        return self.error is None and all(self.slice_identical)

    @property
    def max_abs_diff(self) -> float:
        return max(self.slice_max_abs_diff, default=float("inf"))

    @property
    def fingerprints_ok(self) -> bool:
        return all(self.fingerprints_match) and all(self.meta_fingerprints_match)

    def status(self, atol: float | None = None) -> str:
        """``identical``, ``close`` (within ``atol``), ``differs`` or ``error``."""
        if self.error is not None:
            return "error"
        if self.identical:
            return "identical"
        if atol is not None and self.max_abs_diff <= atol:
            return "close"
        return "differs"

    def to_dict(self, atol: float | None = None) -> dict[str, Any]:
        """Plain JSON-able dict; non-finite differences (not comparable) become None."""
        d = dataclasses.asdict(self)
        d["slice_max_abs_diff"] = [_finite_or_none(v) for v in self.slice_max_abs_diff]
        d.update(
            identical=self.identical,
            max_abs_diff=_finite_or_none(self.max_abs_diff),
            fingerprints_ok=self.fingerprints_ok,
            status=self.status(atol),
        )
        return d


@dataclasses.dataclass
class VerifyReport:
    """Outcome of :func:`verify`.

    Attributes:
      shards: one :class:`ShardVerification` per verified shard.
      generation: the run's generation when verified.
      backend: ``jax.default_backend()`` of this process (``cpu`` is deterministic).
      shard_exec: the run's stored shard execution (``vmap`` or ``map``).
      versions_now / versions_run: library versions of this process and of the run's training;
        bit-identity is only expected when they agree.
      xla_flags: the ``XLA_FLAGS`` environment variable of this process.
      atol: tolerance for the ``close`` status (None: bit-identity required).
      partition_consistent: the stored partition and per-shard data copies hold exactly the
        retained ids, in the reference assignment, none of them forgotten.
      partition_kind: ``hash`` (recomputed from the seed) or ``explicit`` (a run trained with an
        explicit partition; its stored assignment is the reference).
      mode: ``in_memory`` (engine retrain, nothing written) or ``full_train`` (a whole new run
        trained by ``sj.train`` in ``workdir``).
      retrain_s: wall seconds spent retraining (compile included).
      host_now: this process's host id; foreign_hosts: ``{host id: differences}`` of verified
        checkpoints written on other hosts. With any, ``bitwise_meaningful`` is False and shards
        are compared within ``tolerance`` (``atol``, default ``CROSS_HOST_TOLERANCE``).
    """

    shards: list[ShardVerification]
    generation: int
    backend: str
    shard_exec: str
    versions_now: dict[str, str]
    versions_run: dict[str, str]
    xla_flags: str
    atol: float | None
    partition_consistent: bool
    partition_kind: str
    mode: str
    retrain_s: float
    wall_s: float
    host_now: str = ""
    foreign_hosts: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def versions_match(self) -> bool:
        keys = set(self.versions_now) & set(self.versions_run)
        return all(self.versions_now[k] == self.versions_run[k] for k in keys)

    @property
    def bitwise_meaningful(self) -> bool:
        """Every verified checkpoint was written by this host: bits must match exactly."""
        return not self.foreign_hosts

    @property
    def tolerance(self) -> float | None:
        """The max |diff| accepted: ``atol``, or on another host ``CROSS_HOST_TOLERANCE``."""
        if self.atol is not None:
            return self.atol
        return None if self.bitwise_meaningful else CROSS_HOST_TOLERANCE

    @property
    def mismatched_shards(self) -> list[int]:
        """Shards whose checkpoints are not (close to) the from-scratch retrain."""
        tol = self.tolerance
        return [s.shard for s in self.shards if s.status(tol) not in ("identical", "close")]

    @property
    def fingerprint_mismatches(self) -> list[int]:
        return [s.shard for s in self.shards if not s.fingerprints_ok]

    @property
    def ok(self) -> bool:
        """Every verified shard matches, every fingerprint names the retained ids."""
        return (
            not self.mismatched_shards
            and not self.fingerprint_mismatches
            and self.partition_consistent
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shards"] = [s.to_dict(self.tolerance) for s in self.shards]
        d.update(
            ok=self.ok,
            versions_match=self.versions_match,
            mismatched_shards=self.mismatched_shards,
            fingerprint_mismatches=self.fingerprint_mismatches,
            verified_shards=[s.shard for s in self.shards],
            bitwise_meaningful=self.bitwise_meaningful,
            tolerance=self.tolerance,
        )
        return d


def choose_shards(
    num_shards: int, shards: Sequence[int] | None, sample: int | None, seed: int
) -> list[int]:
    """Which shards to verify: ``shards`` (validated), a random ``sample`` of them, or all.

    With both given, ``sample`` shards are drawn from ``shards``. The draw is seeded by ``seed``.
    """
    try:
        seed = int_value(seed, "seed", 0)
        if sample is not None:
            sample = int_value(sample, "sample", 1)
        given = None if shards is None else [int_value(k, "shards", 0) for k in shards]
    except ConfigError as e:
        raise VerifyError(str(e)) from None
    pool = list(range(num_shards)) if given is None else sorted(set(given))
    bad = [k for k in pool if not 0 <= k < num_shards]
    if bad:
        raise VerifyError(f"shards {bad} do not exist (the run has shards 0..{num_shards - 1})")
    if not pool:
        raise VerifyError("no shards to verify")
    if sample is not None:
        if not 1 <= sample <= len(pool):
            raise VerifyError(f"sample must be in 1..{len(pool)}, got {sample}")
        rng = np.random.default_rng(seed)
        pool = sorted(rng.choice(pool, size=sample, replace=False).tolist())
    return pool


@dataclasses.dataclass
class _Snapshot:
    """What verify reads from one committed generation (taken under the run's reader lock)."""

    generation: int
    manifest: Manifest
    dataset: Dataset  # the retained ids (+ test split)
    data: list[ShardData]  # reference per-shard data of a from-scratch run
    partition_kind: str  # "hash" or "explicit"
    consistent: bool
    stored: dict[int, tuple[list[str], list[str], PyTree | None, str | None]]


def _reference_partition(run: SisaRun, ds: Dataset) -> tuple[Partition, str, bool]:
    """The (shard, slice) assignment a from-scratch run on the retained ids would use.

    A run trained with the default hash partition gets it recomputed from (seed, id), independently
    of the stored files. A run trained with an explicit partition (e.g. distribution-aware
    sharding) keeps its stored assignment: ids never move, so that is its from-scratch reference.
    Returns ``(partition, kind, consistent)``; ``consistent`` says the stored partition and the
    stored per-shard data copies agree with it and hold no forgotten id.
    """
    sisa = run.config.sisa
    trainable = ds.train_ids[
        ~validation_mask(ds.train_ids, run.config.data.val_fraction, sisa.seed)
    ]
    hashed = hash_partition(trainable, sisa.shards, sisa.slices, sisa.seed)
    stored = run.partition
    same_ids = np.array_equal(stored.ids, hashed.ids)
    kind = run.manifest.partition_kind
    ref = stored if kind == "explicit" else hashed

    def keys(ids: np.ndarray) -> np.ndarray:
        return run.ledger.removed_keys(ids) if run.config.ledger.hash_ids else ids

    consistent = bool(same_ids and not np.isin(keys(ref.ids), stored.removed).any())
    if run.has_validation:  # a forgotten validation id leaves the stored split too
        consistent = consistent and not np.isin(keys(run.val_data()[0]), stored.removed).any()
    for k in range(sisa.shards):
        d = run.shard_data(k)
        sel = ref.shard == k
        consistent = consistent and bool(
            np.array_equal(d.ids, ref.ids[sel]) and np.array_equal(d.slices, ref.slice[sel])
        )
    return ref, kind, consistent


def _snapshot(run: SisaRun, chosen: list[int]) -> _Snapshot:
    """Read the retained data and the chosen shards' stored checkpoints from one generation."""
    with run.reader_lock():
        run.reload()
        ds = run.retained_dataset()
        if len(np.unique(ds.train_ids)) != len(ds.train_ids):
            raise RunError(f"{run.run_dir}: an id is stored in more than one shard")
        part, kind, consistent = _reference_partition(run, ds)
        pos = np.searchsorted(ds.train_ids, part.ids)  # both sorted: the identity
        data = []
        for k in range(run.num_shards):
            sel = part.shard == k
            data.append(
                ShardData(
                    part.ids[sel], ds.x_train[pos[sel]], ds.y_train[pos[sel]], part.slice[sel]
                )
            )
        stored = {}
        spec = run.row_spec()
        for k in chosen:
            entry = run.manifest.shards[k]
            fps = list(entry.fingerprints)
            block, error, header_fps = None, None, []
            try:
                for j, ref in enumerate(entry.rows):
                    rel = row_file(k, j, ref.generation)
                    header, _ = read_row(run.files.path(rel), ref.sha256, spec, rel)
                    header_fps.append(header.get("ids_fingerprint"))
                block = run.restore_block(k)
            except (RowError, RunError, OSError, ValueError) as e:
                error = str(e)
            stored[k] = (fps, header_fps, block, error)
        return _Snapshot(run.generation, run.manifest, ds, data, kind, consistent, stored)


def retrain_from_scratch(run: SisaRun, shards: list[int], data: list[ShardData]) -> list[PyTree]:
    """Every slice's state of ``shards`` trained from scratch: ``[W]`` stacked ``[R, ...]``."""
    per_slice: list[dict[int, PyTree]] = []

    def keep(out: SliceOutput) -> None:
        per_slice.append(out.fetch())

    jobs = [ShardJob(k, d) for k, d in zip(shards, data, strict=True)]
    run.engine.run(jobs, capacity=run.capacity, on_slice=keep)
    return [stack_states([rows[i] for rows in per_slice]) for i in range(len(shards))]


def _compare_rows(stored: PyTree, fresh: PyTree, r: int) -> tuple[list[bool], list[float]]:
    """Per slice ``j < r``: bit-identity and max |diff| of two ``[R, ...]`` pytrees."""
    ls, ts = jax.tree.flatten(stored)
    lf, tf = jax.tree.flatten(fresh)
    if ts != tf:
        return [False] * r, [float("inf")] * r
    same, diff = [], []
    for j in range(r):
        eq, mx = True, 0.0
        for a, b in zip(ls, lf, strict=True):
            a, b = np.asarray(a[j]), np.asarray(b[j])
            if a.dtype != b.dtype or a.shape != b.shape:
                eq, mx = False, float("inf")
                continue
            eq = eq and a.tobytes() == b.tobytes()
            if a.size:
                a64, b64 = a.astype(np.float64), b.astype(np.float64)
                d = np.where(np.isnan(a64) & np.isnan(b64), 0.0, np.abs(a64 - b64))
                mx = max(mx, float(np.nan_to_num(d, nan=np.inf).max()))
        same.append(eq)
        diff.append(mx)
    return same, diff


def verify(
    run: SisaRun,
    shards: Sequence[int] | None = None,
    sample: int | None = None,
    seed: int = 0,
    workdir: str | Path | None = None,
    *,
    atol: float | None = None,
    write: bool = True,
) -> VerifyReport:
    """Retrain shards from scratch on the retained ids and compare with the stored checkpoints.

    Args:
      run: an open run.
      shards: shard indices to verify (default: all).
      sample: verify a random sample of this many shards (drawn from ``shards`` if given).
      seed: seed of the sample draw.
      workdir: if given, train a complete new run there with ``sj.train`` (all shards, written to
        disk) and compare with it, instead of the in-memory engine retrain of only the chosen
        shards. Slower; an end-to-end cross-check of the in-memory path.
      atol: shards whose max absolute difference is ``<= atol`` count as ``close`` and pass (for
        backends that are not bit-deterministic, or checkpoints from another host). None: bits
        must match on this host; ``CROSS_HOST_TOLERANCE`` for checkpoints of other hosts.
      write: write the report into ``run_dir/results/`` (skipped on a read-only run).

    Returns:
      a :class:`VerifyReport`; ``report.ok`` is False if any verified shard differs (beyond the
      tolerance) or any fingerprint does not name the retained ids.

    Raises:
      VerifyError: bad ``shards`` / ``sample``.
    """
    t0 = time.perf_counter()
    chosen = choose_shards(run.num_shards, shards, sample, seed)
    if atol is not None:
        try:
            atol = float_value(atol, "atol")
        except ConfigError as e:
            raise VerifyError(str(e)) from None
        if atol < 0:
            raise VerifyError(f"atol must be >= 0, got {atol}")
    if workdir is not None:
        wd = Path(workdir).expanduser()
        if wd.is_symlink() or (wd.exists() and (not wd.is_dir() or any(wd.iterdir()))):
            raise VerifyError(
                f"workdir {workdir} must be a new or empty folder: verify compares, it never "
                "trains over a run (this one or another)"
            )
    snap = _snapshot(run, chosen)
    r = run.num_slices

    t_train = time.perf_counter()
    if workdir is None:
        fresh_list = retrain_from_scratch(run, chosen, [snap.data[k] for k in chosen])
        fresh = dict(zip(chosen, fresh_list, strict=True))
        mode = "in_memory"
    else:
        ids = np.concatenate([d.ids for d in snap.data])
        shard_of = np.concatenate([np.full(len(d), k, np.int32) for k, d in enumerate(snap.data)])
        slice_of = np.concatenate([d.slices for d in snap.data])
        order = np.argsort(ids)
        ref_part = Partition(
            ids[order], shard_of[order], slice_of[order], run.num_shards, run.num_slices
        )
        ref, _ = train(
            run.config,
            snap.dataset,
            workdir,
            partition=ref_part,
            plugins=list(run.manifest.plugins),
            metrics=False,
        )
        fresh = {k: ref.restore_block(k) for k in chosen}
        mode = "full_train"
    retrain_s = time.perf_counter() - t_train

    results = []
    for k in chosen:
        d = snap.data[k]
        expected = prefix_fingerprints(d.ids, d.slices, r)
        fps, header_fps, block, error = snap.stored[k]
        fp_ok = [j < len(fps) and fps[j] == expected[j] for j in range(r)]
        meta_ok = [j < len(header_fps) and header_fps[j] == expected[j] for j in range(r)]
        if block is None:
            same, diff = [False] * r, [float("inf")] * r
        else:
            same, diff = _compare_rows(block, fresh[k], r)
        results.append(ShardVerification(k, len(d), same, diff, fp_ok, meta_ok, error))

    here, _ = host_mod.current()
    report = VerifyReport(
        shards=results,
        generation=snap.generation,
        backend=jax.default_backend(),
        shard_exec=snap.manifest.layout.get("shard_exec", ""),
        versions_now=library_versions(),
        versions_run=dict(snap.manifest.versions),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        atol=atol,
        partition_consistent=snap.consistent,
        partition_kind=snap.partition_kind,
        mode=mode,
        retrain_s=retrain_s,
        wall_s=time.perf_counter() - t0,
        host_now=here,
        foreign_hosts=run.foreign_hosts(chosen),
    )
    if write:
        run.write_result("verify", report.to_dict())
    return report


__all__ = [
    "CROSS_HOST_TOLERANCE",
    "ShardVerification",
    "VerifyError",
    "VerifyReport",
    "choose_shards",
    "retrain_from_scratch",
    "verify",
]
