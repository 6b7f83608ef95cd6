"""SISA training vs the one model it replaces, in every CPU layout.

    python -m benchmarks.bench_layouts [--quick] [--repeats 2]

Each measurement is a fresh process (the CPU device count is fixed when jax starts), all on the
compass workload (see ``benchmarks.common``), interleaved round by round (odd rounds in reverse
order):
  * SISA S=20,R=50 with checkpoints, default layout (one CPU device per core);
  * SISA on one core (``taskset -c 0``: one device);
  * the single model (S=1,R=1) in the default layout, as one device on all cores
    (``SISAJAX_CPU_DEVICES=1``: XLA's own thread pool) and pinned to one core;
  * the single model and SISA in the ``serial`` layout (``SISAJAX_CPU_DEVICES=serial``: one
    device whose XLA pools were sized while the process ran on one core, all cores usable after).

The single model's best layout is the fair reference: SISA / best single is the headline ratio,
and SISA on one core / single on one core the like-for-like one. Reported: wall (with compile and
checkpoints), compile, training, examples/s, CPU seconds and CPU s per wall s, load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common as C

# (name, kind, pinned to one core, SISAJAX_CPU_DEVICES)
LAYOUTS = [
    ("SISA, 1 device per core (default)", "sisa", False, None),
    ("SISA, one core", "sisa", True, None),
    ("single model, 1 device per core (default)", "single", False, None),
    ("single model, 1 device on all cores", "single", False, "1"),
    ("single model, one core", "single", True, None),
    ("single model, serial (1 device, XLA pools for one core)", "single", False, "serial"),
    ("SISA, serial (1 device, XLA pools for one core)", "sisa", False, "serial"),
]


def child(kind: str, quick: bool) -> dict[str, Any]:
    """Train one config in this process; returns its measurements."""
    import sisajax as sj  # noqa: I001  (first: it sets the CPU device count before jax starts)
    import jax

    wl = C.Workload.quick_version() if quick else C.Workload()
    cfg = wl.config() if kind == "sisa" else wl.config(1, 1)
    ds = wl.dataset()
    work = Path(tempfile.mkdtemp(prefix="sisajax-bench-layouts-"))
    try:
        with C.span() as sp:
            _, cost = sj.train(cfg, ds, work / "run", metrics=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "devices": len(jax.local_devices()),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cost": cost.to_dict(),
        "span": sp.to_dict(),
        "examples_per_s": cost.examples / cost.retrain_s if cost.retrain_s else None,
        "cpu_per_wall": sp.cpu_s / sp.wall_s if sp.wall_s else None,
    }


def measure(name: str, kind: str, pinned: bool, devices: str | None, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_layouts", "--child", kind]
    cmd += ["--quick"] if quick else []
    if pinned:
        if shutil.which("taskset") is None:
            return {"skipped": "taskset not found"}
        cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *cmd]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if devices is not None:
        env["SISAJAX_CPU_DEVICES"] = devices
    C.log(f"{name}: {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=C.REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--child", choices=("sisa", "single"), default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.quick)))
        return 0
    wl = C.workload(args)
    head = C.header(args, "bench_layouts", wl)
    repeats = args.repeats or (1 if args.quick else 2)
    rounds: list[dict[str, Any]] = []
    for rep in range(repeats):
        order = LAYOUTS if rep % 2 == 0 else LAYOUTS[::-1]
        rounds.append({name: measure(name, k, pin, dev, args.quick) for name, k, pin, dev in order})
    results = summarise(rounds)
    tables = make_tables(results, wl)
    C.show(tables, head)
    path = C.write_results(args, "bench_layouts", head, tables, results)
    print(f"results: {path}")
    return 0


def argparse_hidden() -> str:
    return "internal: train one config in this process and print its measurements as JSON"


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median wall per layout over rounds; ratios per round against the best single model."""
    names = [n for n, *_ in LAYOUTS]
    med = {}
    for n in names:
        got = [r[n] for r in rounds if "cost" in r[n]]
        if not got:
            med[n] = None
            continue
        walls = [g["cost"]["wall_s"] for g in got]
        median = float(np.median(walls))  # the mean of the middle two for an even count
        # the round closest to the median gives the other columns; the wall is the median
        mid = got[int(np.argmin([abs(w - median) for w in walls]))]
        med[n] = {**mid, "cost": {**mid["cost"], "wall_s": median}}
    per_round = []
    for i, r in enumerate(rounds):
        singles = {
            n: r[n]["cost"]["wall_s"] for n, k, *_ in LAYOUTS if k == "single" and "cost" in r[n]
        }
        best_name = min(singles, key=singles.get)
        row = {"round": i + 1, "best_single": best_name, "best_single_wall_s": singles[best_name]}
        sisa = r[LAYOUTS[0][0]]["cost"]["wall_s"]
        row["sisa_over_best_single"] = sisa / singles[best_name]
        if "cost" in r["SISA, one core"] and "single model, one core" in singles:
            row["one_core_sisa_over_single"] = (
                r["SISA, one core"]["cost"]["wall_s"] / singles["single model, one core"]
            )
        row["load"] = [r[n]["span"]["load_after"] for n in names if "span" in r[n]]
        per_round.append(row)
    return {"median": med, "per_round": per_round, "rounds": rounds}


def make_tables(res: dict[str, Any], wl: C.Workload) -> list[C.Table]:
    t1 = C.Table(
        f"SISA S={wl.shards},R={wl.slices} vs one model, per CPU layout (fresh processes, "
        f"median of {len(res['rounds'])} round(s))",
        (
            "layout",
            "devices",
            "wall s",
            "compile s",
            "train s",
            "save wait s",
            "examples",
            "ex/s (train)",
            "CPU s",
            "CPU s / wall s",
            "load",
        ),
        note="wall = everything sj.train took (compile, training, checkpoints); save wait = time "
        "the caller waited for checkpoint writes not hidden behind training.",
    )
    for name, *_ in LAYOUTS:
        m = res["median"][name]
        if m is None:
            t1.add(name, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-")
            continue
        c = m["cost"]
        t1.add(
            name,
            m["devices"],
            c["wall_s"],
            c["compile_s"],
            c["retrain_s"],
            c["save_s"],
            c["examples"],
            m["examples_per_s"],
            m["span"]["cpu_s"],
            m["cpu_per_wall"],
            m["span"]["load_after"],
        )
    t2 = C.Table(
        "Ratios per round (targets: SISA / best single <= 0.80; on one core <= 1.05)",
        (
            "round",
            "best single layout",
            "best single wall s",
            "SISA / best single",
            "one core: SISA / single",
            "load after each run",
        ),
    )
    for r in res["per_round"]:
        t2.add(
            r["round"],
            r["best_single"],
            r["best_single_wall_s"],
            r["sisa_over_best_single"],
            r.get("one_core_sisa_over_single"),
            " ".join(f"{x:.2f}" for x in r["load"]),
        )
    return [t1, t2]


if __name__ == "__main__":
    sys.exit(main())
