"""A SISA run on disk: open it, read its checkpoints, predict and evaluate with it.

Training a run is :func:`sisajax.training.train`; forgetting is :func:`sisajax.unlearning.forget`.
A :class:`SisaRun` is a cheap handle: it reads the manifest and loads data and checkpoints lazily,
every file checked against the checksum the manifest records and opened without following links.
Readers (``predict``, ``evaluate``) load under the shared reader lock and see one whole
generation; they also work on a read-only run directory.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sisajax import aggregation as agg
from sisajax import host as host_mod
from sisajax.aggregation import EvalReport
from sisajax.config import ConfigError, RunConfig
from sisajax.data.datasets import Dataset
from sisajax.data.partition import Partition, prefix_fingerprints
from sisajax.engine import Engine, LayoutError, ShardData, TrainState, stack_states
from sisajax.errors import RunError, UserInputError
from sisajax.layout import layout_options
from sisajax.models import BUILTIN_MODELS
from sisajax.plugins import check_sources
from sisajax.store.files import read_bytes, sha256_file
from sisajax.store.ledger import Ledger
from sisajax.store.locks import reader_lock, writer_lock
from sisajax.store.manifest import FileRef, Manifest, row_file
from sisajax.store.rows import leaf_spec, read_row
from sisajax.store.run_dir import RunDir

PyTree = Any


class HostWarning(UserWarning):
    """Rows of a run come from a host other than this one (bits may not be reproducible)."""


def load_npz(path: Path, sha256: str | None) -> dict[str, np.ndarray]:
    """Read an ``.npz`` of the run, checking its checksum first (no pickles, no links)."""
    try:
        buf = read_bytes(path)
    except FileNotFoundError:
        raise RunError(f"{path.name} is missing") from None
    import hashlib

    if sha256 is not None and hashlib.sha256(buf).hexdigest() != sha256:
        raise RunError(f"{path.name} is corrupt (checksum mismatch)")
    try:
        with np.load(io.BytesIO(buf), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError):
        raise RunError(f"{path.name} is not a readable .npz file") from None


class SisaRun:
    """Handle on a run directory (see :mod:`sisajax.store.run_dir` for the layout).

    Raises:
      NotARunError: not a run directory (or one of another schema).
      UnsafeRunError: a managed path is a symbolic link.
      ManifestError: a malformed manifest.
    """

    def __init__(self, run_dir: str | Path):
        self.files = RunDir(run_dir)
        self.run_dir = self.files.root
        self._engine: Engine | None = None
        self._engine_built_for = ""
        self._layout_error: LayoutError | None = None
        self._ledger: tuple[Any, Ledger] | None = None
        self._files_cache: dict[str, Any] = {}  # sha256 -> parsed small file (test ids, ...)
        self._stamp: tuple[int, int, int] | None = None
        self._plugins_warned: set[str] = set()
        self.reload()

    def adopt(self, manifest: Manifest) -> None:
        """Make ``manifest`` (just committed by this process) the handle's current one without
        reading it back; cached files stay valid by checksum."""
        self.manifest = manifest
        self._stamp = self.files.manifest_stamp()
        self._partition = None
        self._final = None
        self._final_manifest = None
        self._drop_stale_engine()

    def _engine_basis(self) -> str:
        """What this handle's engine is built from: the run's configuration, data set shape and
        device layout, as the manifest records them."""
        m = self.manifest
        return json.dumps(
            [m.config, dataclasses.asdict(m.dataset), m.layout, len(m.shards)],
            sort_keys=True,
            default=str,
        )

    def _drop_stale_engine(self) -> None:
        """Forget the engine when the run it was built for changed under this handle (another
        writer retrained it in place with another recipe): programs of the old recipe must never
        retrain the new one."""
        if self._engine is not None and self._engine_built_for != self._engine_basis():
            self._engine = None
            self._layout_error = None

    def reload(self) -> None:
        """Re-read the manifest (another process may have switched generations).

        Raises:
          UnsafeRunError: a file the manifest names is a symbolic link (a run is refused whole:
            sisajax never reads, writes or deletes through links).
        """
        stamp = self.files.manifest_stamp()
        if stamp is None or stamp != self._stamp or not hasattr(self, "manifest"):
            self.manifest: Manifest = self.files.read_manifest()
            self._stamp = stamp
        self.files.check_no_links(self.manifest.files())
        cfg = self.manifest.config
        if "val_fraction" not in (cfg.get("data") or {}):  # runs from before validation splits
            cfg = {**cfg, "data": {**(cfg.get("data") or {}), "val_fraction": 0.0}}
        self.config = RunConfig.from_dict(cfg)
        self._partition: Partition | None = None
        self._final: PyTree | None = None
        self._final_manifest: Manifest | None = None
        self._drop_stale_engine()

    # -- locks and ledger ---------------------------------------------------------------------
    def writer_lock(self, timeout_s: float | None = None, *, replays: bool = True):
        """The run's writer lock, waiting up to ``timeout_s`` (default ``ledger.lock_timeout_s``).

        ``replays``: the writer retrains slices the way training did (forget, resume, serve), so
        the plug-ins must be the code the run was trained with (:meth:`check_plugins`); a retrain
        from scratch passes False.

        Raises:
          ConfigError: a timeout that is not a number >= 0.
          PluginChangedError: ``replays`` and a plug-in's source changed since training.
        """
        from sisajax.config import ConfigError

        t = self.config.ledger.lock_timeout_s if timeout_s is None else timeout_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not t >= 0:
            raise ConfigError(f"lock_timeout_s must be a number >= 0, got {t!r}")
        if replays:
            self.check_plugins(writing=True)
        return writer_lock(self.run_dir, t)

    def check_plugins(self, *, writing: bool) -> None:
        """Compare the imported plug-ins' sources with the hashes the run recorded when trained:
        a changed one is refused when ``writing`` (unless ``SISAJAX_ALLOW_PLUGIN_CHANGE=1``),
        otherwise warned about once per handle (:func:`sisajax.plugins.check_sources`).

        Raises:
          PluginChangedError: ``writing`` and a plug-in's source hash differs.
        """
        check_sources(
            self.manifest.plugin_sources,
            writing=writing,
            warned=self._plugins_warned,
            require_imported=self.config.model.name not in BUILTIN_MODELS,
        )

    def reader_lock(self, exclusive: bool = False):
        return reader_lock(self.run_dir, self.config.ledger.lock_timeout_s, exclusive=exclusive)

    @property
    def ledger(self) -> Ledger:
        """The run's ledger (one object per run handle: it caches what it has read and verified
        while the files are unchanged; :meth:`fresh_ledger` reads from scratch)."""
        lc = self.config.ledger
        key = (lc.hash_ids, lc.salt_file)
        if self._ledger is None or self._ledger[0] != key:
            self._ledger = (key, Ledger(self.run_dir, hash_ids=lc.hash_ids, salt_file=lc.salt_file))
        return self._ledger[1]

    def fresh_ledger(self) -> Ledger:
        """A new ledger object (no cached reads: what audits use)."""
        lc = self.config.ledger
        return Ledger(self.run_dir, hash_ids=lc.hash_ids, salt_file=lc.salt_file)

    # -- basic facts ----------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return self.config.sisa.shards

    @property
    def num_slices(self) -> int:
        return self.config.sisa.slices

    @property
    def generation(self) -> int:
        return self.manifest.generation

    @property
    def capacity(self) -> int:
        return self.manifest.capacity

    @property
    def partition(self) -> Partition:
        if self._partition is None:
            ref = self.manifest.partition
            cached = self._cached(ref.sha256)
            if cached is None:
                path = self.files.path(ref.path)
                if not path.is_file():
                    raise RunError(f"{ref.path} is missing")
                if sha256_file(path) != ref.sha256:
                    raise RunError(f"{ref.path} is corrupt (checksum mismatch)")
                cached = Partition.load(path)
                self._remember(ref.sha256, cached)
            self._partition = cached
        return self._partition

    def _cached(self, sha: str) -> Any:
        """A parsed file kept by :meth:`_remember` (now the most recently used), or None."""
        obj = self._files_cache.pop(sha, None)
        if obj is not None:
            self._files_cache[sha] = obj
        return obj

    def _remember(self, sha: str, obj: Any) -> None:
        """Keep a parsed file by checksum (a few: the partition and the held-out splits), the
        least recently used going first: every forget adopts a new partition, and the test split
        it reads each time must outlive them."""
        self._files_cache.pop(sha, None)
        if len(self._files_cache) >= 4:
            self._files_cache.pop(next(iter(self._files_cache)))
        self._files_cache[sha] = obj

    def adopt_partition(self, partition: Partition, sha256: str) -> None:
        """Tell the handle the partition it just wrote (so it is not read back)."""
        self._remember(sha256, partition)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine_built_for = self._engine_basis()
            self.check_plugins(writing=False)  # where a run's plug-in code is first used
            ds = self.manifest.dataset
            cfg = self.config
            args = (cfg, ds.feature_shape, np.dtype(ds.x_dtype), ds.num_classes)
            kw = {"preprocessing": ds.preprocessing, "vmap_width": self.num_shards}
            try:
                try:
                    opts = layout_options(self.manifest.layout)
                    self._engine = Engine(*args, **opts, **kw)
                except LayoutError as e:
                    # predict/evaluate still work on any layout; forget/verify must refuse
                    self._layout_error = e
                    self._engine = Engine(*args, **kw)
            except ConfigError as e:
                if self.manifest.plugins and "unknown model" in str(e):
                    raise ConfigError(
                        f"{e}. This run was trained with plugins {list(self.manifest.plugins)}: "
                        "name them with plugins=[...] (a run directory never imports code by "
                        "itself)"
                    ) from None
                raise
        return self._engine

    def check_layout(self) -> None:
        """Raise :class:`LayoutError` unless this process can reproduce the run's device layout."""
        _ = self.engine
        if self._layout_error is not None:
            raise self._layout_error

    def active_shards(self) -> np.ndarray:
        """``[S]`` bool: shards that still hold training data (the others drop out)."""
        m = self._final_manifest or self.manifest
        return np.array([e.active for e in m.shards])

    # -- hosts ----------------------------------------------------------------------------------
    def row_hosts(self, shards: list[int] | None = None) -> set[str]:
        """Host ids that produced the live rows of ``shards`` (default: all)."""
        ks = range(self.num_shards) if shards is None else shards
        return {r.host for k in ks for r in self.manifest.shards[k].rows}

    def foreign_hosts(self, shards: list[int] | None = None) -> dict[str, list[str]]:
        """``{host id: differences from this host}`` of live rows made on other hosts."""
        here_id, here = host_mod.current()
        out = {}
        for h in sorted(self.row_hosts(shards) - {here_id}):
            info = self.manifest.hosts.get(h, {})
            out[h] = host_mod.differences(info, here) or ["unknown host"]
        return out

    # -- data -----------------------------------------------------------------------------------
    def _npz(self, ref: FileRef) -> dict[str, np.ndarray]:
        return load_npz(self.files.path(ref.path), ref.sha256)

    def _split(self, ref: FileRef) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, x, y)`` of a held-out split's file, checksum-verified once and then kept."""
        z = self._cached(ref.sha256)
        if z is None:
            z = self._npz(ref)
            self._remember(ref.sha256, z)
        return z["ids"], z["x"], z["y"]

    def shard_data(self, k: int) -> ShardData:
        """Retained training rows of shard ``k``, sorted by id (checksum-verified)."""
        z = self._npz(self.manifest.shards[k].data)
        return ShardData(z["ids"], z["x"], z["y"], z["slices"])

    def test_data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids [M], x [M, *feat], y [M])`` of the held-out split (checksum-verified once)."""
        return self._split(self.manifest.test_data)

    @property
    def has_validation(self) -> bool:
        """Whether the run holds a validation split (``data.val_fraction > 0``)."""
        return self.manifest.val_data is not None

    def val_data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids [V], x [V, *feat], y [V])`` of the validation split: training ids held out of
        every shard (checksum-verified once).

        Raises:
          RunError: the run has no validation split (trained with ``data.val_fraction=0``).
        """
        ref = self.manifest.val_data
        if ref is None:
            raise RunError(
                f"{self.run_dir} has no validation split (trained with data.val_fraction=0 or by "
                "an older sisajax); retrain it with data.val_fraction > 0"
            )
        return self._split(ref)

    # -- checkpoints ----------------------------------------------------------------------------
    def row_spec(self) -> list[list[Any]]:
        leaves = jax.tree.leaves(self.engine.state_template())
        return leaf_spec(self.engine.leaf_paths(), [np.zeros(x.shape, x.dtype) for x in leaves])

    def read_row(self, k: int, j: int) -> PyTree:
        """The state of shard ``k`` after slice ``j`` (one shard, numpy), checksum-verified."""
        ref = self.manifest.shards[k].rows[j]
        rel = row_file(k, j, ref.generation)
        _, leaves = read_row(self.files.path(rel), ref.sha256, self.row_spec(), rel)
        treedef = jax.tree.structure(self.engine.state_template())
        return jax.tree.unflatten(treedef, [np.array(x) for x in leaves])

    def check_shard(self, k: int, data: ShardData, upto: int) -> PyTree | None:
        """Check what a request reads and keeps of shard ``k`` before anything is written: its
        data copy ``data`` (already checksum-verified) holds the partition's ids, and each row
        ``0..upto-1`` is intact (checksum, state layout) and is the row the manifest means: its
        header names this shard, slice and generation and the training ids of the data copy's
        slice prefix.

        Returns:
          the state after slice ``upto - 1`` (one shard, numpy; what a retrain from slice
          ``upto`` starts from), or None when ``upto`` is 0.

        Raises:
          RunError: a file fails its checksum or was swapped for another row (one line).
        """
        leaves = self.check_rows(k, data, upto)
        if upto == 0:
            return None
        treedef = jax.tree.structure(self.engine.state_template())
        return jax.tree.unflatten(treedef, [np.array(x) for x in leaves])

    def check_rows(
        self, k: int, data: ShardData | None = None, upto: int | None = None
    ) -> list[np.ndarray]:
        """The checks of :meth:`check_shard` on rows ``0..upto-1`` of shard ``k`` (default: every
        live row; ``data`` default: the shard's stored data copy), without building a state.

        Returns:
          the leaves of row ``upto - 1`` (empty when ``upto`` is 0).

        Raises:
          RunError / RowError: a file fails its checksum or was swapped for another row.
        """
        entry = self.manifest.shards[k]
        data = self.shard_data(k) if data is None else data
        upto = len(entry.rows) if upto is None else upto
        leaves: list[np.ndarray] = []
        if not np.array_equal(data.ids, self.partition.shard_ids(k)):
            raise RunError(
                f"shard {k}: its data copy and the partition disagree; run `sisajax audit`"
            )
        spec = self.row_spec()
        fps = prefix_fingerprints(data.ids, data.slices, upto)
        for j in range(upto):
            ref = entry.rows[j]
            rel = row_file(k, j, ref.generation)
            header, leaves = read_row(self.files.path(rel), ref.sha256, spec, rel)
            want = {"shard": k, "slice": j, "generation": ref.generation}
            got = {key: header.get(key) for key in want}
            recorded = {header.get("ids_fingerprint"), entry.fingerprints[j], fps[j]}
            if got != want or len(recorded) != 1:
                raise RunError(
                    f"checkpoint {rel} is not the row the manifest names (its header or training "
                    "ids differ); run `sisajax audit`"
                )
        return leaves

    def restore_block(self, k: int) -> PyTree:
        """Shard ``k``'s stacked states ``[R, ...]`` (row ``j`` = after slice ``j``)."""
        return stack_states([self.read_row(k, j) for j in range(self.num_slices)])

    def final_states(self) -> TrainState:
        """Stacked ``[S, ...]`` states after the last slice (numpy), from one generation."""
        if self._final is None:
            with self.reader_lock():
                self.reload()
                rows = [self.read_row(k, self.num_slices - 1) for k in range(self.num_shards)]
                self._final = stack_states(rows)
                self._final_manifest = self.manifest
        return self._final

    def final_params(self) -> PyTree:
        return self.final_states().params

    # -- inference ------------------------------------------------------------------------------
    def logits(self, x: np.ndarray) -> np.ndarray:
        """``[S, M, C]`` logits of every constituent model (averaged weights when configured)."""
        return self.engine.logits(self.final_states(), np.asarray(x))

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
        *,
        split: str = "test",
    ) -> EvalReport:
        """Accuracy per shard and aggregated (both ways) on ``x, y``, or on the run's ``split``:
        ``test`` (the held-out split, for reporting) or ``val`` (the validation split, for
        choosing recipes and hyperparameters).

        ``aggregation`` names which of the two ``EvalReport.accuracy`` reports.
        """
        method = aggregation or self.config.sisa.aggregation
        agg.check_method(method)
        if split not in ("test", "val"):
            raise UserInputError(f"split must be test or val, got {split!r}")
        if x is None or y is None:
            _, x, y = self.val_data() if split == "val" else self.test_data()
            if len(y) == 0:
                raise RunError(f"the run's {split} split is empty (every id of it was forgotten)")
        return agg.eval_report(self.logits(x), np.asarray(y), self.active_shards(), method)

    def retained_dataset(self) -> Dataset:
        """The data this run currently holds as a Dataset: its retained training ids, those of
        its validation split among them (training with this run's seed and ``val_fraction``
        carves the same split again), and the test split."""
        parts = [self.shard_data(k) for k in range(self.num_shards)]
        ids = [d.ids for d in parts]
        xs = [d.x for d in parts]
        ys = [d.y for d in parts]
        if self.has_validation:
            v_ids, v_x, v_y = self.val_data()
            ids, xs, ys = ids + [v_ids], xs + [v_x], ys + [v_y]
        ids = np.concatenate(ids)
        order = np.argsort(ids)
        test_ids, x_test, y_test = self.test_data()
        ds = self.manifest.dataset
        return Dataset(
            ds.name,
            ids[order],
            np.concatenate(xs)[order],
            np.concatenate(ys)[order],
            test_ids,
            x_test,
            y_test,
            ds.num_classes,
            dict(ds.preprocessing),
        )

    # -- results --------------------------------------------------------------------------------
    def write_result(self, name: str, obj: dict[str, Any]) -> Path | None:
        """Write ``results/<name>-<time>-<pid>.json`` (never replacing a file); None when the run
        directory is read-only."""
        return self.files.write_result(name, obj)

    def export(self, path: str | Path, *, all_slices: bool = False) -> Path:
        """Write this generation's states as a standard Orbax checkpoint at ``path``.

        Args:
          path: a new directory.
          all_slices: every (shard, slice) state as ``[S, R, ...]``; default the final states
            ``[S, ...]`` (what prediction uses).

        Returns:
          the checkpoint path (restore with ``orbax.checkpoint.StandardCheckpointer().restore``).
        """
        from sisajax.store.checkpoint_orbax import save_pytree

        with self.reader_lock():
            self.reload()
            if all_slices:
                tree = stack_states([self.restore_block(k) for k in range(self.num_shards)])
            else:
                tree = self.final_states()
        return save_pytree(Path(path), tree._asdict() if isinstance(tree, TrainState) else tree)

    def warn_foreign_hosts(self, shards: list[int] | None, action: str) -> list[str]:
        """Warn (and return the lines) when rows of ``shards`` were made on another host."""
        lines = [
            f"rows of this run were made on another host {h} ({'; '.join(d)}): {action}"
            for h, d in self.foreign_hosts(shards).items()
        ]
        for line in lines:
            warnings.warn(line, HostWarning, stacklevel=3)
        return lines


def open_run(run_dir: str | Path) -> SisaRun:
    """Open an existing run directory."""
    return SisaRun(run_dir)


__all__ = ["EvalReport", "HostWarning", "RunError", "SisaRun", "open_run"]
