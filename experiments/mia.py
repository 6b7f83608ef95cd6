"""Membership inference before and after forgetting: does ``sj.forget`` leave a trace?

Train SISA with a few deliberately mislabelled training points (canaries), forget them together
with random training points, and attack the forget set (members) against held-out points
(non-members) with a loss threshold, a confidence threshold and LiRA, on

  (a) the original SISA model,
  (b) the same run after ``sj.forget``,
  (c) a full retrain of one model without the forget set (``sj.full_retrain``),

each per constituent (the shard model that held the point; held-out points are scored by the
shard their id would hash to) and for the aggregate (mean probability of the ensemble). Writes
``results.json``, ``results.csv``, ``results.md`` and ``roc.png`` into ``mia.out_dir``, and
checks exactness with :func:`sisajax.verification.verify` after the forget.

    sisajax mia [overrides, e.g. mia.shadow_ensembles=64 sisa.shards=8]
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULTS: dict[str, Any] = {
    "out_dir": "runs/mia",
    "seed": 0,
    "num_random": 100,  # random training ids in the forget set
    "num_mislabelled": 50,  # canaries: training points with a flipped label (and as many held out)
    "shadow_ensembles": 32,  # LiRA shadow SISA ensembles for (a) and (b)
    "shadow_single": 32,  # LiRA shadow single models for (c)
    "target_fraction": 0.5,  # re-split train+test so the target trains on this share (None: keep)
    "shadow_fraction": 0.5,  # share of the population each shadow trains on
    "online": True,  # online LiRA (IN and OUT Gaussians); false: offline (OUT only)
    "fix_variance": True,  # one pooled variance (recommended below 64 shadows)
    "max_train": None,  # use only the first rows of the data set (tests)
    "max_test": None,
    "verify": True,  # check bit-identity of the forgotten run against a from-scratch retrain
}
SCENARIOS = ("original", "forgotten", "full_retrain")
SCENARIO_TITLES = {
    "original": "(a) original SISA",
    "forgotten": "(b) after sj.forget",
    "full_retrain": "(c) full retrain",
}
ATTACKS = ("loss", "confidence", "lira")


def options(cfg: dict[str, Any]) -> dict[str, Any]:
    """``DEFAULTS`` updated by ``cfg["mia"]``; unknown keys fail."""
    given = dict(cfg.get("mia") or {})
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        from sisajax.config import ConfigError

        raise ConfigError(f"unknown mia options {sorted(unknown)} (known: {sorted(DEFAULTS)})")
    return {**DEFAULTS, **given}


@dataclasses.dataclass
class Setup:
    """The data of one experiment.

    Attributes:
      dataset: what SISA trains on: member canaries carry flipped labels; non-member canaries
        are removed from the test split (so test accuracy stays clean).
      population: every example the attacker may use: training set (as trained), clean test
        points, non-member canaries (flipped labels). Indices below refer to it.
      sets: ``{forget set name: (member indices, non-member indices)}``.
      forget_ids: training ids forgotten by ``sj.forget`` (random and canary members).
    """

    dataset: Any
    population: Any
    sets: dict[str, tuple[np.ndarray, np.ndarray]]
    forget_ids: np.ndarray


def make_setup(ds, m: dict[str, Any]):
    """Pick canaries and the random forget set, build the training data set and the population."""
    import sisajax as sj
    from sisajax.mia import Population

    if m["max_train"] is not None or m["max_test"] is not None:
        a, b = m["max_train"] or len(ds.train_ids), m["max_test"] or len(ds.test_ids)
        ds = sj.Dataset(
            ds.name,
            ds.train_ids[:a],
            ds.x_train[:a],
            ds.y_train[:a],
            ds.test_ids[:b],
            ds.x_test[:b],
            ds.y_test[:b],
            ds.num_classes,
            ds.preprocessing,
        )
    rng = np.random.default_rng(np.random.SeedSequence([m["seed"], 0x41A]))
    if m["target_fraction"] is not None:  # re-split train + test: the target trains on a share
        ids = np.r_[ds.train_ids, ds.test_ids]
        x, y = np.concatenate([ds.x_train, ds.x_test]), np.r_[ds.y_train, ds.y_test]
        tr = np.zeros(len(ids), bool)
        tr[rng.choice(len(ids), size=round(m["target_fraction"] * len(ids)), replace=False)] = True
        ds = sj.Dataset(
            ds.name,
            ids[tr],
            x[tr],
            y[tr],
            ids[~tr],
            x[~tr],
            y[~tr],
            ds.num_classes,
            ds.preprocessing,
        )
    n, c = len(ds.train_ids), ds.num_classes
    k_mis, k_rand = int(m["num_mislabelled"]), int(m["num_random"])
    if 2 * k_mis >= len(ds.test_ids) or k_mis + k_rand >= n:
        from sisajax.config import ConfigError

        raise ConfigError("forget / canary sets are too large for the data set")

    canary_tr = rng.choice(n, size=k_mis, replace=False)
    canary_te = rng.choice(len(ds.test_ids), size=k_mis, replace=False)
    random_tr = rng.choice(np.setdiff1d(np.arange(n), canary_tr), size=k_rand, replace=False)
    y_train = ds.y_train.copy()
    y_train[canary_tr] = (y_train[canary_tr] + rng.integers(1, c, size=k_mis)) % c
    y_canary_te = (ds.y_test[canary_te] + rng.integers(1, c, size=k_mis)) % c
    clean_te = np.setdiff1d(np.arange(len(ds.test_ids)), canary_te)
    train = sj.Dataset(
        ds.name,
        ds.train_ids,
        ds.x_train,
        y_train.astype(np.int32),
        ds.test_ids[clean_te],
        ds.x_test[clean_te],
        ds.y_test[clean_te],
        c,
        ds.preprocessing,
    )
    pop = Population(
        np.concatenate([ds.train_ids, ds.test_ids[clean_te], ds.test_ids[canary_te]]),
        np.concatenate([ds.x_train, ds.x_test[clean_te], ds.x_test[canary_te]]),
        np.concatenate([y_train, ds.y_test[clean_te], y_canary_te]).astype(np.int32),
    )
    n_clean = len(clean_te)
    sets = {"random": (random_tr, n + np.arange(n_clean))}
    if k_mis:
        sets["mislabelled"] = (canary_tr, n + n_clean + np.arange(k_mis))
    forget_ids = np.sort(ds.train_ids[np.r_[random_tr, canary_tr]])
    return Setup(train, pop, sets, forget_ids)


def holder_shards(ids: np.ndarray, config) -> np.ndarray:
    """``[P]`` the shard each id is (or would be) assigned to by the run's hash partition."""
    from sisajax.data import hash_partition

    part = hash_partition(ids, config.sisa.shards, config.sisa.slices, config.sisa.seed)
    return part.shard[np.searchsorted(part.ids, ids)]


def target_views(logits: np.ndarray, active: np.ndarray, setup: Setup, config) -> dict[str, Any]:
    """``{level: ModelView}``: the holding constituent's view and the aggregate's view."""
    from sisajax.mia import ModelView, ensemble_probs

    y = setup.population.y
    if logits.shape[0] == 1:
        return {"model": ModelView.from_logits(logits[0], y)}
    holder = holder_shards(setup.population.ids, config)
    own = logits[holder, np.arange(logits.shape[1])]  # [P, C]
    return {
        "constituent": ModelView.from_logits(own, y),
        "aggregate": ModelView.from_probs(ensemble_probs(logits, active), y),
    }


def attack_all(
    scenario: str, views: dict[str, Any], shadows: dict[str, tuple], setup: Setup, m: dict
) -> list:
    """Every (forget set, attack, level) result for one target."""
    from sisajax.mia import evaluate_attack, lira_scores

    out = []
    for level, view in views.items():
        scores = {"loss": view.loss, "confidence": view.confidence}
        phi, inn = shadows[level]
        scores["lira"] = lira_scores(
            view.phi, phi, inn, online=m["online"], fix_variance=m["fix_variance"]
        )
        for set_name, (mem, non) in setup.sets.items():
            for attack in ATTACKS:
                s = scores[attack]
                res = evaluate_attack(s[mem], s[non], f"{scenario}/{level}/{set_name}/{attack}")
                out.append((scenario, level, set_name, attack, res))
    return out


def run_mia_experiment(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the experiment described in the module docstring; return (and write) its results.

    Args:
      cfg: a composed config (``data``, ``model``, ``optim``, ``sisa`` groups and an optional
        ``mia`` section, see :data:`DEFAULTS`).

    Returns:
      the results dict also written to ``<out_dir>/results.json``.
    """
    import sisajax as sj
    from sisajax.config import run_config_from
    from sisajax.mia import train_shadows
    from sisajax.store.run_dir import remove_run_dir
    from sisajax.verification import verify

    t_start = time.perf_counter()
    m = options(cfg)
    # Membership is the question: every training point of the target is a member, so none may
    # be held out as validation (nothing is tuned here); the shadows train on all of theirs too.
    rc = run_config_from(cfg).replace(data={"val_fraction": 0.0})
    out = Path(m["out_dir"]).absolute()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("sisa", "full_retrain"):  # the experiment's own runs: start from scratch
        remove_run_dir(out / name)  # a folder there that is not a run is refused, not deleted
    setup = make_setup(sj.load_dataset(rc.data.name, **rc.data.params), m)
    ds, pop = setup.dataset, setup.population
    timings: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        r = fn(*a, **kw)
        timings[name] = time.perf_counter() - t0
        return r

    run, _ = timed("train", sj.train, rc, ds, out / "sisa")
    if not np.isin(ds.train_ids, run.partition.ids).all():  # members that were never trained
        raise RuntimeError("the target run did not train on every member of the population")
    acc = {"original": run.evaluate().to_dict()}
    views = {"original": target_views(run.logits(pop.x), run.active_shards(), setup, run.config)}
    rep = timed("forget", sj.forget, run, setup.forget_ids)
    acc["forgotten"] = run.evaluate().to_dict()
    views["forgotten"] = target_views(run.logits(pop.x), run.active_shards(), setup, run.config)
    full, _ = timed("full_retrain", sj.full_retrain, run, out / "full_retrain")
    acc["full_retrain"] = full.evaluate().to_dict()
    views["full_retrain"] = target_views(full.logits(pop.x), full.active_shards(), setup, rc)
    vrep = timed("verify", verify, run) if m["verify"] else None

    sisa_sh = timed(
        "shadows_sisa",
        train_shadows,
        run.config,
        pop,
        ds.num_classes,
        m["shadow_ensembles"],
        fraction=m["shadow_fraction"],
        seed=m["seed"],
        preprocessing=ds.preprocessing,
    )
    single_sh = timed(
        "shadows_single",
        train_shadows,
        full.config,
        pop,
        ds.num_classes,
        m["shadow_single"],
        fraction=m["shadow_fraction"],
        seed=m["seed"],
        preprocessing=ds.preprocessing,
    )
    shadows = {
        "sisa": {
            "constituent": (sisa_sh.constituent_phi(pop.y), sisa_sh.member),
            "aggregate": (sisa_sh.ensemble_phi(pop.y), sisa_sh.ensemble_member),
        },
        "single": {"model": (single_sh.constituent_phi(pop.y), single_sh.member)},
    }
    results = []
    for scen in SCENARIOS:
        sh = shadows["single" if scen == "full_retrain" else "sisa"]
        results += attack_all(scen, views[scen], sh, setup, m)
    timings["total"] = time.perf_counter() - t_start

    rows = [
        {"scenario": s, "level": lv, "forget_set": fs, "attack": a, **r.to_dict()}
        for s, lv, fs, a, r in results
    ]
    summary = {
        "config": rc.to_dict(),
        "mia": m,
        "dataset": {
            "name": ds.name,
            "num_train": len(ds.train_ids),
            "num_test_clean": len(ds.test_ids),
            "population": len(pop.ids),
        },
        "forget_sets": {
            k: {"members": len(a), "nonmembers": len(b)} for k, (a, b) in setup.sets.items()
        },
        "forget": {
            "ids": rep.to_dict()["ids"],
            "shards_retrained": len(rep.restart),
            "examples": rep.cost.examples,
        },
        "accuracy": {k: v["accuracy"] for k, v in acc.items()},
        "accuracy_detail": acc,
        "verify": None
        if vrep is None
        else {
            "ok": vrep.ok,
            "mismatched_shards": vrep.mismatched_shards,
            "fingerprint_mismatches": vrep.fingerprint_mismatches,
            "backend": vrep.backend,
            "max_abs_diff": max(s.max_abs_diff for s in vrep.shards),
        },
        "shadows": {
            "sisa": {"models": int(sisa_sh.member.shape[0]), "ensembles": sisa_sh.num_ensembles},
            "single": {"models": int(single_sh.member.shape[0])},
        },
        "timings_s": timings,
        "results": rows,
    }
    (out / "results.json").write_text(
        json.dumps(
            {
                **summary,
                "curves": {
                    r.name: {"fpr": r.fpr.tolist(), "tpr": r.tpr.tolist()} for *_, r in results
                },
            },
            indent=1,
        )
    )
    write_csv(out / "results.csv", rows)
    md = markdown_table(results, summary)
    (out / "results.md").write_text(md)
    plot_rocs(out / "roc.png", results, setup)
    summary["markdown"] = md
    summary["files"] = {
        k: str(out / f)
        for k, f in [
            ("json", "results.json"),
            ("csv", "results.csv"),
            ("md", "results.md"),
            ("png", "roc.png"),
        ]
    }
    return summary


CSV_FIELDS = (
    "scenario",
    "level",
    "forget_set",
    "attack",
    "auc",
    "auc_null_sd",
    "tpr_at_0.01_fpr",
    "tpr_at_0.001_fpr",
    "advantage",
    "n_members",
    "n_nonmembers",
)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


# The header of a run's table: one row per (forget set, attack, level), a cell per scenario.
TABLE_HEAD = (
    "| forget set (members vs non-members) | attack | level | (a) original | (b) after forget "
    "| (c) full retrain |",
    "|---|---|---|---|---|---|",
)


def markdown_table(results: list, summary: dict[str, Any]) -> str:
    """One row per (forget set, attack, level); cells ``AUC / TPR@1%FPR`` per scenario."""
    by = {(s, lv, fs, a): r for s, lv, fs, a, r in results}
    lines = list(TABLE_HEAD)
    for fs, n in summary["forget_sets"].items():
        for a in ATTACKS:
            for lv in ("constituent", "aggregate"):
                cells = []
                for s in SCENARIOS:
                    r = by.get((s, lv, fs, a)) or by.get((s, "model", fs, a))
                    cells.append(f"{r.auc:.3f} / {r.tpr_at[0.01]:.3f}" if r else "-")
                lines.append(
                    f"| {fs} ({n['members']} vs {n['nonmembers']}) | {a} | {lv} | "
                    + " | ".join(cells)
                    + " |"
                )
    acc = summary["accuracy"]
    sd = {
        fs: next(r.auc_null_sd for s, lv, f, a, r in results if f == fs)
        for fs in summary["forget_sets"]
    }
    lines += [
        "",
        "Cells: AUC / TPR at 1% FPR. (c) is one model, so its constituent and aggregate cells are the "
        "same. AUC of a useless attack: 0.5 +- "
        + ", ".join(f"{v:.3f} ({k})" for k, v in sd.items())
        + " (one standard deviation).",
        f"Test accuracy: original {acc['original']:.4f}, after forget {acc['forgotten']:.4f}, "
        f"full retrain {acc['full_retrain']:.4f}.",
    ]
    if summary["verify"] is not None:
        v = summary["verify"]
        lines.append(
            f"verify after forget ({v['backend']}): "
            + (
                "every checkpoint bit-identical to a from-scratch retrain"
                if v["ok"]
                else f"MISMATCH in shards {v['mismatched_shards']}"
            )
            + "."
        )
    return "\n".join(lines) + "\n"


def plot_rocs(path: Path, results: list, setup: Setup) -> None:
    """ROC curves (log-log) of LiRA (solid) and the loss attack (dashed): rows = forget sets,
    columns = constituent / aggregate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(setup.sets)
    levels = ("constituent", "aggregate")
    colors = {"original": "tab:red", "forgotten": "tab:blue", "full_retrain": "tab:green"}
    fig, axes = plt.subplots(len(sets), 2, figsize=(10, 4.5 * len(sets)), squeeze=False)
    by = {(s, lv, fs, a): r for s, lv, fs, a, r in results}
    for i, fs in enumerate(sets):
        n0 = len(setup.sets[fs][1])
        for j, lv in enumerate(levels):
            ax = axes[i, j]
            for s in SCENARIOS:
                for a, style in (("lira", "-"), ("loss", "--")):
                    r = by.get((s, lv, fs, a)) or by.get((s, "model", fs, a))
                    if r is None:
                        continue
                    ax.step(
                        r.fpr,
                        r.tpr,
                        style,
                        where="post",
                        color=colors[s],
                        label=f"{SCENARIO_TITLES[s]}, {a} (AUC {r.auc:.2f})",
                    )
            lo = 0.5 / n0
            ax.plot([lo, 1], [lo, 1], ":", color="gray", lw=1)
            ax.set(xscale="log", yscale="log", xlim=(lo, 1), ylim=(lo, 1.05))
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.set_title(f"{fs} forget set, {lv}")
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- Documents: tables rendered from stored results (docs/forgetting-evidence.md, docs/mia/) ---

SEED0_BEGIN = "<!-- mia:seed0:begin (generated from docs/mia/seed0/results.json; do not edit) -->"
SEED0_END = "<!-- mia:seed0:end -->"
SEEDS_BEGIN = "<!-- mia:seeds:begin (generated from docs/mia/seed*/results.json; do not edit) -->"
SEEDS_END = "<!-- mia:seeds:end -->"
# The rows of the multi-seed table: (forget set, attack, level).
SEED_ROWS = (
    ("random", "loss", "constituent"),
    ("random", "lira", "constituent"),
    ("random", "lira", "aggregate"),
    ("mislabelled", "loss", "constituent"),
    ("mislabelled", "confidence", "constituent"),
    ("mislabelled", "lira", "constituent"),
    ("mislabelled", "lira", "aggregate"),
)


def load_results(paths: list[Any]) -> list[dict[str, Any]]:
    """The stored ``results.json`` of each path (a results file or the folder holding one)."""
    out = []
    for p in map(Path, paths):
        out.append(json.loads((p / "results.json" if p.is_dir() else p).read_text()))
    return out


def _row(res: dict[str, Any], scenario: str, level: str, forget_set: str, attack: str) -> dict:
    """The stored result row; the full retrain is one model, stored at level ``model``."""
    for r in res["results"]:
        if (r["scenario"], r["forget_set"], r["attack"]) == (scenario, forget_set, attack) and r[
            "level"
        ] in (level, "model"):
            return r
    raise KeyError(f"no stored result {scenario}/{level}/{forget_set}/{attack}")


def seed_block(res: dict[str, Any]) -> str:
    """One run's table (cells ``AUC / TPR@1%FPR``), null spread, test accuracy, verify, timings."""
    lines = list(TABLE_HEAD)
    for fs, n in res["forget_sets"].items():
        for a in ATTACKS:
            for lv in ("constituent", "aggregate"):
                cells = [
                    f"{r['auc']:.3f} / {r['tpr_at_0.01_fpr']:.3f}"
                    for r in (_row(res, s, lv, fs, a) for s in SCENARIOS)
                ]
                lines.append(
                    f"| {fs} ({n['members']} vs {n['nonmembers']}) | {a} | {lv} | "
                    + " | ".join(cells)
                    + " |"
                )
    sd = {
        fs: _row(res, "original", "constituent", fs, "loss")["auc_null_sd"]
        for fs in res["forget_sets"]
    }
    acc, t = res["accuracy"], res["timings_s"]
    lines += [
        "",
        "A useless attack scores AUC 0.5 +- "
        + " and +- ".join(f"{v:.3f} ({k} set)" for k, v in sd.items())
        + ", one standard deviation. Test accuracy: "
        f"original {acc['original']:.4f}, after forget {acc['forgotten']:.4f}, "
        f"full retrain {acc['full_retrain']:.4f}.",
    ]
    v = res.get("verify")
    if v is not None:
        lines.append(
            f"`verify` after the forget ({v['backend']}): "
            + (
                f"every checkpoint bit-identical (max |diff| {v['max_abs_diff']:g})"
                if v["ok"]
                else f"MISMATCH in shards {v['mismatched_shards']}"
            )
            + "."
        )
    lines.append(
        f"Wall clock of this stored run: {t['total']:.0f} s = train {t['train']:.1f}, "
        f"forget {t['forget']:.1f}, full retrain {t['full_retrain']:.1f}"
        + (f", verify {t['verify']:.1f}" if "verify" in t else "")
        + f", {res['shadows']['sisa']['models']} SISA shadows {t['shadows_sisa']:.1f}, "
        f"{res['shadows']['single']['models']} single shadows {t['shadows_single']:.1f}, "
        "the rest attacks and plots."
    )
    return "\n".join(lines)


def _spread(vals: list[float]) -> str:
    a = np.asarray(vals, float)
    sd = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return f"{a.mean():.3f} +- {sd:.3f} [{a.min():.2f}, {a.max():.2f}]"


def seeds_block(runs: list[dict[str, Any]]) -> str:
    """Mean AUC +- sd over runs [min, max] for :data:`SEED_ROWS`, LiRA's mean TPR at 1% FPR on
    the mislabelled set, and the mean test accuracy and wall clock."""
    seeds = [r["mia"]["seed"] for r in runs]
    lines = [
        "| forget set | attack | level | (a) original | (b) after forget | (c) full retrain |",
        "|---|---|---|---|---|---|",
    ]
    for fs, a, lv in SEED_ROWS:
        cells = [_spread([_row(r, s, lv, fs, a)["auc"] for r in runs]) for s in SCENARIOS]
        lines.append(f"| {fs} | {a} | {lv} | " + " | ".join(cells) + " |")

    def tpr(s: str, lv: str) -> str:
        return f"{np.mean([_row(r, s, lv, 'mislabelled', 'lira')['tpr_at_0.01_fpr'] for r in runs]):.3f}"

    acc = {s: [r["accuracy"][s] for r in runs] for s in SCENARIOS}
    tot = [r["timings_s"]["total"] for r in runs]
    lines += [
        "",
        f"Seeds {', '.join(map(str, seeds))}. LiRA's mean TPR at 1% FPR on the mislabelled set: "
        f"{tpr('original', 'constituent')} (constituent) and {tpr('original', 'aggregate')} "
        f"(aggregate) before forgetting; {tpr('forgotten', 'constituent')} and "
        f"{tpr('forgotten', 'aggregate')} after; {tpr('full_retrain', 'constituent')} for the "
        "full retrain. Mean test accuracy: "
        + ", ".join(
            f"{SCENARIO_TITLES[s].split(') ', 1)[1]} {np.mean(v):.4f} [{min(v):.4f}, {max(v):.4f}]"
            for s, v in acc.items()
        )
        + f". Wall clock per stored run: {min(tot):.0f}-{max(tot):.0f} s.",
    ]
    return "\n".join(lines)


def render_doc(text: str, runs: list[dict[str, Any]]) -> str:
    """``text`` with the seed-0 block (the run whose ``mia.seed`` is 0, else the first) and the
    multi-seed block replaced by what the stored ``runs`` give."""
    from sisajax.experiments.report import replace_between

    first = next((r for r in runs if r["mia"]["seed"] == 0), runs[0])
    text = replace_between(text, SEED0_BEGIN, SEED0_END, seed_block(first))
    return replace_between(text, SEEDS_BEGIN, SEEDS_END, seeds_block(runs))


def main(argv: list[str] | None = None) -> int:
    """``python -m sisajax.experiments.mia [--check] DOC RESULTS...``: rewrite DOC's MIA tables
    from the stored results (a ``results.json`` or its folder per run); ``--check``: exit 1 when
    DOC is not what they give, writing nothing."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    args = [a for a in args if a != "--check"]
    if len(args) < 2:
        print("usage: python -m sisajax.experiments.mia [--check] DOC RESULTS...", file=sys.stderr)
        return 2
    doc = Path(args[0])
    text = doc.read_text()
    new = render_doc(text, load_results(args[1:]))
    if check:
        if new != text:
            print(f"{doc}: MIA tables differ from the stored results", file=sys.stderr)
            return 1
        return 0
    doc.write_text(new)
    print(f"{doc}: MIA tables from {len(args) - 1} stored runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
