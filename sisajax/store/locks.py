"""Run locks: one writer at a time, readers that see whole generations, read-only runs.

``.writer.lock`` (exclusive ``flock``) serialises every command that changes a run (``train`` over
an existing run, ``forget``, ``resume``, ``serve``). ``.reader.lock`` is held shared while a
reader loads one generation and exclusively while a writer switches generations and deletes
superseded files, so a reader sees the run before or after a request, never a mix. Locks are
released when the process dies.

On a run directory this process cannot write (a read-only mount, another user's run), a reader
opens an existing lock file read-only (``flock`` works on it) and, when none exists, reads
without a lock: no writer can be changing a directory nobody may write.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from sisajax.errors import RunStateError, StorageError, storage_error
from sisajax.store.files import UnsafeRunError, is_writable_dir, managed_path

WRITER_LOCK = ".writer.lock"
READER_LOCK = ".reader.lock"


class RunBusyError(RunStateError):
    """Another process holds the run's lock for longer than we were willing to wait."""


class RunLock:
    """An ``fcntl.flock`` on a lock file in the run directory.

    Args:
      root: the run directory (real path).
      name: the lock file's name.
      exclusive: exclusive (writer) or shared (reader).
      timeout_s: how long to wait before :class:`RunBusyError`.
      what: how to name this lock in messages.
    """

    def __init__(self, root: Path, name: str, *, exclusive: bool, timeout_s: float, what: str):
        self.root, self.name = root, name
        self.exclusive, self.timeout_s, self.what = exclusive, timeout_s, what
        self.fd: int | None = None
        self.unlocked_reason: str | None = None

    def _open(self) -> int | None:
        path = managed_path(self.root, self.name)
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO in its place never blocks
        if self.exclusive or is_writable_dir(self.root):
            try:
                return os.open(path, flags | os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise UnsafeRunError(f"{path} is a symbolic link") from None
                if self.exclusive:
                    raise self._lock_error(e) from None
        try:
            return os.open(path, flags | os.O_RDONLY)
        except FileNotFoundError:
            self.unlocked_reason = "read-only run directory without a lock file"
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeRunError(f"{path} is a symbolic link") from None
            self.unlocked_reason = f"lock file not readable ({e.strerror})"
            return None

    def _lock_error(self, e: OSError) -> StorageError:
        """Why this lock could not be opened for writing. A directory that refuses writes gets
        no `resume` hint (nothing has changed yet) but the commands that still work."""
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return storage_error(
                e,
                f"{self.root} is read-only to this process, so its {self.what} lock cannot be "
                "taken (commands that change a run need write access; evaluate, status, audit "
                "and verify do not)",
                resumable=False,
            )
        return storage_error(e, f"taking the {self.what} lock of {self.root}")

    def __enter__(self) -> RunLock:
        fd = self._open()
        if fd is None:
            return self
        mode = (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + max(self.timeout_s, 0.0)
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _holder(fd)
                    os.close(fd)
                    raise RunBusyError(
                        f"{self.what} lock of {self.root} is held by {holder}; gave up after "
                        f"{self.timeout_s:g}s (nothing was changed; try again when it finishes)"
                    ) from None
                time.sleep(0.02)
        if self.exclusive:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
            except OSError:
                pass  # the holder's pid is a courtesy for messages
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.startswith("pid ") and text[4:].isdigit() else "another process"


def writer_lock(root: Path, timeout_s: float) -> RunLock:
    return RunLock(root, WRITER_LOCK, exclusive=True, timeout_s=timeout_s, what="writer")


def reader_lock(root: Path, timeout_s: float, *, exclusive: bool = False) -> RunLock:
    return RunLock(root, READER_LOCK, exclusive=exclusive, timeout_s=timeout_s, what="reader")
