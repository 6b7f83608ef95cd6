"""Scaling: throughput, unlearning speedup and peak memory as S, R and N grow (item 5).

    python -m benchmarks.bench_scaling [--quick] [--budget-s 1500]

Every grid point runs in its own subprocess (``--point``, one CPU device per core): generate the
data, ``sj.train``; then, in a fresh process in ``--forget-layout`` (default ``serial``, the
fastest CPU layout for a program of one shard), one warm-up ``sj.forget`` of a random id and
``--forgets`` measured ones (ids stratified by slice, as in bench_forget). The point reports
training throughput (examples / training seconds), the mean steady forget wall (compile excluded)
and its own peak RSS (``VmHWM``): of the whole process, and of the part after the data was
generated (training), by resetting the high-water mark through ``/proc/self/clear_refs``; the
forget process's peak is reported apart.

Unlearning speedup = steady wall of training one model (S=1, R=1) on the same N and epochs (what
``sj.full_retrain`` runs), in the fastest of ``--baseline-layouts`` (default one device per core
and serial; each its own point process) / mean steady forget wall; analytic S*3R/(2R+1).

Grid (the compass recipe, 20 epochs everywhere, ~25 minutes on 2 cores):
  * S in 1, 2, 5, 10, 20, 50, 64, 100 at N=100k, R=10;
  * R in 1, 5, 10, 20, 50, 100 at N=100k, S=20;
  * N in 10k, 30k, 100k, 300k, 1M at S=20, R=50.
Points are skipped (and listed) once ``--budget-s`` is spent. Plot: ``bench_scaling[_tag].png``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common as C


def grid(quick: bool) -> dict[str, Any]:
    if quick:
        n0 = C.Workload.quick_version().n_train
        return {
            "S": {"values": [2], "fixed": {"N": n0, "R": 2, "epochs": 1.0}},
            "R": {"values": [2], "fixed": {"N": n0, "S": 2, "epochs": 1.0}},
            "N": {"values": [n0], "fixed": {"S": 2, "R": 2, "epochs": 1.0}},
        }
    return {
        "S": {
            "values": [1, 2, 5, 10, 20, 50, 64, 100],
            "fixed": {"N": 100_000, "R": 10, "epochs": 20.0},
        },
        "R": {
            "values": [1, 5, 10, 20, 50, 100],
            "fixed": {"N": 100_000, "S": 20, "epochs": 20.0},
        },
        "N": {
            "values": [10_000, 30_000, 100_000, 300_000, 1_000_000],
            "fixed": {"S": 20, "R": 50, "epochs": 20.0},
        },
    }


def points_of(g: dict[str, Any]) -> list[dict[str, Any]]:
    """Unique points, each full-model baseline (S=1, R=1) first for its (N, epochs)."""
    pts: dict[tuple, dict[str, Any]] = {}
    for axis, spec in g.items():
        for v in spec["values"]:
            p = dict(spec["fixed"], **{axis: v})
            for q in ({"N": p["N"], "S": 1, "R": 1, "epochs": p["epochs"]}, p):
                key = (q["N"], q["S"], q["R"], q["epochs"])
                pts.setdefault(key, {"N": q["N"], "S": q["S"], "R": q["R"], "epochs": q["epochs"]})
    return list(pts.values())


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_forgets(run, slices: int, args) -> list[dict[str, Any]]:
    """A warm-up ``sj.forget`` of a random id, then ``args.forgets`` measured ones of ids
    stratified by slice (as in bench_forget), in this process."""
    import numpy as np

    import sisajax as sj

    rng = np.random.default_rng(args.seed)
    n = args.forgets
    forgets = []
    strata = [None] + [int((i + rng.random()) * slices / n) for i in rng.permutation(n)]
    for i, u in enumerate(strata):
        part = run.partition
        pool = part.ids if u is None else part.ids[part.slice == u]
        ids = [int(rng.choice(pool))]
        with C.span() as fs:
            rep = sj.forget(run, ids)
        fc = rep.cost.to_dict()
        forgets.append(
            {
                "warmup": i == 0,
                "cost": fc,
                "jit_s": fs.jit_s,
                "steady_s": C.steady(fc["wall_s"], fc["compile_s"], fs.jit_s),
                "restart": {str(k): int(v) for k, v in rep.restart.items()},
                "examples_ratio": rep.examples_ratio,
            }
        )
    return forgets


def forgets_in_layout(run_dir: Path, args) -> dict[str, Any]:
    """:func:`measure_forgets` on the run at ``run_dir`` in a fresh process started in CPU layout
    ``args.forget_layout``: ``{"forgets", "peak_rss_mb"}``."""
    out = run_dir.parent / "forgets.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_scaling", "--forget-child", str(run_dir)]
    cmd += ["--point-out", str(out), "--forgets", str(args.forgets), "--seed", str(args.seed)]
    env = C.layout_env(args.forget_layout)
    proc = subprocess.run(cmd, cwd=C.REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"forgets in the {args.forget_layout} layout:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def run_point(point: dict[str, Any], args) -> dict[str, Any]:
    """One grid point, in this (fresh) process."""

    import sisajax as sj

    wl = C.workload(args)
    n, s, r, e = point["N"], point["S"], point["R"], point["epochs"]
    t0 = time.perf_counter()
    ds = wl.dataset(n_train=n)
    data_s = time.perf_counter() - t0
    rss_data = _vm_hwm_mb()
    reset = _reset_hwm()
    cfg = wl.config(s, r, args.exec, epochs=e, n_train=n)
    out: dict[str, Any] = {**point, "data_s": data_s, "rss_after_data_mb": rss_data}
    with C.work_dir(args, "point") as work:
        with C.span() as sp:
            run, cost = sj.train(cfg, ds, work / "run")
        c = cost.to_dict()
        out["train"] = {"cost": c, "span": sp.to_dict()}
        out["train_steady_s"] = C.steady(c["wall_s"], c["compile_s"], sp.jit_s)
        out["examples_per_s"] = c["examples"] / c["retrain_s"] if c["retrain_s"] else None
        out["checkpoint_bytes"] = C.du_bytes(work / "run" / "checkpoints")
        forgets: list[dict[str, Any]] = []
        if s * r > 1 and args.forgets > 0:
            if C.in_layout(args.forget_layout):
                forgets = measure_forgets(run, r, args)
            else:
                child = forgets_in_layout(work / "run", args)
                forgets = child["forgets"]
                out["forget_process_peak_rss_mb"] = child["peak_rss_mb"]
            out["forget_layout"] = args.forget_layout
        out["forgets"] = forgets
        measured = [f for f in forgets if not f["warmup"]]
        out["forget_steady_mean_s"] = (
            C.mean([f["steady_s"] for f in measured]) if measured else None
        )
        out["forget_retrain_mean_s"] = (
            C.mean([f["cost"]["retrain_s"] for f in measured]) if measured else None
        )
    # clear_refs resets VmHWM and ru_maxrss alike: the process peak is the larger of the two parts
    after = _vm_hwm_mb() if reset else None
    out["peak_rss_after_data_mb"] = after
    out["peak_rss_mb"] = max(x for x in (rss_data, after, C.peak_rss_mb()) if x is not None)
    return out


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--exec", default="map")
    p.add_argument("--forgets", type=int, default=None, help="measured forgets per point")
    p.add_argument("--seed", type=int, default=99)
    p.add_argument("--budget-s", type=float, default=2400.0, help="skip points after this")
    p.add_argument("--point", default=None, help=argparse_hidden())
    p.add_argument("--point-out", type=Path, default=None, help=argparse_hidden())
    p.add_argument("--forget-child", type=Path, default=None, help=argparse_hidden())
    p.add_argument(
        "--forget-layout",
        default="serial",
        choices=sorted(C.CPU_LAYOUTS),
        help="CPU layout the forgets run in, in their own process (default serial, the fastest "
        "for a program of one shard)",
    )
    p.add_argument(
        "--baseline-layouts",
        default="per-core,serial",
        help="CPU layouts the full model (S=1, R=1) trains in at each N; the fastest is the "
        "speedup's baseline (comma-separated)",
    )
    args = p.parse_args(argv)
    if args.forgets is None:
        args.forgets = 1 if args.quick else 3
    if args.forget_child is not None:
        import sisajax as sj

        rows = measure_forgets(run := sj.open_run(args.forget_child), run.config.sisa.slices, args)
        res = {"forgets": rows, "peak_rss_mb": C.peak_rss_mb()}
        args.point_out.write_text(json.dumps(res, default=C.json_default))
        return 0
    if args.point is not None:
        res = run_point(json.loads(args.point), args)
        args.point_out.write_text(json.dumps(res, default=C.json_default))
        return 0

    wl = C.workload(args)
    head = C.header(args, "bench_scaling", wl)
    g = grid(args.quick)
    pts = points_of(g)
    results, skipped = [], []
    t_start = time.perf_counter()
    with C.work_dir(args, "scaling") as work:
        baseline_layouts = args.baseline_layouts.split(",")
        for x in baseline_layouts:
            if x not in C.CPU_LAYOUTS:
                p.error(f"unknown layout {x!r} (one of {sorted(C.CPU_LAYOUTS)})")
        runs = [
            (pt, lay)
            for pt in pts
            for lay in (baseline_layouts if pt["S"] == 1 and pt["R"] == 1 else ["per-core"])
        ]
        for i, (pt, lay) in enumerate(runs):
            if time.perf_counter() - t_start > args.budget_s:
                skipped.append({**pt, "layout": lay})
                continue
            C.log(f"point {i + 1}/{len(runs)} ({lay} layout): {pt}")
            out = work / f"point{i}.json"
            cmd = [sys.executable, "-m", "benchmarks.bench_scaling", "--point", json.dumps(pt)]
            cmd += ["--point-out", str(out), "--exec", args.exec, "--forgets", str(args.forgets)]
            cmd += ["--seed", str(args.seed), "--work", str(work)]
            cmd += ["--forget-layout", args.forget_layout]
            if args.quick:
                cmd.append("--quick")
            env = C.layout_env(lay)
            with C.span() as sp:
                proc = subprocess.run(
                    cmd, cwd=C.REPO, env=env, capture_output=True, text=True, check=False
                )
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                results.append(
                    {**pt, "layout": lay, "error": proc.stderr[-500:], "process": sp.to_dict()}
                )
                continue
            results.append({**json.loads(out.read_text()), "layout": lay, "process": sp.to_dict()})
    data = {
        "grid": g,
        "points": results,
        "skipped": skipped,
        "total_s": time.perf_counter() - t_start,
    }
    derive(data)
    tables = make_tables(data)
    C.show(tables, head)
    path = C.write_results(args, "bench_scaling", head, tables, data)
    png = plot(data, path.with_suffix(".png"))
    print(f"results: {path}" + (f", plot: {png}" if png else ""))
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def derive(data: dict[str, Any]) -> None:
    """Speedups against the full-model point of the same (N, epochs)."""
    from sisajax.costs import expected_speedup_single

    ok = [p for p in data["points"] if "error" not in p]
    # the full model's fastest layout at each (N, epochs) is the baseline
    base: dict[tuple, dict[str, Any]] = {}
    for p in ok:
        if p["S"] == 1 and p["R"] == 1:
            key = (p["N"], p["epochs"])
            if key not in base or p["train_steady_s"] < base[key]["train_steady_s"]:
                base[key] = p
    for b in base.values():
        b["fastest_baseline"] = True
    for p in ok:
        b = base.get((p["N"], p["epochs"]))
        p["analytic_speedup"] = expected_speedup_single(p["S"], p["R"])
        p["full_steady_s"] = b["train_steady_s"] if b else None
        p["full_layout"] = b.get("layout", "per-core") if b else None
        if p["S"] == 1 and p["R"] == 1:
            p["measured_speedup"] = 1.0
        elif b and p.get("forget_steady_mean_s"):
            p["measured_speedup"] = b["train_steady_s"] / p["forget_steady_mean_s"]
        else:
            p["measured_speedup"] = None
        p["retrain_only_speedup"] = (
            1.0
            if p["S"] == 1 and p["R"] == 1
            else C.ratio(b["train_steady_s"], p.get("forget_retrain_mean_s"))
            if b
            else None
        )
        p["throughput_vs_full"] = C.ratio(p["examples_per_s"], b["examples_per_s"]) if b else None


def _axis_points(data: dict[str, Any], axis: str) -> list[dict[str, Any]]:
    spec = data["grid"][axis]
    out = []
    for v in spec["values"]:
        want = dict(spec["fixed"], **{axis: v})
        for p in data["points"]:
            if "error" not in p and all(p[k] == want[k] for k in ("N", "S", "R", "epochs")):
                out.append(p)
    return out


def make_tables(data: dict[str, Any]) -> list[C.Table]:
    tables = []
    for axis, label in (("S", "shards S"), ("R", "slices R"), ("N", "training points N")):
        fixed = data["grid"][axis]["fixed"]
        t = C.Table(
            f"Scaling in {label} ({', '.join(f'{k}={v:g}' for k, v in fixed.items())})",
            (
                axis,
                "train wall s",
                "ex/s (train)",
                "ex/s / full",
                "save s",
                "ckpt MB",
                "forget steady s",
                "full steady s",
                "speedup",
                "speedup (retrain only)",
                "analytic",
                "measured / analytic",
                "peak RSS MB",
                "RSS after data MB",
            ),
        )
        for p in _axis_points(data, axis):
            c = p["train"]["cost"]
            t.add(
                p[axis],
                c["wall_s"],
                p["examples_per_s"],
                p["throughput_vs_full"],
                c["save_s"],
                p["checkpoint_bytes"] / 2**20,
                p.get("forget_steady_mean_s"),
                p["full_steady_s"],
                p["measured_speedup"],
                p["retrain_only_speedup"],
                p["analytic_speedup"],
                C.ratio(p["measured_speedup"], p["analytic_speedup"]),
                p["peak_rss_mb"],
                p["peak_rss_after_data_mb"],
            )
        tables.append(t)
    t = C.Table(
        "The full model (S=1, R=1) in each CPU layout: the fastest is the speedups' baseline",
        ("N", "epochs", "layout", "train wall s", "train steady s", "ex/s (train)", "baseline"),
    )
    for p in sorted(
        (p for p in data["points"] if "error" not in p and p["S"] == 1 and p["R"] == 1),
        key=lambda p: (p["N"], p["epochs"], p.get("layout", "")),
    ):
        t.add(
            p["N"],
            p["epochs"],
            p.get("layout", "per-core"),
            p["train"]["cost"]["wall_s"],
            p["train_steady_s"],
            p["examples_per_s"],
            "yes" if p.get("fastest_baseline") else "",
        )
    tables.append(t)
    t = C.Table("Sweep", ("quantity", "value"))
    t.add("points run", len(data["points"]))
    t.add("points skipped (budget)", len(data["skipped"]))
    t.add("total s", data["total_s"])
    tables.append(t)
    return tables


def plot(data: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(3, 3, figsize=(12, 9), dpi=70)
    for col, axis in enumerate(("S", "R", "N")):
        pts = _axis_points(data, axis)
        x = [p[axis] for p in pts]
        ax = axes[0][col]
        ax.plot(x, [p["examples_per_s"] for p in pts], "o-")
        ax.set_ylabel("examples/s (training)")
        ax = axes[1][col]
        ax.plot(x, [p["measured_speedup"] or float("nan") for p in pts], "o-", label="measured")
        ax.plot(
            x,
            [p["retrain_only_speedup"] or float("nan") for p in pts],
            "^:",
            label="retraining only",
        )
        ax.plot(x, [p["analytic_speedup"] for p in pts], "k--", label="S*3R/(2R+1)")
        ax.set_ylabel("unlearning speedup")
        ax.legend(fontsize=8)
        ax = axes[2][col]
        ax.plot(x, [p["peak_rss_mb"] for p in pts], "o-", label="process")
        ax.plot(
            x, [p["peak_rss_after_data_mb"] or float("nan") for p in pts], "s-", label="after data"
        )
        ax.set_ylabel("peak RSS (MiB)")
        ax.legend(fontsize=8)
        fixed = data["grid"][axis]["fixed"]
        axes[2][col].set_xlabel(f"{axis} ({', '.join(f'{k}={v:g}' for k, v in fixed.items())})")
        for row in range(3):
            if len(set(x)) > 1:
                axes[row][col].set_xscale("log")
            axes[row][col].set_ylim(bottom=0)
            axes[row][col].grid(alpha=0.3)
    fig.suptitle("sisajax scaling (Purchase-shaped MLP, SGD, batch 16)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    C.main_wrapper(main)
