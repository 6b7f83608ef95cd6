"""Devices: training throughput with the shards spread over 1, 2 and 4 forced CPU devices.

    python -m benchmarks.devices [--quick] [--devices 1,2,4] [--partitionings per_device,shard_map]

Every (device count, partitioning) point runs in its own subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the flag must be set before jax is
imported). A point builds an :class:`~sisajax.engine.Engine` on N devices, trains every shard once
to compile and warm up, then ``--repeats`` measured times (``train_slices``: the training loop,
compile excluded), and hashes the final states so the table can say whether every layout gave
the one-device bits.

Workload: the Purchase-shaped MLP of ``benchmarks.common`` (600-128-100 tanh, SGD lr 0.01, batch
16 per model) with S=8 shards, R=4 slices, N=16,000, 10 epochs (``map``: the CPU default). About 2
minutes on 2 idle cores. On a CPU every forced device is one more XLA client thread pool sharing
the same cores, so the speedup is bounded by the physical cores free; the load average is
recorded next to every point.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks import common as C

SHARDS, SLICES, N_TRAIN, EPOCHS = 8, 4, 16_000, 10.0


def run_point(n_devices: int, partitioning: str, args) -> dict[str, Any]:
    """In a subprocess with ``n_devices`` forced devices: compile, warm up, time, hash."""
    import jax
    import numpy as np

    from sisajax.data.partition import hash_partition
    from sisajax.engine import Engine, ShardJob
    from sisajax.planning import shard_data_from

    assert jax.local_device_count() == n_devices, jax.local_devices()
    wl = C.workload(args)
    shards, slices = (wl.shards, wl.slices) if args.quick else (SHARDS, SLICES)
    n_train, epochs = (wl.n_train, wl.epochs) if args.quick else (N_TRAIN, EPOCHS)
    cfg = wl.config(shards, slices, "map", epochs=epochs, n_train=n_train)
    ds = wl.dataset(n_train)
    part = hash_partition(ds.train_ids, shards, slices, cfg.sisa.seed)
    data = [shard_data_from(part, ds, k) for k in range(shards)]
    capacity = -(-max(len(d) for d in data) // 8) * 8
    eng = Engine(
        cfg,
        ds.feature_shape,
        ds.x_train.dtype,
        ds.num_classes,
        devices=n_devices,
        partitioning=partitioning,
    )
    jobs = [ShardJob(k, d) for k, d in enumerate(data)]

    def train():
        return eng.run(jobs, capacity=capacity)

    t0 = time.perf_counter()
    final, first = train()  # compiles
    warm_s = time.perf_counter() - t0
    runs = []
    for _ in range(args.repeats):
        load = C.loadavg()[:1]
        c0 = time.process_time()
        _, st = train()
        cpu_s = time.process_time() - c0
        runs.append(
            {
                "train_s": st.train_s,
                "cpu_s": cpu_s,
                "examples": st.examples,
                "examples_per_s": st.examples / st.train_s,
                "examples_per_cpu_s": st.examples / cpu_s,
                "cpu_per_wall": cpu_s / st.train_s,
                "load": load,
            }
        )
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(final):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return {
        "devices": n_devices,
        "partitioning": eng.partitioning,
        "layout": eng.layout(),
        "compile_s": first.compile_s,
        "first_call_s": warm_s,
        "runs": runs,
        "best_examples_per_s": max(r["examples_per_s"] for r in runs),
        "examples": first.examples,
        "states_sha256": h.hexdigest(),
        "workload": {"shards": shards, "slices": slices, "n_train": n_train, "epochs": epochs},
    }


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--devices", default="1,2,4", help="device counts, comma separated")
    p.add_argument("--partitionings", default="per_device,shard_map")
    p.add_argument("--repeats", type=int, default=2, help="measured trainings per point")
    p.add_argument("--point", default=None, help=_hidden())
    args = p.parse_args(argv)
    if args.point is not None:
        n, part = args.point.split(":")
        print(json.dumps(run_point(int(n), part, args)))
        return 0

    wl = C.workload(args)
    head = C.header(args, "devices", wl)
    points = []
    for n in (int(x) for x in args.devices.split(",")):
        for part in args.partitionings.split(",") if n > 1 else ["single"]:
            points.append((n, part))
    results = []
    t_start = time.perf_counter()
    for n, part in points:
        C.log(f"{n} device(s), {part}")
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
        ).strip()
        cmd = [sys.executable, "-m", "benchmarks.devices", "--point", f"{n}:{part}"]
        cmd += ["--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
        with C.span() as sp:
            proc = subprocess.run(
                cmd, cwd=C.REPO, env=env, capture_output=True, text=True, check=False
            )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            results.append({"devices": n, "partitioning": part, "error": proc.stderr[-500:]})
            continue
        results.append({**json.loads(proc.stdout.splitlines()[-1]), "process": sp.to_dict()})
    ok = [r for r in results if "error" not in r]
    base = next((r for r in ok if r["devices"] == 1), None)
    table = C.Table(
        "training throughput by device count (lax.map inside each device)",
        [
            "devices",
            "partitioning",
            "compile s",
            "train s (best)",
            "examples/s (best)",
            "vs 1 device",
            "CPU/wall",
            "examples/CPU s",
            "same bits as 1 device",
            "load",
        ],
        note=(
            "train s: the training loop of one `train_slices` call (compile excluded); best of "
            f"{args.repeats}. CPU/wall: process CPU seconds per wall second while training "
            "(the cores it got: below the device count, the devices waited for a core). "
            "examples/CPU s: work per CPU second, the per-device overhead whatever the load. "
            "load: 1-minute load average before the best run."
        ),
    )
    for r in ok:
        best = max(r["runs"], key=lambda x: x["examples_per_s"])
        table.add(
            r["devices"],
            r["partitioning"],
            r["compile_s"],
            best["train_s"],
            best["examples_per_s"],
            C.ratio(best["examples_per_s"], base["best_examples_per_s"]) if base else None,
            best["cpu_per_wall"],
            best["examples_per_cpu_s"],
            (r["states_sha256"] == base["states_sha256"]) if base else None,
            best["load"][0] if best["load"] else None,
        )
    data = {"points": results, "total_s": time.perf_counter() - t_start}
    C.show([table], head)
    path = C.write_results(args, "devices", head, [table], data)
    print(f"results: {path}")
    return 0 if len(ok) == len(results) else 1


def _hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    C.main_wrapper(main)
