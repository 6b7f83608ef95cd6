"""Read-only commands that answer questions about a run: ``predict`` and ``ids``."""

from __future__ import annotations

from typing import Any

import numpy as np

from sisajax.cli.base import UsageError, output_path
from sisajax.cli.base import open_run as _open
from sisajax.config import int_value
from sisajax.console import print_table, say


def _id_list(value: Any, name: str) -> list[int]:
    items = value if isinstance(value, list | tuple) else [value]
    try:
        return [int(v) for v in items]
    except (TypeError, ValueError):
        raise UsageError(
            f"{name} must be an integer id or a list of them, e.g. {name}=[3,17]"
        ) from None


def cmd_predict(cfg: dict[str, Any], overrides: list[str]) -> int:
    """Labels from the ensemble for features in a file (or the run's own test/val split).

    ``input=`` a .npy/.npz/.csv file of examples as the run stores them, or ``test``/``val``;
    ``out=`` a .csv (index, label, mean probability of that label) or .npz (labels ``[M]``,
    mean probabilities ``[M, C]``, every constituent's label ``[S, M]``); read-only.
    """
    from sisajax import aggregation as agg
    from sisajax.data.inputs import read_features

    show = int_value(cfg["show"], "show", 0)
    out = output_path(cfg["out"], "out", (".csv", ".npz"))
    run = _open(cfg)
    source = cfg["input"]
    if source in (None, ""):
        raise UsageError("predict needs input=<.npy|.npz|.csv file>, input=test or input=val")
    _, x_ref, _ = run.test_data()
    if source == "test":
        x = x_ref
    elif source == "val":
        x = run.val_data()[1]
    else:
        x = read_features(source, tuple(x_ref.shape[1:]), x_ref.dtype)
    method = cfg["aggregation"] or run.config.sisa.aggregation
    if method not in ("vote", "mean_prob"):
        raise UsageError(f"aggregation must be vote or mean_prob, not {method!r}")
    logits = run.logits(x)  # [S, M, C]
    active = run.active_shards()
    labels = agg.aggregate(logits, method, active)
    proba = agg.mean_prob(logits, active)
    conf = proba[np.arange(len(labels)), labels]
    if out:
        path = out
        if path.suffix == ".csv":
            lines = ["index,label,mean_prob"]
            lines += [
                f"{i},{int(y)},{float(c):.6f}"
                for i, (y, c) in enumerate(zip(labels, conf, strict=True))
            ]
            path.write_text("\n".join(lines) + "\n")
        else:
            np.savez(path, labels=labels, proba=proba, shard_labels=logits.argmax(-1))
    shown = min(len(labels), show)
    print_table(
        f"{len(labels):,} predictions ({method}, {int(active.sum())} models)",
        [(str(i), str(int(labels[i])), f"{conf[i]:.4f}") for i in range(shown)],
        ("index", "label", "mean prob of label"),
    )
    counts = np.bincount(labels, minlength=proba.shape[1])
    top = ", ".join(f"{c}: {n:,}" for c, n in sorted(enumerate(counts), key=lambda t: -t[1])[:5])
    say(f"most predicted labels: {top}" + (f"; written to {out}" if out else ""))
    return 0


def cmd_ids(cfg: dict[str, Any], overrides: list[str]) -> int:
    """List a run's ids (retained, optionally of one shard/slice; validation; forgotten), or say
    where given ids are with ``find=[...]``; read-only."""
    from sisajax.status import list_ids, locate_ids

    out = output_path(cfg["out"], "out")
    run = _open(cfg)
    if cfg["find"] is not None:
        found = locate_ids(run, _id_list(cfg["find"], "find"))
        print_table(
            f"{run.run_dir}: where the ids are (generation {run.generation})",
            [
                (
                    str(r["id"]),
                    r["status"],
                    "-" if r["shard"] is None else str(r["shard"]),
                    "-" if r["slice"] is None else str(r["slice"]),
                )  # fmt: skip
                for r in found
            ],
            ("id", "status", "shard", "slice"),
        )
        return 0
    ids = list_ids(run, cfg["which"], cfg["shard"], cfg["slice"])
    where = "".join(f" {k}={cfg[k]}" for k in ("shard", "slice") if cfg[k] is not None)
    if out:
        out.write_text("".join(f"{int(i)}\n" for i in ids))
    say(f"{len(ids):,} {cfg['which']} ids{where}: {_ranges(ids)}"
        + (f"; written to {cfg['out']}" if cfg["out"] else ""))  # fmt: skip
    return 0


def _ranges(ids: np.ndarray, limit: int = 30) -> str:
    """``0-4 7 9-12 ...``: sorted ids as runs of consecutive values (the first ``limit`` runs)."""
    if len(ids) == 0:
        return "(none)"
    ids = np.sort(np.asarray(ids, np.int64))
    breaks = np.flatnonzero(np.diff(ids) != 1)
    starts = np.r_[ids[0], ids[breaks + 1]]
    ends = np.r_[ids[breaks], ids[-1]]
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts, ends, strict=True)]
    more = f" ... (+{len(parts) - limit} more runs)" if len(parts) > limit else ""
    return " ".join(parts[:limit]) + more
