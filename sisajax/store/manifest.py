"""The run manifest: which files make up the live generation of a run, typed and validated.

``MANIFEST.json`` names every file a run depends on, with its sha256 and size; switching a run to a
new generation is one atomic rename of this file. It is built in one place
(:meth:`Manifest.to_json` / :func:`load_manifest`), carries a schema version, and is validated
field by field when read, so a garbage or hand-edited manifest gives one clear error instead of a
traceback deep in a command.

File names are derived from (shard, slice, generation), never taken from user input::

    checkpoints/s003r017.g000004.row   the state of shard 3 after slice 17, written by generation 4
    data/shard_003.g000004.npz         the retained training rows of shard 3 (ids, x, y, slices)
    data/test.g000000.npz              the held-out split
    data/val.g000000.npz               the validation split (ids held out of training), if any
    partition.g000004.npz              id -> (shard, slice), and the forgotten ids (or their hashes)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from sisajax.errors import NotARunError, RunError

SCHEMA = 2
MANIFEST = "MANIFEST.json"

ROW_RE = re.compile(r"^s(\d{3,})r(\d{3,})\.g(\d{6,})\.row$")
SHARD_DATA_RE = re.compile(r"^shard_(\d{3,})\.g(\d{6,})\.npz$")
TEST_DATA_RE = re.compile(r"^test\.g(\d{6,})\.npz$")
VAL_DATA_RE = re.compile(r"^val\.g(\d{6,})\.npz$")
PARTITION_RE = re.compile(r"^partition\.g(\d{6,})\.npz$")


def row_file(shard: int, slice_: int, generation: int) -> str:
    return f"checkpoints/s{shard:03d}r{slice_:03d}.g{generation:06d}.row"


def shard_data_file(shard: int, generation: int) -> str:
    return f"data/shard_{shard:03d}.g{generation:06d}.npz"


def test_data_file(generation: int) -> str:
    return f"data/test.g{generation:06d}.npz"


def val_data_file(generation: int) -> str:
    return f"data/val.g{generation:06d}.npz"


def partition_file(generation: int) -> str:
    return f"partition.g{generation:06d}.npz"


class ManifestError(RunError):
    """MANIFEST.json is malformed (wrong types, missing fields, unknown schema)."""


@dataclasses.dataclass(frozen=True)
class FileRef:
    """A file of the run: relative path, sha256 and size in bytes."""

    path: str
    sha256: str
    size: int


@dataclasses.dataclass(frozen=True)
class RowRef:
    """One stored (shard, slice) checkpoint: the generation that wrote it, its checksum and size,
    and the host (:mod:`sisajax.host`) whose program produced it."""

    generation: int
    sha256: str
    size: int
    host: str


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    """One shard: its data copy, its ``[R]`` slice checkpoints, and per slice prefix the number
    of ids and their fingerprint (the exact ids row ``j`` was trained on)."""

    data: FileRef
    rows: tuple[RowRef, ...]
    n_ids: tuple[int, ...]
    fingerprints: tuple[str, ...]

    @property
    def active(self) -> bool:
        return self.n_ids[-1] > 0


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the run was trained on (shapes, dtype, classes, the preprocessing applied)."""

    name: str
    feature_shape: tuple[int, ...]
    x_dtype: str
    num_classes: int
    num_train: int
    num_test: int
    preprocessing: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The live generation of a run.

    Attributes:
      generation: increases by one per committed change (forget, retrain in place).
      config: the resolved :class:`~sisajax.config.RunConfig` as a dict; ``config_fingerprint``
        its fingerprint (everything that determines the trained bits).
      layout: the device layout of the engine (:meth:`sisajax.engine.Engine.layout`).
      capacity: rows per shard in the device arrays (fixed for the run's life).
      dataset: :class:`DatasetInfo`.
      partition / partition_kind: the partition file and ``hash`` or ``explicit``.
      test_data: the held-out split file.
      val_data: the validation split file (training ids never trained on), or None (runs
        trained with ``data.val_fraction=0`` or by older versions).
      shards: ``[S]`` :class:`ShardEntry`.
      hosts: ``{host id: host description}`` of every host that produced a live row.
      versions: library versions of the process that wrote this generation.
      id_hashing: with ``ledger.hash_ids``, ``{"salt_fingerprint": ..., "salt_source": ...}``.
      origin: what made this generation (``{"op": "train" | "forget" | "retrain", ...}``).
      plugins: modules the run needs imported (plug-in models / data sets).
      plugin_sources: ``{module: sha256 of its source}`` of the plug-ins, as they were when the
        run was (re)trained (:func:`sisajax.plugins.source_hash`); empty in runs from older
        versions.
    """

    generation: int
    config: dict[str, Any]
    config_fingerprint: str
    layout: dict[str, Any]
    capacity: int
    dataset: DatasetInfo
    partition: FileRef
    partition_kind: str
    test_data: FileRef
    shards: tuple[ShardEntry, ...]
    hosts: dict[str, dict[str, Any]]
    versions: dict[str, str]
    id_hashing: dict[str, str] | None = None
    origin: dict[str, Any] = dataclasses.field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    plugin_sources: dict[str, str] = dataclasses.field(default_factory=dict)
    val_data: FileRef | None = None
    schema: int = SCHEMA

    def files(self) -> set[str]:
        """Relative paths of every file this generation names."""
        out = {self.partition.path, self.test_data.path}
        if self.val_data is not None:
            out.add(self.val_data.path)
        for k, e in enumerate(self.shards):
            out.add(e.data.path)
            out.update(row_file(k, j, r.generation) for j, r in enumerate(e.rows))
        return out

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def with_shard(self, k: int, entry: ShardEntry) -> Manifest:
        shards = list(self.shards)
        shards[k] = entry
        return self.replace(shards=tuple(shards))

    def to_json(self) -> dict[str, Any]:
        """The JSON document (built field by field: ``dataclasses.asdict`` deep-copies every
        value, which cost ~70 ms per commit for a 20 x 50 run)."""
        ds = self.dataset
        return {
            "schema": self.schema,
            "generation": self.generation,
            "config": self.config,
            "config_fingerprint": self.config_fingerprint,
            "layout": self.layout,
            "capacity": self.capacity,
            "dataset": {
                "name": ds.name,
                "feature_shape": list(ds.feature_shape),
                "x_dtype": ds.x_dtype,
                "num_classes": ds.num_classes,
                "num_train": ds.num_train,
                "num_test": ds.num_test,
                "preprocessing": ds.preprocessing,
            },
            "partition": _fileref_json(self.partition),
            "partition_kind": self.partition_kind,
            "test_data": _fileref_json(self.test_data),
            "val_data": None if self.val_data is None else _fileref_json(self.val_data),
            "shards": [shard_entry_json(e) for e in self.shards],
            "hosts": self.hosts,
            "versions": self.versions,
            "id_hashing": self.id_hashing,
            "origin": self.origin,
            "plugins": list(self.plugins),
            "plugin_sources": self.plugin_sources,
            "row_fields": ["generation", "sha256", "size", "host"],
        }


def _fileref_json(f: FileRef) -> dict[str, Any]:
    return {"path": f.path, "sha256": f.sha256, "size": f.size}


def shard_entry_json(e: ShardEntry) -> dict[str, Any]:
    """A :class:`ShardEntry` as JSON (rows as ``[generation, sha256, size, host]`` lists)."""
    return {
        "data": _fileref_json(e.data),
        "rows": [[r.generation, r.sha256, r.size, r.host] for r in e.rows],
        "n_ids": list(e.n_ids),
        "fingerprints": list(e.fingerprints),
    }


# -- reading and validating ---------------------------------------------------------------------


def _req(d: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ManifestError(f"MANIFEST.json: {where}{key} is missing")
    v = d[key]
    if typ is int and isinstance(v, bool) or not isinstance(v, typ):
        raise ManifestError(
            f"MANIFEST.json: {where}{key} has the wrong type ({type(v).__name__}, expected "
            f"{getattr(typ, '__name__', typ)})"
        )
    return v


def _hex(v: Any, where: str) -> str:
    if not (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)):
        raise ManifestError(f"MANIFEST.json: {where} is not a sha256")
    return v


def _nonneg(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ManifestError(f"MANIFEST.json: {where} must be a non-negative integer")
    return v


def _optional(d: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    """``d[key]`` when it is a JSON object, None when absent or null; else ``ManifestError``."""
    v = d.get(key)
    if v is not None and not isinstance(v, dict):
        raise ManifestError(f"MANIFEST.json: {where}{key} must be an object")
    return v


def _origin(d: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``origin`` (what made this generation): an object whose ``request_id``,
    if any, is a string."""
    origin = dict(_optional(d, "origin", "") or {})
    rid = origin.get("request_id")
    if rid is not None and not isinstance(rid, str):
        raise ManifestError("MANIFEST.json: origin.request_id must be a string")
    return origin


def _fileref(d: Any, where: str, pattern: re.Pattern, folder: str = "") -> FileRef:
    path = _req(d, "path", str, where + ".")
    name = path[len(folder) :] if folder and path.startswith(folder) else path
    if (folder and not path.startswith(folder)) or not pattern.fullmatch(name):
        raise ManifestError(
            f"MANIFEST.json: {where}.path {path!r} is not a file name sisajax writes"
        )
    return FileRef(
        path,
        _hex(_req(d, "sha256", str, where + "."), where + ".sha256"),
        _nonneg(_req(d, "size", int, where + "."), where + ".size"),
    )


def parse_shard_entry(e: Any, where: str, r: int, gen: int, k: int | None = None) -> ShardEntry:
    """Validate one shard entry (``r`` slices, rows no newer than generation ``gen``; with
    ``k``, its data copy must be shard ``k``'s own file of a generation no newer than ``gen``)."""
    rows_raw = _req(e, "rows", list, where + ".")
    n_ids = _req(e, "n_ids", list, where + ".")
    fps = _req(e, "fingerprints", list, where + ".")
    if not (len(rows_raw) == len(n_ids) == len(fps) == r):
        raise ManifestError(f"MANIFEST.json: {where} does not list {r} slices")
    rows = []
    for j, row in enumerate(rows_raw):
        w = f"{where}.rows[{j}]"
        if not (isinstance(row, list) and len(row) == 4):
            raise ManifestError(f"MANIFEST.json: {w} is malformed")
        g, sha, size, host = row
        if _nonneg(g, w + ".generation") > gen:
            raise ManifestError(f"MANIFEST.json: {w} names a future generation")
        rows.append(RowRef(g, _hex(sha, w + ".sha256"), _nonneg(size, w + ".size"), str(host)))
    data = _fileref(_req(e, "data", dict, where + "."), where + ".data", SHARD_DATA_RE, "data/")
    if k is not None:
        m = SHARD_DATA_RE.fullmatch(data.path[len("data/") :])
        assert m is not None  # _fileref checked the pattern
        if int(m.group(1)) != k or int(m.group(2)) > gen:
            raise ManifestError(
                f"MANIFEST.json: {where}.data names {data.path}, not a data copy of shard {k} "
                f"of generation <= {gen}"
            )
    return ShardEntry(
        data,
        tuple(rows),
        tuple(_nonneg(v, where + ".n_ids") for v in n_ids),
        tuple(_hex(v, where + ".fingerprints") for v in fps),
    )


def parse_manifest(d: Any) -> Manifest:
    """Validate a decoded ``MANIFEST.json`` and build the typed :class:`Manifest`.

    Raises:
      NotARunError: a manifest of another schema (e.g. a run written by an older sisajax).
      ManifestError: a missing field or a value of the wrong type.
    """
    if not isinstance(d, dict):
        raise ManifestError("MANIFEST.json is not a JSON object")
    schema = d.get("schema", d.get("format"))
    if schema != SCHEMA:
        raise NotARunError(
            f"MANIFEST.json has schema {schema!r}; this sisajax reads schema {SCHEMA} "
            "(a run from an older sisajax: retrain it with this version)"
        )
    gen = _nonneg(_req(d, "generation", int, ""), "generation")
    config = _req(d, "config", dict, "")
    sisa = _req(config, "sisa", dict, "config.")
    s = _nonneg(_req(sisa, "shards", int, "config.sisa."), "config.sisa.shards")
    r = _nonneg(_req(sisa, "slices", int, "config.sisa."), "config.sisa.slices")
    ds = _req(d, "dataset", dict, "")
    dataset = DatasetInfo(
        _req(ds, "name", str, "dataset."),
        tuple(
            _nonneg(v, "dataset.feature_shape") for v in _req(ds, "feature_shape", list, "dataset.")
        ),
        _req(ds, "x_dtype", str, "dataset."),
        _nonneg(_req(ds, "num_classes", int, "dataset."), "dataset.num_classes"),
        _nonneg(_req(ds, "num_train", int, "dataset."), "dataset.num_train"),
        _nonneg(_req(ds, "num_test", int, "dataset."), "dataset.num_test"),
        dict(_optional(ds, "preprocessing", "dataset.") or {}),
    )
    fields = d.get("row_fields", [f.name for f in dataclasses.fields(RowRef)])
    if fields != [f.name for f in dataclasses.fields(RowRef)]:
        raise ManifestError(f"MANIFEST.json: unknown row fields {fields}")
    raw_shards = _req(d, "shards", list, "")
    if len(raw_shards) != s:
        raise ManifestError(f"MANIFEST.json: {len(raw_shards)} shard entries for {s} shards")
    shards = [parse_shard_entry(e, f"shards[{k}]", r, gen, k) for k, e in enumerate(raw_shards)]
    kind = _req(d, "partition_kind", str, "")
    if kind not in ("hash", "explicit"):
        raise ManifestError(f"MANIFEST.json: partition_kind {kind!r} is not hash or explicit")
    plugins = d.get("plugins") or []
    if not (isinstance(plugins, list) and all(isinstance(p, str) for p in plugins)):
        raise ManifestError("MANIFEST.json: plugins must be a list of module names")
    sources = d.get("plugin_sources") or {}  # absent in runs from older versions
    if not (isinstance(sources, dict) and all(isinstance(p, str) for p in sources)):
        raise ManifestError("MANIFEST.json: plugin_sources must map module names to sha256s")
    sources = {p: _hex(h, f"plugin_sources.{p}") for p, h in sources.items()}
    return Manifest(
        generation=gen,
        config=config,
        config_fingerprint=_hex(_req(d, "config_fingerprint", str, ""), "config_fingerprint"),
        layout=_req(d, "layout", dict, ""),
        capacity=_nonneg(_req(d, "capacity", int, ""), "capacity"),
        dataset=dataset,
        partition=_fileref(_req(d, "partition", dict, ""), "partition", PARTITION_RE),
        partition_kind=kind,
        test_data=_fileref(_req(d, "test_data", dict, ""), "test_data", TEST_DATA_RE, "data/"),
        val_data=(
            None
            if d.get("val_data") is None
            else _fileref(_req(d, "val_data", dict, ""), "val_data", VAL_DATA_RE, "data/")
        ),
        shards=tuple(shards),
        hosts=_req(d, "hosts", dict, ""),
        versions=_req(d, "versions", dict, ""),
        id_hashing=_optional(d, "id_hashing", ""),
        origin=_origin(d),
        plugins=tuple(plugins),
        plugin_sources=sources,
    )
