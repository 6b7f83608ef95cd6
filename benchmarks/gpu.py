"""The GPU check: one process, one GPU, at most ~5 minutes (run by ``benchmarks/gpu.sh``).

    python -m benchmarks.gpu [--dry-run] [--out DIR]

On the compass workload (Purchase-shaped 100k x 600, 100 classes, MLP 600-128-100, SGD lr 0.01,
20 epochs, batch 16; S=20, R=50), side by side in this process:

  * training: SISA with all shards in one vmapped program, the same with ``lax.map``, a Python
    loop training one shard at a time (width 1), and one model on all the data (S=1, R=1);
  * forgetting: single random ids (one request each) and batched requests (K=5, 20) on the vmap
    run, against the full retrain, with the analytic speedups;
  * exactness: every (shard, slice) checkpoint of the forgotten run against training from scratch
    on the retained ids, bit for bit, under XLA's determinism flags (set by sisajax on import,
    and by gpu.sh);
  * the compiled program: HLO op counts of the vmapped train chunk (scatters, conditionals,
    loops and their trip counts, kernels per step) and its device time per step at width 1 and
    S, for a few (chunk, unroll) choices; the fastest is used for the training runs;
  * ResNet-18 on CIFAR-shaped images (bf16 compute, crop+flip augmentation): SISA S=10 in one
    vmapped program (convolutions by ``lax.conv``, which vmap turns into grouped convolutions,
    and as patches x kernel, which vmap turns into batched matrix products), the same with
    ``lax.map``, and one model, same per-model batch and total examples.

Uses only the library (no Hydra, no command line), so it runs from the source tree against the
GPU machine's own jax. ``--dry-run`` runs the same code at tiny sizes on whatever backend is there
(CI runs it on a CPU). Writes ``<out>/gpu.json`` and ``gpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu_report import run_header, summary


def _cfg(sj, shards: int, slices: int, shard_exec: str, size: dict[str, Any]):
    return sj.RunConfig(
        model=sj.ModelConfig(hidden=(size["hidden"],)),
        optim=sj.OptimConfig(learning_rate=0.01),
        sisa=sj.SisaConfig(
            shards=shards,
            slices=slices,
            epochs=size["epochs"],
            batch_size=16,
            shard_exec=shard_exec,
            chunk_steps=size["chunk"],
            # the map layout's loop runs only the live steps (a dynamic trip), which does not
            # unroll: the chosen unroll applies to the static vmap loop
            unroll=size.get("unroll", 1) if shard_exec != "map" else 1,
        ),
    ).replace(data={"val_fraction": 0.0})  # every id trains: the partition chunk_fill counts


def step_time_us(engine: Any, width: int, capacity: int, calls: int) -> float:
    """Device time per step (microseconds) of ``engine``'s program at ``width`` with every step
    live: ``calls`` chunks dispatched back to back after a warm-up call, then one wait."""
    import jax
    import numpy as np

    from sisajax.engine import stack_states
    from sisajax.jobs import row_offsets
    from sisajax.step import StepMeta

    program = engine.compiled(width, capacity)
    c, b = engine.chunk_steps, engine.batch_size
    rng = np.random.default_rng(0)
    states = engine.put(stack_states([engine.init_state(k) for k in range(width)]))
    x = engine.put(np.zeros((width, capacity, *engine.feature_shape), engine.x_dtype))
    offsets = row_offsets(engine.shard_exec, width, capacity, engine.num_devices)[:, None, None]
    rows = (rng.integers(0, capacity, (width, c, b)) + offsets).astype(np.int32)
    inputs = engine.put(
        (
            rows,
            np.ones((width, c, b), bool),
            rng.integers(0, engine.num_classes, (width, c, b)).astype(np.int32),
            StepMeta.stack(np.arange(width), np.zeros(width), np.zeros(width), np.full(width, c)),
        )
    )
    states, _ = program(states, x, *inputs)
    jax.block_until_ready(states)
    t0 = time.perf_counter()
    for _ in range(calls):
        states, _ = program(states, x, *inputs)
    jax.block_until_ready(states)
    return (time.perf_counter() - t0) / (calls * c) * 1e6


def program_study(sj, ds, size: dict[str, Any], dry: bool) -> dict[str, Any]:
    """HLO census and device time per step of the vmapped chunk at width 1 and S, for a few
    (chunk, unroll) choices. Returns the rows and the fastest choice at width S."""
    from sisajax.hlo import census

    s = size["shards"]
    rows = []
    for chunk, unroll in size["program_grid"]:
        cfg = _cfg(sj, s, size["slices"], "vmap", {**size, "chunk": chunk, "unroll": unroll})
        for width in (1, s):
            eng = sj.Engine(
                cfg, ds.feature_shape, ds.x_train.dtype, ds.num_classes, vmap_width=width
            )
            cap = -(-len(ds.train_ids) // s // 8) * 8 + 64
            t0 = time.perf_counter()
            text = eng.compiled(width, cap).as_text()
            compile_s = time.perf_counter() - t0
            us = step_time_us(eng, width, cap, calls=2 if dry else 20)
            c = census(text)
            rows.append(
                {
                    "chunk": chunk,
                    "unroll": unroll,
                    "width": width,
                    "us_per_step": us,
                    "compile_s": compile_s,
                    **{k: v for k, v in c.items() if k != "loops"},
                    "loops": c["loops"],
                }
            )
            print(
                f"program chunk={chunk} unroll={unroll} width={width}: {us:.1f} us/step, "
                f"{c['instructions']} instructions, scatter {c['scatter']}, conditional "
                f"{c['conditional']}, loops {[lp['trip_count'] for lp in c['loops']]}",
                flush=True,
            )
    # a static chunk loop pads each slice step's last chunk with no-op steps that cost a live
    # step's time: rank the choices by device time per *live* step of this workload's training
    from sisajax.costs import chunk_fill
    from sisajax.data.partition import hash_partition

    part = hash_partition(ds.train_ids, s, size["slices"], 0)
    for r in rows:
        live, dispatched = chunk_fill(
            part.sizes(), size["epochs"], 16, r["chunk"], together=r["width"] > 1
        )
        r["fill"] = live / dispatched
        r["us_per_live_step"] = r["us_per_step"] / r["fill"]
    best = min((r for r in rows if r["width"] == s), key=lambda r: r["us_per_live_step"])
    return {"rows": rows, "best": {"chunk": best["chunk"], "unroll": best["unroll"]}}


def resnet_study(sj, size: dict[str, Any], tmp: Path, deadline: float) -> dict[str, Any]:
    """ResNet-18 on CIFAR-shaped images: SISA S shards (vmap, map) vs one model, the same
    per-model batch and the same total examples (each SISA model sees its shard; the one model
    all of it)."""
    rs = size["resnet"]
    ds = sj.load_dataset("cifar_synthetic", n_train=rs["n"], n_test=rs["n_test"])
    out: dict[str, Any] = {"size": rs}
    # the baseline first (a time budget cut skips the last), the grouped-convolution variant
    # (measured before, the slowest) last
    for name, shards, ex, conv in (
        ("single", 1, "map", "xla"),
        ("sisa_vmap_patches", rs["shards"], "vmap", "patches"),
        ("sisa_map", rs["shards"], "map", "xla"),
        ("sisa_vmap", rs["shards"], "vmap", "xla"),
    ):
        if time.perf_counter() > deadline:
            print(f"resnet18 {name}: skipped (time budget)", flush=True)
            out.setdefault("skipped", []).append(name)
            continue
        cfg = sj.RunConfig(
            model=sj.ModelConfig(
                name="resnet18",
                hidden=(),
                params={**rs["params"], "conv": conv},
                compute_dtype="bfloat16",
            ),
            optim=sj.OptimConfig(
                name="sgd", learning_rate=0.05, momentum=0.9, augment="crop_flip", augment_pad=4
            ),
            sisa=sj.SisaConfig(
                shards=shards,
                slices=1,
                epochs=rs["epochs"],
                batch_size=rs["batch"],
                shard_exec=ex,
                chunk_steps=rs["chunk"],
            ),
        )
        run, cost = sj.train(cfg, ds, tmp / f"resnet_{name}", metrics=False)
        acc = run.evaluate().vote_accuracy
        out[name] = {**cost.to_dict(), "accuracy": acc}
        print(
            f"resnet18 {name}: wall {cost.wall_s:.2f}s (compile {cost.compile_s:.2f}, train "
            f"{cost.retrain_s:.2f}), {cost.examples:,} examples, accuracy {acc:.3f}",
            flush=True,
        )
    return out


PARTS = (
    "program",
    "train_vmap",
    "train_vmap_stored",
    "train_map",
    "train_single",
    "train_loop",
    "forget",
    "verify",
    "resnet18",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on any backend")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--forgets", type=int, default=None, help="single-id requests to average")
    ap.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {','.join(PARTS)} (forget/verify need train_vmap)",
    )
    ap.add_argument(
        "--grid", default=None, help="(chunk, unroll) choices to time, e.g. '128x8,32x1'"
    )
    ap.add_argument("--tag", default="", help="suffix of the output files (gpu<tag>.json/md)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=330.0,
        help="skip the parts that would start after this many seconds (partial results are kept)",
    )
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    import sisajax as sj
    from sisajax.engine import ShardJob
    from sisajax.verification import verify

    dry = args.dry_run
    size = (
        {
            "n": 1500,
            "shards": 4,
            "slices": 3,
            "epochs": 2.0,
            "hidden": 16,
            "chunk": 32,
            "forgets": 2,
            "ks": [2, 3],
            "program_grid": [(8, 1), (8, 4)],
            "resnet": {
                "n": 64,
                "n_test": 16,
                "shards": 2,
                "epochs": 1.0,
                "batch": 8,
                "chunk": 4,
                "params": {"width": 4, "stages": [1, 1, 1, 1]},
            },
        }
        if dry
        else {
            "n": 100_000,
            "shards": 20,
            "slices": 50,
            "epochs": 20.0,
            "hidden": 128,
            "chunk": 128,
            "forgets": 20,
            "ks": [5, 20],
            "program_grid": [(16, 8), (32, 1), (32, 8), (128, 8), (64, 16)],
            "resnet": {
                "n": 10_000,
                "n_test": 1000,
                "shards": 10,
                "epochs": 10.0,
                "batch": 64,
                "chunk": 16,
                "params": {"width": 64},
            },
        }
    )
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        ap.error(f"unknown parts {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")
    if args.grid:
        size["program_grid"] = [tuple(int(v) for v in g.split("x")) for g in args.grid.split(",")]
    n_forgets = args.forgets or size["forgets"]
    t_start = time.perf_counter()
    backend = jax.default_backend()
    print(
        f"gpu check: backend {backend}, devices {jax.devices()}, jax {jax.__version__}", flush=True
    )
    ds = sj.load_dataset("purchase_synthetic", n_train=size["n"], n_test=2000 if not dry else 200)
    s, r = size["shards"], size["slices"]
    res: dict[str, Any] = {
        "run": run_header(),
        "backend": backend,
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "dry_run": dry,
        "size": size,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "parts": sorted(parts),
        "errors": {},
        "skipped": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("gpu" if backend == "gpu" and not dry else f"gpu_dry_run_{backend}") + args.tag

    def save() -> None:
        res["elapsed_s"] = time.perf_counter() - t_start
        res["run"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=float) + "\n")

    def phase(name: str, fn, *, needs_s: float = 0.0) -> Any:
        """Run one part of the check; a failure is recorded (the others still run), and a part
        that would not finish inside ``--budget-s`` is skipped. Results are saved after each."""
        if name not in parts:
            return None
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < needs_s:
            print(f"{name}: skipped ({left:.0f}s of the budget left, needs ~{needs_s:.0f}s)")
            res["skipped"].append(name)
            save()
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a check reports every part it could run
            import traceback

            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {e}"
            return None
        finally:
            save()

    prog = phase("program", lambda: program_study(sj, ds, size, dry))
    if prog is not None:
        res["program"] = prog
        size = {**size, **prog["best"]}
        res["size"] = size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def train(name: str, shards: int, slices: int, ex: str):
            cfg = _cfg(sj, shards, slices, ex, size)
            run, cost = sj.train(cfg, ds, tmp / name, metrics=False)
            out = {**cost.to_dict(), "examples_per_s": cost.examples / max(cost.retrain_s, 1e-9)}
            print(
                f"train {name}: {cost.wall_s:.2f}s ({out['examples_per_s']:,.0f} ex/s)", flush=True
            )
            res[f"train_{name}"] = out
            return run

        # the first vmap training stores its compiled programs (sisajax.program_store, as the
        # command line does); a second one, as a later run on this machine would, loads them
        from sisajax import program_store

        program_store.enable(tmp / "programs")
        vm_run = phase("train_vmap", lambda: train("vmap", s, r, "vmap"))

        def train_stored() -> None:
            before = program_store.stats()["loaded"]
            train("vmap_stored", s, r, "vmap")
            res["train_vmap_stored"]["programs_loaded"] = program_store.stats()["loaded"] - before

        if vm_run is not None:
            phase("train_vmap_stored", train_stored, needs_s=20)
        program_store.disable()
        phase("train_map", lambda: train("map", s, r, "map"), needs_s=30)
        # the baseline in each layout: the fastest is the one to compare against
        phase("train_single", lambda: train("single", 1, 1, "map"), needs_s=30)
        if "train_single" in res:
            phase("train_single", lambda: train("single_vmap", 1, 1, "vmap"), needs_s=30)

        def shard_loop() -> None:
            # a per-shard loop with the same per-shard program, one shard at a time
            solo = sj.Engine(
                vm_run.config.replace(sisa={"shard_exec": "map"}),
                ds.feature_shape,
                ds.x_train.dtype,
                ds.num_classes,
                vmap_width=1,
            )
            t0 = time.perf_counter()
            examples, compile_s = 0, 0.0
            for k in range(s):
                _, st = solo.run([ShardJob(k, vm_run.shard_data(k))], capacity=vm_run.capacity)
                examples += st.examples
                compile_s += st.compile_s
            loop_s = time.perf_counter() - t0
            # train_s, like the vmap run's retrain_s, leaves the programs' compile out
            res["train_loop"] = {
                "wall_s": loop_s,
                "compile_s": compile_s,
                "train_s": loop_s - compile_s,
                "examples": examples,
            }
            print(f"per-shard loop: {loop_s:.2f}s ({compile_s:.2f}s compile)", flush=True)

        def forgets() -> None:
            rng = np.random.default_rng(0)
            singles = []
            for _ in range(n_forgets + 1):  # the first one warms up
                rep = sj.forget(vm_run, [int(rng.choice(vm_run.partition.ids))], metrics=False)
                singles.append(rep.cost.to_dict())
            res["forget_single"] = singles[1:]
            batched = res["forget_batched"] = {}
            for k in size["ks"]:
                rep = sj.forget(
                    vm_run,
                    rng.choice(vm_run.partition.ids, size=k, replace=False).tolist(),
                    metrics=False,
                )
                batched[str(k)] = rep.cost.to_dict()

        def full_and_verify() -> None:
            _, full_cost = sj.full_retrain(vm_run, tmp / "full")
            res["full_retrain"] = full_cost.to_dict()
            ver = verify(vm_run, write=False)
            res["verify"] = {
                "ok": ver.ok,
                "bit_identical_shards": sum(x.identical for x in ver.shards),
                "shards": len(ver.shards),
                "max_abs_diff": max(x.max_abs_diff for x in ver.shards),
            }
            print(f"verify: {res['verify']}", flush=True)

        if vm_run is not None:
            phase("train_loop", shard_loop, needs_s=30)
            phase("forget", forgets, needs_s=30)
            phase("verify", full_and_verify, needs_s=30)
        deadline = t_start + args.budget_s - (0 if dry else 20)
        phase(
            "resnet18",
            lambda: res.__setitem__("resnet18", resnet_study(sj, size, tmp, deadline)),
            needs_s=0 if dry else 60,
        )

    try:
        text = summary(res, size, backend, jax.__version__, dry)
    except Exception as e:  # noqa: BLE001 - the JSON holds every measured part regardless
        res["errors"]["summary"] = f"{type(e).__name__}: {e}"
        text = f"## gpu\n\nsummary failed: {e}; see {stem}.json\n"
    print(text)
    save()
    (args.out / f"{stem}.md").write_text(text)
    ok = not res["errors"] and ("verify" not in parts or res.get("verify", {}).get("ok", False))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
