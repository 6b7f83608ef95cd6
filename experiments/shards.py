"""Kind ``shards``: accuracy vs the number of shards S (both aggregations, one constituent).

The paper: simple tasks lose under ~2 points up to S = 20. Each S trains a fresh run per seed and
evaluates both aggregations at once; "one constituent" is the per-shard accuracy (one model on
1/S of the data); S = 1, R = 1 is the full model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sisajax.config import RunConfig
from sisajax.data.datasets import Dataset
from sisajax.experiments.common import Workspace, full_baselines, train_and_eval
from sisajax.experiments.report import by_seed, fmt, plot_accuracy, pm, table

DEFAULTS: dict[str, Any] = {
    "shards": [1, 2, 5, 10, 20],
    "full_baseline": True,  # also the S=1, R=1 baseline (an S=1 row of the same seed is reused)
}
SEED_LOOP = True  # run() trains every seed of opts["seeds"] itself
ROW_KEYS = ("shards", "slices")  # what names a row's configuration (rows differ by seed)


def run(rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    """Train every (S, seed) of ``opts["shards"]`` x ``opts["seeds"]`` (the resolved run seeds);
    rows carry both aggregations, the constituents' accuracy and their seed."""
    rows = []
    for seed in opts["seeds"]:
        for s in opts["shards"]:
            p = ws.path(f"S{s}_seed{seed}")
            _, row = train_and_eval(rc.replace(sisa={"shards": int(s), "seed": int(seed)}), ds, p)
            rows.append(row)
            ws.drop(p)
    out: dict[str, Any] = {"rows": rows}
    if opts["full_baseline"]:
        out.update(full_baselines(rc, ds, ws, [int(s) for s in opts["seeds"]], rows))
    return out


def report(res: dict[str, Any], png: Path) -> str:
    rows = by_seed(
        res["rows"], "shards", ("vote", "mean_prob", "shard_mean", "train_examples", "train_wall_s")
    )
    body = [
        [
            str(r["shards"]),
            str(r["slices"]),
            str(r["n"]),
            f"{r['shard_size_min']:,}-{r['shard_size_max']:,}",
            pm(r, "vote"),
            pm(r, "mean_prob"),
            pm(r, "shard_mean"),
            f"{r['train_examples']:,.0f}",
            fmt(r["train_wall_s"], ".1f"),
        ]
        for r in rows
    ]
    md = table(
        [
            "S",
            "R",
            "seeds",
            "ids per shard",
            "vote",
            "mean prob",
            "one constituent on 1/S",
            "train examples",
            "train s",
        ],
        body,
    )
    plot_accuracy(res, "shards", "number of shards S", png)
    return md
