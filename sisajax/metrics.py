"""Metrics a researcher can plot: training loss per shard and slice, cost and accuracy per request.

Every training and unlearning call appends to ``run_dir/metrics.jsonl`` (one JSON object per
line, never rewritten): per (shard, slice) step the mean training loss and the examples it took
(``event: train_slice``, with the generation that trained it), per forget request its cost
(``event: forget``) and, for request streams, the accuracy after each request
(``event: stream_request``). Records never hold ids. With ``tensorboard=True`` the same scalars go
to TensorBoard event files under ``run_dir/tensorboard/`` through ``tensorboardX`` (install the
``tensorboard`` extra). :func:`read_metrics` loads the history; ``sisajax report run_dir=...``
turns it into tables and plots.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from sisajax.errors import UserInputError

METRICS = "metrics.jsonl"


class MetricsLog:
    """Append-only metrics of one run directory (thread-safe; the writer thread logs too).

    Args:
      run_dir: the run directory (real path).
      tensorboard: also write TensorBoard scalars (needs ``tensorboardX``).
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False):
        from sisajax.store.files import managed_path

        self.path = managed_path(Path(run_dir), METRICS)
        self._lock = threading.Lock()
        self._tb = None
        self._step = 0
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise UserInputError(
                    "tensorboard=true needs tensorboardX: pip install 'sisajax[tensorboard]'"
                ) from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def __call__(self, record: dict[str, Any]) -> None:
        rec = {"time": round(time.time(), 3), **record}
        line = (json.dumps(rec, sort_keys=True, default=_plain) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            if self._tb is not None:
                self._tensorboard(rec)
                self._tb.flush()

    def _tensorboard(self, rec: dict[str, Any]) -> None:
        event = rec.get("event")
        if event == "train_slice" and rec.get("loss") is not None:
            tag = f"loss/shard_{rec['shard']:03d}"
            step = rec["generation"] * 100_000 + rec["slice"]
            self._tb.add_scalar(tag, rec["loss"], step)
        elif event in ("forget", "stream_request"):
            self._step += 1
            for key in ("examples", "wall_s", "accuracy"):
                if rec.get(key) is not None:
                    self._tb.add_scalar(
                        f"{event}/{key}", rec[key], rec.get("generation", self._step)
                    )

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def read_metrics(run_dir: str | Path, event: str | None = None) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (optionally of one ``event``), oldest first.

    A torn last line (a crash mid-append) is skipped.
    """
    from sisajax.store.files import managed_path, read_bytes

    try:
        data = read_bytes(managed_path(Path(run_dir), METRICS))
    except FileNotFoundError:
        return []
    out = []
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict) and (event is None or rec.get("event") == event):
            out.append(rec)
    return out
