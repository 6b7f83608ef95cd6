"""Tables and plot of the ``unlearning`` experiment kind (:mod:`sisajax.experiments.unlearning`),
computed from its stored rows: the per-(forget set, method) summary with the floor test, the full
report with its forget-quality-vs-cost plot, and the headline table documents embed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sisajax.experiments.report import fmt, table


def summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (forget set, method): means over seeds of every score and cost, and whether the
    population is at the floor (computed from the stored rows): ``at_floor`` is True when no
    seed's permutation test tells it from a second oracle draw (p >= 0.05, Bonferroni over
    seeds), False when one does, and None when the corrected test could never have told them
    apart with the study's permutations (``experiment.floor_permutations``, 100 when not
    recorded) for this many seeds (:func:`sisajax.forget_quality.floor_test_can_reject`: one
    study that far is refused before it trains, but seeds run as separate jobs and merged
    afterwards can get there); ``floor_permutations_needed`` then says how many it needed.

    A row whose scores (F, its interval, KLOM, U-LiRA) equal its floor's exactly in some seed
    was scored against itself: results from before the third oracle population scored the
    "retrain" baseline with the floor population, so its floor test held by construction.
    Such a row gets no verdict (``at_floor`` None, ``self_scored`` True; :func:`floor_cell`
    says why) instead of a vacuous "yes"."""
    from sisajax.forget_quality import floor_test_can_reject, min_permutations

    n_perm = permutations(res)
    out = []
    keys = list(dict.fromkeys((r["forget_set"], r["method"]) for r in res["rows"]))
    for fset, method in keys:
        rs = [r for r in res["rows"] if r["forget_set"] == fset and r["method"] == method]
        m = {k: float(np.mean([r[k] for r in rs])) for k in rs[0] if _num(rs[0][k])}
        m.update(forget_set=fset, method=method, seeds=len(rs))
        m["min_floor_p"] = min(r["floor_p"] for r in rs)
        m["self_scored"] = any(scored_against_itself(r) for r in rs)
        if m["self_scored"]:
            m["at_floor"] = None
        elif floor_test_can_reject(n_perm, len(rs)):
            m["at_floor"] = m["min_floor_p"] * len(rs) >= 0.05
        else:
            m["at_floor"] = None
            m["floor_permutations_needed"] = min_permutations(len(rs))
        out.append(m)
    return out


SELF_SCORED_KEYS = ("F", "F_lo", "F_hi", "klom", "ulira")


def scored_against_itself(row: dict[str, Any]) -> bool:
    """Whether a stored row's scores equal its floor's exactly (every one of
    :data:`SELF_SCORED_KEYS` against ``floor_<key>``): the population was the floor population
    itself, so its floor test is no test. Two independent populations never tie on all five."""
    return all(
        k in row and f"floor_{k}" in row and row[k] == row[f"floor_{k}"] for k in SELF_SCORED_KEYS
    )


SELF_SCORED_CELL = "n/a: scored against itself (results predate the third oracle population; rerun)"


def permutations(res: dict[str, Any]) -> int:
    """The floor test's permutations in a stored study (100 in studies that did not record it:
    the number they ran)."""
    n = (res.get("experiment") or {}).get("floor_permutations")
    return 100 if n is None else int(n)


def floor_cell(r: dict[str, Any]) -> str:
    """``yes (p 0.43)``, ``no (p 0.01)`` (the permutation test over models, Bonferroni over
    seeds), or why there is no verdict: the row was scored against itself, or the test could
    not tell."""
    if r.get("self_scored"):
        return SELF_SCORED_CELL
    if r["at_floor"] is None:
        return (
            f"untestable (p {r['min_floor_p']:.2f}: {r['seeds']} seeds need >= "
            f"{r['floor_permutations_needed']} permutations)"
        )
    return f"{'yes' if r['at_floor'] else 'no'} (p {r['min_floor_p']:.2f})"


def ci_label(rows: list[dict[str, Any]]) -> str:
    """How the F brackets read: a 95% bootstrap interval over the forget examples with the
    models fixed (not the noise of drawing the models: the verdict is the permutation test, not
    whether two intervals overlap) for one seed; over several seeds the mean of the per-seed
    intervals, which is not an interval for the mean."""
    base = "95% CI over forget examples, models fixed"
    return base if all(r["seeds"] == 1 for r in rows) else f"per-seed {base}, averaged"


VERDICT_NOTE = (
    "The brackets are bootstrap intervals over the forget examples with the models held fixed; "
    "they leave out the noise of drawing the models (two oracle populations' intervals can be "
    "disjoint), so do not compare them: the verdict ('at floor') is the permutation test over "
    "models (p), not whether the intervals overlap."
)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def report(res: dict[str, Any], png: Path) -> str:
    rows = summary(res)
    ci = ci_label(rows)
    body = [
        [
            r["forget_set"], r["method"],
            f"{r['F']:.3f} [{r['F_lo']:.3f}, {r['F_hi']:.3f}]",
            f"{r['floor_F']:.3f} [{r['floor_F_lo']:.3f}, {r['floor_F_hi']:.3f}]",
            floor_cell(r),
            f"{r['klom']:.3f} / {r['floor_klom']:.3f}", f"{r['ulira']:.3f} / {r['floor_ulira']:.3f}",
            f"{fmt(r['retain_acc'])} / {fmt(r['oracle_retain_acc'])}",
            f"{fmt(r['test_acc'])} / {fmt(r['oracle_test_acc'])}",
            f"{r['examples']:,.0f}", f"{r['grad_steps']:,.0f}", fmt(r["wall_s"], ".3f"),
        ]
        for r in rows
    ]  # fmt: skip
    _plot(rows, png)
    return "\n".join(
        [
            f"N = {res['num_models']} models per population; forget quality F (the unlearning "
            "challenge's score, 1 = indistinguishable from the oracle; 95% bootstrap interval "
            "over the forget examples, models fixed), KLOM (lower is "
            "better) and U-LiRA attack accuracy (0.5 = chance) against the oracle of the same configuration, each beside the floor two "
            "independent oracle populations give. 'at floor': a permutation test of the "
            "population against the second oracle draw does not tell them apart (p >= 0.05, "
            f"Bonferroni over seeds; {permutations(res)} permutations, so the smallest p is "
            f"1/{permutations(res) + 1}; p shown). Utility: unlearned / oracle accuracy. Costs per model (SISA: the measured "
            "forget of a real run, verified bit for bit). Approximate methods: their "
            "conf/unlearn budget, with the hyperparameters chosen by the tuning below. "
            + VERDICT_NOTE,
            "",
            table(
                [
                    "forget set",
                    "method",
                    f"F [{ci}]",
                    f"floor F [{ci}]",
                    "at floor",
                    "KLOM / floor",
                    "U-LiRA acc / floor",
                    "retain acc / oracle",
                    "test acc / oracle",
                    "examples",
                    "grad steps",
                    "wall s",
                ],
                body,
            ),  # fmt: skip
            "",
            "Tuning (each method's grid, scored on a separate tuning forget set of the same kind "
            "against its own oracle population by F x closeness(retain accuracy ratio) x "
            "closeness(validation accuracy ratio), closeness(r) = max(0, 1 - |1 - r|), so "
            "exceeding the oracle's accuracy (not forgetting) is not rewarded; the evaluation "
            "forget set and the test split are never read; older studies were tuned by the "
            "plain ratios):",
            "",
            table(
                [
                    "seed",
                    "forget set",
                    "method",
                    "trial",
                    "params",
                    "F",
                    "retain rel",
                    "val rel",
                    "objective",
                ],
                [
                    [
                        str(t["seed"]),
                        t["forget_set"],
                        t["method"],
                        str(t["trial"]),
                        ", ".join(f"{k}={v}" for k, v in t["params"].items()) or "(defaults)",
                        fmt(t["F"], ".3f"),
                        fmt(t["retain_rel"], ".3f"),
                        fmt(t["val_rel"], ".3f"),
                        fmt(t["objective"], ".3f"),
                    ]
                    for t in res.get("trials", [])
                ],
            ),  # fmt: skip
        ]
    )


def _plot(rows: list[dict[str, Any]], png: Path) -> None:
    from sisajax.experiments.report import plt

    pyplot = plt()
    sets = list(dict.fromkeys(r["forget_set"] for r in rows))
    fig, axes = pyplot.subplots(1, len(sets), figsize=(4.2 * len(sets), 4.6), squeeze=False)
    for ax, fset in zip(axes[0], sets, strict=True):
        rs = [r for r in rows if r["forget_set"] == fset]
        for r in rs:
            xv = max(r["examples"], 1.0)
            err = [[r["F"] - r["F_lo"]], [r["F_hi"] - r["F"]]]
            mark = (
                "s"
                if r["method"].startswith("SISA")
                else ("*" if r["method"] == "retrain" else "o")
            )
            ax.errorbar([xv], [r["F"]], yerr=err, fmt=mark, capsize=2, label=r["method"])
        # the floor as a point: its bracket is an interval over forget examples with the models
        # fixed, which a band would invite reading as the models' noise
        ax.axhline(rs[0]["floor_F"], color="grey", ls="--",
                   label="oracle-vs-oracle floor F (single models)")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("examples per model (log; 'none' at 1)")
        ax.set_ylabel("forget quality F")
        ax.set_title(fset)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.035),
               ncol=min(len(labels), 6), fontsize=8)  # fmt: skip
    fig.text(0.5, 0.005, "bars: 95% interval over forget examples, models fixed; the at-floor "
             "verdict is the permutation test over models (p), not interval overlap",
             ha="center", va="bottom", fontsize=8)  # fmt: skip
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(png, dpi=110)
    pyplot.close(fig)


HEADLINE_BEGIN = "<!-- unlearning headline: generated from the stored results; do not edit -->"
HEADLINE_END = "<!-- end of unlearning headline -->"


def markers(name: str) -> tuple[str, str]:
    """The lines around a study's generated table in a document (``unlearning``: the default
    study's; another preset's carry its name)."""
    if name == "unlearning":
        return HEADLINE_BEGIN, HEADLINE_END
    return (
        f"<!-- unlearning headline ({name}): generated from the stored results; do not edit -->",
        f"<!-- end of unlearning headline ({name}) -->",
    )


def headline(res: dict[str, Any]) -> str:
    """The study's summary as one markdown table (computed from its stored rows): per forget
    set and method, F with its interval (over forget examples, models fixed) beside the
    floor's, whether it is at the floor (the permutation test's verdict, or why there is none),
    test accuracy against the oracle's and examples per model."""
    rows = summary(res)
    ci = ci_label(rows)
    body = [
        [
            r["forget_set"], r["method"],
            f"{r['F']:.3f} [{r['F_lo']:.3f}, {r['F_hi']:.3f}]",
            f"{r['floor_F']:.3f} [{r['floor_F_lo']:.3f}, {r['floor_F_hi']:.3f}]",
            floor_cell(r),
            f"{fmt(r['test_acc'])} / {fmt(r['oracle_test_acc'])}",
            f"{r['examples']:,.0f}",
        ]
        for r in rows
    ]  # fmt: skip
    return table(
        ["forget set", "method", f"forget quality F [{ci}]", f"oracle floor F [{ci}]",
         "at floor", "test acc / oracle", "examples per model"],
        body,
    )  # fmt: skip
