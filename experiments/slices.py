"""Kind ``slices``: accuracy vs the number of slices R at fixed S (recalibrated epochs; the paper:
no accuracy lost), and the measured cost of single deletion requests against the expected
speedup S * 3R / (2R + 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sisajax.config import RunConfig
from sisajax.data.datasets import Dataset
from sisajax.experiments.common import Workspace, full_baselines, train_and_eval
from sisajax.experiments.report import by_seed, fmt, integer_log_axis, plot_accuracy, plt, pm, table
from sisajax.experiments.seeds import request_seed

DEFAULTS: dict[str, Any] = {
    "slices": [1, 2, 5, 10, 20],
    "probe_requests": 3,
    "full_baseline": True,  # also train the S=1, R=1 baseline on the same data
    "seed": None,  # the probe requests' seed (null: each run's seed)
}
SEED_LOOP = True  # run() trains every seed of opts["seeds"] itself
ROW_KEYS = ("slices", "shards")


def run(rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    import sisajax as sj
    from sisajax import costs

    rows = []
    for seed in opts["seeds"]:
        for r in opts["slices"]:
            p = ws.path(f"R{r}_seed{seed}")
            rcr = rc.replace(sisa={"slices": int(r), "seed": int(seed)})
            run_, row = train_and_eval(rcr, ds, p)
            n_probe = int(opts["probe_requests"])
            if n_probe:
                req_seed = request_seed(opts, int(seed))
                ids = sj.sample_requests(run_.partition.ids, n_probe, "uniform", req_seed)
                reps = [sj.forget(run_, [int(i)], metrics=False) for i in ids]
                ex = float(np.mean([x.cost.examples for x in reps]))
                full_ex = float(np.mean([x.full_retrain_examples for x in reps]))
                row.update(
                    {
                        "probe_requests": n_probe,
                        "request_seed": req_seed,
                        "forget_examples_mean": ex,
                        "forget_wall_s_mean": float(np.mean([x.cost.wall_s for x in reps])),
                        "forget_retrain_s_mean": float(np.mean([x.cost.retrain_s for x in reps])),
                        "full_examples": full_ex,
                        "speedup_examples": full_ex / max(ex, 1.0),
                    }
                )
            e, b = rc.sisa.epochs, rc.sisa.batch_size
            row["predicted_speedup"] = costs.expected_speedup_single(rc.sisa.shards, int(r))
            row["partition_expected_examples"] = costs.expected_single_request(
                run_.partition.sizes(), e, b
            )
            row["partition_expected_speedup"] = (
                costs.full_retrain_cost(row["n_train"] - 1, e, b)[0]
                / row["partition_expected_examples"]
            )
            row["predicted_examples"] = (
                costs.full_retrain_cost(row["n_train"], e, b)[0] / row["predicted_speedup"]
            )
            rows.append(row)
            ws.drop(p)
    out: dict[str, Any] = {"rows": rows}
    if opts["full_baseline"]:
        out.update(full_baselines(rc, ds, ws, [int(s) for s in opts["seeds"]], rows))
    return out


def report(res: dict[str, Any], png: Path) -> str:
    fields = (
        "vote",
        "mean_prob",
        "shard_mean",
        "train_examples",
        "train_wall_s",
        "forget_examples_mean",
        "speedup_examples",
        "partition_expected_speedup",
        "predicted_speedup",
        "forget_wall_s_mean",
    )
    rows = by_seed(res["rows"], "slices", fields)
    body = [
        [
            str(r["slices"]),
            pm(r, "vote"),
            pm(r, "mean_prob"),
            pm(r, "shard_mean"),
            f"{r['train_examples']:,.0f}",
            fmt(r["train_wall_s"], ".1f"),
            fmt(r.get("forget_examples_mean"), ",.0f"),
            fmt(r.get("speedup_examples"), ".1f"),
            fmt(r.get("partition_expected_speedup"), ".1f"),
            fmt(r["predicted_speedup"], ".1f"),
            fmt(r.get("forget_wall_s_mean"), ".2f"),
        ]
        for r in rows
    ]
    s = res["rows"][0]["shards"] if res["rows"] else "?"
    n_probe = res["rows"][0].get("probe_requests", 0) if res["rows"] else 0
    md = table(
        [
            "R",
            "vote",
            "mean prob",
            "one constituent",
            "train examples",
            "train s",
            "1 request: examples retrained",
            f"speedup, mean of {n_probe} (examples)",
            "expected on this partition",
            f"formula S*3R/(2R+1), S={s}",
            "1 request: wall s",
        ],
        body,
    )
    _plot(res, rows, png)
    return md


def _plot(res: dict[str, Any], rows: list[dict[str, Any]], png: Path) -> None:
    pyplot = plt()
    fig, (a1, a2) = pyplot.subplots(1, 2, figsize=(11, 4))
    plot_accuracy(res, "slices", "number of slices R", png, ax=a1)
    x = [r["slices"] for r in rows]
    if all(r.get("speedup_examples") == r.get("speedup_examples") for r in rows):
        a2.plot(x, [r["speedup_examples"] for r in rows], "o-", label="measured (examples)")
    a2.plot(
        x,
        [r["partition_expected_speedup"] for r in rows],
        "s:",
        label="expected on the run's partition (exact schedule)",
    )
    a2.plot(x, [r["predicted_speedup"] for r in rows], "k--", label="formula S*3R/(2R+1)")
    if len(x) > 1:
        integer_log_axis(a2, x)
    a2.set_xlabel("number of slices R")
    a2.set_ylabel("speedup of one request vs full retrain")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    pyplot.close(fig)
