"""Kind ``accuracy``: what sharding costs in accuracy, per training recipe, and whether it drifts.

For every recipe (named overrides of the ``optim``/``sisa``/``model`` sections, e.g. the plain
baseline and the best exact recipe) and seed: accuracy vs the number of shards S (majority vote,
mean probability, one constituent), the full model (S=1, R=1) of the same recipe as the
reference, and the training cost (examples, seconds) of each configuration. Then a stream of
single-id deletions (served one request at a time, as they arrive) on one configuration, with the
ensemble's accuracy read every few deletions: exact unlearning must not make it drift beyond what
removing that little data explains.

Every recipe option used here is exact under forgetting (see ``tests/test_recipes.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from sisajax.config import RunConfig, recipe_summary
from sisajax.data.datasets import Dataset
from sisajax.experiments.common import ExperimentError, Workspace, eval_row, log, train_and_eval
from sisajax.experiments.report import PAPER, by_seed, fmt, integer_log_axis, plt, pm, table
from sisajax.stats import interval_text, pack_correct, paired_bootstrap_gap, unpack_correct

DEFAULTS: dict[str, Any] = {
    "shards": [1, 2, 5, 10, 20, 50],
    # name -> overrides of the run groups; the first is the baseline
    "recipes": {"baseline": {}},
    "deletions": 100,  # single-id deletion requests in the drift stream (0: none)
    "deletion_shards": 20,  # S of the configuration the stream runs on
    "deletion_recipe": None,  # default: the last recipe
    "eval_every": 10,
}
SECTIONS = ("optim", "sisa", "model")
SEED_LOOP = True  # run() trains every seed of opts["seeds"] itself
ROW_KEYS = ("recipe", "shards")  # what names a row's configuration (rows differ by seed)


def recipe_config(rc: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """``rc`` with a recipe's section overrides (``{"optim": {...}, "sisa": {...}}``)."""
    bad = set(overrides or {}) - set(SECTIONS)
    if bad:
        raise ExperimentError(f"recipe overrides may change {SECTIONS}, not {sorted(bad)}")
    return rc.replace(**{k: dict(v) for k, v in (overrides or {}).items()})


def run(rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    recipes = dict(opts["recipes"])
    if not recipes:
        raise ExperimentError("experiment.recipes must name at least one recipe")
    keep_for_stream = opts["deletion_recipe"] or list(recipes)[-1]
    if keep_for_stream not in recipes:
        raise ExperimentError(f"deletion_recipe {keep_for_stream!r} is not one of the recipes")
    rows, full, described = [], [], {}
    correct: dict[str, str] = {}  # per-example vote correctness on the test split, packed
    stream_src, stream_seed = None, 0
    for name, over in recipes.items():
        rrc = recipe_config(rc, over)
        described[name] = recipe_summary(rrc)
        log(f"recipe {name}: {described[name]}")
        for seed in opts["seeds"]:
            for s in opts["shards"]:
                cfg = rrc.replace(sisa={"shards": int(s), "seed": int(seed)})
                p = ws.path(f"{name}_S{s}_seed{seed}")
                trained, row = train_and_eval(cfg, ds, p)
                rows.append({**row, "recipe": name})
                correct[correct_key(name, int(s), int(seed))] = _correct(trained, ds)
                keep = (
                    opts["deletions"]
                    and name == keep_for_stream
                    and int(s) == int(opts["deletion_shards"])
                    and stream_src is None
                )
                if keep:
                    stream_src, stream_seed = p, int(seed)
                else:
                    ws.drop(p)
            if rrc.sisa.slices == 1 and 1 in [int(s) for s in opts["shards"]]:
                same = [r for r in rows if r["recipe"] == name and r["shards"] == 1]
                full.append({**same[-1], "recipe": name})
                correct[correct_key(name, None, int(seed))] = correct[
                    correct_key(name, 1, int(seed))
                ]
            else:
                p = ws.path(f"{name}_full_seed{seed}")
                cfg = rrc.replace(sisa={"shards": 1, "slices": 1, "seed": int(seed)})
                trained, row = train_and_eval(cfg, ds, p)
                full.append({**row, "recipe": name})
                correct[correct_key(name, None, int(seed))] = _correct(trained, ds)
                ws.drop(p)
    # "full": the baseline recipe's full model (seed of the first run), as in the other kinds
    out: dict[str, Any] = {"rows": rows, "full": full[0], "full_rows": full, "recipes": described}
    out["correct"] = correct
    out["n_test"] = int(len(ds.y_test))
    out["bayes_accuracy"] = ceiling(rc)
    if stream_src is not None:
        out["stream"] = deletion_stream(
            stream_src, int(opts["deletions"]), int(opts["eval_every"]), stream_seed
        )
        out["stream"]["recipe"] = keep_for_stream
        ws.drop(stream_src)
    return out


def correct_key(recipe: str, shards: int | None, seed: int) -> str:
    """Key of a configuration's stored per-example correctness (``shards=None``: the full
    model, S=1, R=1)."""
    return f"{recipe}|{'full' if shards is None else f'S{shards}'}|seed{seed}"


def _correct(run: Any, ds: Dataset) -> str:
    """The run's vote prediction on each test example, right or wrong, packed."""
    return pack_correct(run.predict(ds.x_test) == ds.y_test)


def loss_interval(res: dict[str, Any], recipe: str, shards: int) -> dict[str, float] | None:
    """The full model's vote accuracy minus SISA's at ``shards`` for ``recipe``, in points, with
    a 95% interval (the wider of a paired bootstrap over test examples and seeds and a t-interval
    over the per-seed gaps; with one seed, the bootstrap over its test examples alone; None
    without stored per-example results)."""
    store, n = res.get("correct") or {}, res.get("n_test")
    seeds = sorted(
        {r["seed"] for r in res["rows"] if r["recipe"] == recipe and r["shards"] == shards}
    )
    pairs = [
        (store.get(correct_key(recipe, None, sd)), store.get(correct_key(recipe, shards, sd)))
        for sd in seeds
    ]
    pairs = [(a, b) for a, b in pairs if a and b]
    if not pairs or not n:
        return None
    full = np.stack([unpack_correct(a, n) for a, _ in pairs])
    sisa = np.stack([unpack_correct(b, n) for _, b in pairs])
    r = paired_bootstrap_gap(full, sisa)
    return {k: 100 * r[k] for k in ("gap", "lo", "hi")} | {"seeds": r["n_seeds"]}


def ceiling(rc: RunConfig) -> float | None:
    """The Bayes-optimal accuracy on the test split when the data set is a generator whose
    class-conditional model is known (``purchase_synthetic``), else None."""
    from sisajax.data.synthetic import bayes_accuracy, has_bayes_accuracy

    if not has_bayes_accuracy(rc.data.name):
        return None
    t0 = time.perf_counter()
    value = bayes_accuracy(rc.data.name, **rc.data.params)
    log(
        f"ceiling: the Bayes-optimal accuracy on {rc.data.name}'s test split (its generator's own "
        f"class-conditional model) is {value:.4f} ({time.perf_counter() - t0:.1f}s)"
    )
    return value


def deletion_stream(run_dir: Path, n: int, every: int, seed: int = 0) -> dict[str, Any]:
    """Serve ``n`` uniformly drawn single-id deletions (stream seed ``seed``: the run's) one at a
    time on the run at ``run_dir``; accuracy before and every ``every`` deletions, with the
    cumulative retraining cost."""
    import sisajax as sj

    run = sj.open_run(run_dir)
    ids = sj.sample_requests(run.partition.ids, n, "uniform", seed)
    points = [{"deleted": 0, **_acc(run), "examples": 0, "wall_s": 0.0}]
    examples, wall = 0, 0.0
    t0 = time.perf_counter()
    for i, target in enumerate(ids, 1):
        rep = sj.forget(run, [int(target)])
        examples += rep.cost.examples
        wall += rep.cost.wall_s
        if i % every == 0 or i == n:
            points.append({"deleted": i, **_acc(run), "examples": examples, "wall_s": wall})
            log(f"deletions {i}/{n}: vote {points[-1]['vote']:.4f}")
    return {
        "shards": run.num_shards,
        "slices": run.num_slices,
        "seed": seed,
        "request_seed": seed,
        "points": points,
        "total_s": time.perf_counter() - t0,
        "remaining_ids": int(len(run.partition.ids)),
    }


def _acc(run: Any) -> dict[str, float]:
    r = eval_row(run.evaluate())
    return {k: r[k] for k in ("vote", "mean_prob", "shard_mean")}


def _full_by_recipe(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in res["recipes"]:
        rows = [r for r in res["full_rows"] if r["recipe"] == name]
        agg = by_seed(rows, "recipe", ("vote", "train_examples", "train_wall_s"))
        out[name] = agg[0] if agg else {}
    return out


def _loss_cell(res: dict[str, Any], recipe: str, shards: int, mean_loss: float) -> str:
    """``"3.16 [2.71, 3.60]"``: the loss in points with its 95% paired interval."""
    ci = loss_interval(res, recipe, shards)
    if ci is None:
        return fmt(100 * mean_loss, ".2f")
    return f"{ci['gap']:.2f} [{ci['lo']:.2f}, {ci['hi']:.2f}]"


def report(res: dict[str, Any], png: Path) -> str:
    fields = ("vote", "mean_prob", "shard_mean", "train_examples", "train_wall_s")
    fulls = _full_by_recipe(res)
    names = list(res["recipes"])
    base_full = fulls[names[0]].get("vote", float("nan"))
    bayes = res.get("bayes_accuracy")
    body = []
    for name in names:
        own_full = fulls[name].get("vote", float("nan"))
        for r in by_seed([x for x in res["rows"] if x["recipe"] == name], "shards", fields):
            body.append(
                [
                    name,
                    str(r["shards"]),
                    str(r["slices"]),
                    str(r["n"]),
                    pm(r, "vote"),
                    pm(r, "mean_prob"),
                    pm(r, "shard_mean"),
                    _loss_cell(res, name, int(r["shards"]), own_full - r["vote"]),
                    fmt(100 * (base_full - r["vote"]), ".2f"),
                    *([fmt(100 * (bayes - r["vote"]), ".2f")] if bayes is not None else []),
                    f"{r['train_examples']:,.0f}",
                    fmt(r["train_wall_s"], ".1f"),
                ]
            )
    ceiling_line = (
        f" Ceiling: the Bayes-optimal accuracy on this test split is {bayes:.4f} (the classifier "
        "that knows the generator's class-conditional distributions; no model beats it in "
        "expectation); below Bayes = that minus SISA's vote accuracy, in points."
        if bayes is not None
        else ""
    )
    md = [
        "Recipes: "
        + "; ".join(f"**{n}**: {d}" for n, d in res["recipes"].items())
        + ". Loss = the full model's (S=1, R=1) vote accuracy minus SISA's, in points "
        "(mean over seeds), against the same recipe's full model (with a 95% interval: "
        f"{interval_text(len({r['seed'] for r in res['rows']}))}; each model scored on the same "
        "examples and paired by seed) and against the baseline's." + ceiling_line,
        "",
        table(
            [
                "recipe",
                "S",
                "R",
                "seeds",
                "vote",
                "mean prob",
                "one constituent",
                "loss vs own full [95% CI]",
                "loss vs baseline full",
                *(["below Bayes"] if bayes is not None else []),
                "train examples",
                "train s",
            ],
            body,
        ),
        "",
        table(
            ["full model (S=1, R=1)", "vote", "train examples", "train s"],
            [
                [
                    n,
                    pm(f, "vote") if f else "-",
                    f"{f.get('train_examples', 0):,.0f}",
                    fmt(f.get("train_wall_s"), ".1f"),
                ]
                for n, f in fulls.items()
            ]
            + (
                [["Bayes-optimal (the generator's own model)", fmt(bayes), "-", "-"]]
                if bayes is not None
                else []
            ),
        ),
    ]
    st = res.get("stream")
    if st:
        pts = st["points"]
        md += [
            "",
            f"Deletion stream: {pts[-1]['deleted']} single-id requests served one at a time on "
            f"S={st['shards']}, R={st['slices']} ({st['recipe']}); drift of the vote accuracy "
            f"{100 * (pts[-1]['vote'] - pts[0]['vote']):+.2f} points.",
            "",
            table(
                ["deleted", "vote", "mean prob", "one constituent", "retrain examples", "wall s"],
                [
                    [
                        str(p["deleted"]),
                        fmt(p["vote"]),
                        fmt(p["mean_prob"]),
                        fmt(p["shard_mean"]),
                        f"{p['examples']:,}",
                        fmt(p["wall_s"], ".1f"),
                    ]
                    for p in pts
                ],
            ),
        ]
    plot(res, png)
    return "\n".join(md)


def plot(res: dict[str, Any], png: Path) -> None:
    """Left: accuracy vs S per recipe (vote and one constituent, mean +- sd), each recipe's full
    model, the paper's band under the baseline's full model. Right: accuracy over deletions."""
    pyplot = plt()
    st = res.get("stream")
    fig, axes = pyplot.subplots(1, 2 if st else 1, figsize=(11 if st else 6, 4), squeeze=False)
    ax = axes[0][0]
    fulls = _full_by_recipe(res)
    colors = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    xs: list[int] = []
    for i, name in enumerate(res["recipes"]):
        rows = by_seed(
            [r for r in res["rows"] if r["recipe"] == name], "shards", ("vote", "shard_mean")
        )
        xs = [r["shards"] for r in rows]
        c = colors[i % len(colors)]
        ax.errorbar(
            xs, [r["vote"] for r in rows], yerr=[r["vote_sd"] for r in rows], fmt="o-",
            color=c, capsize=3, label=f"{name}: SISA vote",
        )  # fmt: skip
        ax.errorbar(
            xs, [r["shard_mean"] for r in rows], yerr=[r["shard_mean_sd"] for r in rows],
            fmt="^--", color=c, alpha=0.6, capsize=3, label=f"{name}: one constituent",
        )  # fmt: skip
        if fulls[name]:
            ax.axhline(fulls[name]["vote"], color=c, ls=":", label=f"{name}: full model")
    base = fulls[list(res["recipes"])[0]]
    if base:
        claim = PAPER["shards_max_loss"]
        ax.axhspan(base["vote"] - claim["points"] / 100, base["vote"], color="gray", alpha=0.12,
                   label=claim["label"])  # fmt: skip
    if res.get("bayes_accuracy") is not None:
        ax.axhline(res["bayes_accuracy"], color="k", ls="--", lw=1, label="Bayes-optimal (ceiling)")
    if len(xs) > 1:
        integer_log_axis(ax, xs)
    ax.set_xlabel("number of shards S")
    ax.set_ylabel("test accuracy (mean ± sd over seeds)")
    ax.set_title(f"{res['name']}: {res['data']['name']}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if st:
        ax2 = axes[0][1]
        pts = st["points"]
        d = [p["deleted"] for p in pts]
        for field, style, label in (
            ("vote", "o-", "vote"),
            ("mean_prob", "s-", "mean probability"),
            ("shard_mean", "^--", "one constituent"),
        ):
            ax2.plot(d, [p[field] for p in pts], style, label=label)
        ax2.set_xlabel("single-id deletions served")
        ax2.set_ylabel("test accuracy")
        ax2.set_title(f"after deletions (S={st['shards']}, R={st['slices']}, {st['recipe']})")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    pyplot.close(fig)


def headline(res: dict[str, Any], shards: int = 20) -> list[dict[str, Any]]:
    """Per recipe at ``shards``: vote mean/sd, loss vs its own and the baseline's full model, and
    the data set's Bayes-optimal accuracy (None unless the generator's model is known)."""
    fulls = _full_by_recipe(res)
    names = list(res["recipes"])
    out = []
    for name in names:
        rows = [r for r in res["rows"] if r["recipe"] == name and r["shards"] == shards]
        if not rows:
            continue
        v = np.array([r["vote"] for r in rows])
        out.append(
            {
                "recipe": name,
                "vote": float(v.mean()),
                "vote_sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "loss_vs_own_full": 100 * (fulls[name].get("vote", np.nan) - v.mean()),
                "loss_vs_own_full_ci": loss_interval(res, name, shards),
                "loss_vs_baseline_full": 100 * (fulls[names[0]].get("vote", np.nan) - v.mean()),
                "train_examples": float(np.mean([r["train_examples"] for r in rows])),
                "bayes_accuracy": res.get("bayes_accuracy"),
            }
        )
    return out
