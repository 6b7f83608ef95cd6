"""Fresh-process unlearning latency: the ``sisajax forget`` command as a new process (item 3).

    python -m benchmarks.bench_cli [--quick] [--warm-repeats 2]

On a trained S=20, R=50 run (reused from ``runs/bench-cache`` when possible), runs
``sisajax forget run_dir=... ids=[i] progress=false`` as a subprocess, first with an empty JAX
persistent compilation cache (``SISAJAX_CACHE_DIR`` pointing at a new directory: cold) and then
again with the cache it filled (warm), each time forgetting another random id. Each call's time is
split into:
  * imports: every module import (``PYTHONPROFILEIMPORTTIME``; top-level entries summed);
  * compile / restore / retrain / save / other-in-forget: from the ``cost`` the command writes to
    ``run_dir/results/forget_g*.json``;
  * rest: interpreter start and exit, Hydra compose, opening the run, printing.
Then ``sisajax serve run_dir=... spool=-`` as one process fed ``--serve`` single-id requests on
stdin: per request, the overhead beyond retraining and the durable save (from its JSON responses).
Targets: a fresh `sisajax forget`, everything but retraining <= 1.5 s on a warm cache (judged on
the calls that do not profile imports); serve mode <= 0.1 s per request beyond retrain + save.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common as C

_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)")


def import_seconds(stderr: str) -> tuple[float, list[tuple[str, float]]]:
    """Total import time (s) from ``-X importtime`` output, and the slowest top-level imports."""
    top = []
    for line in stderr.splitlines():
        m = _LINE.match(line)
        if m and len(m.group(3)) == 1:  # one space after "|": a top-level import
            top.append((m.group(4), int(m.group(2)) / 1e6))
    total = sum(t for _, t in top)
    return total, sorted(top, key=lambda x: -x[1])[:8]


def sisajax_command() -> list[str]:
    exe = Path(sys.executable).parent / "sisajax"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "sisajax.cli"]


def run_cli(run_dir: Path, ids: list[int], cache: Path, importtime: bool = True) -> dict[str, Any]:
    env = dict(os.environ, SISAJAX_CACHE_DIR=str(cache))
    if importtime:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    cmd = sisajax_command() + [
        "forget",
        f"run_dir={run_dir}",
        f"ids=[{','.join(map(str, ids))}]",
        "progress=false",
    ]
    before = set((run_dir / "results").glob("forget-g*.json"))
    with C.span() as sp:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=C.REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    new = sorted(set((run_dir / "results").glob("forget-g*.json")) - before)
    cost = json.loads(new[-1].read_text())["cost"]
    imports, slowest = import_seconds(proc.stderr) if importtime else (None, [])
    total = sp.wall_s
    inside = (
        cost["wall_s"] - cost["compile_s"] - cost["restore_s"] - cost["retrain_s"] - cost["save_s"]
    )
    return {
        "command": " ".join(cmd),
        "total_s": total,
        "imports_s": imports,
        "slowest_imports": slowest,
        "cost": cost,
        "other_in_forget_s": inside,
        "rest_s": total - (imports or 0.0) - cost["wall_s"],
        "overhead_s": total - cost["retrain_s"],
        "span": sp.to_dict(),
    }


def run_serve(
    run_dir: Path, ids: list[int], cache: Path, layout: str | None = None
) -> dict[str, Any]:
    """``sisajax serve spool=-`` fed one single-id request per line; per-request responses.
    ``layout``: a ``SISAJAX_CPU_DEVICES`` value for the serving process (None: the default)."""
    env = dict(os.environ, SISAJAX_CACHE_DIR=str(cache))
    env.pop("SISAJAX_CPU_DEVICES", None)
    env.pop("XLA_FLAGS", None)  # this process's device count: the child chooses its own
    if layout is not None:
        env["SISAJAX_CPU_DEVICES"] = layout
    cmd = sisajax_command() + ["serve", f"run_dir={run_dir}", "spool=-"]
    text = "".join(f"{i}\n" for i in ids)
    with C.span() as sp:
        proc = subprocess.run(
            cmd, input=text, capture_output=True, text=True, env=env, cwd=C.REPO, check=False
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    responses = [x for x in lines if "request" in x]
    if len(responses) != len(ids) or not all(r["ok"] for r in responses):
        raise RuntimeError(f"serve answered {responses}")
    return {
        "command": " ".join(cmd),
        "layout": layout or "default",
        "total_s": sp.wall_s,
        "requests": len(ids),
        "responses": responses,
        "span": sp.to_dict(),
    }


def bare_imports(repeats: int) -> dict[str, float]:
    """Wall of ``python -c pass`` and of importing the CLI's stack (best of ``repeats``)."""
    out = {}
    for name, code in (
        ("python_startup_s", "pass"),
        ("import_stack_s", "import sisajax.cli.app, sisajax, hydra, omegaconf"),
    ):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], cwd=C.REPO, check=True)
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    return out


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--exec", default="map")
    p.add_argument("--warm-repeats", type=int, default=None)
    p.add_argument("--seed", type=int, default=4321)
    p.add_argument("--serve", type=int, default=None, help="requests sent to `sisajax serve`")
    args = p.parse_args(argv)
    wl = C.workload(args)
    warm_repeats = args.warm_repeats or (1 if args.quick else 3)
    n_serve = args.serve or (3 if args.quick else 20)
    head = C.header(args, "bench_cli", wl)
    cfg = wl.config(wl.shards, wl.slices, args.exec)
    ds = wl.dataset()
    rng = np.random.default_rng(args.seed)
    res: dict[str, Any] = {}
    with C.work_dir(args, "cli") as work:
        C.log(f"run S={wl.shards} R={wl.slices} {args.exec}")
        run, info = C.trained_run(args, cfg, ds, work / "run")
        res["train"] = info
        n_layout = max(2, n_serve // 4)  # per serve process of the layout comparison
        size = 1 + warm_repeats + n_serve + 4 * n_layout
        pool = rng.choice(run.partition.ids, size=size, replace=False)
        ids = [int(i) for i in pool[: 1 + warm_repeats]]
        served = [int(i) for i in pool[1 + warm_repeats : 1 + warm_repeats + n_serve]]
        rest = [int(i) for i in pool[1 + warm_repeats + n_serve :]]
        with tempfile.TemporaryDirectory(prefix="sisajax-jax-cache-", dir=work) as cache:
            C.log("bare imports")
            res["bare"] = bare_imports(1 if args.quick else 2)
            calls = []
            for n, i in enumerate(ids):
                # the cold call and the first warm one profile imports (which slows them a
                # little); the other warm calls run plain and decide the target
                profiled = n < 2
                C.log(f"sisajax forget ({'cold' if n == 0 else 'warm'} cache)")
                calls.append(
                    {
                        "cache": "cold" if n == 0 else "warm",
                        "profiled": profiled,
                        **run_cli(run.run_dir, [i], Path(cache), importtime=profiled),
                    }
                )
            res["calls"] = calls
            C.log(f"sisajax serve: {len(served)} single-id requests")
            res["serve"] = run_serve(run.run_dir, served, Path(cache))
            # the same single-id requests served by the default layout and by the `serial` one
            # (1 device, XLA pools for one core), alternating, 2 processes each
            res["serve_layouts"] = []
            for r, layout in enumerate((None, "serial", "serial", None)):
                chunk = rest[r * n_layout : (r + 1) * n_layout]
                C.log(f"sisajax serve, layout {layout or 'default'}: {len(chunk)} requests")
                res["serve_layouts"].append(run_serve(run.run_dir, chunk, Path(cache), layout))
    tables = make_tables(res, wl)
    C.show(tables, head)
    path = C.write_results(args, "bench_cli", head, tables, res)
    print(f"results: {path}")
    return 0


def make_tables(res: dict[str, Any], wl: C.Workload) -> list[C.Table]:
    t1 = C.Table(
        f"`sisajax forget` of one id as a new process (S={wl.shards}, R={wl.slices})",
        (
            "call",
            "total s",
            "imports s",
            "compile s",
            "restore s",
            "retrain s",
            "save s",
            "other in forget s",
            "rest s",
            "overhead (all but retrain) s",
            "target",
            "verdict",
            "load",
        ),
        note="imports from PYTHONPROFILEIMPORTTIME (its own overhead included); rest = interpreter "
        "start/exit, Hydra compose, opening the run, printing. Bare python start "
        f"{res['bare']['python_startup_s']:.2f} s; importing the CLI's stack alone "
        f"{res['bare']['import_stack_s']:.2f} s.",
    )
    for c in res["calls"]:
        k = c["cost"]
        judged = c["cache"] == "warm" and not c.get("profiled", True)
        t1.add(
            f"{c['cache']} cache" + (", imports profiled" if c.get("profiled", True) else ""),
            c["total_s"],
            c["imports_s"],
            k["compile_s"],
            k["restore_s"],
            k["retrain_s"],
            k["save_s"],
            c["other_in_forget_s"],
            c["rest_s"],
            c["overhead_s"],
            "<= 1.5 s" if judged else "-",
            C.target(c["overhead_s"], 1.5, at_most=True) if judged else "",
            c["span"]["load_after"],
        )
    warm = [c for c in res["calls"] if c["cache"] == "warm"]
    cold = res["calls"][0]
    t2 = C.Table("Cold vs warm compilation cache", ("quantity", "value"))
    if warm:
        t2.add(
            "compile s, cold / warm",
            C.ratio(cold["cost"]["compile_s"], C.mean([w["cost"]["compile_s"] for w in warm])),
        )
        t2.add("overhead s, cold", cold["overhead_s"])
        t2.add("overhead s, warm (mean)", C.mean([w["overhead_s"] for w in warm]))
        t2.add("imports s, warm (mean)", C.mean([w["imports_s"] or 0.0 for w in warm]))
    sv = res.get("serve")
    if sv:
        rs = sv["responses"]
        over = [r["overhead_s"] for r in rs[1:]]  # the first request warms the caches
        t2.add("serve: requests", sv["requests"])
        t2.add("serve: process total s (start, compile, all requests, exit)", sv["total_s"])
        t2.add(
            "serve: wall s per request (mean, after the first)",
            C.mean([r["wall_s"] for r in rs[1:]]),
        )
        t2.add("serve: retrain s per request (mean)", C.mean([r["retrain_s"] for r in rs[1:]]))
        t2.add("serve: save wait s per request (mean)", C.mean([r["save_s"] for r in rs[1:]]))
        t2.add("serve: overhead beyond retrain + save, s (mean; target <= 0.1)", C.mean(over))
        t2.add("serve: overhead verdict", C.target(C.mean(over), 0.1, at_most=True))
        t2.add("serve: overhead p90 s", sorted(over)[int(0.9 * (len(over) - 1))] if over else None)
    if res.get("serve_layouts"):
        per: dict[str, list[dict[str, Any]]] = {}
        for sv in res["serve_layouts"]:
            per.setdefault(sv["layout"], []).extend(sv["responses"][1:])  # first: warm-up
        t2.add(
            "serve layouts: requests per process (the first, a warm-up, not in the means)",
            len(sv["responses"]),
        )
        for layout, rs in per.items():
            wall = C.mean([r["wall_s"] for r in rs])
            rate = C.mean([r["examples"] / r["retrain_s"] for r in rs if r.get("retrain_s")])
            t2.add(f"serve, {layout} layout: wall s per request (mean)", wall)
            t2.add(f"serve, {layout} layout: retrain examples/s (mean)", rate)
        if {"default", "serial"} <= per.keys():
            t2.add(
                "serve: default / serial wall per request",
                C.ratio(
                    C.mean([r["wall_s"] for r in per["default"]]),
                    C.mean([r["wall_s"] for r in per["serial"]]),
                ),
            )
    names = {}
    for c in res["calls"]:
        for n, s in c["slowest_imports"]:
            names[n] = max(names.get(n, 0.0), s)
    t3 = C.Table("Slowest top-level imports (max over calls)", ("module", "s"))
    for n, s in sorted(names.items(), key=lambda x: -x[1])[:8]:
        t3.add(n, s)
    return [t1, t2, t3]


if __name__ == "__main__":
    C.main_wrapper(main)
