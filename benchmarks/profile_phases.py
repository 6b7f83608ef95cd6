"""Where the time goes in ``sj.train`` and ``sj.forget``: a cProfile breakdown by phase.

    python -m benchmarks.profile_phases [--quick] [--what train,forget] [--forgets 5]

Profiles ``sj.train`` of the S=20, R=50 workload (map) and ``--forgets`` single-id ``sj.forget``
calls after a warm-up one, then attributes cumulative time to library phases by function name
(callers distinguished where a function is used in several places). Device compute shows up as
the host waiting for results (``jax.Array._value``, inside ``device_get``): JAX dispatches the
compiled program asynchronously. cProfile slows pure-Python code, so the Python-heavy rows are
upper bounds; the ``unprofiled`` note gives the same call's cost without the profiler.

cProfile sees only the thread it is enabled on, so every checkpoint writer thread started during
a profiled call (``sisajax-writer*``) gets its own profiler (``threading.setprofile``); the
``writer thread`` rows come from those and run concurrently with the calling thread's rows (their
share is of the call's wall time: how busy the writer was). The library's own counter of the same
thing is ``CostReport.writer_busy_s``, quoted in the notes.

Staleness is loud: a phase whose function is not defined in the named file is ``NO SUCH
FUNCTION``; one whose function never ran is ``NOT SEEN``; both print a warning. A few phases only
run in some cases (``only_when``, e.g. a forget restarting at slice 0): they are still marked
when absent, with the reason in the note.

Run it against a prototype of the library with ``PYTHONPATH=/tmp/proto python -m ...``.
"""

from __future__ import annotations

import ast
import cProfile
import functools
import importlib.util
import pstats
import sys
import threading
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from benchmarks import common as C

Fn = tuple[str, str]  # (file suffix, function name); builtins live in file "~"


class Phase(NamedTuple):
    """One row: ``fn`` (or alternatives, summed) optionally only as called from ``caller``."""

    label: str
    fn: Fn | tuple[Fn, ...]
    caller: Fn | None = None
    depth: int = 1
    thread: str = "main"  # "main": the calling thread; "writer": the checkpoint writer threads
    only_when: str | None = None  # the phase legitimately does not run otherwise


WRITER_THREAD_PREFIX = "sisajax-writer"  # BackgroundWriter's ThreadPoolExecutor prefix

TRAINING = "sisajax/training.py"
UNLEARN = "sisajax/unlearning.py"
GENERATION = "sisajax/generation.py"
GEN_WRITER = "sisajax/generation_writer.py"
PLANNING = "sisajax/planning.py"
RETRAINING = "sisajax/retraining.py"
ENGINE = "sisajax/engine.py"
JOBS = "sisajax/jobs.py"
RUN = "sisajax/run.py"
LAYOUT = "sisajax/layout.py"
METRICS = "sisajax/metrics.py"
SCHEDULE = "sisajax/data/schedule.py"
PARTITION = "sisajax/data/partition.py"
FILES = "sisajax/store/files.py"
ROWS = "sisajax/store/rows.py"
RUN_DIR = "sisajax/store/run_dir.py"
MANIFEST = "sisajax/store/manifest.py"
LEDGER = "sisajax/store/ledger.py"
LOCKS = "sisajax/store/locks.py"
JAX_API = "jax/_src/api.py"
FSYNC = ("~", "<built-in method posix.fsync>")
SHA256_NEW = ("~", "<built-in method _hashlib.openssl_sha256>")
SHA256_UPDATE = ("~", "<method 'update' of '_hashlib.HASH' objects>")
FILE_WRITE = ("~", "<method 'write' of '_io.BufferedWriter' objects>")
DISPATCH = ((LAYOUT, "__call__"), ("jax/_src/stages.py", "__call__"))  # per_device | single


def engine_run_phases(d: int, *, forget: bool) -> list[Phase]:
    """Phases inside ``Engine.run`` at depth ``d`` (the same recipe trains and forgets)."""
    run = (ENGINE, "run")
    slice0 = "the forgotten id sits in slice 0" if forget else None
    return [
        Phase(
            "program lookup (Engine.compiled; compiled by the warm-up)"
            if forget
            else "program compile (Engine.compiled)",
            (ENGINE, "compiled"),
            run,
            d,
        ),
        Phase(
            "initial states (init_state, incl. its jit compile)",
            (ENGINE, "init_state"),
            run,
            d,
            only_when=slice0,
        ),
        Phase("stacking the start states (stack_states)", (JOBS, "stack_states"), run, d),
        Phase("host->device puts: data, states, batches (Engine.put)", (ENGINE, "put"), run, d),
        Phase(
            "slice step inputs: batches, chunk rows (slice_step_inputs)",
            (JOBS, "slice_step_inputs"),
            run,
            d,
        ),
        Phase(
            "batch schedules (slice_step_batches)",
            (SCHEDULE, "slice_step_batches"),
            (JOBS, "slice_step_inputs"),
            d + 1,
        ),
        Phase("program dispatch (PerDeviceProgram/Compiled.__call__)", DISPATCH, run, d),
        Phase("on_slice handler (GenerationWriter.on_slice)", (GEN_WRITER, "handle"), run, d),
        Phase(
            "per-slice state fetch, one step behind (_fetch_pending)",
            (GEN_WRITER, "_fetch_pending"),
            (GEN_WRITER, "handle"),
            d + 1,
        ),
        Phase(
            "device_get of a slice's states: waiting for the device (+ finish's)",
            (JAX_API, "device_get"),
            (GEN_WRITER, "_fetch_pending"),
            d + 2,
        ),
        Phase(
            "slice losses (SliceOutput.mean_loss)",
            (JOBS, "mean_loss"),
            (GEN_WRITER, "_fetch_pending"),
            d + 2,
        ),
        Phase(
            "handing to the writer (BackgroundWriter.call; blocks at 16 pending)",
            (ROWS, "call"),
            (GEN_WRITER, "_fetch_pending"),
            d + 2,
        ),
        Phase("final states fetch (device_get in Engine.run)", (JAX_API, "device_get"), run, d),
    ]


def finish_phases(d: int) -> list[Phase]:
    finish = (GEN_WRITER, "finish")
    return [
        Phase("finish: last fetch, writer drain, dir fsyncs (finish)", finish, None, d),
        Phase(
            "last slice step's fetch (_fetch_pending)",
            (GEN_WRITER, "_fetch_pending"),
            finish,
            d + 1,
        ),
        Phase(
            "waiting for the writer thread (BackgroundWriter.wait)", (ROWS, "wait"), finish, d + 1
        ),
        Phase("folder fsyncs (BackgroundWriter.sync_dirs)", (ROWS, "sync_dirs"), finish, d + 1),
        Phase("writer thread shutdown (BackgroundWriter.close)", (ROWS, "close"), finish, d + 1),
    ]


def writer_phases(*, test_copy: bool) -> list[Phase]:
    """The checkpoint writer thread(s): concurrent with the calling thread."""
    w = "writer"
    npz = (GEN_WRITER, "_npz")
    return [
        Phase(
            "writer thread busy (BackgroundWriter._run; concurrent)",
            (ROWS, "_run"),
            None,
            0,
            w,
        ),
        Phase(
            "slice rows (GenerationWriter._write_slice)", (GEN_WRITER, "_write_slice"), None, 1, w
        ),
        Phase(
            "row encoding: header, byte order (encode_row)",
            (ROWS, "encode_row"),
            (GEN_WRITER, "_write_slice"),
            2,
            w,
        ),
        Phase(
            "row files: sha256 + write + fsync (write_file)",
            (FILES, "write_file"),
            (GEN_WRITER, "_write_slice"),
            2,
            w,
        ),
        Phase(
            "row bytes out: sha256 + write (encode_row's writer)",
            (ROWS, "write"),
            (FILES, "write_file"),
            3,
            w,
        ),
        Phase(
            "loss records (MetricsLog.__call__; in train through FinalLossWatch)",
            ((METRICS, "__call__"), (TRAINING, "__call__")),
            (GEN_WRITER, "_write_slice"),
            2,
            w,
        ),
        Phase(
            "shard data copies" + (" + test split" if test_copy else "") + " (.npz, _npz)",
            npz,
            None,
            1,
            w,
        ),
        Phase("np.savez into memory", ("numpy/lib/_npyio_impl.py", "savez"), npz, 2, w),
        Phase("file: sha256 + write + fsync (write_file)", (FILES, "write_file"), npz, 2, w),
        Phase("partition file (Partition.save)", (PARTITION, "save"), None, 1, w),
        Phase("all writer files: sha256 (HASH.update)", SHA256_UPDATE, (FILES, "write"), 1, w),
        Phase("all writer files: write() to the page cache", FILE_WRITE, (FILES, "write"), 1, w),
        Phase("all writer files: fsync per file", FSYNC, (FILES, "write_file"), 1, w),
        Phase("all writer files: folder fsyncs (fsync_dir)", (FILES, "fsync_dir"), None, 1, w),
    ]


def across_phases() -> list[Phase]:
    """Totals of one kind wherever they occur on the calling thread."""
    return [
        Phase(
            "all: waiting for device results (jax.Array._value)", ("jax/_src/array.py", "_value")
        ),
        Phase("all: host->device puts (jax.device_put)", (JAX_API, "device_put")),
        Phase("all: fsyncs on the calling thread (os.fsync)", FSYNC),
    ]


def compile_phases(only_when: str | None) -> list[Phase]:
    """XLA compiles, or loads from JAX's compilation caches, wherever they happen."""
    return [
        Phase(
            "all: XLA compile or cache load (compile_or_get_cached)",
            ("jax/_src/compiler.py", "compile_or_get_cached"),
            only_when=only_when,
        ),
        Phase(
            "cache misses: real compiles (backend_compile_and_load)",
            ("jax/_src/compiler.py", "backend_compile_and_load"),
            depth=2,
            only_when=only_when
            or "a program is not in JAX's compilation caches (an earlier call compiled it)",
        ),
    ]


TRAIN = (TRAINING, "train")
TRAIN_PHASES = [
    Phase("sj.train total", TRAIN, None, 0),
    Phase("writer lock (RunLock.__enter__)", (LOCKS, "__enter__"), (GENERATION, "new_run"), 1),
    Phase("plan: partition, engine, shard data (plan_training)", (PLANNING, "plan_training")),
    Phase("hash partition (hash_partition)", (PARTITION, "hash_partition"), None, 2),
    Phase("engine + state template (build_engine)", (PLANNING, "build_engine"), None, 2),
    Phase("per-shard data selection (shard_data_from)", (PLANNING, "shard_data_from"), None, 2),
    Phase("train_generation", (RETRAINING, "train_generation")),
    Phase("prefix id fingerprints (prefix_facts)", (GEN_WRITER, "prefix_facts"), None, 2),
    Phase("Engine.run", (ENGINE, "run"), (RETRAINING, "train_generation"), 2),
    *engine_run_phases(3, forget=False),
    *finish_phases(2),
    Phase("manifest: build (make_manifest)", (PLANNING, "make_manifest")),
    Phase("library versions (library_versions)", (PLANNING, "library_versions"), None, 2),
    Phase("config.json (RunDir.write_config)", (RUN_DIR, "write_config")),
    Phase("manifest commit: JSON + write + fsync (write_manifest)", (RUN_DIR, "write_manifest")),
    Phase("opening the run (SisaRun.__init__)", (RUN, "__init__"), TRAIN, 1),
    *across_phases(),
    *compile_phases(None),
    *writer_phases(test_copy=True),
]

FORGET = (UNLEARN, "forget_in")
FORGET_PHASES = [
    Phase("sj.forget total", (UNLEARN, "forget"), None, 0),
    Phase("writer lock (RunLock.__enter__)", (LOCKS, "__enter__"), (GENERATION, "_session"), 1),
    Phase("manifest stamp check (SisaRun.reload)", (RUN, "reload"), (GENERATION, "_session"), 1),
    Phase("ledger check: recover + requests (prepare_ledger)", (GENERATION, "prepare_ledger")),
    Phase("forget_in", FORGET),
    Phase("held-out ids (SisaRun.test_data, cached)", (RUN, "test_data"), FORGET, 2),
    Phase("partition (SisaRun.partition, cached by sha256)", (RUN, "partition"), None, 2),
    Phase("planning (plan_forget)", (PLANNING, "plan_forget"), None, 2),
    Phase("new partition (Partition.drop)", (PARTITION, "drop"), None, 2),
    Phase("shard data load + sha256 (SisaRun.shard_data)", (RUN, "shard_data"), FORGET, 2),
    Phase("sha256 of the data copy", SHA256_NEW, (RUN, "load_npz"), 3),
    Phase(
        "check of the kept rows and restore of the restart row (SisaRun.check_shard)",
        (RUN, "check_shard"),
        FORGET,
        2,
        only_when="the forgotten id is not in slice 0",
    ),
    Phase(
        "read + sha256 + decode (rows.read_row)",
        (ROWS, "read_row"),
        (RUN, "check_shard"),
        3,
        only_when="the forgotten id is not in slice 0",
    ),
    Phase("ledger appends: pending + done (Ledger.append)", (LEDGER, "append"), None, 2),
    Phase("ledger line fsync", FSYNC, (LEDGER, "append"), 3),
    Phase("ledger head write + fsyncs (_write_head)", (LEDGER, "_write_head"), None, 3),
    Phase(
        "writer setup (GenerationWriter.__init__)",
        (GEN_WRITER, "__init__"),
        (GENERATION, "start_writer"),
        2,
    ),
    Phase("prefix id fingerprints (prefix_facts)", (GEN_WRITER, "prefix_facts"), None, 2),
    Phase("Engine.run (the retraining)", (ENGINE, "run"), FORGET, 2),
    *engine_run_phases(3, forget=True),
    *finish_phases(2),
    Phase(
        "manifest commit + garbage collection (RunDir.commit)",
        (RUN_DIR, "commit"),
        (GENERATION, "commit"),
        2,
    ),
    Phase(
        "reader lock, exclusive (RunLock.__enter__)", (LOCKS, "__enter__"), (RUN_DIR, "commit"), 3
    ),
    Phase("manifest JSON (Manifest.to_json)", (MANIFEST, "to_json"), None, 3),
    Phase("manifest write + fsyncs (write_json)", (FILES, "write_json"), None, 3),
    Phase("garbage collection (collect_garbage)", (RUN_DIR, "collect_garbage"), None, 3),
    Phase("directory scan (RunDir.scan)", (RUN_DIR, "scan"), (RUN_DIR, "collect_garbage"), 4),
    Phase("unlinks (remove_if_ours)", (FILES, "remove_if_ours"), None, 4),
    Phase("folder fsyncs", (FILES, "fsync_dir"), (RUN_DIR, "collect_garbage"), 4),
    Phase("model fingerprints for the ledger", (UNLEARN, "model_fingerprints"), None, 2),
    Phase("metrics record (MetricsLog.__call__)", (METRICS, "__call__"), FORGET, 2),
    *across_phases(),
    *compile_phases("a forget needs a program the warm-up forget did not compile"),
    *writer_phases(test_copy=False),
]


# -- profiling ------------------------------------------------------------------------------------


class ThreadProfiles:
    """cProfile of the calling thread, plus one per writer thread started meanwhile.

    cProfile (Python 3.11) profiles only the thread that enables it; ``threading.setprofile``
    installs a hook in every thread started afterwards, which enables a profiler of its own in the
    library's writer threads and removes itself from any other thread.
    """

    def __init__(self) -> None:
        self.main = cProfile.Profile()
        self.writers: list[cProfile.Profile] = []

    def _hook(self, *_: Any) -> None:
        sys.setprofile(None)
        if threading.current_thread().name.startswith(WRITER_THREAD_PREFIX):
            prof = cProfile.Profile()
            self.writers.append(prof)
            prof.enable()  # replaces this hook in this thread

    def __enter__(self) -> ThreadProfiles:
        threading.setprofile(self._hook)
        self.main.enable()
        return self

    def __exit__(self, *exc: object) -> None:
        self.main.disable()
        threading.setprofile(None)  # type: ignore[arg-type]

    def stats(self) -> dict[str, pstats.Stats | None]:
        """``{"main": ..., "writer": ... or None}`` (writer threads have ended by now: the library
        joins them before returning)."""
        writer = None
        for prof in self.writers:
            if writer is None:
                writer = pstats.Stats(prof)
            else:
                writer.add(prof)
        return {"main": pstats.Stats(self.main), "writer": writer}


def _fns(fn: Fn | tuple[Fn, ...]) -> tuple[Fn, ...]:
    return (fn,) if isinstance(fn[0], str) else fn  # type: ignore[return-value]


def cumtime(stats: pstats.Stats | None, fns: tuple[Fn, ...], caller: Fn | None) -> float | None:
    """Cumulative seconds of functions matching any of ``fns`` (optionally only as called from
    ``caller``); None when none of them ran (or ran only from other callers)."""
    if stats is None:
        return None
    total, found = 0.0, False
    for (file, _line, name), (_cc, _nc, _tt, ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if not any(name == n and file.endswith(f) for f, n in fns):
            continue
        if caller is None:
            found = True
            total += ct
            continue
        for (cfile, _cl, cname), vals in callers.items():
            if cname == caller[1] and cfile.endswith(caller[0]):
                found = True
                total += vals[3]
    return total if found else None


@functools.cache
def _defined_names(suffix: str) -> frozenset[str] | None:
    """Function names defined (at any nesting) in the installed file ``suffix``; None when the
    file cannot be found (builtins, or a library laid out differently)."""
    if suffix == "~":
        return None
    top = suffix.split("/")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc).parent / suffix
        if path.is_file():
            tree = ast.parse(path.read_text())
            return frozenset(
                n.name
                for n in ast.walk(tree)
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            )
    return frozenset()  # the package is there, the file is not


def undefined(phase: Phase) -> list[str]:
    """``file:function`` of the phase's functions (and caller) that no longer exist."""
    out = []
    for f, name in [*_fns(phase.fn), *([phase.caller] if phase.caller else [])]:
        names = _defined_names(f)
        if names is not None and name not in names:
            out.append(f"{f}:{name}")
    return out


WRITER_NOTE = (
    "Writer-thread rows are profiled on the writer thread(s) and run concurrently with the "
    "others; their share is of the call's wall time (how busy the writer was)."
)
NOT_SEEN = "NOT SEEN"
NO_SUCH = "NO SUCH FUNCTION"


def breakdown(
    stats: dict[str, pstats.Stats | None], phases: list[Phase], per: int = 1
) -> list[dict[str, Any]]:
    """One record per phase: label (indented by depth), seconds per call or None, status."""
    out = []
    for ph in phases:
        v = cumtime(stats.get(ph.thread), _fns(ph.fn), ph.caller)
        missing = undefined(ph)
        status = NO_SUCH if missing else ("ok" if v is not None else NOT_SEEN)
        out.append(
            {
                "label": "  " * ph.depth + ph.label,
                "phase": ph.label,
                "depth": ph.depth,
                "thread": ph.thread,
                "s": None if v is None else v / per,
                "status": status,
                "missing": missing,
                "only_when": ph.only_when,
            }
        )
    return out


def warn_stale(what: str, recs: list[dict[str, Any]]) -> list[str]:
    """Print a warning per phase that did not show up; return the note lines."""
    lines = []
    for r in recs:
        if r["status"] == NO_SUCH:
            line = (
                f"{what}: phase {r['phase']!r}: {', '.join(r['missing'])} is not defined any more "
                "(update the phase list)"
            )
        elif r["status"] == NOT_SEEN:
            why = (
                f"expected: it runs only when {r['only_when']}"
                if r["only_when"]
                else "its function never ran on this path: stale phase list?"
            )
            line = f"{what}: phase {r['phase']!r} not seen in the profile ({why})"
        else:
            continue
        print(f"WARNING: {line}", file=sys.stderr, flush=True)
        lines.append(line)
    return lines


def phase_table(title: str, unit: str, recs: list[dict[str, Any]], note: str) -> C.Table:
    t = C.Table(title, ("phase", unit, "share of total"), note=note)
    total = recs[0]["s"] or 1.0
    for r in recs:
        if r["status"] == "ok":
            t.add(r["label"], r["s"], r["s"] / total)
        else:
            t.add(r["label"], r["status"], r["status"])
    return t


def section(
    title: str, unit: str, recs: list[dict[str, Any]], note: str, stale: list[str], writers: int
) -> tuple[C.Table, dict[str, Any]]:
    """The phase table of one profiled call (stale phases named in its note) and its JSON."""
    if stale:
        note += " Not seen / stale: " + "; ".join(stale) + "."
    data = {
        "rows": [(r["label"], r["s"]) for r in recs],
        "phases": recs,
        "not_seen": [r["phase"] for r in recs if r["status"] == NOT_SEEN],
        "undefined": [r["phase"] for r in recs if r["status"] == NO_SUCH],
        "writer_threads_profiled": writers,
    }
    return phase_table(title, unit, recs, note), data


def value(recs: list[dict[str, Any]], phase: str) -> float:
    """Seconds of the (first) phase labelled ``phase`` (0 when not seen)."""
    return next((r["s"] or 0.0 for r in recs if r["phase"] == phase), 0.0)


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
    train, forget = sj.train, sj.forget  # (the lazy imports happen here, not under the profiler)
    tables, data = [], {}
    with C.work_dir(args, "profile") as work:
        if "train" in what:
            C.log("profiling sj.train")
            with ThreadProfiles() as prof:
                _, cost = train(cfg, ds, work / "train")
            st = prof.stats()
            dump(args, "train", st)
            recs = breakdown(st, TRAIN_PHASES)
            stale = warn_stale("train", recs)
            C.log("sj.train again, unprofiled")
            with C.span() as sp2:
                _, cost2 = train(cfg, ds, work / "train2", overwrite=True)
            total = recs[0]["s"] or 0.0
            wait = value(recs, "all: waiting for device results (jax.Array._value)")
            note = (
                f"{WRITER_NOTE} Not waiting for the device: {total - wait:.3f} s of {total:.3f} s "
                f"({(total - wait) / max(total, 1e-9):.0%}). Cost report (profiled): "
                f"{fmt_cost(cost.to_dict())}. Unprofiled retrain in place: "
                f"{fmt_cost(cost2.to_dict())}; load {sp2.load_after}."
            )
            title = f"sj.train S={wl.shards} R={wl.slices} ({args.exec}) under cProfile"
            table, sec = section(title, "s", recs, note, stale, len(prof.writers))
            tables.append(table)
            data["train"] = {**sec, "cost": cost.to_dict(), "unprofiled_cost": cost2.to_dict()}
        if "forget" in what:
            C.log("profiling sj.forget")
            run, info = C.trained_run(args, cfg, ds, work / "forget")
            rng = np.random.default_rng(args.seed)
            forget(run, [int(rng.choice(run.partition.ids))])  # warm-up (compiles)
            costs, restarts = [], []
            with ThreadProfiles() as prof:
                for _ in range(n_forgets):
                    rep = forget(run, [int(rng.choice(run.partition.ids))])
                    costs.append(rep.cost.to_dict())
                    restarts.append(rep.restart)
            st = prof.stats()
            dump(args, "forget", st)
            recs = breakdown(st, FORGET_PHASES, per=n_forgets)
            stale = warn_stale("forget", recs)
            unprof = []
            for _ in range(n_forgets):
                unprof.append(forget(run, [int(rng.choice(run.partition.ids))]).cost.to_dict())
            mean_cost = {k: C.mean([c[k] for c in costs]) for k in costs[0]}
            mean_unprof = {k: C.mean([c[k] for c in unprof]) for k in unprof[0]}
            total = recs[0]["s"] or 0.0
            retrain = value(recs, "Engine.run (the retraining)")
            note = (
                f"{WRITER_NOTE} Outside Engine.run: {total - retrain:.3f} s per forget. Restart slices "
                f"(shard: slice): {restarts}. Cost report (profiled, mean): "
                f"{fmt_cost(mean_cost)}. Unprofiled, mean of {n_forgets} other ids: "
                f"{fmt_cost(mean_unprof)}."
            )
            title = (
                f"sj.forget of one random id, S={wl.shards} R={wl.slices} ({args.exec}), "
                f"mean of {n_forgets} under cProfile"
            )
            table, sec = section(title, "s per forget", recs, note, stale, len(prof.writers))
            tables.append(table)
            data["forget"] = {
                **sec,
                "restarts": [{str(k): v for k, v in r.items()} for r in restarts],
                "costs": costs,
                "unprofiled_costs": unprof,
            }
    C.show(tables, head)
    path = C.write_results(args, "profile_phases", head, tables, data)
    print(f"results: {path}")
    return 0


def dump(args: Any, name: str, stats: dict[str, pstats.Stats | None]) -> None:
    if not args.dump:
        return
    Path(args.dump).mkdir(parents=True, exist_ok=True)
    for thread, st in stats.items():
        if st is not None:
            st.dump_stats(str(Path(args.dump) / f"{name}_{thread}.prof"))


def fmt_cost(c: dict[str, Any]) -> str:
    return (
        f"wall {c['wall_s']:.3f} s = compile {c['compile_s']:.3f} + restore {c['restore_s']:.3f} "
        f"+ retrain {c['retrain_s']:.3f} + save {c['save_s']:.3f} (+ rest); writer thread busy "
        f"{c.get('writer_busy_s', 0.0):.3f} s (concurrent)"
    )


if __name__ == "__main__":
    C.main_wrapper(main)
