"""Kind ``single``: one configuration (the job of a sweep): train, evaluate, optionally serve
``k`` requests, compare with a full retrain on the retained data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sisajax.config import RunConfig
from sisajax.data.datasets import Dataset
from sisajax.experiments.common import Workspace, cost_cols, eval_row, stream_costs, train_and_eval
from sisajax.experiments.report import fmt, plot_accuracy, table

DEFAULTS: dict[str, Any] = {"k": 0, "mode": "batched", "distribution": "uniform", "seed": 0}


def run(rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    import sisajax as sj

    run_, row = train_and_eval(rc, ds, ws.path("sisa"))
    out: dict[str, Any] = {"rows": [row]}
    if opts["k"]:
        ids = sj.sample_requests(
            run_.partition.ids, int(opts["k"]), opts["distribution"], opts["seed"]
        )
        stream = sj.serve_requests(run_, ids, opts["mode"])
        row.update(
            {
                "k": int(opts["k"]),
                "mode": opts["mode"],
                **{f"forget_{k}": v for k, v in stream_costs(stream.costs, 0).items()},
                "full_examples": int(stream.full_retrain_examples),
                "speedup_examples": stream.full_retrain_examples / max(stream.total.examples, 1),
            }
        )
        row.update({f"after_{k}": v for k, v in eval_row(run_.evaluate()).items()})
    if opts["full_baseline"]:
        full, full_cost = sj.full_retrain(run_, ws.path("full"))
        fr = {
            "shards": 1,
            "slices": 1,
            **eval_row(full.evaluate()),
            **cost_cols(full_cost, "train"),
        }
        out["full"] = fr
        if opts["k"]:
            n_req = int(opts["k"]) if opts["mode"] == "sequential" else 1
            row["full_wall_s"] = fr["train_wall_s"] * n_req
            row["speedup_wall"] = row["full_wall_s"] / max(row["forget_wall_s"], 1e-9)
    return out


def report(res: dict[str, Any], png: Path) -> str:  # one job: reported with its sweep
    return report_jobs([(png.parent, res)], png.parent)


def _job_overrides(d: Path) -> str:
    p = d / ".hydra" / "overrides.yaml"
    if not p.is_file():
        return ""
    from omegaconf import OmegaConf

    return " ".join(str(o) for o in OmegaConf.to_container(OmegaConf.load(p)))


def report_jobs(found: list[tuple[Path, dict[str, Any]]], root: Path) -> str:
    """One table over the jobs of a sweep, and accuracy vs S if S varies."""
    body = []
    for d, res in found:
        r = res["rows"][0]
        full = res.get("full") or {}
        body.append(
            [
                str(d.relative_to(root)) or ".",
                _job_overrides(d) or "-",
                str(r["shards"]),
                str(r["slices"]),
                fmt(r["vote"]),
                fmt(r["mean_prob"]),
                fmt(r["shard_mean"]),
                fmt(r["train_wall_s"], ".1f"),
                fmt(r.get("forget_examples"), ","),
                fmt(r.get("speedup_examples"), ".2f"),
                fmt(full.get("vote")),
            ]
        )
    md = table(
        [
            "job",
            "overrides",
            "S",
            "R",
            "vote",
            "mean prob",
            "one constituent",
            "train s",
            "forget examples",
            "speedup (examples)",
            "full retrain accuracy",
        ],
        body,
    )
    if len({res["rows"][0]["shards"] for _, res in found}) > 1:
        merged = {
            "name": "sweep",
            "data": found[0][1]["data"],
            "rows": [res["rows"][0] for _, res in found],
            "full": found[0][1].get("full"),
        }
        plot_accuracy(merged, "shards", "number of shards S", root / "sweep.png")
        md += "\n\n![accuracy vs S](sweep.png)"
    return md
