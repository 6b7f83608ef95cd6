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
    afterwards can get there); ``floor_permutations_needed`` then says how many it needed."""
    from sisajax.forget_quality import floor_test_can_reject, min_permutations

    n_perm = permutations(res)
    out = []
    keys = list(dict.fromkeys((r["forget_set"], r["method"]) for r in res["rows"]))
    for fset, method in keys:
        rs = [r for r in res["rows"] if r["forget_set"] == fset and r["method"] == method]
        m = {k: float(np.mean([r[k] for r in rs])) for k in rs[0] if _num(rs[0][k])}
        m.update(forget_set=fset, method=method, seeds=len(rs))
        m["min_floor_p"] = min(r["floor_p"] for r in rs)
        if floor_test_can_reject(n_perm, len(rs)):
            m["at_floor"] = m["min_floor_p"] * len(rs) >= 0.05
        else:
            m["at_floor"] = None
            m["floor_permutations_needed"] = min_permutations(len(rs))
        out.append(m)
    return out


def permutations(res: dict[str, Any]) -> int:
    """The floor test's permutations in a stored study (100 in studies that did not record it:
    the number they ran)."""
    n = (res.get("experiment") or {}).get("floor_permutations")
    return 100 if n is None else int(n)


def floor_cell(r: dict[str, Any]) -> str:
    """``yes (p 0.43)``, ``no (p 0.01)``, or why the test could not tell."""
    if r["at_floor"] is None:
        return (
            f"untestable (p {r['min_floor_p']:.2f}: {r['seeds']} seeds need >= "
            f"{r['floor_permutations_needed']} permutations)"
        )
    return f"{'yes' if r['at_floor'] else 'no'} (p {r['min_floor_p']:.2f})"


def ci_label(rows: list[dict[str, Any]]) -> str:
    """How the F brackets read: a 95% interval over the forget examples for one seed; over
    several seeds the mean of the per-seed intervals, which is not an interval for the mean."""
    return "95% CI" if all(r["seeds"] == 1 for r in rows) else "per-seed 95% CIs, averaged"


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
            "over the forget examples), KLOM (lower is "
            "better) and U-LiRA attack accuracy (0.5 = chance) against the oracle of the same configuration, each beside the floor two "
            "independent oracle populations give. 'at floor': a permutation test of the "
            "population against the second oracle draw does not tell them apart (p >= 0.05, "
            f"Bonferroni over seeds; {permutations(res)} permutations, so the smallest p is "
            f"1/{permutations(res) + 1}; p shown). Utility: unlearned / oracle accuracy. Costs per model (SISA: the measured "
            "forget of a real run, verified bit for bit). Approximate methods: their "
            "conf/unlearn budget, with the hyperparameters chosen by the tuning below.",
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
            "against its own oracle population by F x retain accuracy ratio x validation "
            "accuracy ratio; the evaluation forget set and the test split are never read):",
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
        lo, hi = rs[0]["floor_F_lo"], rs[0]["floor_F_hi"]
        ax.axhspan(lo, hi, color="grey", alpha=0.2, label="oracle floor (single models)")
        ax.set_xscale("log")
        ax.set_xlabel("examples per model (log; 'none' at 1)")
        ax.set_ylabel("forget quality F")
        ax.set_title(fset)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
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
    set and method, F with its interval beside the floor's, whether it is at the floor, test
    accuracy against the oracle's and examples per model."""
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
