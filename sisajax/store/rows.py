"""Slice checkpoints: one file per (shard, slice) state, written in the background while training.

A *row* is one constituent model's complete training state (params, optimizer state, step, model
state, averaged weights) after one slice step. Each row is its own small file, so a forget writes
exactly the rows it retrains (from the restart slice on), keeps the earlier rows by name without
copying, and reads only the one row it restarts from.

Why not one Orbax checkpoint per row: measured here (600-128-100 MLP state, 360 KB), an Orbax
``StandardCheckpointer`` save costs ~25 ms wall / 17 ms CPU whatever the size and writes 10 files,
so the S*R = 1,000 rows of an S=20, R=50 run would cost ~25 s; this format costs ~1.2 ms per row
including its checksum. Orbax stays the interchange format: :func:`sisajax.run.SisaRun.export`
writes a standard Orbax checkpoint of any generation.

File format (little-endian)::

    b"SJROW\\x00\\x02\\n"           8-byte magic with the format version
    uint32                        header length H
    H bytes                       JSON header: shard, slice, generation, config and ids
                                  fingerprints, host id, and per leaf [path, dtype, shape, offset,
                                  nbytes] (offsets from the start of the data)
    data                          every leaf's bytes, C order, in ``jax.tree`` flatten order

The sha256 of the whole file is computed while writing and kept in the run's manifest; a reader
checks it before use.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sisajax.errors import RunError
from sisajax.store.files import HashingWriter, fsync_dir, read_bytes, write_file

MAGIC = b"SJROW\x00\x02\n"
_LEN = struct.Struct("<I")
PyTree = Any


class RowError(RunError):
    """A slice checkpoint is missing, corrupt, or does not match the run's state layout."""


def _dtype_name(dt: np.dtype) -> str:
    return np.dtype(dt).name


def leaf_spec(paths: Sequence[str], leaves: Sequence[Any]) -> list[list[Any]]:
    """``[[path, dtype, shape], ...]`` describing a flattened state."""
    return [
        [p, _dtype_name(np.asarray(x).dtype), list(np.shape(x))]
        for p, x in zip(paths, leaves, strict=True)
    ]


def encode_row(header: dict[str, Any], paths: Sequence[str], leaves: Sequence[np.ndarray]):
    """A writer function for :func:`~sisajax.store.files.write_file` producing one row file."""
    arrays = [np.asarray(x) for x in leaves]  # (np.ascontiguousarray would make scalars 1-d)
    arrays = [a.astype(a.dtype.newbyteorder("<"), order="C", copy=False) for a in arrays]
    offset, specs = 0, []
    for p, a in zip(paths, arrays, strict=True):
        specs.append([p, _dtype_name(a.dtype), list(a.shape), offset, a.nbytes])
        offset += a.nbytes
    blob = json.dumps({**header, "leaves": specs}, sort_keys=True).encode()

    def write(f: HashingWriter) -> None:
        f.write(MAGIC)
        f.write(_LEN.pack(len(blob)))
        f.write(blob)
        for a in arrays:
            if a.nbytes:
                f.write(a.reshape(-1).view(np.uint8))

    return write


def decode_row(buf: bytes, what: str) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Parse a row file's bytes into ``(header, leaves)`` (leaves are read-only views)."""
    if len(buf) < len(MAGIC) + _LEN.size or not buf.startswith(MAGIC):
        raise RowError(f"{what} is not a sisajax slice checkpoint (bad magic)")
    (hlen,) = _LEN.unpack_from(buf, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    try:
        header = json.loads(buf[start : start + hlen])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RowError(f"{what}: unreadable header") from None
    data = memoryview(buf)[start + hlen :]
    leaves = []
    for _, dtype, shape, off, nbytes in header.get("leaves", []):
        if off + nbytes > len(data):
            raise RowError(f"{what} is truncated")
        dt = np.dtype(dtype).newbyteorder("<")
        leaves.append(np.frombuffer(data[off : off + nbytes], dtype=dt).reshape(shape))
    return header, leaves


def read_row(
    path: Path, sha256: str | None, template: Sequence[list[Any]], what: str | None = None
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Read and check one row file.

    Args:
      path: the row file.
      sha256: the checksum the manifest records (None: do not check).
      template: :func:`leaf_spec` of the run's state; the row must match it exactly.

    Raises:
      RowError: missing, checksum mismatch, or a layout other than ``template``.
    """
    import hashlib

    what = what or path.name
    try:
        buf = read_bytes(path)
    except FileNotFoundError:
        raise RowError(f"checkpoint {what} is missing") from None
    if sha256 is not None and hashlib.sha256(buf).hexdigest() != sha256:
        raise RowError(f"checkpoint {what} is corrupt (checksum mismatch)")
    header, leaves = decode_row(buf, what)
    got = [lv[:3] for lv in header.get("leaves", [])]
    if got != [list(t) for t in template]:
        raise RowError(f"checkpoint {what} does not hold this run's state layout")
    return header, leaves


class BackgroundWriter:
    """Writes files on one background thread, so checkpointing overlaps with training.

    ``submit`` returns a future of ``(sha256, size)``; at most ``max_pending`` writes are queued
    (the producer waits beyond that, bounding memory). Files are fsynced by the worker; the
    caller fsyncs their folders once (:meth:`sync_dirs`) before naming them in a manifest. The
    first error is re-raised by :meth:`wait` (later submissions are skipped).
    """

    def __init__(self, root: Path, max_pending: int = 16):
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sisajax-writer")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._futures: list[Future] = []
        self._dirs: set[Path] = set()
        self._failed: BaseException | None = None
        self.busy_s = 0.0

    def _run(self, fn: Callable[[], Any]) -> Any:
        import time

        try:
            if self._failed is not None:
                raise self._failed
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                self.busy_s += time.perf_counter() - t0
        except BaseException as e:
            self._failed = self._failed or e
            raise
        finally:
            self._slots.release()

    def submit(self, rel: str, data: bytes | Callable[[HashingWriter], None]) -> Future:
        """Write ``root/rel`` (its folder must exist) in the background."""
        path = self.root / rel
        self._dirs.add(path.parent)
        self._slots.acquire()
        fut = self._pool.submit(
            self._run, lambda: write_file(path, data, durable=True, sync_dir=False, what=rel)
        )
        self._futures.append(fut)
        return fut

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the writer thread (e.g. to build and write a data copy)."""
        self._slots.acquire()
        fut = self._pool.submit(self._run, fn)
        self._futures.append(fut)
        return fut

    def wait(self) -> None:
        """Block until every submitted write is done; re-raise the first error."""
        for f in self._futures:
            f.exception()
        self._futures.clear()
        if self._failed is not None:
            raise self._failed

    def sync_dirs(self, extra: Sequence[Path] = ()) -> None:
        """fsync every folder a file was written to (and ``extra``): renames become durable."""
        for d in sorted(self._dirs | set(extra)):
            fsync_dir(d)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
