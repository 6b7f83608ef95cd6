"""Kind ``dist_aware``: the paper's Algorithm 1 (distribution-aware sharding) vs uniform hash
sharding with the same number of shards, under a skewed request distribution (the paper's SVHN
scenario: three groups of ids with per-id deletion probabilities 3e-6, 3e-5, 6e-6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sisajax.config import RunConfig
from sisajax.data.datasets import Dataset
from sisajax.experiments.common import (
    ExperimentError,
    Workspace,
    full_baseline,
    log,
    serve_all,
    train_and_eval,
)
from sisajax.experiments.report import by_seed, fmt, plt, pm, table
from sisajax.experiments.seeds import request_seed

DEFAULTS: dict[str, Any] = {
    # groups: [{fraction, p}] = share of the training ids and per-id deletion probability
    # (the paper's SVHN scenario); or a request_weights distribution: exponential, pareto
    "scenario": "groups",
    "groups": [
        {"fraction": 0.7717, "p": 3.0e-6},
        {"fraction": 0.1001, "p": 3.0e-5},
        {"fraction": 0.1282, "p": 6.0e-6},
    ],
    "target_shards": 19,  # sets the bound C = sum(p) / target_shards (ignored if bound set)
    "bound": None,  # C, expected deletions per shard, in units of p
    "k": [1, 5, 10, 20],
    "modes": ["batched", "sequential"],
    "seed": None,  # the scenario's and the request stream's seed (null: the run's seed)
    "full_baseline": True,  # also train the S=1, R=1 baseline on the same data
}
ROW_KEYS = ("partition", "mode", "k")  # what names a row's configuration (rows differ by seed)


def deletion_probabilities(
    ids: np.ndarray, opts: dict, run_seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """``([N] per-id deletion probability, [N] group index or None)`` of the scenario, drawn with
    ``experiment.seed`` (or ``run_seed`` when it is null)."""
    from sisajax.errors import UserInputError
    from sisajax.requests import group_weights, request_weights

    seed = request_seed(opts, run_seed)
    if opts["scenario"] == "groups":
        try:
            return group_weights(ids, opts["groups"], seed)
        except UserInputError as e:
            raise ExperimentError(str(e)) from None
    return request_weights(ids, opts["scenario"], seed), None


def run(rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    from sisajax.costs import expected_cost_partition
    from sisajax.data.partition import (
        distribution_aware_partition,
        hash_partition,
        validation_mask,
    )
    from sisajax.requests import sample_requests

    # the ids the runs train on: a request for a validation id costs nothing (no shard holds
    # it), so the partitions, request shares and request streams leave the split out
    ids = np.sort(ds.train_ids)
    ids = ids[~validation_mask(ids, rc.data.val_fraction, rc.sisa.seed)]
    req_seed = request_seed(opts, rc.sisa.seed)
    probs, groups = deletion_probabilities(ids, opts, rc.sisa.seed)
    total = float(probs.sum())
    bound = float(opts["bound"]) if opts["bound"] else total / int(opts["target_shards"])
    r, seed = rc.sisa.slices, rc.sisa.seed
    aware = distribution_aware_partition(ids, probs, bound, r, seed)
    s = aware.num_shards
    parts = {"uniform": hash_partition(ids, s, r, seed), "dist_aware": aware}
    ks = sorted(int(k) for k in opts["k"])
    stream = sample_requests(ids, max(ks), seed=req_seed, weights=probs)
    log(f"Algorithm 1: bound C={bound:.3g} (sum p = {total:.3g}) -> {s} shards")
    rcs = rc.replace(sisa={"shards": s})
    rows, partitions = [], {}
    e = rc.sisa.epochs
    for name, part in parts.items():
        src = ws.path(name)
        _, trained = train_and_eval(rcs, ds, src, partition=part)
        sizes = part.sizes().sum(1)
        share = np.bincount(part.shard, weights=probs, minlength=s) / total  # request mass
        partitions[name] = {
            **trained,
            "sizes": sizes.tolist(),
            "request_share": share.tolist(),
            "size_median": float(np.median(sizes)),
            "expected_deletions_max": float(share.max()),
        }
        for row in serve_all(src, stream, ks, list(opts["modes"]), ws, name):
            if r == 1:  # expected cost from the partition itself (independent draws)
                row["predicted_examples"], row["predicted_shards_hit"] = expected_cost_partition(
                    sizes, share, row["k"], e, row["mode"]
                )
            row["speedup_examples"] = row["full_examples"] / max(row["examples"], 1)
            rows.append(
                {
                    "partition": name,
                    "shards": s,
                    "slices": r,
                    **row,
                    "seed": seed,
                    "request_seed": req_seed,
                }
            )
        ws.drop(src)
    out: dict[str, Any] = {
        "rows": rows,
        "partitions": partitions,
        "bound": bound,
        "probability_sum": total,
        "requests": stream.tolist(),
    }
    if groups is not None:
        out["groups"] = [
            {**g, "ids": int((groups == i).sum())} for i, g in enumerate(opts["groups"])
        ]
    if opts["full_baseline"]:
        out["full"] = full_baseline(rc, ds, ws)
    return out


def _one_request_costs(res: dict[str, Any], per_seed: list[dict[str, Any]]) -> tuple[str, str]:
    """(expected, median) examples of one request from the skewed distribution, R = 1 only,
    averaged over the partitions of every seed (``per_seed``)."""
    if res["config"]["sisa"]["slices"] != 1:
        return "-", "-"
    e = res["config"]["sisa"]["epochs"]
    expected, medians = [], []
    for p in per_seed:
        cost = e * np.asarray(p["sizes"], np.float64)
        share = np.asarray(p["request_share"], np.float64)
        order = np.argsort(cost)
        medians.append(cost[order][np.searchsorted(np.cumsum(share[order]), 0.5)])
        expected.append((share * cost).sum())
    return f"{np.mean(expected):,.0f}", f"{np.mean(medians):,.0f}"


def report(res: dict[str, Any], png: Path) -> str:
    parts = res["partitions"]  # averaged over seeds when merged (per seed: partition_rows)
    per_seed = res.get("partition_rows") or {name: [p] for name, p in parts.items()}
    md = table(
        [
            "partition",
            "seeds",
            "S",
            "ids per shard (min / median / max)",
            "largest request share of a shard",
            "one request: expected examples",
            "one request: median examples",
            "vote",
            "mean prob",
            "one constituent (mean)",
        ],
        [
            [
                name,
                str(len(per_seed[name])),
                fmt(p["shards"], "g"),
                f"{p['shard_size_min']:,} / {p['size_median']:,.0f} / {p['shard_size_max']:,}",
                fmt(p["expected_deletions_max"], ".3f"),
                *_one_request_costs(res, per_seed[name]),
                pm(p, "vote"),
                pm(p, "mean_prob"),
                pm(p, "shard_mean"),
            ]
            for name, p in parts.items()
        ],
    )
    md += "\n\n" + table(
        [
            "partition",
            "mode",
            "K",
            "seeds",
            "shard retrains",
            "examples retrained (expected)",
            "speedup vs full (examples)",
            "wall s",
        ],
        [
            [
                r["partition"],
                r["mode"],
                str(r["k"]),
                str(r["n"]),
                fmt(r["shards_hit"], "g"),
                f"{pm(r, 'examples', ',.0f')} ({fmt(r.get('predicted_examples'), ',.0f')})",
                pm(r, "speedup_examples", ".2f"),
                fmt(r["wall_s"], ".1f"),
            ]
            for r in by_seed(res["rows"], ROW_KEYS)
        ],
    )
    if res.get("groups"):
        md += "\n\nGroups (share of ids, per-id deletion probability p): " + ", ".join(
            f"{g['ids']:,} ids at p={g['p']:g}" for g in res["groups"]
        )
    md += f"; bound C = {res['bound']:.3g} (sum of p = {res['probability_sum']:.3g})."
    _plot(res, png)
    return md


def _plot(res: dict[str, Any], png: Path) -> None:
    pyplot = plt()
    fig, (a1, a2) = pyplot.subplots(1, 2, figsize=(11, 4))
    first = {name: ps[0] for name, ps in (res.get("partition_rows") or {}).items()}
    for i, (name, p) in enumerate((first or res["partitions"]).items()):
        a1.bar(
            np.arange(len(p["sizes"])) + 0.4 * i, p["sizes"], width=0.4, label=name, color=f"C{i}"
        )
    a1.set_xlabel("shard")
    a1.set_ylabel("training ids")
    seed = next(iter((first or res["partitions"]).values())).get("seed")
    a1.set_title("shard sizes" + (f" (seed {seed})" if seed is not None else ""))
    a1.legend(fontsize=8)
    styles = {"batched": "o-", "sequential": "s--"}
    merged = by_seed(res["rows"], ROW_KEYS)
    for i, name in enumerate(res["partitions"]):
        for mode, st in styles.items():
            rows = sorted(
                (r for r in merged if r["partition"] == name and r["mode"] == mode),
                key=lambda r: r["k"],
            )
            if rows:
                k = [r["k"] for r in rows]
                a2.plot(
                    k, [r["examples"] for r in rows], st, color=f"C{i}", label=f"{name}, {mode}"
                )
                if all(r.get("predicted_examples") is not None for r in rows):
                    a2.plot(
                        k,
                        [r["predicted_examples"] for r in rows],
                        ":",
                        color=f"C{i}",
                        lw=1,
                        label=f"{name}, {mode}: expected",
                    )
    a2.set_xlabel("number of requests K (skewed distribution)")
    a2.set_ylabel("examples retrained")
    a2.set_title("retraining cost (one request stream; dotted: expectation)")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    pyplot.close(fig)
