"""Metrics a researcher can plot: training loss per shard, program call and slice, cost and
accuracy per request, every evaluation and verification.

Every training and unlearning call appends to ``run_dir/metrics.jsonl`` (one JSON object per
line, never rewritten), each record with the generation it belongs to:

* ``train_chunk``: per shard and program call (``sisa.chunk_steps`` steps) the mean training
  loss per example, its examples, its place in the slice step (``chunk``, ``first_step``,
  ``step``) and the shard's gradient steps so far (``global_step``): a loss curve even at R=1;
* ``train_slice``: per (shard, slice step) the mean training loss and the examples it took;
* ``train`` / ``forget``: the cost of a training or of a forget request;
* ``stream_request``: for request streams, the cost and accuracy after each request;
* ``evaluate``: test accuracy by each aggregation (``sisajax evaluate``);
* ``verify``: the verified shards, how many are bit-identical, the verdict (``sisajax verify``).

Records never hold ids. With ``tensorboard=True`` the same scalars go to TensorBoard event files
under ``run_dir/tensorboard/`` through ``tensorboardX`` (install the ``tensorboard`` extra).
:func:`read_metrics` loads the history; ``sisajax report run_dir=...`` turns it into tables and
plots. Commands that only read a run (``evaluate``, ``verify``) log through :func:`log_record`,
which skips a read-only run directory.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import warnings
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
        self._tb: Any = None
        self._tb_dir = str(Path(run_dir) / "tensorboard")
        self._tb_class: Any = None
        self._step = 0
        self._write_failed = False
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise UserInputError(
                    "tensorboard=true needs tensorboardX: pip install 'sisajax[tensorboard]'"
                ) from None
            self._tb_class = SummaryWriter  # opened with the first record, not before

    def __call__(self, record: dict[str, Any]) -> None:
        rec = {"time": round(time.time(), 3), **record}
        line = (json.dumps(rec, sort_keys=True, default=_plain) + "\n").encode()
        with self._lock:
            try:
                self._append(line)
            except OSError as e:
                # A log, not part of any transaction: a record that cannot be written (full
                # disk, a path that became a link) never fails the work it describes, which may
                # already be committed. Said once; later records are tried again.
                if not self._write_failed:
                    self._write_failed = True
                    warnings.warn(
                        f"{METRICS} could not be written ({e.strerror or e}); metrics records "
                        "are dropped until it can",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                return
            if self._tb_class is not None:
                if self._tb is None:
                    self._tb = self._tb_class(self._tb_dir)
                self._tensorboard(rec)
                if rec.get("event") != "train_chunk":  # its slice step's record follows
                    self._tb.flush()

    def _append(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def _tensorboard(self, rec: dict[str, Any]) -> None:
        event = rec.get("event")
        if event == "train_slice" and rec.get("loss") is not None:
            tag = f"loss/shard_{rec['shard']:03d}"
            step = rec["generation"] * 100_000 + rec["slice"]
            self._tb.add_scalar(tag, rec["loss"], step)
        elif event == "train_chunk" and rec.get("global_step") is not None:
            # one curve per generation: a forget retrains a shard's later steps again
            tag = f"loss_per_chunk/gen_{rec['generation']:06d}/shard_{rec['shard']:03d}"
            self._tb.add_scalar(tag, rec["loss"], rec["global_step"])
        elif event == "val_slice":
            step = rec["generation"] * 100_000 + rec["slice"]
            for key in ("vote_accuracy", "mean_prob_accuracy"):
                if rec.get(key) is not None:
                    self._tb.add_scalar(f"val/{key}", rec[key], step)
        elif event in ("forget", "stream_request"):
            self._step += 1
            for key in ("examples", "wall_s", "accuracy"):
                if rec.get(key) is not None:
                    self._tb.add_scalar(
                        f"{event}/{key}", rec[key], rec.get("generation", self._step)
                    )

    def close(self) -> None:
        with self._lock:
            if self._tb is not None:
                self._tb.close()
                self._tb = None
            self._tb_class = None


def log_record(run_dir: str | Path, record: dict[str, Any]) -> bool:
    """Append ``record`` to ``run_dir/metrics.jsonl`` unless the run directory is read-only.

    For commands that only read a run: a read-only run is skipped silently (as its result file
    is), so they never change it. Returns whether the record was written.
    """
    from sisajax.store.files import is_writable_dir

    if not is_writable_dir(Path(run_dir)):
        return False
    MetricsLog(run_dir)(record)
    return True


def evaluate_record(
    report: Any, generation: int, wall_s: float, split: str = "test"
) -> dict[str, Any]:
    """The ``evaluate`` record of an :class:`~sisajax.aggregation.EvalReport` on ``split``."""
    return {
        "event": "evaluate",
        "split": split,
        "generation": generation,
        "aggregation": report.aggregation,
        "accuracy": report.accuracy,
        "vote_accuracy": report.vote_accuracy,
        "mean_prob_accuracy": report.mean_prob_accuracy,
        "shard_accuracy": [None if a != a else a for a in report.shard_accuracy],
        "active_shards": report.active_shards,
        "examples": report.num_examples,
        "wall_s": round(wall_s, 4),
    }


def verify_record(report: Any) -> dict[str, Any]:
    """The ``verify`` record of a :class:`~sisajax.verification.VerifyReport`."""
    shards = report.shards
    worst = max((s.max_abs_diff for s in shards if s.error is None), default=None)
    return {
        "event": "verify",
        "generation": report.generation,
        "ok": report.ok,
        "mode": report.mode,
        "verified_shards": len(shards),
        "identical_shards": sum(s.identical for s in shards),
        "mismatched_shards": list(report.mismatched_shards),
        "max_abs_diff": worst if worst is not None and math.isfinite(worst) else None,
        "bitwise_meaningful": report.bitwise_meaningful,
        "retrain_s": report.retrain_s,
        "wall_s": report.wall_s,
    }


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
