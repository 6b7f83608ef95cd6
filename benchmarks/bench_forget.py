"""Unlearning latency in-process vs a full retrain, against the paper's analytic speedups (item 2).

    python -m benchmarks.bench_forget [--quick] [--exec map|vmap] [--ids 10] [--ks 1,5,20,100]

On one trained S=20, R=50 run (reused from ``runs/bench-cache`` when the same config and library
sources trained it before), in one process:
  * one warm-up ``sj.forget`` of a random id (its compile is shown, not averaged), then
    ``--ids`` (default 100) forgets of one random id each (seeded), end to end: restore, retrain, save. The ids
    are stratified by slice (the restart slice sets the cost; with 10 plain random draws the mean
    restart slice varies by about 20%, one standard deviation): draw i of n takes a uniform
    slice in [i*R/n, (i+1)*R/n) and a random id of that slice in any shard;
  * ``sj.full_retrain`` on the retained data, ``--full-repeats`` times, between groups of the
    forgets above (the first compiles; the steady-state figure is wall minus all compile work);
  * batched requests of K random ids (one ``sj.forget`` call each).

The baseline is the full retrain in its fastest CPU layout. The process runs in ``--layout``
(default ``serial``: one device with XLA pools sized for one core, the fastest layout both for a
program of one shard, as a one-id forget retrains, and for the single full model on 2 cores; it
restarts itself in it), and at each baseline point the full retrain also runs in a fresh process
in each of ``--baseline-layouts`` (default: one device per core, and XLA's one device on all
cores); the measured speedup divides the lowest mean steady full retrain over the layouts by the
mean forget. Batched forgets of many shards run in ``--layout`` too (one device per core would
retrain them side by side, faster: their speedups are conservative).

The ``--full-repeats`` (default 3) full retrains are interleaved with the single-id forgets
(F f..f F f..f F), so a load that drifts over the minutes of a run (the machine is shared) affects
both sides alike. Measured speedup = mean full-retrain steady wall / mean forget steady wall (per
group too). It is compared with the analytic expectation S*3R/(2R+1) (29.7x at S=20, R=50) for
single requests and with ``N / costs.expected_cost_batched(N, S, R, K)`` for batched ones. Targets: >= 0.95 of analytic for
single requests, >= 0.90 for batched ones. Steady state excludes compile time: the engine's own (``cost.compile_s``) or,
when larger, all tracing/lowering/compiling JAX reported during the call (``jax.monitoring``
events; initial-state and other small jits compile on first use too). Compile time is shown in its
own columns.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common as C


def forget_once(run, ids: list[int]) -> dict[str, Any]:
    import sisajax as sj

    with C.span() as sp:
        rep = sj.forget(run, ids)
    c = rep.cost.to_dict()
    return {
        "ids": list(ids),
        "restart": {str(k): int(v) for k, v in rep.restart.items()},
        "cost": c,
        "jit_s": sp.jit_s,
        "steady_s": C.steady(c["wall_s"], c["compile_s"], sp.jit_s),
        "other_s": c["wall_s"] - c["compile_s"] - c["restore_s"] - c["retrain_s"] - c["save_s"],
        "examples_ratio": rep.examples_ratio,
        "full_retrain_examples": rep.full_retrain_examples,
        "span": sp.to_dict(),
    }


def full_retrain_once(run, dest: Path) -> dict[str, Any]:
    """``sj.full_retrain`` of ``run`` into ``dest`` in this process: cost, jit and steady wall."""
    import sisajax as sj

    with C.span() as sp:
        _, fc = sj.full_retrain(run, dest)
    fc = fc.to_dict()
    return {
        "cost": fc,
        "jit_s": sp.jit_s,
        "steady_s": C.steady(fc["wall_s"], fc["compile_s"], sp.jit_s),
        "span": sp.to_dict(),
    }


def baseline_child(run_dir: Path) -> dict[str, Any]:
    """The full retrain of the run at ``run_dir`` in this (fresh) process, into a scratch folder."""
    import sisajax as sj

    work = Path(tempfile.mkdtemp(prefix="sisajax-bench-full-", dir=run_dir.parent))
    try:
        return full_retrain_once(sj.open_run(run_dir), work / "full")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def full_in_layout(run_dir: Path, layout: str) -> dict[str, Any]:
    """The full retrain of the run at ``run_dir`` in a fresh process in CPU layout ``layout``."""
    args = ["--baseline-child", str(run_dir)]
    return C.child_json("benchmarks.bench_forget", args, layout, "full retrain")


def batched_child(run_dir: Path, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The warm-up forget, then every batch of ``plan``, on the run at ``run_dir``, here."""
    import sisajax as sj

    run = sj.open_run(run_dir)
    forget_once(run, plan["warm"])
    return [forget_once(run, ids) for _, ids in plan["batches"]]


def batches_in_layout(
    run_dir: Path, warm: list[int], batches: list[tuple[int, list[int]]], layout: str
) -> list[dict[str, Any]]:
    """:func:`batched_child` in a fresh process in CPU layout ``layout``."""
    plan = json.dumps({"warm": warm, "batches": batches})
    args = ["--batched-child", str(run_dir), "--batched-plan", plan]
    return C.child_json("benchmarks.bench_forget", args, layout, "batched forgets")


def main(argv: list[str] | None = None) -> int:
    from sisajax import costs

    p = C.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--layout",
        default="serial",
        choices=sorted(C.CPU_LAYOUTS),
        help="CPU layout of the forgets and the in-process full retrains (default serial)",
    )
    p.add_argument(
        "--baseline-layouts",
        default=None,
        help="other CPU layouts the full retrain also runs in, each in a fresh process "
        "(comma-separated; default per-core,one-device; 'none' for none)",
    )
    p.add_argument(
        "--batch-layouts",
        default="serial,per-core",
        help="CPU layouts the batched forgets run in (comma-separated; the fastest counts)",
    )
    p.add_argument("--baseline-child", type=Path, default=None, help="internal")
    p.add_argument("--batched-child", type=Path, default=None, help="internal")
    p.add_argument("--batched-plan", default=None, help="internal")
    p.add_argument("--exec", default="map", help="shard_exec of the run (map on CPU, vmap on GPU)")
    p.add_argument(
        "--ids", type=int, default=None, help="single-id forgets to average (default 100)"
    )
    p.add_argument("--ks", default=None, help="batch sizes K of batched requests")
    p.add_argument("--full-repeats", type=int, default=None)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.baseline_child is not None:
        print(json.dumps(baseline_child(args.baseline_child)))
        return 0
    if args.batched_child is not None:
        print(json.dumps(batched_child(args.batched_child, json.loads(args.batched_plan))))
        return 0
    if not C.in_layout(args.layout):
        return C.rerun_in_layout("benchmarks.bench_forget", argv, args.layout)
    others = args.baseline_layouts or "per-core,one-device"
    others = [] if others == "none" else [x for x in others.split(",") if x != args.layout]
    for x in others:
        if x not in C.CPU_LAYOUTS:
            p.error(f"unknown layout {x!r} in --baseline-layouts (one of {sorted(C.CPU_LAYOUTS)})")
    layouts = [args.layout, *others]
    batch_layouts = args.batch_layouts.split(",")
    for x in batch_layouts:
        if x not in C.CPU_LAYOUTS:
            p.error(f"unknown layout {x!r} in --batch-layouts (one of {sorted(C.CPU_LAYOUTS)})")
    wl = C.workload(args)
    n_ids = args.ids or (3 if args.quick else 100)
    ks = [int(k) for k in (args.ks or ("1,3,8" if args.quick else "1,5,20,100")).split(",")]
    full_repeats = args.full_repeats or (1 if args.quick else 3)
    head = C.header(args, "bench_forget", wl)
    S, R = wl.shards, wl.slices
    cfg = wl.config(S, R, args.exec)
    ds = wl.dataset()
    rng = np.random.default_rng(args.seed)
    res: dict[str, Any] = {
        "exec": args.exec,
        "seed": args.seed,
        "layout": args.layout,
        "baseline_layouts": layouts,
    }

    with C.work_dir(args, "forget") as work:
        C.log(f"run S={S} R={R} {args.exec}")
        run, info = C.trained_run(args, cfg, ds, work / "run")
        res["train"] = info

        def pick(k: int) -> list[int]:
            return sorted(int(i) for i in rng.choice(run.partition.ids, size=k, replace=False))

        def pick_in_slice(u: int) -> list[int]:
            part = run.partition
            return [int(rng.choice(part.ids[part.slice == u]))]

        C.log("warm-up forget")
        res["warmup"] = forget_once(run, pick(1))
        # single ids stratified by slice (their restart slice drives the cost): stratum i of n
        # draws its slice uniformly from [i*R/n, (i+1)*R/n), then an id of that slice in any shard
        strata = [int((i + rng.random()) * R / n_ids) for i in rng.permutation(n_ids)]

        def full(i: int) -> list[dict[str, Any]]:
            # every layout at each baseline point, in an order that rotates between points
            order = layouts[i % len(layouts) :] + layouts[: i % len(layouts)]
            out = []
            for lay in order:
                C.log(f"full retrain {i + 1}/{full_repeats} ({lay} layout)")
                if lay == args.layout:
                    rec = full_retrain_once(run, work / f"full{i}")
                else:
                    rec = full_in_layout(work / "run", lay)
                out.append({"layout": lay, "point": i, **rec})
            return out

        # full retrains interleaved with groups of forgets (F f f f F f f f F): the load on a
        # shared machine drifts over minutes, and symmetric interleaving cancels a linear drift
        groups = np.array_split(np.arange(n_ids), max(full_repeats - 1, 1))
        singles, points, group_of = [], [full(0)], []
        for g, members in enumerate(groups):
            for i in members:
                C.log(f"forget {i + 1}/{n_ids} (slice {strata[i]})")
                singles.append(forget_once(run, pick_in_slice(strata[i])))
                group_of.append(g)
            if len(points) < full_repeats:
                points.append(full(len(points)))
        for s_, g in zip(singles, group_of, strict=True):
            s_["group"] = g
        res["singles"] = singles
        fulls = [f for pt in points for f in pt]
        res["full_retrain"] = fulls

        # batched requests retrain many shards, which one device per core retrains side by side:
        # every batch is forgotten in each layout, from identical copies of the run (same ids,
        # after the same warm-up forget), the other layouts each in one fresh process
        drawn = pick(1 + sum(ks))
        rng.shuffle(drawn)
        warm, batches, at = drawn[:1], [], 1
        for k in ks:
            batches.append((k, sorted(drawn[at : at + k])))
            at += k
        copies = {}
        for lay in batch_layouts:
            if lay != args.layout:
                copies[lay] = work / f"run-{lay}"
                shutil.copytree(work / "run", copies[lay])
        batched = []
        forget_once(run, warm)
        for k, ids in batches:
            C.log(f"batched forget K={k} ({args.layout} layout)")
            batched.append({"k": k, "layout": args.layout, **forget_once(run, ids)})
        for lay, copy in copies.items():
            C.log(f"batched forgets in the {lay} layout (new process)")
            for (k, _), rec in zip(
                batches, batches_in_layout(copy, warm, batches, lay), strict=True
            ):
                batched.append({"k": k, "layout": lay, **rec})
        res["batched"] = batched
        n_now = len(run.partition.ids)

    # the baseline is the layout with the lowest mean steady full retrain; the measured speedup
    # is its mean (interleaved with the forgets) over the mean forget; per group, the mean of its
    # two full retrains around the group over that group's mean forget
    per_layout = {
        lay: C.mean([f["steady_s"] for f in fulls if f["layout"] == lay]) for lay in layouts
    }
    fastest = min(per_layout, key=per_layout.__getitem__)
    base = [f for f in fulls if f["layout"] == fastest]
    full_steady = per_layout[fastest]
    full_steady_min = min(f["steady_s"] for f in fulls)
    n = wl.n_train
    analytic = costs.expected_speedup_single(S, R)
    steady = [s["steady_s"] for s in singles]
    mean_forget = C.mean(steady)
    measured = full_steady / mean_forget
    per_group = []
    for g in sorted(set(group_of)):
        around = [f["steady_s"] for f in base[g : g + 2]]
        mine = [s["steady_s"] for s in singles if s["group"] == g]
        per_group.append(C.mean(around) / C.mean(mine))
    realized_ex = C.mean([s["full_retrain_examples"] for s in singles]) / C.mean(
        [s["cost"]["examples"] for s in singles]
    )
    res["summary"] = {
        "full_retrain_steady_s": full_steady,
        "full_retrain_layout": fastest,
        "full_retrain_steady_by_layout_s": per_layout,
        "forget_steady_mean_s": mean_forget,
        "forget_steady_std_s": C.std(steady),
        "forget_steady_p50_s": float(np.percentile(steady, 50)),
        "forget_steady_p90_s": float(np.percentile(steady, 90)),
        "forget_first10_mean_s": C.mean(steady[:10]),
        "forget_last10_mean_s": C.mean(steady[-10:]),
        "measured_speedup": measured,
        "measured_speedup_per_group": per_group,
        "full_retrain_steady_min_s": full_steady_min,
        "analytic_speedup": analytic,
        "fraction_of_analytic": measured / analytic,
        "examples_speedup_realized": realized_ex,
        "retained_ids_at_end": n_now,
    }
    tables = make_tables(res, S, R, n, full_steady, full_steady_min, analytic)
    C.show(tables, head)
    path = C.write_results(args, "bench_forget", head, tables, res)
    print(f"results: {path}")
    return 0


def fastest_batches(batched: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """For each batch size K, its forget in the layout with the lowest steady wall."""
    out: dict[int, dict[str, Any]] = {}
    for b in batched:
        if b["k"] not in out or b["steady_s"] < out[b["k"]]["steady_s"]:
            out[b["k"]] = b
    return out


def _parts(c: dict[str, float]) -> list[float]:
    return [c["wall_s"], c["compile_s"], c["restore_s"], c["retrain_s"], c["save_s"]]


def make_tables(res, S, R, n, full_steady, full_steady_min, analytic) -> list[C.Table]:
    from sisajax import costs

    sm = res["summary"]
    singles = res["singles"]
    t1 = C.Table(
        f"Forget one random id (S={S}, R={R}, {res['exec']}), end to end in-process",
        (
            "measurement",
            "wall s",
            "compile s",
            "restore s",
            "retrain s",
            "save s",
            "other s",
            "all jit s",
            "steady s",
            "load",
        ),
        note=f"mean of {len(singles)} seeded random ids (stratified by slice) after one warm-up "
        "call, in groups between the full retrains. compile = the "
        "engine's program compile; all jit = every trace/lower/compile JAX reported during the "
        "call (included in the other columns); steady = wall - max(compile, all jit). other = "
        "the rest of sj.forget (locks, ledger, reading test ids and the partition, planning). "
        "Full retrain = sj.full_retrain on the retained data (S=1, R=1), at each point in every "
        f"layout; this process runs in the {res['layout']} layout.",
    )
    w = res["warmup"]
    t1.add(
        "warm-up forget (first call)",
        *_parts(w["cost"]),
        w["other_s"],
        w["jit_s"],
        w["steady_s"],
        w["span"]["load_after"],
    )
    keys = ("wall_s", "compile_s", "restore_s", "retrain_s", "save_s")
    avg = {k: C.mean([s["cost"][k] for s in singles]) for k in keys}
    t1.add(
        f"forget, mean of {len(singles)}",
        *_parts(avg),
        C.mean([s["other_s"] for s in singles]),
        C.mean([s["jit_s"] for s in singles]),
        C.mean([s["steady_s"] for s in singles]),
        C.mean([s["span"]["load_after"] for s in singles]),
    )
    t1.add(
        "forget, std",
        C.std([s["cost"]["wall_s"] for s in singles]),
        None,
        C.std([s["cost"]["restore_s"] for s in singles]),
        C.std([s["cost"]["retrain_s"] for s in singles]),
        C.std([s["cost"]["save_s"] for s in singles]),
        None,
        None,
        C.std([s["steady_s"] for s in singles]),
        None,
    )
    for f in res["full_retrain"]:
        c = f["cost"]
        where = "in process" if f["layout"] == res["layout"] else "new process"
        t1.add(
            f"full retrain #{f['point'] + 1}, {f['layout']} ({where})",
            *_parts(c),
            None,
            f["jit_s"],
            f["steady_s"],
            f["span"]["load_after"],
        )

    t2 = C.Table(
        "Single-request speedup vs full retrain",
        ("quantity", "value", "target", "verdict"),
    )
    for lay, v in sm["full_retrain_steady_by_layout_s"].items():
        t2.add(f"full retrain, steady wall s, {lay} layout (mean)", v, "", "")
    t2.add(
        f"full retrain baseline: fastest layout ({sm['full_retrain_layout']}), mean",
        full_steady,
        "",
        "",
    )
    t2.add(f"forget layout: {res['layout']}", "", "", "")
    t2.add("forget, steady wall s (mean)", sm["forget_steady_mean_s"], "", "")
    t2.add("measured speedup (wall)", sm["measured_speedup"], "", "")
    t2.add("analytic speedup S*3R/(2R+1)", analytic, "", "")
    frac = sm["fraction_of_analytic"]
    t2.add("measured / analytic", frac, ">= 0.95", C.target(frac, 0.95, at_most=False))
    t2.add("forget steady wall s, p50 / p90", f"{sm['forget_steady_p50_s']:.3f} / "
           f"{sm['forget_steady_p90_s']:.3f}", "", "")  # fmt: skip
    t2.add("forget steady wall s, first 10 / last 10 (drift)", f"{sm['forget_first10_mean_s']:.3f}"
           f" / {sm['forget_last10_mean_s']:.3f}", "", "")  # fmt: skip
    t2.add(
        "measured speedup per forget group (full retrains around it)",
        ", ".join(f"{v:.1f}" for v in sm["measured_speedup_per_group"]),
        "",
        "",
    )
    t2.add(
        "measured speedup using the fastest full retrain",
        full_steady_min / sm["forget_steady_mean_s"],
        "",
        "",
    )
    retrain_only = C.mean([s["cost"]["retrain_s"] for s in singles])
    t2.add("speedup counting retraining only (no restore/save)", full_steady / retrain_only, "", "")
    t2.add("speedup in examples (these ids)", sm["examples_speedup_realized"], "", "")
    t2.add(
        "measured / examples speedup (wall efficiency)",
        sm["measured_speedup"] / sm["examples_speedup_realized"],
        "",
        "",
    )
    t2.add(
        "mean restart slice (uniform expectation (R-1)/2)",
        C.mean([next(iter(s["restart"].values())) for s in singles]),
        f"{(R - 1) / 2:.1f}",
        "",
    )

    t3 = C.Table(
        "Batched requests (K random ids, one sj.forget call), in each layout",
        (
            "K",
            "layout",
            "shards hit",
            "expected hits",
            "wall s",
            "compile s",
            "steady s",
            "retrain s",
            "measured speedup",
            "analytic speedup",
            "measured / analytic",
            "examples speedup",
            "measured / examples",
            "fastest",
        ),
        note="target: measured / analytic >= 0.90, in the layout fastest for each K (each batch "
        "is forgotten in every layout from identical copies of the run). "
        "analytic = N / costs.expected_cost_batched(N, S, R, K); steady = wall - compile "
        "(as above); measured speedup = full-retrain steady wall (its fastest layout) / steady.",
    )
    fastest = fastest_batches(res["batched"])
    for b in res["batched"]:
        k = b["k"]
        an = n / costs.expected_cost_batched(n, S, R, k)
        ms = full_steady / b["steady_s"]
        t3.add(
            k,
            b.get("layout", res.get("layout", "per-core")),
            len(b["restart"]),
            costs.expected_shards_hit(S, k),
            b["cost"]["wall_s"],
            b["cost"]["compile_s"],
            b["steady_s"],
            b["cost"]["retrain_s"],
            ms,
            an,
            ms / an,
            b["examples_ratio"],
            ms / b["examples_ratio"],
            "yes" if fastest[k] is b else "",
        )
    return [t1, t2, t3]


if __name__ == "__main__":
    C.main_wrapper(main)
