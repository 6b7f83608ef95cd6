"""Where the time goes in ``sj.train`` and ``sj.forget``: a cProfile breakdown by phase.

    python -m benchmarks.profile_phases [--quick] [--what train,forget] [--forgets 5]

Profiles ``sj.train`` of the S=20, R=50 workload (map) and ``--forgets`` single-id ``sj.forget``
calls after a warm-up one, then attributes cumulative time to library phases by function name
(callers distinguished where a function is used in several places). Device compute shows up as
the host waiting for results (``jax.Array._value``, inside ``device_get``): JAX dispatches the
compiled program asynchronously. cProfile slows pure-Python code, so the Python-heavy rows are
upper bounds; the ``unprofiled`` row gives the same call's cost without the profiler.
Phases whose functions no longer exist show ``-``.

Run it against a prototype of the library with ``PYTHONPATH=/tmp/proto python -m ...``.
"""

from __future__ import annotations

import cProfile
import pstats
from typing import Any

import numpy as np

from benchmarks import common as C

# (label, (file suffix, function), optional caller (file suffix, function), depth)
TRAIN_PHASES = [
    ("sj.train total", ("sisajax/run.py", "train"), None, 0),
    (
        "initial states (init_state, incl. its jit compiles)",
        ("sisajax/engine.py", "init_state"),
        None,
        1,
    ),
    ("Engine.train_slices", ("sisajax/engine.py", "train_slices"), ("sisajax/run.py", "train"), 1),
    (
        "program compile (Engine.compiled)",
        ("sisajax/engine.py", "compiled"),
        ("sisajax/engine.py", "train_slices"),
        2,
    ),
    (
        "batch schedules (slice_step_batches)",
        ("sisajax/data/schedule.py", "slice_step_batches"),
        None,
        2,
    ),
    ("waiting for device results (compute)", ("jax/_src/array.py", "_value"), None, 2),
    ("program dispatch (Compiled.__call__)", ("jax/_src/stages.py", "__call__"), None, 2),
    ("host->device puts (device_put)", ("jax/_src/api.py", "device_put"), None, 2),
    (
        "stacking per-slice states (stack_states)",
        ("sisajax/engine.py", "stack_states"),
        ("sisajax/run.py", "train"),
        1,
    ),
    ("write_shard_files (all shards)", ("sisajax/run.py", "write_shard_files"), None, 1),
    (
        "data copy npz + sha256 (save_npz_atomic)",
        ("sisajax/run.py", "save_npz_atomic"),
        ("sisajax/run.py", "write_shard_files"),
        2,
    ),
    (
        "id fingerprints (fingerprint_ids)",
        ("sisajax/data/partition.py", "fingerprint_ids"),
        None,
        2,
    ),
    ("CheckpointStore.write_block", ("sisajax/checkpoint.py", "write_block"), None, 2),
    (
        "Orbax save (blocking part)",
        ("orbax/checkpoint/_src/checkpointers/standard_checkpointer.py", "save"),
        ("sisajax/checkpoint.py", "write_block"),
        3,
    ),
    (
        "Orbax wait_until_finished",
        ("orbax/checkpoint/_src/checkpointers/async_checkpointer.py", "wait_until_finished"),
        ("sisajax/checkpoint.py", "write_block"),
        3,
    ),
    (
        "block checksums (checksum_tree)",
        ("sisajax/checkpoint.py", "checksum_tree"),
        ("sisajax/checkpoint.py", "write_block"),
        3,
    ),
    (
        "fsync per file (fsync_tree)",
        ("sisajax/checkpoint.py", "fsync_tree"),
        ("sisajax/checkpoint.py", "write_block"),
        3,
    ),
    ("one syncfs (sync_filesystem)", ("sisajax/checkpoint.py", "sync_filesystem"), None, 1),
    ("JSON files (write_json_atomic)", ("sisajax/run.py", "write_json_atomic"), None, 1),
    (
        "all XLA compiles (backend_compile_and_load)",
        ("jax/_src/compiler.py", "backend_compile_and_load"),
        None,
        1,
    ),
]

FORGET_PHASES = [
    ("sj.forget total", ("sisajax/unlearning.py", "forget"), None, 0),
    ("writer lock + resume check (resume)", ("sisajax/unlearning.py", "resume"), None, 1),
    ("reading the test split for its ids (test_data)", ("sisajax/run.py", "test_data"), None, 1),
    ("partition load + sha256 (SisaRun.partition)", ("sisajax/run.py", "partition"), None, 1),
    ("restore_block", ("sisajax/run.py", "restore_block"), None, 1),
    ("block checksum verification (verify)", ("sisajax/checkpoint.py", "verify"), None, 2),
    (
        "Orbax restore",
        ("orbax/checkpoint/_src/checkpointers/standard_checkpointer.py", "restore"),
        ("sisajax/checkpoint.py", "restore"),
        2,
    ),
    ("shard data load + sha256 (shard_data)", ("sisajax/run.py", "shard_data"), None, 1),
    ("initial state (init_state)", ("sisajax/engine.py", "init_state"), None, 1),
    ("ledger appends", ("sisajax/ledger.py", "append"), None, 1),
    ("Engine.train_slices", ("sisajax/engine.py", "train_slices"), None, 1),
    ("waiting for device results (compute)", ("jax/_src/array.py", "_value"), None, 2),
    (
        "batch schedules (slice_step_batches)",
        ("sisajax/data/schedule.py", "slice_step_batches"),
        None,
        2,
    ),
    ("write_shard_files", ("sisajax/run.py", "write_shard_files"), None, 1),
    (
        "Orbax save (blocking part)",
        ("orbax/checkpoint/_src/checkpointers/standard_checkpointer.py", "save"),
        ("sisajax/checkpoint.py", "write_block"),
        2,
    ),
    (
        "Orbax wait_until_finished",
        ("orbax/checkpoint/_src/checkpointers/async_checkpointer.py", "wait_until_finished"),
        ("sisajax/checkpoint.py", "write_block"),
        2,
    ),
    (
        "block checksums after write (checksum_tree)",
        ("sisajax/checkpoint.py", "checksum_tree"),
        ("sisajax/checkpoint.py", "write_block"),
        2,
    ),
    (
        "data copy npz + sha256",
        ("sisajax/run.py", "save_npz_atomic"),
        ("sisajax/run.py", "write_shard_files"),
        2,
    ),
    ("partition save (Partition.save)", ("sisajax/data/partition.py", "save"), None, 1),
    ("one syncfs (sync_filesystem)", ("sisajax/checkpoint.py", "sync_filesystem"), None, 1),
    (
        "commit: manifest + garbage collection (SisaRun.commit)",
        ("sisajax/run.py", "commit"),
        None,
        1,
    ),
    (
        "manifest write + fsync",
        ("sisajax/run.py", "write_json_atomic"),
        ("sisajax/run.py", "commit"),
        2,
    ),
    ("manifest re-read (reload)", ("sisajax/run.py", "reload"), ("sisajax/run.py", "commit"), 2),
    ("garbage collection", ("sisajax/run.py", "collect_garbage"), ("sisajax/run.py", "commit"), 2),
    (
        "model fingerprints for the ledger",
        ("sisajax/unlearning.py", "_model_fingerprints"),
        None,
        1,
    ),
    (
        "all XLA compiles (backend_compile_and_load)",
        ("jax/_src/compiler.py", "backend_compile_and_load"),
        None,
        1,
    ),
]


def cumtime(
    stats: pstats.Stats, fn: tuple[str, str], caller: tuple[str, str] | None
) -> float | None:
    """Cumulative seconds of functions matching ``fn`` (optionally only as called from ``caller``)."""
    total, found = 0.0, False
    for (file, _line, name), (_cc, _nc, _tt, ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if name != fn[1] or not file.endswith(fn[0]):
            continue
        found = True
        if caller is None:
            total += ct
            continue
        for (cfile, _cl, cname), vals in callers.items():
            if cname == caller[1] and cfile.endswith(caller[0]):
                total += vals[3]
    return total if found else None


def breakdown(stats: pstats.Stats, phases, per: int = 1) -> list[tuple[str, float | None]]:
    out = []
    for label, fn, caller, depth in phases:
        v = cumtime(stats, fn, caller)
        out.append(("  " * depth + label, None if v is None else v / per))
    return out


def main(argv: list[str] | None = None) -> int:
    import sisajax as sj

    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--what", default="train,forget")
    p.add_argument("--forgets", type=int, default=None)
    p.add_argument("--exec", default="map")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dump", default=None, help="directory to write .prof files to")
    args = p.parse_args(argv)
    what = set(args.what.split(","))
    n_forgets = args.forgets or (2 if args.quick else 5)
    wl = C.workload(args)
    head = C.header(args, "profile_phases", wl)
    cfg = wl.config(wl.shards, wl.slices, args.exec)
    ds = wl.dataset()
    tables, data = [], {}
    with C.work_dir(args, "profile") as work:
        if "train" in what:
            C.log("profiling sj.train")
            prof = cProfile.Profile()
            with C.span() as sp:
                prof.enable()
                _, cost = sj.train(cfg, ds, work / "train")
                prof.disable()
            st = pstats.Stats(prof)
            if args.dump:
                st.dump_stats(f"{args.dump}/train.prof")
            rows = breakdown(st, TRAIN_PHASES)
            C.log("sj.train again, unprofiled")
            with C.span() as sp2:
                _, cost2 = sj.train(cfg, ds, work / "train2", overwrite=True)
            t = C.Table(
                f"sj.train S={wl.shards} R={wl.slices} ({args.exec}) under cProfile",
                ("phase", "s", "share of total"),
                note=f"cost report (profiled): {fmt_cost(cost.to_dict())}. Unprofiled second "
                f"call: {fmt_cost(cost2.to_dict())}; load {sp.load_after}/{sp2.load_after}.",
            )
            total = rows[0][1] or 1.0
            for label, v in rows:
                t.add(label, v, None if v is None else v / total)
            tables.append(t)
            data["train"] = {
                "rows": rows,
                "cost": cost.to_dict(),
                "unprofiled_cost": cost2.to_dict(),
            }
        if "forget" in what:
            C.log("profiling sj.forget")
            run, info = C.trained_run(args, cfg, ds, work / "forget")
            rng = np.random.default_rng(args.seed)
            sj.forget(run, [int(rng.choice(run.partition.ids))])  # warm-up (compiles)
            prof = cProfile.Profile()
            costs = []
            prof.enable()
            for _ in range(n_forgets):
                costs.append(sj.forget(run, [int(rng.choice(run.partition.ids))]).cost.to_dict())
            prof.disable()
            st = pstats.Stats(prof)
            if args.dump:
                st.dump_stats(f"{args.dump}/forget.prof")
            rows = breakdown(st, FORGET_PHASES, per=n_forgets)
            unprof = []
            for _ in range(n_forgets):
                unprof.append(sj.forget(run, [int(rng.choice(run.partition.ids))]).cost.to_dict())
            mean_cost = {k: C.mean([c[k] for c in costs]) for k in costs[0]}
            mean_unprof = {k: C.mean([c[k] for c in unprof]) for k in unprof[0]}
            t = C.Table(
                f"sj.forget of one random id, S={wl.shards} R={wl.slices} ({args.exec}), "
                f"mean of {n_forgets} under cProfile",
                ("phase", "s per forget", "share of total"),
                note=f"cost report (profiled, mean): {fmt_cost(mean_cost)}. Unprofiled, mean of "
                f"{n_forgets} other ids: {fmt_cost(mean_unprof)}.",
            )
            total = rows[0][1] or 1.0
            for label, v in rows:
                t.add(label, v, None if v is None else v / total)
            tables.append(t)
            data["forget"] = {"rows": rows, "costs": costs, "unprofiled_costs": unprof}
    C.show(tables, head)
    path = C.write_results(args, "profile_phases", head, tables, data)
    print(f"results: {path}")
    return 0


def fmt_cost(c: dict[str, Any]) -> str:
    return (
        f"wall {c['wall_s']:.3f} s = compile {c['compile_s']:.3f} + restore {c['restore_s']:.3f} "
        f"+ retrain {c['retrain_s']:.3f} + save {c['save_s']:.3f} (+ rest)"
    )


if __name__ == "__main__":
    C.main_wrapper(main)
