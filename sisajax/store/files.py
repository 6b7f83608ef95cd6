"""The files of a run directory: safe paths, atomic writes with checksums, durability, deletion.

Every read, write and delete of a run goes through this module, so the rules live in one place:

* **Inside the real run directory only.** A run is opened by its real path
  (:func:`real_run_dir`); every managed path below it is checked component by component
  (:func:`managed_path`) and a symbolic link anywhere on the way is refused with
  :class:`UnsafeRunError` (exit code 2). Files are opened with ``O_NOFOLLOW``.
* **Atomic and checksummed.** :func:`write_file` writes a temp file with a name unique to the
  process (``.<name>.<pid>.<random>.tmp``, ``O_EXCL``), hashing the bytes as they are written
  (no re-read for the checksum), fsyncs it (unless the caller batches durability), and renames
  it into place. A failure removes the temp file and raises :class:`~sisajax.errors.StorageError`
  naming the action in one line.
* **Deletes never follow links.** :func:`remove_if_ours` unlinks only regular files; links and
  folders are left alone and reported by the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from sisajax.errors import UserInputError, storage_error
from sisajax.store.faults import io_fault

TEMP_RE = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")


class UnsafeRunError(UserInputError):
    """A run directory holds a symbolic link or a path leading outside it where a managed file is."""


def real_run_dir(path: str | Path) -> Path:
    """The real (link-free, absolute) path of a run directory the user named."""
    return Path(path).expanduser().resolve()


def _check_rel(rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts):
        raise UnsafeRunError(f"refusing path {rel!r}: managed paths are relative and stay inside")
    return p


def managed_path(root: Path, rel: str, *, must_exist: bool = False) -> Path:
    """``root/rel`` after checking that no component below ``root`` is a symbolic link.

    Raises:
      UnsafeRunError: ``rel`` is absolute or has ``..``, or a component is a link.
      FileNotFoundError: ``must_exist`` and the path does not exist.
    """
    p = root
    for part in _check_rel(rel).parts:
        p = p / part
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            if must_exist:
                raise
            return root / rel
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeRunError(
                f"{root}: {p.relative_to(root)} is a symbolic link; sisajax never reads, writes "
                "or deletes through links in a run directory (replace it with the real file)"
            )
    return p


def open_read(path: Path) -> BinaryIO:
    """Open a regular file for reading without following a final symbolic link. Opening does not
    block: a FIFO or device in the file's place is refused, not waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == 40:  # ELOOP: the final component is a link
            raise UnsafeRunError(f"{path} is a symbolic link; refusing to follow it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeRunError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: Path) -> bytes:
    with open_read(path) as f:
        return f.read()


def read_json(path: Path) -> Any:
    """Parse a JSON file (raises ``ValueError`` on malformed content, never echoing it)."""
    data = read_bytes(path)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path.name} is not valid JSON (at byte {getattr(e, 'pos', '?')})"
        ) from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open_read(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class HashingWriter:
    """A write-only, non-seekable file wrapper that hashes (sha256) and counts what passes.

    Non-seekable on purpose: ``zipfile`` (``np.savez``) then streams with data descriptors instead
    of seeking back, so the hash covers exactly the bytes on disk.
    """

    def __init__(self, raw: BinaryIO, what: str):
        self.raw, self.what = raw, what
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, b: Any) -> int:
        io_fault(f"write {self.what}")
        mv = memoryview(b).cast("B")
        self.hash.update(mv)
        self.raw.write(mv)
        self.size += len(mv)
        return len(mv)

    def tell(self) -> int:
        return self.size

    def read(self, *_: Any) -> bytes:  # np.savez tells files from paths by a ``read`` attribute
        raise OSError("HashingWriter is write-only")

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        self.raw.flush()

    @property
    def sha256(self) -> str:
        return self.hash.hexdigest()


def temp_name(path: Path) -> Path:
    """A temp path next to ``path`` unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_file(
    path: Path,
    data: bytes | Callable[[HashingWriter], None],
    *,
    durable: bool = True,
    sync_dir: bool | None = None,
    mode: int = 0o644,
    what: str | None = None,
) -> tuple[str, int]:
    """Write ``path`` atomically; return ``(sha256, size)`` of what was written.

    Args:
      path: destination (its directory must exist and be checked by the caller).
      data: the bytes, or a function writing them to the given file object.
      durable: fsync the file (callers that make a batch of files durable with one
        :func:`sync_filesystem` pass False).
      sync_dir: fsync the folder after the rename (default: ``durable``); callers that write many
        files into one folder pass False and fsync the folder once.
      mode: permission bits of a new file (e.g. ``0o600`` for secrets).
      what: how to name the file in an error (default: its name).

    Raises:
      StorageError: the write failed (disk full, read-only, ...); no temp file is left.
    """
    what = what or path.name
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        raise storage_error(e, f"creating {what}") from None
    try:
        with os.fdopen(fd, "wb") as raw:
            f = HashingWriter(raw, what)
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                data(f)
            raw.flush()
            if durable:
                os.fsync(raw.fileno())
        io_fault(f"rename {what}")
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise storage_error(e, f"writing {what}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if durable if sync_dir is None else sync_dir:
        fsync_dir(path.parent)
    return f.sha256, f.size


def write_json(
    path: Path, obj: Any, *, durable: bool = True, mode: int = 0o644, compact: bool = False
) -> tuple[str, int]:
    """:func:`write_file` of canonical JSON (indented, or ``compact`` for large documents)."""
    if compact:
        blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    else:
        blob = json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n"
    return write_file(path, blob, durable=durable, mode=mode)


def _unlink_quietly(p: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(p)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync one file (never through a link; raises ``OSError`` like ``os.fsync``)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _syncfs_call() -> Callable[[int], int] | None:
    """libc's ``syncfs``, looked up once per process (None where it is missing).

    The symbols already loaded into the process come first: ``ctypes.util.find_library`` runs a
    subprocess (``ldconfig``), which costs milliseconds per call in a large process, and a
    training syncs once per slice step.
    """
    names = (lambda: None, lambda: ctypes.util.find_library("c") or "libc.so.6")
    for name in names:
        try:
            return ctypes.CDLL(name(), use_errno=True).syncfs
        except (OSError, AttributeError, TypeError):
            continue
    return None


def _syncfs(path: Path) -> bool:
    """``syncfs`` on ``path``'s file system; False where the call is missing or fails."""
    call = _syncfs_call()
    if call is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        return call(fd) == 0
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Make everything written on ``path``'s file system durable (``syncfs``; one call instead of an
    fsync per file). Falls back to fsyncing every file under ``path`` where ``syncfs`` is missing."""
    if _syncfs(path):
        return
    for dirpath, _, files in os.walk(path):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                fsync_file(p)
        fsync_dir(Path(dirpath))


def sync_files(root: Path, paths: Sequence[Path]) -> None:
    """Make ``paths`` (files written without fsync under ``root``) durable with one call:
    ``syncfs`` on ``root``'s file system, or an fsync of each file where ``syncfs`` is missing.

    Raises:
      StorageError: the sync failed (e.g. the disk filled up while the data was cached).
    """
    if _syncfs(root):
        return
    for p in paths:
        try:
            fsync_file(p)
        except OSError as e:
            raise storage_error(e, f"syncing {p.name}") from None
    # new files' names live in their folders: those must be durable too before a manifest
    # names the files
    for d in sorted({Path(p).parent for p in paths}):
        try:
            fsync_dir(d)
        except OSError as e:
            raise storage_error(e, f"syncing {d.name}/") from None


def ensure_dir(root: Path, rel: str) -> Path:
    """Create ``root/rel`` (one level) if missing; refuse if it is a link or not a folder."""
    p = managed_path(root, rel)
    try:
        os.mkdir(p)
    except FileExistsError:
        pass
    except OSError as e:
        raise storage_error(e, f"creating {rel}/") from None
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafeRunError(f"{root}: {rel} must be a real folder (it is a link or a file)")
    return p


def scan_dir(path: Path) -> Iterator[os.DirEntry]:
    """Entries of a folder (nothing when it does not exist)."""
    try:
        with os.scandir(path) as it:
            yield from it
    except FileNotFoundError:
        return


def is_regular(entry: os.DirEntry) -> bool:
    return entry.is_file(follow_symlinks=False)


def remove_if_ours(path: Path) -> bool:
    """Unlink ``path`` if it is a regular file (never a link's target, never a folder).

    Returns True if removed, False if it was not a regular file (left alone) or already gone.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise storage_error(e, f"deleting {path.name}") from None
    return True


def is_writable_dir(path: Path) -> bool:
    """Whether this process can create files in ``path`` (False on read-only mounts too)."""
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return not (st.f_flag & os.ST_RDONLY)
