"""The benchmarks' targets and their verdicts, computed from the stored results.

    python -m benchmarks.verdicts [--results DIR] [--docs FILE ...] [--check]

Each target names the result file it reads (``results/<name>.json``), how its value follows from
the numbers stored there and its limit; the verdict is computed here from those numbers, never
typed. The table is printed, written to ``results/VERDICTS.md`` and, with ``--docs``, put between
the ``<!-- verdicts:begin -->`` and ``<!-- verdicts:end -->`` lines of each file named (the README
and docs/performance.md); ``--check`` only compares those blocks with the stored results and
fails when they differ (a test runs it), so a document cannot claim what the results do not say.

CPU targets read the latest stored run of each benchmark. GPU targets read the latest stored
``gpu*.json`` that ran ``benchmarks/gpu.sh`` as shipped (XLA's determinism flags and nothing
else) and measured the quantity; the earlier runs' values are listed beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import bench_forget, bench_scaling
from benchmarks import common as C
from benchmarks.gpu_report import loop_train_s

BEGIN, END = "<!-- verdicts:begin -->", "<!-- verdicts:end -->"
DOCS = (C.REPO / "README.md", C.REPO / "docs" / "performance.md")
Value = tuple[float | None, str]  # (value, how it was computed)


@dataclasses.dataclass(frozen=True)
class Target:
    """One target: the measure, the result file it reads and its limit."""

    measure: str
    source: str  # the result file's stem (CPU) or "gpu" (every gpu.sh run)
    limit: float
    at_most: bool
    value: Callable[[dict], Value]  # of the stored file (CPU) or of one gpu.sh run
    unit: str = ""

    def verdict(self, v: float | None) -> str:
        if v is None:
            return "not measured"
        return "met" if (v <= self.limit if self.at_most else v >= self.limit) else "missed"

    def target_text(self) -> str:
        return f"{'<=' if self.at_most else '>='} {_num(self.limit)}{self.unit}"


def _num(v: float) -> str:
    if abs(v) >= 1e5:
        return f"{v / 1e3:,.0f}k"
    return f"{v:.4g}" if abs(v) < 10 else f"{v:,.1f}"


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


# -- CPU targets (one stored result each) ---------------------------------------------------------


def layouts_ratio(key: str, what: str) -> Callable[[dict], Value]:
    def value(stored: dict) -> Value:
        rounds = [r[key] for r in stored["results"]["per_round"] if r.get(key) is not None]
        if not rounds:
            return None, "no round measured it"
        shown = ", ".join(f"{v:.3f}" for v in rounds)
        return _median(rounds), f"median of {len(rounds)} rounds ({shown}); {what}"

    return value


def full_retrain_baseline(res: dict) -> tuple[float, str]:
    """The mean steady full retrain of its fastest layout (results stored before the baseline
    ran in several layouts hold one: the forgets' process layout)."""
    per: dict[str, list[float]] = {}
    for f in res["full_retrain"]:
        per.setdefault(f.get("layout", res.get("layout", "per-core")), []).append(f["steady_s"])
    means = {lay: C.mean(v) for lay, v in per.items()}
    fastest = min(means, key=means.__getitem__)
    return means[fastest], fastest


def forget_single(stored: dict) -> Value:
    from sisajax.costs import expected_speedup_single

    res, wl = stored["results"], stored["workload"]
    full, layout = full_retrain_baseline(res)
    measured = full / C.mean([x["steady_s"] for x in res["singles"]])
    analytic = expected_speedup_single(wl["shards"], wl["slices"])
    layouts = sorted({f.get("layout", "?") for f in res["full_retrain"]})
    base = (
        f"baseline: the full retrain in its fastest layout ({layout}, of {', '.join(layouts)}); "
        f"forgets in {res.get('layout', 'per-core')}"
        if len(layouts) > 1
        else "baseline: the full retrain in the forgets' own process layout only"
    )
    return measured / analytic, (
        f"{measured:.1f}x vs analytic {analytic:.1f}x, mean of {len(res['singles'])} ids; {base}"
    )


def forget_batched(stored: dict) -> Value:
    from sisajax.costs import expected_cost_batched

    res, wl = stored["results"], stored["workload"]
    n, s, r = wl["n_train"], wl["shards"], wl["slices"]
    full, _ = full_retrain_baseline(res)
    per_k = {
        k: (full / b["steady_s"]) / (n / expected_cost_batched(n, s, r, k))
        for k, b in bench_forget.fastest_batches(res["batched"]).items()
        if k > 1
    }
    if not per_k:
        return None, "no batch of K > 1"
    shown = ", ".join(f"K={k}: {v:.2f}" for k, v in per_k.items())
    layouts = sorted({str(b.get("layout", res.get("layout", "per-core"))) for b in res["batched"]})
    return min(per_k.values()), f"lowest over K ({shown}), each K in its fastest of: " + ", ".join(
        layouts
    )


def _shipped_calls(res: dict) -> list[dict]:
    return [
        c
        for c in res["calls"]
        if c["cache"] == "warm" and not c.get("profiled", True) and "id_index" in c
        if c.get("variant", "shipped") == "shipped"
    ]


def cli_total(stored: dict) -> Value:
    calls = _shipped_calls(stored["results"])
    if not calls:
        return None, "no warm call"
    tot = [c["total_s"] for c in calls]
    return C.mean(tot), f"mean of {len(tot)} random ids, warm caches (max {max(tot):.2f} s)"


def cli_beyond_retraining(stored: dict) -> Value:
    calls = _shipped_calls(stored["results"])
    if not calls:
        return None, "no warm call"
    return C.mean([c["overhead_s"] for c in calls]), f"mean of {len(calls)} calls"


def serve_overhead(stored: dict) -> Value:
    rs = (stored["results"].get("serve") or {}).get("responses", [])[1:]  # the first warms caches
    if not rs:
        return None, "no requests served"
    over = sorted(r["overhead_s"] for r in rs)
    p90 = over[int(0.9 * (len(over) - 1))]
    return C.mean(over), f"mean of {len(over)} requests after the first (p90 {p90:.3f} s)"


def _train_config(res: dict, shards: int, slices: int, shard_exec: str) -> dict | None:
    for c in res["configs"]:
        x = c["sisa"]
        if (x["shards"], x["slices"], x["shard_exec"]) == (shards, slices, shard_exec):
            return x
    return None


def checkpoint_share(stored: dict) -> Value:
    x = _train_config(stored["results"], 20, 50, "map")
    if x is None:
        return None, "no S=20, R=50 map run"
    c = x["cost"]
    return c["save_s"] / c["retrain_s"], (
        f"save wait {c['save_s']:.3f} s of {c['retrain_s']:.2f} s training (S=20, R=50, map)"
    )


def throughput(stored: dict) -> Value:
    x = _train_config(stored["results"], 20, 50, "map")
    if x is None:
        return None, "no S=20, R=50 map run"
    return x["examples_per_s"], "SISA S=20, R=50, map: examples / training seconds"


def scaling_forget(stored: dict) -> Value:
    data = json.loads(json.dumps(stored["results"]))  # derive() annotates the points it is given
    bench_scaling.derive(data)
    pts = [
        p
        for p in data["points"]
        if "error" not in p
        and (p["S"], p["R"]) != (1, 1)
        and p["N"] >= 100_000
        and p["S"] <= 64
        and p["R"] <= 100
        and p.get("measured_speedup")
    ]
    if not pts:
        return None, "no point in the target's range"
    worst = min(pts, key=lambda p: p["measured_speedup"] / p["analytic_speedup"])
    best = max(p["measured_speedup"] / p["analytic_speedup"] for p in pts)
    layouts = sorted({str(p.get("full_layout")) for p in pts})
    return worst["measured_speedup"] / worst["analytic_speedup"], (
        f"lowest of {len(pts)} points (N={worst['N']:,}, S={worst['S']}, R={worst['R']}; "
        f"highest {best:.2f}); baseline layout(s): {', '.join(layouts)}"
    )


def chaos_survived(stored: dict) -> Value:
    trials = stored["results"]["trials"]
    if not trials:
        return None, "no trial"
    ok = [
        t
        for t in trials
        if t["resume_rc"] == 0 and t["bit_identical"] and t["audit_ok"]
        if t["ledger_honest"]
    ]
    killed = sum(1 for t in trials if t["killed"])
    return len(ok) / len(trials), (
        f"{len(ok)} of {len(trials)} trials ({killed} killed by SIGKILL) resumed bit-identical, "
        "audit PASS, ledger honest"
    )


CPU_TARGETS = [
    Target(
        "SISA S=20, R=50 training (with checkpoints) / one model in its fastest layout, 2 cores",
        "bench_layouts",
        0.80,
        True,
        layouts_ratio("sisa_over_best_single", "fresh processes, wall"),
    ),
    Target(
        "the same, both on one core",
        "bench_layouts",
        1.05,
        True,
        layouts_ratio("one_core_sisa_over_single", "taskset to one core"),
    ),
    Target("training throughput, 2 cores", "bench_train", 180_000, False, throughput, " ex/s"),
    Target("checkpoint wait / training time", "bench_train", 0.03, True, checkpoint_share),
    Target(
        "one-id forget in process: measured / analytic speedup",
        "bench_forget",
        0.95,
        False,
        forget_single,
    ),
    Target(
        "batched forgets (K > 1): measured / analytic speedup",
        "bench_forget",
        0.90,
        False,
        forget_batched,
    ),
    Target(
        "one-id forget / analytic, N >= 100k, S <= 64, R <= 100",
        "bench_scaling",
        0.80,
        False,
        scaling_forget,
    ),
    Target(
        "`sisajax forget` of one id, new process, beyond retraining",
        "bench_cli",
        1.5,
        True,
        cli_beyond_retraining,
        " s",
    ),
    Target(
        "`sisajax forget` of one id, new process, in total", "bench_cli", 1.5, True, cli_total, " s"
    ),
    Target(
        "`sisajax serve`: per request beyond retraining + save",
        "bench_cli",
        0.1,
        True,
        serve_overhead,
        " s",
    ),
    Target(
        "SIGKILL at random moments of `sisajax forget`, then `resume`: share survived",
        "chaos",
        1.0,
        False,
        chaos_survived,
    ),
]


# -- GPU targets (every stored gpu.sh run) --------------------------------------------------------


def gpu_step_us(g: dict) -> float | None:
    prog = g.get("program") or {}
    best, width = prog.get("best"), g["size"]["shards"]
    for row in prog.get("rows", []):
        chosen = best and (row["chunk"], row["unroll"]) == (best["chunk"], best["unroll"])
        if chosen and row["width"] == width:
            return row["us_per_step"]
    return None


def gpu_one_model(g: dict) -> float | None:
    rates = [g[k]["examples_per_s"] for k in ("train_single", "train_single_vmap") if k in g]
    return max(rates) if rates else None


def gpu_forget(g: dict) -> float | None:
    fs = g.get("forget_single") or []
    steady = [f["wall_s"] - f["compile_s"] for f in fs[1:]]  # the first warms up
    return C.mean(steady) if steady else None


def gpu_loop(g: dict) -> float | None:
    if "train_loop" not in g or "train_vmap" not in g:
        return None
    return loop_train_s(g["train_loop"]) / g["train_vmap"]["retrain_s"]


def gpu_resnet(g: dict) -> float | None:
    rn = g.get("resnet18") or {}
    single = rn.get("single")
    sisa = [v for k, v in rn.items() if k.startswith("sisa_") and isinstance(v, dict)]
    if not single or not sisa:
        return None
    return min(v["retrain_s"] for v in sisa) / single["retrain_s"]


def gpu_verify(g: dict) -> float | None:
    v = g.get("verify")
    return None if not v else v["bit_identical_shards"] / v["shards"]


GPU_TARGETS = [
    ("device time per vmapped step, S=20 (chosen chunk)", 30.0, True, gpu_step_us, " us"),
    (
        "SISA S=20, R=50 training, wall",
        1.0,
        True,
        lambda g: g["train_vmap"]["wall_s"] if "train_vmap" in g else None,
        " s",
    ),
    ("one model, examples/s (its fastest layout)", 1e6, False, gpu_one_model, " ex/s"),
    ("one-id forget, mean (compile excluded)", 0.15, True, gpu_forget, " s"),
    ("per-shard loop / vmap, train time", 10.0, False, gpu_loop, "x"),
    (
        "ResNet-18 CIFAR-shaped: fastest SISA S=10 / one model, train time",
        1.0,
        True,
        gpu_resnet,
        "",
    ),
    ("verify after forgets: share of shards bit-identical", 1.0, False, gpu_verify, ""),
]


# runs stored before results recorded when they started, oldest first (git history: the first
# two measured one model before its chunk loop became static on accelerators)
LEGACY_GPU_RUNS = ("gpu.json", "gpu_round2.json", "gpu_resnet.json", "gpu_xla_default.json")


def gpu_runs(results: Path) -> list[tuple[str, dict]]:
    """The stored full-size gpu.sh runs with the shipped XLA flags (determinism only), oldest
    first: the legacy runs in their known order, then the others by the time they started."""
    from sisajax.layout import GPU_DETERMINISM_FLAGS

    runs = []
    for p in sorted(results.glob("gpu*.json")):
        g = json.loads(p.read_text())
        if g.get("dry_run") or g.get("backend") != "gpu":
            continue
        if set(g.get("xla_flags", "").split()) == set(GPU_DETERMINISM_FLAGS):
            runs.append((p.name, g))

    def order(item: tuple[str, dict]) -> tuple[int, str]:
        name, g = item
        if name in LEGACY_GPU_RUNS and "run" not in g:
            return (0, f"{LEGACY_GPU_RUNS.index(name):04d}")
        return (1, str(g.get("run", {}).get("started", "")))

    return sorted(runs, key=order)


# -- evaluation and rendering ---------------------------------------------------------------------


def evaluate(results: Path = C.RESULTS) -> list[dict[str, Any]]:
    """One row per target: measure, value, how it was computed, target, verdict, source."""
    rows = []
    for t in CPU_TARGETS:
        path = results / f"{t.source}.json"
        if not path.is_file():
            v, how, src = None, "no stored result", path.name
        else:
            stored = json.loads(path.read_text())
            v, how = t.value(stored)
            g = stored["git"]
            src = f"{path.name} ({stored['started'][:10]}, git {g['commit']})"
        rows.append(_row("CPU", t, v, how, src))
    runs = gpu_runs(results)
    for measure, limit, at_most, fn, unit in GPU_TARGETS:
        t = Target(measure, "gpu", limit, at_most, fn, unit)
        got = [(name, fn(g)) for name, g in runs]
        got = [(name, v) for name, v in got if v is not None]
        if not got:
            rows.append(_row("GPU", t, None, "no stored run measured it", "gpu*.json"))
            continue
        latest_name, latest = got[-1]
        earlier = ", ".join(f"{_num(v)}{unit}" for _, v in got[:-1])
        how = "the latest run" + (f" (earlier runs: {earlier})" if earlier else "")
        loop = dict(runs).get(latest_name, {}).get("train_loop", {})
        if measure.startswith("per-shard loop") and "train_s" not in loop:
            how += "; its loop time includes compiling (stored before compile was recorded)"
        rows.append(_row("GPU", t, latest, how, latest_name))
    return rows


def _row(kind: str, t: Target, v: float | None, how: str, src: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "measure": t.measure,
        "value": v,
        "shown": "-" if v is None else f"{_num(v)}{t.unit}",
        "how": how,
        "target": t.target_text(),
        "verdict": t.verdict(v),
        "source": src,
    }


def render(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of :func:`evaluate`'s rows."""
    out = [
        "| | measure | value | target | verdict | how (from the stored result) | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = f"**{r['verdict']}**" if r["verdict"] == "missed" else r["verdict"]
        out.append(
            f"| {r['kind']} | {r['measure']} | {r['shown']} | {r['target']} | {v} | {r['how']} "
            f"| {r['source']} |"
        )
    return "\n".join(out) + "\n"


def replace_block(text: str, table: str) -> str:
    """``text`` with the lines between the verdict markers replaced by ``table``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=C.RESULTS)
    p.add_argument("--docs", type=Path, nargs="*", default=list(DOCS))
    p.add_argument("--check", action="store_true", help="only compare the documents' blocks")
    args = p.parse_args(argv)
    table = render(evaluate(args.results))
    stale = []
    for doc in args.docs:
        text = doc.read_text()
        new = replace_block(text, table)
        if new != text:
            stale.append(str(doc))
            if not args.check:
                doc.write_text(new)
    if args.check:
        if stale:
            print(f"verdict tables out of date in: {', '.join(stale)} (run benchmarks.verdicts)")
            return 1
        return 0
    (args.results / "VERDICTS.md").write_text("# Targets and verdicts\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
