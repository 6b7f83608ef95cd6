"""Reports: markdown tables and plots from experiment ``results.json`` files.

:func:`make_report` turns every ``results.json`` under a folder into ``report.md`` and one PNG per
configuration (each kind module renders its own section with ``report(res, png)``). Results of
the same configuration with different seeds (one Hydra job per seed, e.g. ``sisajax paper -m
experiment=shards seed=0,1,2``) are merged first, so their rows read mean ± sd over seeds
(:mod:`sisajax.experiments.seeds`); ``merged.json`` holds those averaged rows. Shared here: number
formatting, markdown tables, the recipe line, seed aggregation (mean and spread), and the
accuracy-vs-S/R plot with error bars over seeds, integer ticks on counting axes (log or linear)
and the paper's reported numbers overlaid where a preset reproduces a paper figure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sisajax.experiments.common import jsonable

# What the paper reports (Bourtoule et al., IEEE S&P 2021), drawn on the matching plots.
PAPER = {
    "requests": [
        {"k": 8, "speedup": 4.63, "label": "paper: Purchase, S=20 R=50, K=8"},
        {"k": 18, "speedup": 2.45, "label": "paper: SVHN, K=18"},
    ],
    "shards_max_loss": {"shards": 20, "points": 2.0, "label": "paper: < ~2 points lost up to S=20"},
}


def fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def replace_between(text: str, begin: str, end: str, block: str) -> str:
    """``text`` with the part between the marker lines ``begin`` and ``end`` replaced by
    ``block`` (a generated table in a document).

    Raises:
      ValueError: the markers are missing or out of order.
    """
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"the document has no {begin!r} ... {end!r} markers")
    return text[: i + len(begin)] + "\n" + block + "\n" + text[j:]


def recipe(res: dict[str, Any]) -> str:
    c = res["config"]
    m, o, s = c["model"], c["optim"], c["sisa"]
    feats = res.get("features") or {}
    ext = ""
    if feats.get("extractor"):
        x = res["data"].get("extractor", {})
        ext = (
            f"; frozen {feats['extractor']} extractor pretrained on {x.get('public_examples')} "
            f"public ids (its test accuracy {fmt(x.get('test_accuracy'))})"
        )
    extras = [f"averaging {o['averaging']}"] if o.get("averaging", "none") != "none" else []
    seeds = (res.get("seeding") or {}).get("note")
    if not seeds:  # results written before the seeding record: the rows' seeds
        from sisajax.experiments.seeds import result_seeds

        found = result_seeds(res)
        seeds = f"seed{'s' if len(found) > 1 else ''} {', '.join(map(str, found))}"
    return (
        f"Data: {res['data']['summary']}{ext}. Model: {m['name']} hidden {m['hidden']} "
        f"{m['activation']}; {o['name']} lr {o['learning_rate']}{', ' if extras else ''}"
        f"{', '.join(extras)}, batch {s['batch_size']}, {s['epochs']:g} epochs (recalibrated over "
        f"slices), {seeds}. Took {res['total_s']:.0f}s on {res['machine']['cpus']} CPU "
        f"cores (load {res['machine']['loadavg'][0]:.1f})."
    )


def full_line(res: dict[str, Any]) -> str:
    f = res.get("full")
    if not f:
        return ""
    seeds = f" (mean ± sd over {f['n']} seeds)" if f.get("n", 1) > 1 else ""
    return (
        f"Full-retrain baseline (S=1, R=1, same data): accuracy {pm(f, 'vote')}{seeds}, "
        f"{f['train_examples']:,.0f} examples, {f['train_wall_s']:.1f}s."
    )


def by_seed(
    rows: list[dict[str, Any]], key: str | tuple[str, ...], fields: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """Rows grouped by ``key`` (e.g. ``shards``, or ``("mode", "k")``): per field the mean,
    ``<field>_sd`` (sample standard deviation over seeds, 0 for one seed), ``n`` (the number of
    seeds) and ``seeds``; see :func:`sisajax.experiments.seeds.aggregate_rows`."""
    from sisajax.experiments.seeds import aggregate_rows

    return aggregate_rows(rows, key, fields)


def pm(row: dict[str, Any], field: str, spec: str = ".4f") -> str:
    """``mean ± sd`` (just the mean for one seed)."""
    if row.get("n", 1) > 1:
        return f"{fmt(row[field], spec)} ± {fmt(row[field + '_sd'], spec)}"
    return fmt(row[field], spec)


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def integer_log_axis(ax: Any, ticks: list[int], which: str = "x") -> None:
    """A log axis labelled with the given integers (no 10^x clutter, no minor labels)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def integer_axis(ax: Any, which: str = "x") -> None:
    """Ticks at whole numbers only on an axis that counts (requests, slices, shards, steps)."""
    from matplotlib.ticker import MaxNLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def plot_accuracy(res: dict[str, Any], key: str, xlabel: str, png: Path, ax=None) -> None:
    """Accuracy vs ``key`` (shards or slices): vote, mean prob and one constituent, mean ± sd over
    seeds as error bars, the full model as a line, the paper's claim as a band."""
    pyplot = plt()
    rows = by_seed(res["rows"], key, ("vote", "mean_prob", "shard_mean"))
    x = [r[key] for r in rows]
    own = ax is None
    if own:
        fig, ax = pyplot.subplots(figsize=(6, 4))
    for field, style, label in (
        ("vote", "o-", "SISA, majority vote"),
        ("mean_prob", "s-", "SISA, mean probability"),
        ("shard_mean", "^--", "one constituent on 1/S of the data"),
    ):
        ax.errorbar(
            x,
            [r[field] for r in rows],
            yerr=[r[field + "_sd"] for r in rows],
            fmt=style,
            capsize=3,
            label=label,
        )
    full = res.get("full")
    if full:
        ax.axhline(full["vote"], color="k", ls=":", label="full model (S=1, R=1)")
        claim = PAPER["shards_max_loss"]
        if key == "shards":
            ax.axhspan(
                full["vote"] - claim["points"] / 100,
                full["vote"],
                color="gray",
                alpha=0.12,
                label=claim["label"],
            )
    if len(x) > 1:
        integer_log_axis(ax, x)
    else:
        integer_axis(ax)
    n = max((r["n"] for r in rows), default=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy" + (f" (mean ± sd, {n} seeds)" if n > 1 else ""))
    ax.set_title(f"{res['name']}: {res['data']['name']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if own:
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        pyplot.close(fig)


def _rel(d: Path, root: Path) -> str:
    where = str(d.relative_to(root))
    return "" if where == "." else where


def merge_found(
    found: list[tuple[Path, dict[str, Any]]],
) -> list[tuple[list[Path], dict[str, Any]]]:
    """Results grouped by configuration (everything but the seeds), each group merged over its
    seeds (:func:`sisajax.experiments.seeds.merge_runs`), in order of first appearance."""
    from sisajax.experiments.seeds import config_key, merge_runs

    groups: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for d, res in found:
        groups.setdefault(config_key(res), []).append((d, res))
    return [([d for d, _ in g], merge_runs([r for _, r in g])) for g in groups.values()]


def summary(res: dict[str, Any], dirs: list[Path], root: Path) -> dict[str, Any]:
    """One merged configuration for ``merged.json``: its jobs, seeds and rows averaged over
    seeds (grouped by the kind's ``ROW_KEYS``)."""
    from sisajax.experiments.paper import KINDS
    from sisajax.experiments.seeds import aggregate_rows, result_seeds

    keys = getattr(KINDS[res["kind"]], "ROW_KEYS", ())
    out: dict[str, Any] = {
        "name": res["name"],
        "kind": res["kind"],
        "jobs": [_rel(d, root) or "." for d in dirs],
        "seeds": result_seeds(res),
        "rows": aggregate_rows(res.get("rows", []), keys),
    }
    if res.get("full"):
        out["full"] = res["full"]
    if res.get("bayes_accuracy") is not None:
        out["bayes_accuracy"] = res["bayes_accuracy"]
    for note in res.get("merge_notes") or []:
        out.setdefault("notes", []).append(note)
    return out


def make_report(root: str | Path) -> Path:
    """Turn every ``results.json`` under ``root`` into ``root/report.md``, ``root/merged.json``
    and PNG plots: one section per configuration, its seeds merged (mean ± sd over seeds).

    Raises:
      FileNotFoundError: no experiment ``results.json`` under ``root``.
    """
    from sisajax.experiments.paper import KINDS

    root = Path(root).absolute()
    found = []
    for p in sorted(root.rglob("results.json")):
        try:
            res = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(res, dict) and res.get("kind") in KINDS:
            found.append((p.parent, res))
    if not found:
        raise FileNotFoundError(f"no experiment results.json under {root}")
    sections = [f"# Results under {root.name}\n"]
    merged = merge_found(found)
    singles = [(dirs, r) for dirs, r in merged if r["kind"] == "single"]
    pngs: set[Path] = set()
    for dirs, res in merged:
        if res["kind"] == "single":
            continue
        if len(dirs) == 1:
            png = dirs[0] / f"{res['name']}.png"
            where = _rel(dirs[0], root)
        else:  # several jobs, one per seed: the merged plot goes to the root
            png = root / f"{res['name']}.png"
            i = 1
            while png in pngs:
                i += 1
                png = root / f"{res['name']}_{i}.png"
            where = "jobs " + ", ".join(_rel(d, root) or "." for d in dirs)
        pngs.add(png)
        md = KINDS[res["kind"]].report(res, png)
        notes = "".join(f"\n\nNote: {n}." for n in res.get("merge_notes") or [])
        sections.append(
            f"## {res['name']} ({res['kind']}){f' - {where}' if where else ''}\n\n"
            f"{recipe(res)}{notes}\n\n{md}\n\n{full_line(res)}\n\n"
            f"![{res['name']}]({png.relative_to(root)})\n"
        )
    if singles:
        from sisajax.experiments.single import report_jobs

        jobs = sum(len(dirs) for dirs, _ in singles)
        sections.append(
            f"## Sweep ({jobs} jobs)\n\n{recipe(singles[0][1])}\n\n{report_jobs(singles, root)}\n"
        )
    (root / "merged.json").write_text(
        json.dumps(jsonable([summary(r, dirs, root) for dirs, r in merged]), indent=1) + "\n"
    )
    path = root / "report.md"
    path.write_text("\n".join(sections))
    return path
