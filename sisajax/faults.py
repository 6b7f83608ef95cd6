"""Fault injection for crash-safety tests.

Set ``SISAJAX_FAULT=<point>`` (optionally ``<point>:<n>`` to fire at the n-th time the point is
reached, counting from 1) and the process kills itself with SIGKILL when it reaches that point, as
a power cut or an OOM kill would. Points are named where they are called (see
``sisajax.unlearning``). Unset in normal use: :func:`fault` is then a dictionary look-up.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}

POINTS = (
    "after_pending",
    "after_restore",
    "mid_retrain",
    "mid_save",
    "before_commit",
    "after_commit",
    "before_done",
)


def fault(point: str) -> None:
    """Die here (SIGKILL) if ``SISAJAX_FAULT`` names this point."""
    spec = os.environ.get("SISAJAX_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
