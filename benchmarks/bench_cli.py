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
import shutil
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


# Fresh-process variants compared side by side on copies of one run (same ids, same order):
# what ships, the same without the program store, and the layout and store of before (one CPU
# device per core for every request, every program traced and lowered in each process).
VARIANTS: dict[str, dict[str, str]] = {
    "shipped": {},
    "no program store": {"SISAJAX_PROGRAM_STORE": "0"},
    "before (device per core, no store)": {
        "SISAJAX_PROGRAM_STORE": "0",
        "SISAJAX_CPU_DEVICES": str(min(len(os.sched_getaffinity(0)), 8))
        if hasattr(os, "sched_getaffinity")
        else "auto",
    },
}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment minus the device layout it chose for itself (a child chooses
    its own, like a user's shell), plus ``extra``."""
    env = dict(os.environ)
    env.pop("SISAJAX_CPU_DEVICES", None)
    env.pop("SISAJAX_PROGRAM_STORE", None)
    flags = [
        f
        for f in env.pop("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env.update(extra or {})
    return env


def run_cli(
    run_dir: Path,
    ids: list[int],
    cache: Path,
    importtime: bool = True,
    env_extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    env = child_env({"SISAJAX_CACHE_DIR": str(cache), **(env_extra or {})})
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
    result = json.loads(new[-1].read_text())
    cost = result["cost"]
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
        "examples": cost["examples"],
        "process": result.get("process"),
        "span": sp.to_dict(),
    }


def run_serve(
    run_dir: Path, ids: list[int], cache: Path, layout: str | None = None
) -> dict[str, Any]:
    """``sisajax serve spool=-`` fed one single-id request per line; per-request responses.
    ``layout``: a ``SISAJAX_CPU_DEVICES`` value for the serving process (None: the default)."""
    env = child_env({"SISAJAX_CACHE_DIR": str(cache)})
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
        n_cli = 3 + warm_repeats  # cold, warm profiled, one warm-up per variant, timed ones
        size = n_cli + n_serve + 2 * n_layout
        pool = rng.choice(run.partition.ids, size=size, replace=False)
        ids = [int(i) for i in pool[:n_cli]]
        served = [int(i) for i in pool[n_cli : n_cli + n_serve]]
        rest = [int(i) for i in pool[n_cli + n_serve :]]
        with tempfile.TemporaryDirectory(prefix="sisajax-jax-cache-", dir=work) as cache:
            C.log("bare imports")
            res["bare"] = bare_imports(1 if args.quick else 2)
            calls = []
            # a cold call and a warm one, both profiling their imports (which slows them)
            for n, i in enumerate(ids[:2]):
                C.log(f"sisajax forget ({'cold' if n == 0 else 'warm'} cache), imports profiled")
                calls.append(
                    {
                        "cache": "cold" if n == 0 else "warm",
                        "profiled": True,
                        "variant": "shipped",
                        **run_cli(run.run_dir, [i], Path(cache), importtime=True),
                    }
                )
            # the plain warm calls decide the target: each id forgotten by every variant, on
            # its own copy of the run (same state, so the same retraining), in rotating order
            copies = {name: run.run_dir for name in VARIANTS}
            for v, name in enumerate(list(VARIANTS)[1:], 1):
                copies[name] = work / f"run-{v}"
                shutil.copytree(run.run_dir, copies[name])
            # each variant compiles (or stores) its programs once before it is timed
            for name, extra in VARIANTS.items():
                run_cli(copies[name], [ids[2]], Path(cache), importtime=False, env_extra=extra)
            for n, i in enumerate(ids[3:]):
                names = list(VARIANTS)
                for name in names[n % len(names) :] + names[: n % len(names)]:
                    C.log(f"sisajax forget (warm cache), {name}")
                    calls.append(
                        {
                            "cache": "warm",
                            "profiled": False,
                            "variant": name,
                            "id_index": n,
                            **run_cli(
                                copies[name],
                                [i],
                                Path(cache),
                                importtime=False,
                                env_extra=VARIANTS[name],
                            ),
                        }
                    )
            res["calls"] = calls
            C.log(f"sisajax serve: {len(served)} single-id requests")
            res["serve"] = run_serve(run.run_dir, served, Path(cache))
            # the default layout vs the `serial` one (1 device, XLA pools for one core), paired:
            # each round's ids are served by both layouts, each from its own copy of the run
            # (identical before the round, and again after it), in alternating order
            serial_copy = work / "run-serve-serial"
            shutil.copytree(run.run_dir, serial_copy)
            res["serve_layouts"] = []
            for r in range(2):
                chunk = rest[r * n_layout : (r + 1) * n_layout]
                order = (None, "serial") if r % 2 == 0 else ("serial", None)
                for layout in order:
                    C.log(f"sisajax serve, layout {layout or 'default'}: {len(chunk)} requests")
                    where = run.run_dir if layout is None else serial_copy
                    served_here = run_serve(where, chunk, Path(cache), layout)
                    res["serve_layouts"].append({"round": r, **served_here})
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
            "variant",
            "devices",
            "examples",
            "total s",
            "imports s",
            "compile s",
            "restore s",
            "retrain s",
            "save s",
            "other in forget s",
            "rest s",
            "overhead (all but retrain) s",
            "load",
        ),
        note="imports from PYTHONPROFILEIMPORTTIME (its own overhead included); rest = interpreter "
        "start/exit, Hydra compose, opening the run, printing. compile includes loading stored "
        "programs. Bare python start "
        f"{res['bare']['python_startup_s']:.2f} s; importing the CLI's stack alone "
        f"{res['bare']['import_stack_s']:.2f} s.",
    )
    for c in res["calls"]:
        k = c["cost"]
        proc = c.get("process") or {}
        devices = proc.get("devices")
        t1.add(
            f"{c['cache']} cache" + (", imports profiled" if c.get("profiled", True) else ""),
            c.get("variant", "shipped"),
            f"{devices}{' serial' if proc.get('serial') else ''}" if devices else "-",
            c.get("examples", k.get("examples")),
            c["total_s"],
            c["imports_s"],
            k["compile_s"],
            k["restore_s"],
            k["retrain_s"],
            k["save_s"],
            c["other_in_forget_s"],
            c["rest_s"],
            c["overhead_s"],
            c["span"]["load_after"],
        )
    tv = variant_table(res["calls"])
    warm = [
        c for c in res["calls"] if c["cache"] == "warm" and c.get("variant", "shipped") == "shipped"
    ]
    cold = res["calls"][0]
    t2 = C.Table("Cold vs warm compilation cache", ("quantity", "value"))
    if warm:
        t2.add(
            "compile s, cold / warm",
            C.ratio(cold["cost"]["compile_s"], C.mean([w["cost"]["compile_s"] for w in warm])),
        )
        t2.add("overhead s, cold", cold["overhead_s"])
        t2.add("overhead s, warm, shipped (mean)", C.mean([w["overhead_s"] for w in warm]))
        profiled = [w["imports_s"] for w in warm if w.get("profiled")]
        t2.add("imports s, warm, profiled (mean)", C.mean(profiled) if profiled else None)
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
        pairs = paired_layout_ratios(res["serve_layouts"])
        if pairs:
            t2.add(
                "serve: default / serial wall per request (median of pairs: the same id, "
                "identical copies)",
                float(np.median(pairs)),
            )
            t2.add("serve: pairs", len(pairs))
    names = {}
    for c in res["calls"]:
        for n, s in c["slowest_imports"]:
            names[n] = max(names.get(n, 0.0), s)
    t3 = C.Table("Slowest top-level imports (max over calls)", ("module", "s"))
    for n, s in sorted(names.items(), key=lambda x: -x[1])[:8]:
        t3.add(n, s)
    return [t1, tv, t2, t3]


def paired_layout_ratios(serves: list[dict[str, Any]]) -> list[float]:
    """Default-layout wall / serial-layout wall of each request both layouts served in the same
    round (the same id from identical copies of the run), the processes' first requests left out
    (they warm caches)."""
    rounds: dict[int, dict[str, dict[int, float]]] = {}
    for sv in serves:
        if "round" not in sv:
            continue  # results of the unpaired comparison, before rounds were recorded
        walls = rounds.setdefault(sv["round"], {}).setdefault(sv["layout"], {})
        for r in sv["responses"][1:]:
            walls[int(r["request"])] = r["wall_s"]  # its position: both got the ids in one order
    out = []
    for by in rounds.values():
        d, s = by.get("default", {}), by.get("serial", {})
        out += [d[i] / s[i] for i in d if i in s and s[i] > 0]
    return out


def variant_table(calls: list[dict[str, Any]]) -> C.Table:
    """Per variant over the plain warm calls: totals, and the paired ratio to what ships (the
    same ids forgotten from identical copies). The target: what ships, mean total <= 1.5 s."""
    plain = [c for c in calls if not c.get("profiled", True) and "id_index" in c]
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for c in plain:
        by.setdefault(c["variant"], {})[c["id_index"]] = c
    t = C.Table(
        "Fresh-process forget, variants side by side (each id forgotten by every variant from "
        "identical copies of the run, rotating order)",
        (
            "variant",
            "calls",
            "total s mean",
            "total s median",
            "total s max",
            "retrain s mean",
            "overhead s mean",
            "total / shipped (median of pairs)",
            "target",
            "verdict",
        ),
        note="total = the command's wall time as a new process, retraining included; overhead = "
        "total minus retraining.",
    )
    base = by.get("shipped", {})
    for name, got in by.items():
        totals = [c["total_s"] for c in got.values()]
        pairs = [got[i]["total_s"] / base[i]["total_s"] for i in got if i in base]
        shipped = name == "shipped"
        t.add(
            name,
            len(totals),
            C.mean(totals),
            float(np.median(totals)),
            max(totals),
            C.mean([c["cost"]["retrain_s"] for c in got.values()]),
            C.mean([c["overhead_s"] for c in got.values()]),
            float(np.median(pairs)) if pairs and not shipped else "-",
            "mean <= 1.5 s" if shipped else "-",
            C.target(C.mean(totals), 1.5, at_most=True) if shipped else "",
        )
    return t


if __name__ == "__main__":
    C.main_wrapper(main)
