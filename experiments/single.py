"""Kind ``single``: one configuration (the job of a sweep): train, evaluate, optionally serve
``k`` requests, compare with a full retrain on the retained data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sisajax.config import RunConfig
from sisajax.data.datasets import Dataset
from sisajax.experiments.common import Workspace, cost_cols, eval_row, stream_costs, train_and_eval
from sisajax.experiments.report import by_seed, fmt, plot_accuracy, pm, table
from sisajax.experiments.seeds import request_seed

DEFAULTS: dict[str, Any] = {
    "k": 0,
    "mode": "batched",
    "distribution": "uniform",
    "seed": None,  # the request stream's seed (null: the run's seed)
    "full_baseline": True,  # also retrain S=1, R=1 on the same data (on the retained ids after k)
}
ROW_KEYS = ("shards", "slices")  # what names a row's configuration (rows differ by seed)


def run(rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    import sisajax as sj

    run_, row = train_and_eval(rc, ds, ws.path("sisa"))
    out: dict[str, Any] = {"rows": [row]}
    if opts["k"]:
        req_seed = request_seed(opts, rc.sisa.seed)
        ids = sj.sample_requests(run_.partition.ids, int(opts["k"]), opts["distribution"], req_seed)
        stream = sj.serve_requests(run_, ids, opts["mode"])
        row.update(
            {
                "k": int(opts["k"]),
                "mode": opts["mode"],
                "request_seed": req_seed,
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
            "seed": rc.sisa.seed,
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
    return report_jobs([([png.parent], res)], png.parent)


def _job_overrides(d: Path) -> str:
    """The job's command-line overrides but ``seed`` (the jobs of a configuration differ in it)."""
    p = d / ".hydra" / "overrides.yaml"
    if not p.is_file():
        return ""
    from omegaconf import OmegaConf

    given = [str(o) for o in OmegaConf.to_container(OmegaConf.load(p))]
    return " ".join(o for o in given if not o.lstrip("+").startswith("seed="))


def report_jobs(groups: list[tuple[list[Path], dict[str, Any]]], root: Path) -> str:
    """One table row per configuration of a sweep (its jobs differ only in the seed: mean ± sd
    over seeds), and accuracy vs S if S varies.

    Args:
      groups: ``(job folders, results merged over their seeds)`` per configuration.
      root: the sweep folder (job folders are shown relative to it; ``sweep.png`` goes there).
    """
    body = []
    for dirs, res in groups:
        full = res.get("full") or {}
        for r in by_seed(res["rows"], ROW_KEYS):
            body.append(
                [
                    ", ".join(str(d.relative_to(root)) or "." for d in dirs),
                    _job_overrides(dirs[0]) or "-",
                    str(r["shards"]),
                    str(r["slices"]),
                    ", ".join(str(s) for s in r["seeds"]),
                    pm(r, "vote"),
                    pm(r, "mean_prob"),
                    pm(r, "shard_mean"),
                    fmt(r["train_wall_s"], ".1f"),
                    fmt(r.get("forget_examples"), ",.0f"),
                    fmt(r.get("speedup_examples"), ".2f"),
                    pm(full, "vote") if full else "-",
                ]
            )
    md = table(
        [
            "job",
            "overrides",
            "S",
            "R",
            "seeds",
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
    rows = [r for _, res in groups for r in res["rows"]]
    if len({r["shards"] for r in rows}) > 1:
        merged = {
            "name": "sweep",
            "data": groups[0][1]["data"],
            "rows": rows,
            "full": groups[0][1].get("full"),
        }
        plot_accuracy(merged, "shards", "number of shards S", root / "sweep.png")
        md += "\n\n![accuracy vs S](sweep.png)"
    return md
