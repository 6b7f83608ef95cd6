"""A/B of the training engine between two source trees, interleaved, on the compass workload.

    python -m benchmarks.engine_ab --a /path/to/old/checkout --b . [--rounds 3] [--n 100000]

Each round runs the two trees one after the other in fresh processes (A, B, then B, A in the next
round, so drift in machine load hits both), on Purchase-shaped data (MLP 600-128-100, SGD lr
0.01, 20 epochs, batch 16, S=20, R=50, ``lax.map``, this machine's default devices):

  * the HLO census of the compiled train-chunk program (:mod:`sisajax.hlo` of tree B);
  * SISA training of all shards by ``Engine.run`` (no checkpoints written: the engine alone),
    second of two calls (the first compiles);
  * one shard trained through all its slices alone (a forget's program), second of two calls.

Writes ``benchmarks/results/engine_ab.{json,md}``. Use it before changing the step: the figures
are what "does not regress" means.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD = r"""
import importlib.util, json, sys, time
tree, n, hlo_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, tree)
import numpy as np
import sisajax as sj
from sisajax.data.partition import hash_partition
from sisajax.engine import Engine, ShardData, ShardJob
spec = importlib.util.spec_from_file_location("hlo_census", hlo_path)
hlo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hlo)
ds = sj.load_dataset("purchase_synthetic", n_train=n, n_test=100)
s, r = 20, 50
cfg = sj.RunConfig(
    model=sj.ModelConfig(hidden=(128,)),
    optim=sj.OptimConfig(learning_rate=0.01),
    sisa=sj.SisaConfig(shards=s, slices=r, epochs=20, batch_size=16, shard_exec="map"),
)
eng = Engine(cfg, ds.feature_shape, ds.x_train.dtype, ds.num_classes)
part = hash_partition(ds.train_ids, s, r, 0)
data = []
for k in range(s):
    sel = part.shard == k
    pos = np.searchsorted(ds.train_ids, part.ids[sel])
    data.append(ShardData(part.ids[sel], ds.x_train[pos], ds.y_train[pos], part.slice[sel]))
cap = int(-(-max(len(d) for d in data) // 8) * 8)
jobs = [ShardJob(k, d) for k, d in enumerate(data)]
width, _ = eng.place(jobs)
out = {"census": hlo.census(eng.compiled(width, cap).as_text())}
for name, js in (("sisa", jobs), ("one_shard", jobs[3:4])):
    for _ in range(2):
        t0 = time.perf_counter()
        _, st = eng.run(js, capacity=cap)
        wall = time.perf_counter() - t0
    out[name] = {"wall_s": wall, "examples": st.examples, "examples_per_s": st.examples / wall}
out["census"]["loops"] = [
    {k: v for k, v in lp.items() if k != "body"} for lp in out["census"]["loops"]
]
print("RESULT " + json.dumps(out))
"""


def run_tree(tree: Path, n: int) -> dict[str, Any]:
    hlo = Path(__file__).resolve().parent.parent / "sisajax" / "hlo.py"
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), str(n), str(hlo)],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def tree_commit(tree: Path) -> dict[str, Any]:
    """The git commit of a source tree and how many tracked files differ from it."""

    def git(*a: str) -> str:
        try:
            r = subprocess.run(
                ["git", "-C", str(tree), *a], capture_output=True, text=True, timeout=10
            )
        except OSError:
            return ""
        return r.stdout.strip() if r.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "dirty_files": len(dirty.splitlines()),
    }


def machine() -> dict[str, Any]:
    """CPU model, cores and the load average, read when the comparison starts."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model or None,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "loadavg_start": list(os.getloadavg()),
    }


def median(values: list[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, required=True, help="baseline source tree")
    ap.add_argument("--b", type=Path, default=Path("."), help="candidate source tree")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    head = {"machine": machine(), "git": {k: tree_commit(v) for k, v in trees.items()}}
    rounds: list[dict[str, Any]] = []
    for i in range(args.rounds):
        order = ["A", "B"] if i % 2 == 0 else ["B", "A"]
        row: dict[str, Any] = {"load_before": os.getloadavg()[0]}
        for name in order:
            row[name] = run_tree(trees[name], args.n)
            print(
                f"round {i} {name}: SISA {row[name]['sisa']['wall_s']:.2f}s, one shard "
                f"{row[name]['one_shard']['wall_s']:.3f}s",
                flush=True,
            )
        row["load_after"] = os.getloadavg()[0]
        rounds.append(row)
    md = [
        "## engine A/B",
        "",
        f"A = `{trees['A']}`, B = `{trees['B']}`; Purchase-shaped {args.n:,} x 600, MLP 600-128-100,"
        " S=20, R=50, 20 epochs, batch 16, lax.map, engine only (no checkpoints); second call of"
        " two in each fresh process; rounds interleaved (A,B then B,A).",
        "",
        f"Machine: {head['machine']['cpu']}, {head['machine']['cores']} cores, load average at "
        f"start {head['machine']['loadavg_start']}; A at git {head['git']['A']['commit']} "
        f"({head['git']['A']['dirty_files']} modified tracked files), B at git "
        f"{head['git']['B']['commit']} ({head['git']['B']['dirty_files']}).",
        "",
        "| round | load | SISA A s | SISA B s | B/A | one shard A s | one shard B s | B/A |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rounds):
        a, b = r["A"], r["B"]
        md.append(
            f"| {i} | {r['load_before']:.1f}-{r['load_after']:.1f} | {a['sisa']['wall_s']:.2f} | "
            f"{b['sisa']['wall_s']:.2f} | {b['sisa']['wall_s'] / a['sisa']['wall_s']:.3f} | "
            f"{a['one_shard']['wall_s']:.3f} | {b['one_shard']['wall_s']:.3f} | "
            f"{b['one_shard']['wall_s'] / a['one_shard']['wall_s']:.3f} |"
        )
    ratios = {
        part: [r["B"][part]["wall_s"] / r["A"][part]["wall_s"] for r in rounds]
        for part in ("sisa", "one_shard")
    }
    head["median_b_over_a"] = {k: median(v) for k, v in ratios.items()}
    md.append(
        f"| median | | | | {head['median_b_over_a']['sisa']:.3f} | | | "
        f"{head['median_b_over_a']['one_shard']:.3f} |"
    )
    md += ["", "HLO census of the train-chunk program (per device):", ""]
    md += [
        "| tree | instructions | fusions | scatter | gather | conditional | loops (trip count, kernels per iteration) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("A", "B"):
        c = rounds[0][name]["census"]
        loops = sorted(
            {(lp["trip_count"], lp["kernels_per_iteration"]) for lp in c["loops"]}, key=str
        )
        md.append(
            f"| {name} | {c['instructions']} | {c['fusion']} | {c['scatter']} | {c['gather']} | "
            f"{c['conditional']} | {loops} |"
        )
    text = "\n".join(md) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_ab.json").write_text(
        json.dumps(
            {"trees": {k: str(v) for k, v in trees.items()}, **head, "rounds": rounds}, indent=1
        )
        + "\n"
    )
    (args.out / "engine_ab.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
