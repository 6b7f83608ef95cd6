"""The record an interrupted training leaves so that it can continue (``training.interrupted.json``).

A new run interrupted (Ctrl-C) after some slice steps keeps the rows of those slice steps: they
are exactly what an uninterrupted run writes, because every slice step is a pure function of the
states before it and of (seed, shard, slice, step). The record names them (checksums, sizes,
hosts), the configuration and the data they were trained from; training the same configuration
on the same data again (or ``sisajax resume``) restores the last completed slice step and trains
the rest. The record is removed when the run commits its manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from sisajax.store.files import read_json, write_json
from sisajax.store.manifest import RowRef

INTERRUPTED = "training.interrupted.json"
RECORD_VERSION = 1


@dataclasses.dataclass(frozen=True)
class InterruptedTraining:
    """What an interrupted training had finished.

    Attributes:
      config: the resolved run configuration (``RunConfig.to_dict()``) and its fingerprint.
      data_fingerprint: :func:`data_fingerprint` of what the shards train on.
      completed: slice steps completed: rows ``0..completed-1`` of every shard are stored.
      rows: ``{shard: [RowRef] * completed}``.
      hosts: ``{host id: description}`` of the hosts that wrote those rows.
      plugins: modules the run needs imported.
      plugin_sources: ``{module: source sha256}`` of those plug-ins when the rows were trained
        (empty in records from older versions).
    """

    config: dict[str, Any]
    config_fingerprint: str
    data_fingerprint: str
    completed: int
    rows: dict[int, list[RowRef]]
    hosts: dict[str, dict[str, Any]]
    plugins: tuple[str, ...] = ()
    plugin_sources: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "config": self.config,
            "config_fingerprint": self.config_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "completed": self.completed,
            "rows": {
                str(k): [[r.generation, r.sha256, r.size, r.host] for r in refs]
                for k, refs in self.rows.items()
            },
            "hosts": self.hosts,
            "plugins": list(self.plugins),
            "plugin_sources": dict(self.plugin_sources),
        }

    @classmethod
    def from_json(cls, d: Any) -> InterruptedTraining:
        """Parse a record (``ValueError`` when malformed)."""
        try:
            if d["version"] != RECORD_VERSION:
                raise ValueError(f"record version {d['version']!r}")
            rows = {
                int(k): [RowRef(int(g), str(s), int(n), str(h)) for g, s, n, h in refs]
                for k, refs in d["rows"].items()
            }
            completed = int(d["completed"])
            if completed < 1 or any(len(v) != completed for v in rows.values()):
                raise ValueError("rows do not match the completed slice steps")
            return cls(
                dict(d["config"]),
                str(d["config_fingerprint"]),
                str(d["data_fingerprint"]),
                completed,
                rows,
                dict(d.get("hosts") or {}),
                tuple(d.get("plugins") or ()),
                {str(k): str(v) for k, v in (d.get("plugin_sources") or {}).items()},
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed record ({type(e).__name__}: {e})") from None


def completed_slices(rows: dict[tuple[int, int], RowRef], shards: list[int], slices: int) -> int:
    """How many leading slice steps have a stored row for every shard in ``shards``."""
    r = 0
    while r < slices and all((k, r) in rows for k in shards):
        r += 1
    return r


def data_fingerprint(*arrays: np.ndarray) -> str:
    """sha256 over the arrays' dtypes, shapes and bytes (the exact data a run trains from)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def write_record(root: Path, record: InterruptedTraining) -> None:
    write_json(root / INTERRUPTED, record.to_json())


def read_record(root: Path) -> InterruptedTraining | None:
    """The record in ``root``, or None when there is none."""
    path = root / INTERRUPTED
    if not path.is_file() or path.is_symlink():
        return None
    return InterruptedTraining.from_json(read_json(path))


def remove_record(root: Path) -> None:
    (root / INTERRUPTED).unlink(missing_ok=True)


__all__ = [
    "INTERRUPTED",
    "InterruptedTraining",
    "completed_slices",
    "data_fingerprint",
    "read_record",
    "remove_record",
    "write_record",
]
