"""Kind ``tune``: choose each configuration's recipe on the validation split, then test it once.

The protocol a reviewer asks for, in one job:

1. **Search, on validation only.** For every number of shards S in ``experiment.shards`` (S=1
   is the full model, trained with one slice), every trial of the same search space (a grid over
   ``experiment.space``, or ``experiment.trials`` of its points drawn once with
   ``experiment.search_seed``: the same points for every S) is trained with each of
   ``experiment.select_seeds`` and scored by the ensemble's vote accuracy on the run's
   validation split (``data.val_fraction`` of the training ids, never trained on). The search
   never reads the test split (a test enforces it). Every trial is stored: its parameters,
   validation scores, examples, gradient steps and seconds.
2. **Test, once.** Each S's best trial (highest mean validation vote; ties: the earlier trial) is
   trained on the test seeds (the top-level ``seed`` or ``experiment.seeds``), which must differ
   from the selection seeds, and scored on the test split once. Per-example correctness is
   stored, so "SISA minus the tuned full model" gets a 95% paired interval (the wider of a
   bootstrap over test examples and seeds and a t-interval over the per-seed gaps) computed from
   the stored results, never typed. With one test seed the interval is the bootstrap over that
   seed's test examples alone (seed-to-seed variance unmeasured), and no verdict is met or not
   met: it is undecided until at least 2 test seeds are stored.

Equal budgets by construction: the full model gets the same space and the same trials as every
S. Rerun the whole selection with the same command (``results.json`` records every option).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from sisajax.config import RunConfig
from sisajax.data.datasets import Dataset
from sisajax.experiments.common import (
    ExperimentError,
    Workspace,
    cost_cols,
    eval_row,
    log,
    partition_digest,
)
from sisajax.experiments.report import fmt, replace_between, table
from sisajax.stats import (
    MIN_SEEDS,
    interval_text,
    pack_correct,
    paired_bootstrap_gap,
    unpack_correct,
)

DEFAULTS: dict[str, Any] = {
    "shards": [1, 5, 20],
    # "section.field" -> candidate values (sections optim, model, sisa); the grid is their product
    "space": {"optim.learning_rate": [0.01, 0.05, 0.1]},
    "trials": None,  # null: every grid point; N: N points drawn once (same for every S)
    "search_seed": 0,  # draws the trials when trials < grid size
    "select_seeds": [1000],  # seeds of the search runs (never the test seeds)
    "goal_points": 2.0,  # the research goal for "SISA minus the tuned full model", in points
}
SEED_LOOP = True  # run() handles the selection and the test seeds itself
ROW_KEYS = ("shards",)  # what names a row's configuration (rows differ by seed)
# why a verdict with fewer than MIN_SEEDS test seeds is undecided whatever its interval
UNMEASURED = f"seed variance unmeasured: needs >= {MIN_SEEDS} test seeds"
SECTIONS = ("optim", "model", "sisa")
FIXED = ("sisa.shards", "sisa.seed")  # chosen by the protocol, not searched


def search_points(opts: dict[str, Any]) -> list[dict[str, Any]]:
    """The trials: ``[{"section.field": value}]``, the grid in order or a keyed draw of it."""
    space = dict(opts["space"] or {})
    for key, values in space.items():
        section, _, field = str(key).partition(".")
        if section not in SECTIONS or not field:
            raise ExperimentError(f"experiment.space key {key!r} must be one of {SECTIONS}.<field>")
        if key in FIXED:
            raise ExperimentError(f"experiment.space may not search {key} (the protocol sets it)")
        if not isinstance(values, list | tuple) or not values:
            raise ExperimentError(f"experiment.space.{key} must list at least one value")
    keys = list(space)
    grid = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*space.values())]
    n = opts["trials"]
    if n is None or int(n) >= len(grid):
        return grid
    if int(n) < 1:
        raise ExperimentError("experiment.trials must be at least 1 (or null for the grid)")
    pick = np.random.default_rng(int(opts["search_seed"])).choice(len(grid), int(n), replace=False)
    return [grid[i] for i in sorted(pick.tolist())]


def apply(rc: RunConfig, point: dict[str, Any]) -> RunConfig:
    """``rc`` with a trial's values (``{"optim.learning_rate": 0.05, ...}``)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in point.items():
        section, _, field = key.partition(".")
        sections.setdefault(section, {})[field] = value
    return rc.replace(**sections)


def configuration(rc: RunConfig, shards: int, seed: int) -> RunConfig:
    """The run of ``shards`` shards (one slice for the full model, S=1) with ``seed``."""
    sisa = {"shards": int(shards), "seed": int(seed)}
    if int(shards) == 1:
        sisa["slices"] = 1
    return rc.replace(sisa=sisa)


def select(
    rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Phase 1: every trial of every S on the validation split. Returns (trials, chosen by S).

    Reads only the validation split of each run (``evaluate(split="val")``)."""
    import sisajax as sj

    if not rc.data.val_fraction:
        raise ExperimentError("tuning needs a validation split: set data.val_fraction > 0")
    points = search_points(opts)
    trials, chosen = [], {}
    for s in opts["shards"]:
        scores = []
        for t, point in enumerate(points):
            vals = []
            for seed in opts["select_seeds"]:
                cfg = configuration(apply(rc, point), s, seed)
                p = ws.path(f"select_S{s}_t{t}_seed{seed}")
                run, cost = sj.train(cfg, ds, p, metrics=False)
                ev = run.evaluate(split="val")
                ws.drop(p)
                vals.append(ev.vote_accuracy)
                trials.append(
                    {
                        "shards": int(s),
                        "trial": t,
                        "params": point,
                        "seed": int(seed),
                        "val_vote": ev.vote_accuracy,
                        "val_mean_prob": ev.mean_prob_accuracy,
                        "n_val": ev.num_examples,
                        **cost_cols(cost, "train"),
                    }
                )
            scores.append(float(np.mean(vals)))
            log(f"S={s} trial {t} {point}: validation vote {scores[-1]:.4f}")
        best = int(np.argmax(scores))  # the first of equal scores
        chosen[str(s)] = {"trial": best, "params": points[best], "val_vote": scores[best]}
        log(f"S={s}: chose trial {best} {points[best]} (validation vote {scores[best]:.4f})")
    return trials, chosen


def run(rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    import sisajax as sj

    test_seeds = [int(s) for s in opts["seeds"]]
    select_seeds = [int(s) for s in opts["select_seeds"] or []]
    if not select_seeds:
        raise ExperimentError("experiment.select_seeds must list at least one seed")
    if set(test_seeds) & set(select_seeds):
        raise ExperimentError(
            f"the test seeds {test_seeds} and experiment.select_seeds {select_seeds} overlap: "
            "a recipe is tested on seeds its search did not use"
        )
    if 1 not in [int(s) for s in opts["shards"]]:
        raise ExperimentError("experiment.shards must include 1: the tuned full model")
    trials, chosen = select(rc, ds, {**opts, "select_seeds": select_seeds}, ws)
    rows, correct = [], {}
    for s in opts["shards"]:
        point = chosen[str(s)]["params"]
        for seed in test_seeds:
            cfg = configuration(apply(rc, point), s, seed)
            p = ws.path(f"test_S{s}_seed{seed}")
            trained, cost = sj.train(cfg, ds, p, metrics=False)
            ev = trained.evaluate()
            correct[f"S{s}|seed{seed}"] = pack_correct(trained.predict(ds.x_test) == ds.y_test)
            rows.append(
                {
                    "shards": int(s),
                    "slices": cfg.sisa.slices,
                    "epochs": cfg.sisa.epochs,
                    "seed": seed,
                    "params": point,
                    "partition_digest": partition_digest(trained.partition),
                    "n_train": int(len(trained.partition.ids)),
                    **eval_row(ev),
                    **cost_cols(cost, "train"),
                }
            )
            ws.drop(p)
            log(f"S={s} seed={seed} {point}: test vote {ev.vote_accuracy:.4f}")
    from sisajax.experiments.accuracy import ceiling

    return {
        "trials": trials,
        "chosen": chosen,
        "rows": rows,
        "correct": correct,
        "n_test": int(len(ds.y_test)),
        "select_seeds": select_seeds,
        "test_seeds": test_seeds,
        "bayes_accuracy": ceiling(rc),
    }


def gap(res: dict[str, Any], shards: int) -> dict[str, float] | None:
    """The tuned full model's test vote accuracy minus the tuned SISA's at ``shards``, in points,
    with its 95% interval (:func:`sisajax.stats.paired_bootstrap_gap`: the wider of a paired
    bootstrap over test examples and test seeds and a t-interval over the per-seed gaps; with one
    test seed, the bootstrap over its test examples alone) and ``seeds``, the test seeds paired.
    """
    store, n = res.get("correct") or {}, res.get("n_test")
    pairs = [
        (store.get(f"S1|seed{sd}"), store.get(f"S{shards}|seed{sd}")) for sd in res["test_seeds"]
    ]
    pairs = [(a, b) for a, b in pairs if a and b]
    if not pairs or not n:
        return None
    full = np.stack([unpack_correct(a, n) for a, _ in pairs])
    sisa = np.stack([unpack_correct(b, n) for _, b in pairs])
    r = paired_bootstrap_gap(full, sisa)
    return {k: 100 * r[k] for k in ("gap", "lo", "hi")} | {"seeds": r["n_seeds"]}


def verdict(ci: dict[str, float] | None, goal: float) -> str:
    """``met`` when the whole interval is within ``goal`` points, ``not met`` when all of it is
    beyond, ``undecided`` when it straddles the goal, and ``undecided`` whatever the interval when
    it pairs fewer than :data:`~sisajax.stats.MIN_SEEDS` test seeds (``ci["seeds"]``; absent
    counts as none): the interval then leaves seed-to-seed variance out (:data:`UNMEASURED`)."""
    if ci is None:
        return "-"
    if int(ci.get("seeds") or 0) < MIN_SEEDS:
        return "undecided"
    if ci["hi"] <= goal:
        return "met"
    if ci["lo"] > goal:
        return "not met"
    return "undecided"


def verdict_note(ci: dict[str, float] | None) -> str:
    """Why :func:`verdict` is undecided whatever the interval says (``""`` when it is not)."""
    if ci is not None and int(ci.get("seeds") or 0) < MIN_SEEDS:
        return UNMEASURED
    return ""


def _verdict_cell(r: dict[str, Any]) -> str:
    return f"{r['verdict']} ({r['verdict_note']})" if r.get("verdict_note") else r["verdict"]


def _vote_cell(r: dict[str, Any]) -> str:
    """Test vote: ``mean ± sd`` over the test seeds; one seed has no spread to show."""
    if r["seeds"] > 1:
        return f"{fmt(r['vote'])} ± {fmt(r['vote_sd'])}"
    return f"{fmt(r['vote'])} (1 seed)"


def _params(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "(defaults)"


def summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per S: the chosen trial, its validation score, test vote mean and sd over test seeds (0
    for one seed, which has no spread), the gap to the tuned full model with its interval, its
    verdict and ``verdict_note`` (why it is undecided regardless of the interval, else ""), and
    mean cost columns."""
    goal = float(res["experiment"].get("goal_points", DEFAULTS["goal_points"]))
    out = []
    for s in res["experiment"]["shards"]:
        rows = [r for r in res["rows"] if r["shards"] == int(s)]
        v = np.array([r["vote"] for r in rows])
        ci = gap(res, int(s)) if int(s) != 1 else None
        out.append(
            {
                "shards": int(s),
                "params": res["chosen"][str(s)]["params"],
                "val_vote": res["chosen"][str(s)]["val_vote"],
                "vote": float(v.mean()),
                "vote_sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "seeds": len(v),
                "gap": ci,
                "verdict": verdict(ci, goal) if int(s) != 1 else "-",
                "verdict_note": verdict_note(ci) if int(s) != 1 else "",
                **{
                    k: float(np.mean([r[k] for r in rows]))
                    for k in ("train_examples", "train_steps", "train_wall_s")
                },
            }
        )
    return out


def report(res: dict[str, Any], png: Any) -> str:
    goal = float(res["experiment"].get("goal_points", DEFAULTS["goal_points"]))
    rows = summary(res)
    n_trials = len({(t["trial"]) for t in res["trials"]})
    n_seeds = len(res["test_seeds"])
    bayes = res.get("bayes_accuracy")
    body = [
        [
            str(r["shards"]) + (" (full)" if r["shards"] == 1 else ""),
            _params(r["params"]),
            fmt(r["val_vote"]),
            _vote_cell(r),
            "-"
            if r["gap"] is None
            else f"{r['gap']['gap']:.2f} [{r['gap']['lo']:.2f}, {r['gap']['hi']:.2f}]",
            _verdict_cell(r),
            f"{r['train_examples']:,.0f}",
            f"{r['train_steps']:,.0f}",
            fmt(r["train_wall_s"], ".1f"),
        ]
        for r in rows
    ]
    md = [
        f"Search: {n_trials} trials per S (the same points for every S, the full model included) "
        f"over {_space(res)}, selection seeds {res['select_seeds']}, scored by the vote accuracy "
        f"on the validation split ({res['config']['data']['val_fraction']:g} of the training "
        f"ids, never trained on). Test: the chosen trial of each S on seeds {res['test_seeds']}, "
        "scored once on the test split. Gap = the tuned full model's (S=1, R=1) test vote "
        f"accuracy minus SISA's, in points, with a 95% interval ({interval_text(n_seeds)}); "
        f"verdict against the goal of <= {goal:g} points (met: the whole interval within it; "
        "not met: all of it beyond; undecided: it straddles"
        + (")." if n_seeds >= MIN_SEEDS else f"; always with one test seed: {UNMEASURED}).")
        + (
            f" Bayes-optimal test accuracy (the generator's own model): {bayes:.4f}."
            if bayes
            else ""
        ),
        "",
        table(
            [
                "S",
                "chosen",
                "val vote",
                "test vote",
                "gap vs tuned full [95% CI]",
                "verdict",
                "train examples",
                "grad steps",
                "train s",
            ],
            body,
        ),
        "",
        "Every trial (validation only):",
        "",
        table(
            [
                "S",
                "trial",
                "params",
                "seed",
                "val vote",
                "val mean prob",
                "train examples",
                "train s",
            ],
            [
                [
                    str(t["shards"]),
                    str(t["trial"]),
                    _params(t["params"]),
                    str(t["seed"]),
                    fmt(t["val_vote"]),
                    fmt(t["val_mean_prob"]),
                    f"{t['train_examples']:,}",
                    fmt(t["train_wall_s"], ".1f"),
                ]
                for t in res["trials"]
            ],
        ),
    ]
    _plot(res, rows, png)
    return "\n".join(md)


def _space(res: dict[str, Any]) -> str:
    space = res["experiment"]["space"]
    return "; ".join(f"{k} in {list(v)}" for k, v in space.items())


def _plot(res: dict[str, Any], rows: list[dict[str, Any]], png: Any) -> None:
    """Test vote (mean ± sd over test seeds) and the chosen trial's validation vote vs S."""
    from sisajax.experiments.report import integer_log_axis, plt

    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 4))
    xs = [r["shards"] for r in rows]
    ax.errorbar(xs, [r["vote"] for r in rows], yerr=[r["vote_sd"] for r in rows], fmt="o-",
                capsize=3, label="tuned, test vote")  # fmt: skip
    ax.plot(xs, [r["val_vote"] for r in rows], "s--", alpha=0.7, label="chosen trial, validation")
    if res.get("bayes_accuracy"):
        ax.axhline(res["bayes_accuracy"], color="k", ls="--", lw=1, label="Bayes-optimal")
    if len(xs) > 1:
        integer_log_axis(ax, xs)
    ax.set_xlabel("number of shards S (1: the full model)")
    ax.set_ylabel("vote accuracy")
    ax.set_title(f"{res['name']}: {res['data']['name']}, each S tuned on validation")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    pyplot.close(fig)


def grid_edges(res: dict[str, Any], shards: int) -> list[str]:
    """Searched numeric parameters whose chosen value for ``shards`` is the smallest or largest
    of its grid: the best value may lie outside the space searched (``["optim.learning_rate"]``).
    """
    space, point = res["experiment"]["space"], res["chosen"][str(shards)]["params"]
    edges = []
    for key, values in space.items():
        nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(nums) > 2 and point.get(key) in (min(nums), max(nums)):
            edges.append(key)
    return edges


HEADLINE_BEGIN = "<!-- tune headline: generated from the stored results; do not edit by hand -->"
HEADLINE_END = "<!-- end of tune headline -->"


def headline(results: list[dict[str, Any]]) -> str:
    """One markdown table over several stored ``tune`` results: per data set and S > 1, the
    tuned full model's and tuned SISA's test vote (mean ± sd over test seeds; no spread for one
    seed), the gap with its 95% paired interval, the goal, the computed verdict (with why it is
    undecided when one test seed leaves seed variance unmeasured), and the parameters chosen at
    a grid edge.
    """
    body = []
    for res in results:
        rows = {r["shards"]: r for r in summary(res)}
        goal = float(res["experiment"].get("goal_points", DEFAULTS["goal_points"]))
        full = rows.get(1)
        n_trials = len({t["trial"] for t in res["trials"]})
        for s, r in rows.items():
            if s == 1 or full is None:
                continue
            g = r["gap"]
            edges = sorted(set(grid_edges(res, s)) | set(grid_edges(res, 1)))
            body.append(
                [
                    f"{res['name']} ({res['data']['name']}, {res['data']['num_test']:,} test)",
                    str(s),
                    str(n_trials),
                    _vote_cell(full),
                    _vote_cell(r),
                    "-" if g is None else f"{g['gap']:.2f} [{g['lo']:.2f}, {g['hi']:.2f}]",
                    f"<= {goal:g}",
                    _verdict_cell(r),
                    fmt(res.get("bayes_accuracy")),
                    ", ".join(edges) or "none",
                ]
            )
    return table(
        [
            "study (data, test examples)",
            "S",
            "trials per S",
            "tuned full, test vote",
            "tuned SISA, test vote",
            "gap, points [95% CI]",
            "goal",
            "verdict",
            "Bayes ceiling",
            "chosen at a grid edge",
        ],
        body,
    )


def load_results(dirs: list[Any]) -> list[dict[str, Any]]:
    """The ``results.json`` of each stored tune study directory, in order."""
    import json
    from pathlib import Path

    return [json.loads((Path(d) / "results.json").read_text()) for d in dirs]


def replace_headline(text: str, block: str) -> str:
    """``text`` with the part between the headline markers replaced by ``block``."""
    try:
        return replace_between(text, HEADLINE_BEGIN, HEADLINE_END, block)
    except ValueError:
        raise ExperimentError("the document has no tune headline markers") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m sisajax.experiments.tune DOC STUDY_DIR...``: rewrite DOC's headline table from
    the stored studies (the verdicts are computed, never typed)."""
    import sys
    from pathlib import Path

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m sisajax.experiments.tune DOC STUDY_DIR...", file=sys.stderr)
        return 2
    doc = Path(args[0])
    doc.write_text(replace_headline(doc.read_text(), headline(load_results(args[1:]))))
    print(f"{doc}: headline from {len(args) - 1} stored studies")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
