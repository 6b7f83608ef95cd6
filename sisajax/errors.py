"""The errors sisajax raises, and what each means for a command's exit code.

Two families, so that every entry point (CLI, scripts, services) can tell them apart:

* :class:`UserInputError` (exit code 2): the request itself is wrong (a bad config value, an
  unknown id, a path that is not a run directory, a run whose managed paths are links). Retrying
  the same request cannot succeed; nothing was changed.
* :class:`RunStateError` (exit code 1): the request was fine but the run or its environment is
  not (disk full, read-only file system, permission denied, a corrupt or tampered file, another
  process holding the lock). The run is left as it was or resumable (``sisajax resume``).

Every error's message is one line meant for people: it names the bad value and what is allowed,
and never echoes the content of a file or (with ``ledger.hash_ids``) a raw training id.
"""

from __future__ import annotations

import errno
import zipfile
import zlib

# What reading a damaged archive raises besides ``OSError``, ``EOFError`` and ``ValueError`` (catch
# it along with those): a truncated or corrupt zip (``.npz``: ``zipfile.BadZipFile``, a bad CRC
# included) and a corrupt deflate stream (gzip or a compressed ``.npz`` member: ``zlib.error``).
DAMAGED_ARCHIVE_ERRORS: tuple[type[Exception], ...] = (zipfile.BadZipFile, zlib.error)


class SisajaxError(Exception):
    """Base of every error sisajax raises on purpose."""

    exit_code = 1


class UserInputError(SisajaxError):
    """The request is wrong (exit code 2); nothing was changed."""

    exit_code = 2


class RunStateError(SisajaxError):
    """The run or the environment is not as it must be (exit code 1); the run stays resumable."""

    exit_code = 1


class StorageError(RunStateError, OSError):
    """A file-system operation failed (disk full, read-only, permission denied, ...)."""


_ENV_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
}


def storage_error(e: OSError, action: str, *, resumable: bool = True) -> StorageError:
    """One clear line for an ``OSError`` met while ``action`` (e.g. "writing data/x.npz");
    ``resumable``: it happened while changing a run (say how to finish)."""
    why = _ENV_ERRNOS.get(e.errno or -1) or (e.strerror or type(e).__name__)
    hint = "; the run is unchanged or resumable (fix the cause, then `sisajax resume`)"
    err = StorageError(f"{action}: {why}{hint if resumable else ''}")
    err.errno = e.errno
    return err


def exit_code_of(e: BaseException) -> int:
    """The exit code an entry point should return for ``e``."""
    if isinstance(e, SisajaxError):
        return e.exit_code
    if isinstance(e, OSError) and e.errno in _ENV_ERRNOS:
        return 1
    return 1


class RunError(RunStateError):
    """The run directory is incomplete or inconsistent (a missing, corrupt or malformed file)."""


class NotARunError(RunError, UserInputError):
    """The path given is not a sisajax run directory (or not one this version can open)."""

    exit_code = 2
