"""Training throughput and checkpoint cost (benchmark items 1 and 4).

    python -m benchmarks.bench_train [--quick] [--execs map,vmap] [--configs 20x50,5x5,10x1]
                                     [--repeats 2]

Side by side, in one process, on the same data:
  * one model on all the data (S=1, R=1; same epochs, batch, optimizer), trained by ``sj.train``;
  * SISA, all shards in one compiled program (``shard_exec`` = map and vmap), by ``sj.train``,
    checkpointing every slice of every shard (what a user waits for);
  * a Python loop over shards running the same per-shard program one shard at a time (width 1,
    ``Engine.train_slices`` per shard, per-slice states fetched to the host as ``train`` does, no
    files written). Its final parameters are compared bit for bit with the SISA run's.

Reported: wall clock (with compile and saving), compile, training (the compiled program and its
host-side batch building), saving, examples/s, the ratios, and bytes on disk. Targets:
checkpoint time not hidden behind training <= 3% of it; >= 180k examples/s on 2 CPU cores; on a
GPU the per-shard loop >= 5x slower than one vmapped program. SISA vs the single model in its
fastest CPU layout (<= 0.80) is measured by ``bench_layouts`` (fresh process per layout).

``--repeats`` rounds (default 2) of the main config run in alternating order; the tables show the
median of every measurement over rounds and a last table each round's own ratios.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from benchmarks import common as C


def parse_configs(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        s, r = part.lower().split("x")
        out.append((int(s), int(r)))
    return out


def train_one(wl: C.Workload, ds, shards: int, slices: int, shard_exec: str, path: Path):
    """``sj.train`` of one config; returns (run, measurements)."""
    import sisajax as sj

    cfg = wl.config(shards, slices, shard_exec)
    C.log(f"train S={shards} R={slices} {shard_exec}")
    with C.span() as sp:
        run, cost = sj.train(cfg, ds, path)
    ckpt = path / "checkpoints"
    acc = run.evaluate().accuracy
    m = {
        "shards": shards,
        "slices": slices,
        "shard_exec": run.manifest.layout.get("shard_exec", shard_exec),
        "cost": cost.to_dict(),
        "span": sp.to_dict(),
        "examples_per_s": cost.examples / cost.retrain_s if cost.retrain_s else None,
        "checkpoint_bytes": C.du_bytes(ckpt),
        "checkpoint_files": C.count_files(ckpt),
        "run_bytes": C.du_bytes(path),
        "accuracy": acc,
    }
    return run, m


def shard_loop(run) -> dict[str, Any]:
    """Train every shard of ``run``'s config from scratch, one shard at a time (width 1)."""
    import jax
    import numpy as np

    import sisajax as sj
    from sisajax.engine import ShardJob

    fresh = sj.open_run(run.run_dir)  # a new Engine: nothing compiled yet
    engine = fresh.engine
    if engine.shard_exec == "vmap":
        # a vmap run's own programs always have the run's width (its bits depend on the width),
        # so one shard through them would compute S lanes: the loop gets a width-1 engine on
        # one device (its bits may differ from the run's in the last place; reported)
        engine = sj.Engine(
            fresh.config,
            engine.feature_shape,
            engine.x_dtype,
            engine.num_classes,
            devices=1,
            vmap_width=1,
            preprocessing=engine.preprocessing,
        )
    data = [fresh.shard_data(k) for k in range(fresh.num_shards)]
    stats: dict[str, float] = {"compile_s": 0.0, "train_s": 0.0, "examples": 0, "grad_steps": 0}
    finals = []
    C.log(f"per-shard loop S={fresh.num_shards} {engine.shard_exec}")
    with C.span() as sp:
        for k, d in enumerate(data):
            rows: list[Any] = []
            (final,), st = engine.run(
                [ShardJob(k, d)],
                capacity=fresh.capacity,
                on_slice=lambda out, rows=rows: rows.append(out.fetch()),
            )
            for key in stats:
                stats[key] += getattr(st, key)
            finals.append(final)
    # bit-identity with the SISA run's saved final states
    saved = fresh.final_states()
    same = True
    for k, f in enumerate(finals):
        a = jax.tree.leaves(f.params)
        b = jax.tree.leaves(jax.tree.map(lambda x, k=k: x[k], saved.params))
        same &= all(
            np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(a, b, strict=True)
        )
    return {
        "shards": fresh.num_shards,
        "slices": fresh.num_slices,
        "shard_exec": engine.shard_exec,
        "span": sp.to_dict(),
        "wall_s": sp.wall_s,
        **stats,
        "examples_per_s": stats["examples"] / stats["train_s"] if stats["train_s"] else None,
        "bit_identical_to_sisa": bool(same),
    }


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--execs", default="map,vmap", help="shard_exec values for the main config")
    p.add_argument("--configs", default=None, help="SxR list; the first is the main config")
    p.add_argument("--extra-execs", default="map", help="shard_exec values for the other configs")
    p.add_argument("--single-exec", default="map", help="shard_exec of the single model")
    p.add_argument("--no-loop", action="store_true", help="skip the per-shard loops")
    p.add_argument(
        "--repeats", type=int, default=None, help="rounds of the main config (medians reported)"
    )
    args = p.parse_args(argv)
    wl = C.workload(args)
    default_cfgs = "4x3,2x2,3x1" if args.quick else f"{wl.shards}x{wl.slices},5x5,10x1"
    configs = parse_configs(args.configs or default_cfgs)
    execs = [e for e in args.execs.split(",") if e]
    extra_execs = [e for e in args.extra_execs.split(",") if e]
    head = C.header(args, "bench_train", wl)
    ds = wl.dataset()

    repeats = args.repeats or (1 if args.quick else 2)
    rounds: list[dict[str, Any]] = []
    with C.work_dir(args, "train") as work:
        for rep in range(repeats):
            # the main config every round (odd rounds in reverse order, against drift), the
            # other configs in the first round only
            jobs = [("single", 1, 1, args.single_exec)]
            jobs += [("sisa", *configs[0], ex) for ex in execs]
            if rep % 2:
                jobs.reverse()
            if rep == 0:
                jobs += [("sisa", s, r, ex) for s, r in configs[1:] for ex in extra_execs]
            rnd: dict[str, Any] = {"single": None, "configs": []}
            for kind, s, r, ex in jobs:
                path = work / f"{kind}_{s}x{r}_{ex}"
                C.log(f"round {rep + 1}/{repeats}")
                run, m = train_one(wl, ds, s, r, ex, path)
                if kind == "single":
                    rnd["single"] = m
                else:
                    loop = None if args.no_loop else shard_loop(run)
                    rnd["configs"].append({"sisa": m, "loop": loop})
                shutil.rmtree(path)
            rounds.append(rnd)
    results = merge_rounds(rounds)

    tables = make_tables(results, configs[0])
    C.show(tables, head)
    path = C.write_results(args, "bench_train", head, tables, results)
    print(f"results: {path}")
    return 0


def median_merge(items: list[Any]) -> Any:
    """Element-wise median of same-shaped JSON-like values (bools: all; strings: the first)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: median_merge([it[k] for it in items]) for k in first}
    if isinstance(first, bool):
        return all(items)
    if isinstance(first, int | float) and all(isinstance(x, int | float) for x in items):
        xs = sorted(items)
        n = len(xs)
        if n % 2 or all(isinstance(x, int) for x in xs):
            return xs[(n - 1) // 2]  # ints (counts, sizes) stay ints: the lower median
        return (xs[n // 2 - 1] + xs[n // 2]) / 2
    return first


def _key(entry: dict[str, Any]) -> tuple:
    m = entry["sisa"]
    return (m["shards"], m["slices"], m["shard_exec"])


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of every measurement, plus each round's own ratios."""
    keys = list(dict.fromkeys(_key(e) for r in rounds for e in r["configs"]))
    configs = []
    for key in keys:
        entries = [e for r in rounds for e in r["configs"] if _key(e) == key]
        loops = [e["loop"] for e in entries if e["loop"] is not None]
        configs.append(
            {
                "sisa": median_merge([e["sisa"] for e in entries]),
                "loop": median_merge(loops) if loops else None,
                "rounds": len(entries),
            }
        )
    per_round = []
    for i, r in enumerate(rounds):
        sw, st = r["single"]["cost"]["wall_s"], r["single"]["cost"]["retrain_s"]
        row: dict[str, Any] = {"round": i + 1, "single_wall_s": sw}
        for e in r["configs"]:
            m = e["sisa"]
            tag = f"{m['shards']}x{m['slices']}_{m['shard_exec']}"
            row[f"{tag}_wall_over_single"] = C.ratio(m["cost"]["wall_s"], sw)
            row[f"{tag}_train_over_single"] = C.ratio(m["cost"]["retrain_s"], st)
            if e["loop"]:
                row[f"{tag}_loop_over_sisa_train"] = C.ratio(
                    e["loop"]["train_s"], m["cost"]["retrain_s"]
                )
        row["load"] = [r["single"]["span"]["load_after"]] + [
            e["sisa"]["span"]["load_after"] for e in r["configs"]
        ]
        per_round.append(row)
    return {
        "single": median_merge([r["single"] for r in rounds]),
        "configs": configs,
        "per_round": per_round,
        "rounds": rounds,
    }


def make_tables(results: dict[str, Any], main_cfg: tuple[int, int]) -> list[C.Table]:
    single = results["single"]
    sw, st = single["cost"]["wall_s"], single["cost"]["retrain_s"]
    main = [e for e in results["configs"] if (e["sisa"]["shards"], e["sisa"]["slices"]) == main_cfg]
    rest = [e for e in results["configs"] if e not in main]
    s0, r0 = main_cfg

    t1 = C.Table(
        f"Training, S={s0} R={r0} vs one model on all the data (S=1 R=1)",
        (
            "variant",
            "exec",
            "wall s",
            "compile s",
            "train s",
            "save s",
            "examples",
            "ex/s (train)",
            "wall / single",
            "train / single",
            "CPU s",
            "load",
            "acc",
        ),
        note="wall = everything the call took (compile, training, checkpoint saving); train = the "
        "compiled program plus host-side batch building and per-slice state fetches. The loop "
        "rows train the same shards one at a time with the same per-shard program and write no "
        "files (their wall includes compiling and initial states).",
    )
    c = single["cost"]
    t1.add(
        "single model",
        single["shard_exec"],
        sw,
        c["compile_s"],
        st,
        c["save_s"],
        c["examples"],
        single["examples_per_s"],
        1.0,
        1.0,
        single["span"]["cpu_s"],
        single["span"]["load_after"],
        single["accuracy"],
    )
    for e in main:
        m, c = e["sisa"], e["sisa"]["cost"]
        t1.add(
            "SISA, one program",
            m["shard_exec"],
            c["wall_s"],
            c["compile_s"],
            c["retrain_s"],
            c["save_s"],
            c["examples"],
            m["examples_per_s"],
            C.ratio(c["wall_s"], sw),
            C.ratio(c["retrain_s"], st),
            m["span"]["cpu_s"],
            m["span"]["load_after"],
            m["accuracy"],
        )
    for e in main:
        lp = e["loop"]
        if lp is None:
            continue
        t1.add(
            "per-shard loop (width 1)",
            lp["shard_exec"],
            lp["wall_s"],
            lp["compile_s"],
            lp["train_s"],
            None,
            lp["examples"],
            lp["examples_per_s"],
            C.ratio(lp["wall_s"], sw),
            C.ratio(lp["train_s"], st),
            lp["span"]["cpu_s"],
            lp["span"]["load_after"],
            None,
        )

    t2 = C.Table(
        f"Key ratios, S={s0} R={r0}",
        ("ratio", "value", "target", "verdict"),
    )
    for e in main:
        m, c = e["sisa"], e["sisa"]["cost"]
        v = C.ratio(c["wall_s"], sw)
        t2.add(
            f"SISA ({m['shard_exec']}) wall / single-model wall (same process; layouts: "
            "bench_layouts)",
            v,
            "-",
            "",
        )
        v2 = C.ratio(c["retrain_s"], st)
        t2.add(f"SISA ({m['shard_exec']}) train / single-model train", v2, "-", "")
        v3 = C.ratio(m["span"]["cpu_s"], single["span"]["cpu_s"])
        t2.add(
            f"SISA ({m['shard_exec']}) CPU s / single-model CPU s (less load-sensitive)",
            v3,
            "-",
            "",
        )
        if e["loop"] is not None:
            lv = C.ratio(e["loop"]["train_s"], c["retrain_s"])
            import jax

            on_gpu = m["shard_exec"] == "vmap" and jax.default_backend() == "gpu"
            tgt = ">= 5 (GPU, vmap)" if on_gpu else "-"
            verdict = C.target(lv, 5.0, at_most=False) if on_gpu else ""
            t2.add(
                f"per-shard loop / SISA one program, train ({m['shard_exec']})", lv, tgt, verdict
            )
            t2.add(
                f"per-shard loop bit-identical to SISA ({m['shard_exec']})",
                e["loop"]["bit_identical_to_sisa"],
                "yes" if m["shard_exec"] == "map" else "- (width 1 is another vmap program)",
                "",
            )
    by_exec = {e["sisa"]["shard_exec"]: e["sisa"]["cost"]["retrain_s"] for e in main}
    if "map" in by_exec and "vmap" in by_exec:
        t2.add(
            "SISA vmap train / SISA map train", C.ratio(by_exec["vmap"], by_exec["map"]), "-", ""
        )

    t3 = C.Table(
        "Other shard/slice counts",
        (
            "S x R",
            "exec",
            "wall s",
            "train s",
            "save s",
            "ex/s (train)",
            "wall / single",
            "train / single",
            "loop / SISA (train)",
            "load",
            "acc",
        ),
    )
    for e in rest:
        m, c = e["sisa"], e["sisa"]["cost"]
        t3.add(
            f"{m['shards']}x{m['slices']}",
            m["shard_exec"],
            c["wall_s"],
            c["retrain_s"],
            c["save_s"],
            m["examples_per_s"],
            C.ratio(c["wall_s"], sw),
            C.ratio(c["retrain_s"], st),
            C.ratio(e["loop"]["train_s"], c["retrain_s"]) if e["loop"] else None,
            m["span"]["load_after"],
            m["accuracy"],
        )

    t4 = C.Table(
        "Checkpoint cost (train's save_s: every slice of every shard)",
        (
            "S x R",
            "exec",
            "save s",
            "train s",
            "save / train",
            "target",
            "save / wall",
            "checkpoint MB",
            "KB per state",
            "files",
            "run dir MB",
        ),
    )
    for e in [{"sisa": single}] + results["configs"]:
        m, c = e["sisa"], e["sisa"]["cost"]
        frac = C.ratio(c["save_s"], c["retrain_s"])
        is_main = (m["shards"], m["slices"]) == main_cfg
        t4.add(
            f"{m['shards']}x{m['slices']}",
            m["shard_exec"],
            c["save_s"],
            c["retrain_s"],
            frac,
            C.target(frac, 0.03, at_most=True) if is_main else "-",
            C.ratio(c["save_s"], c["wall_s"]),
            m["checkpoint_bytes"] / 2**20,
            m["checkpoint_bytes"] / 1024 / (m["shards"] * m["slices"]),
            m["checkpoint_files"],
            m["run_bytes"] / 2**20,
        )
    t = [t1, t2]
    if rest:
        t.append(t3)
    t.append(t4)
    pr = results.get("per_round") or []
    if len(pr) > 1:
        cols = [k for k in pr[0] if k.startswith(f"{s0}x{r0}_")]
        t5 = C.Table(
            "Ratios in each round (the tables above show medians over rounds)",
            ("round", "single wall s", *cols, "load (single, SISA...)"),
        )
        for row in pr:
            t5.add(
                row["round"], row["single_wall_s"], *[row.get(c) for c in cols], str(row["load"])
            )
        t.append(t5)
    return t


if __name__ == "__main__":
    C.main_wrapper(main)
