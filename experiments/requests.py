"""Kind ``requests``: retraining cost vs the number of deletion requests K, sequential (one
retrain per request, vs one full retrain per request) and batched (one retrain of every hit shard
from its earliest affected slice, vs one full retrain), measured and expected, against the full
retrain. The paper: 4.63x on Purchase (S=20, R=50, K=8), 2.45x on SVHN (K=18)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sisajax.config import RunConfig
from sisajax.data.datasets import Dataset
from sisajax.experiments.common import Workspace, cost_cols, eval_row, serve_all, train_and_eval
from sisajax.experiments.report import PAPER, by_seed, fmt, integer_log_axis, plt, pm, table
from sisajax.experiments.seeds import request_seed

DEFAULTS: dict[str, Any] = {
    "k": [1, 2, 5, 8, 10, 18, 20, 50],
    "modes": ["batched", "sequential"],
    "max_sequential": None,  # serve the sequential stream only up to this K (null: all)
    "distribution": "uniform",
    "seed": None,  # the request stream's seed (null: the run's seed)
}
ROW_KEYS = ("mode", "k")  # what names a row's configuration (rows differ by seed)


def run(rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    import sisajax as sj
    from sisajax import costs

    ks = sorted(int(k) for k in opts["k"])
    src = ws.path("sisa")
    run_, trained = train_and_eval(rc, ds, src)
    req_seed = request_seed(opts, rc.sisa.seed)
    stream = sj.sample_requests(run_.partition.ids, max(ks), opts["distribution"], req_seed)
    full_run, full_cost = sj.full_retrain(run_, ws.path("full"))
    full = {
        "shards": 1,
        "slices": 1,
        "seed": rc.sisa.seed,
        **eval_row(full_run.evaluate()),
        **cost_cols(full_cost, "train"),
    }
    ws.drop(full_run.run_dir)
    rows = serve_all(src, stream, ks, list(opts["modes"]), ws, "sisa", opts["max_sequential"])
    s, r, e, n = rc.sisa.shards, rc.sisa.slices, rc.sisa.epochs, trained["n_train"]
    for row in rows:
        row.update(seed=rc.sisa.seed, request_seed=req_seed)
        k = row["k"]
        if row["mode"] == "batched":
            row["predicted_examples"] = e * costs.expected_cost_batched(n, s, r, k)
            row["predicted_shards_hit"] = costs.expected_shards_hit(s, k)
            row["predicted_speedup"] = e * n / row["predicted_examples"]
            n_full = 1
        else:
            row["predicted_examples"] = costs.expected_cost_sequential(n, s, r, k, e)
            row["predicted_shards_hit"] = float(k)
            row["predicted_speedup"] = costs.expected_speedup_single(s, r)
            n_full = k
        row["speedup_examples"] = row["full_examples"] / max(row["examples"], 1)
        row["full_wall_s"] = full["train_wall_s"] * n_full
        row["full_compile_s"] = full["train_compile_s"] * n_full
        row["speedup_wall"] = row["full_wall_s"] / max(row["wall_s"], 1e-9)
        row["speedup_wall_no_compile"] = (row["full_wall_s"] - row["full_compile_s"]) / max(
            row["wall_s"] - row["compile_s"], 1e-9
        )
    ws.drop(src)
    return {"rows": rows, "trained": trained, "full": full, "requests": stream.tolist()}


def report(res: dict[str, Any], png: Path) -> str:
    rows = by_seed(res["rows"], ROW_KEYS)  # mean ± sd over seeds (one row each for one seed)
    body = [
        [
            r["mode"],
            str(r["k"]),
            str(r["n"]),
            f"{fmt(r['shards_hit'], 'g')} / {fmt(r['predicted_shards_hit'], '.1f')}",
            pm(r, "examples", ",.0f"),
            fmt(r["predicted_examples"], ",.0f"),
            fmt(r["full_examples"], ",.0f"),
            f"{pm(r, 'speedup_examples', '.2f')} / {fmt(r['predicted_speedup'], '.2f')}",
            fmt(r["wall_s"], ".1f"),
            fmt(r["full_wall_s"], ".1f"),
            pm(r, "speedup_wall", ".2f"),
            fmt(r["speedup_wall_no_compile"], ".2f"),
        ]
        for r in rows
    ]
    md = table(
        [
            "mode",
            "K",
            "seeds",
            "shard retrains (measured / expected)",
            "examples retrained",
            "expected",
            "full retrain(s) examples",
            "speedup in examples (measured / expected)",
            "SISA wall s",
            "full retrain wall s",
            "speedup wall",
            "speedup wall, compile excluded",
        ],
        body,
    )
    t = res["trained"]
    md += (
        f"\n\nSISA run: S={t['shards']}, R={t['slices']}, accuracy {pm(t, 'vote')} (vote), "
        f"{pm(t, 'mean_prob')} (mean prob); trained {t['train_examples']:,.0f} examples in "
        f"{t['train_wall_s']:.1f}s. Batched: one retrain of every hit shard from its earliest "
        "affected slice, vs one full retrain. Sequential: one retrain per request, vs one full "
        "retrain per request; full-retrain wall clock measured once and multiplied."
    )
    _plot(res, rows, png)
    return md


def _plot(res: dict[str, Any], merged: list[dict[str, Any]], png: Path) -> None:
    """Speedup vs K per mode (``merged``: the rows averaged over seeds)."""
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4.5))
    ks: set[int] = set()
    for i, mode in enumerate(("batched", "sequential")):
        rows = sorted((r for r in merged if r["mode"] == mode), key=lambda r: r["k"])
        if not rows:
            continue
        k = [r["k"] for r in rows]
        ks.update(k)
        c = f"C{i}"
        ax.plot(k, [r["speedup_examples"] for r in rows], "o-", color=c, label=f"{mode}: examples")
        ax.plot(k, [r["predicted_speedup"] for r in rows], "--", color=c, label=f"{mode}: expected")
        ax.plot(k, [r["speedup_wall"] for r in rows], "s:", color=c, label=f"{mode}: wall clock")
    t = res["trained"]
    if (t["shards"], t["slices"]) == (20, 50):  # the paper's setting: overlay its numbers
        for p, marker in zip(PAPER["requests"], ("*", "P"), strict=True):
            ax.plot([p["k"]], [p["speedup"]], marker, color="k", ms=11, label=p["label"])
    ax.axhline(1.0, color="gray", lw=1)
    if len(ks) > 1:
        integer_log_axis(ax, sorted(ks))
    ax.set_yscale("log")
    ax.set_xlabel("number of deletion requests K")
    ax.set_ylabel("speedup vs retraining from scratch")
    ax.set_title(f"{res['data']['name']}: S={t['shards']}, R={t['slices']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    pyplot.close(fig)
