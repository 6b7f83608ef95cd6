"""Fault injection for crash-safety tests (inert unless ``SISAJAX_FAULT`` is set).

``SISAJAX_FAULT=<point>[:<n>]``: the process kills itself with SIGKILL the n-th time (default: the
first) it reaches ``<point>``, as a power cut or an OOM kill would. Points are named where
:func:`fault` is called (``sisajax.unlearning``, ``sisajax.store.ledger``, ``sisajax.run``).

``SISAJAX_FAULT=enospc:<n>``: the n-th write-like file operation of the process (a write of a
buffer, a rename, a truncate; counted by :func:`io_fault`) raises ``OSError(ENOSPC)``, as a full
disk would. Tests walk ``n`` over every operation of a command.
"""

from __future__ import annotations

import errno
import os
import signal

_counts: dict[str, int] = {}

POINTS = (
    "after_pending",
    "mid_retrain",
    "mid_save",
    "before_commit",
    "after_commit",
    "before_done",
    "ledger_after_line",
    "ledger_after_head",
    "retrain_before_commit",
    "retrain_after_commit",
)


def _spec() -> tuple[str, int] | None:
    spec = os.environ.get("SISAJAX_FAULT")
    if not spec:
        return None
    name, _, nth = spec.partition(":")
    return name, int(nth or 1)


def fault(point: str) -> None:
    """Die here (SIGKILL) if ``SISAJAX_FAULT`` names this point (and this is its n-th visit)."""
    spec = _spec()
    if spec is None or spec[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == spec[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def io_fault(what: str) -> None:
    """Raise ``OSError(ENOSPC)`` if ``SISAJAX_FAULT=enospc:<n>`` and this is the n-th operation."""
    spec = _spec()
    if spec is None or spec[0] != "enospc":
        return
    _counts["enospc"] = _counts.get("enospc", 0) + 1
    if _counts["enospc"] == spec[1]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)


def io_operations() -> int:
    """How many write-like operations :func:`io_fault` has counted (for tests)."""
    return _counts.get("enospc", 0)
