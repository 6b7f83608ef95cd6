"""Shared pieces of the benchmarks: the workload, machine facts, timers, tables, result files.

Every benchmark is one command (``python -m benchmarks.<name> [--quick]``), measures the things it
compares side by side in the same process, prints markdown tables of ratios and writes
``<out>/<name>[_<tag>].json`` and ``.md``. The JSON holds the machine (CPU model, cores, load),
the library versions, the git state of the tree and the full workload config.

Workload (the paper's Purchase recipe): Purchase-shaped synthetic data
(``purchase_synthetic``, 600 binary features, 100 classes), MLP 600-128-100 tanh, plain SGD with
lr 0.01 (lr 0.001, the authors' default, underfits sharded models badly here), 20 epochs, batch 16
per constituent model, S=20 shards x R=50 slices. ``--quick`` shrinks everything so a benchmark
runs in seconds; its numbers only show that the code path works.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sisajax  # first: it gives XLA one CPU device per core before jax starts

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Workload:
    """The benchmark workload; ``quick()`` is the tiny version the tests run."""

    n_train: int = 100_000
    n_test: int = 5_000
    hidden: tuple[int, ...] = (128,)
    learning_rate: float = 0.01
    epochs: float = 20.0
    batch_size: int = 16
    shards: int = 20
    slices: int = 50
    chunk_steps: int = 128
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_version(cls) -> Workload:
        return cls(
            n_train=800,
            n_test=100,
            hidden=(16,),
            epochs=2.0,
            shards=4,
            slices=3,
            chunk_steps=32,
            quick=True,
        )

    def data_params(self, n_train: int | None = None) -> dict[str, Any]:
        return {"n_train": n_train or self.n_train, "n_test": self.n_test, "seed": self.seed}

    def config(
        self,
        shards: int | None = None,
        slices: int | None = None,
        shard_exec: str = "map",
        *,
        epochs: float | None = None,
        n_train: int | None = None,
    ):
        """The :class:`sisajax.RunConfig` of this workload with some fields changed."""
        import sisajax as sj

        return sj.RunConfig(
            # every id trains (no validation hold-out): the workload the stored results measured
            data=sj.DataConfig("purchase_synthetic", self.data_params(n_train), val_fraction=0.0),
            model=sj.ModelConfig(hidden=self.hidden, activation="tanh"),
            optim=sj.OptimConfig(name="sgd", learning_rate=self.learning_rate),
            sisa=sj.SisaConfig(
                shards=self.shards if shards is None else shards,
                slices=self.slices if slices is None else slices,
                epochs=self.epochs if epochs is None else epochs,
                batch_size=self.batch_size,
                seed=self.seed,
                shard_exec=shard_exec,
                chunk_steps=self.chunk_steps,
            ),
        )

    def dataset(self, n_train: int | None = None):
        import sisajax as sj

        return sj.load_dataset("purchase_synthetic", **self.data_params(n_train))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            data="purchase_synthetic",
            model=f"MLP 600-{'-'.join(map(str, self.hidden))}-100 tanh",
            optimizer=f"SGD lr {self.learning_rate}",
        )
        return d


# -- arguments ------------------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the code path only")
    p.add_argument(
        "--out", type=Path, default=None, help="results directory (default benchmarks/results)"
    )
    p.add_argument("--work", type=Path, default=None, help="scratch directory for run dirs")
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. gpu)")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="directory of trained runs reused between benchmarks (default runs/bench-cache; "
        "'none' disables)",
    )
    return p


def out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    return RESULTS / "quick" if args.quick else RESULTS


@contextmanager
def work_dir(args: argparse.Namespace, name: str) -> Iterator[Path]:
    """A fresh scratch directory, removed afterwards."""
    base = args.work
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"sisajax-bench-{name}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def workload(args: argparse.Namespace) -> Workload:
    return Workload.quick_version() if args.quick else Workload()


# -- machine facts --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def source_digest() -> str:
    """sha256 (12 hex) over the library sources actually imported (``sisajax/**.py``)."""

    root = Path(sisajax.__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            r = subprocess.run(
                ["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
            )
            return r.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty_files": len(git("status", "--porcelain", "--untracked-files=no").splitlines()),
    }


def machine() -> dict[str, Any]:
    import jax

    devs = jax.local_devices()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_gb": mem_total_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devs],
        "cpu_layout": os.environ.get(DEVICES_ENV) or "auto",
        "loadavg_start": loadavg(),
    }


def versions() -> dict[str, str]:
    import flax
    import jax
    import jaxlib
    import numpy
    import optax
    import orbax.checkpoint

    return {
        "sisajax": sisajax.__version__,
        "sisajax_path": str(Path(sisajax.__file__).parent),
        "sisajax_source_sha": source_digest(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax-checkpoint": orbax.checkpoint.__version__,
        "numpy": numpy.__version__,
    }


def header(args: argparse.Namespace, name: str, wl: Workload) -> dict[str, Any]:
    """The common head of every result file."""
    return {
        "benchmark": name,
        "tag": args.tag,
        "quick": bool(args.quick),
        "command": " ".join([Path(sys.executable).name, "-m", f"benchmarks.{name}", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "versions": versions(),
        "git": git_state(),
        "workload": wl.to_dict(),
    }


# CPU layouts a process can start in (values of SISAJAX_CPU_DEVICES, read when jax starts):
# one device per core (the default), XLA's one device on all cores, and one device whose thread
# pools were sized for one core (the fastest for programs of one shard on 2 cores)
DEVICES_ENV = "SISAJAX_CPU_DEVICES"
CPU_LAYOUTS = {"per-core": "auto", "one-device": "1", "serial": "serial"}


def layout_env(layout: str) -> dict[str, str]:
    """The environment of a child process that starts jax in CPU layout ``layout`` (a key of
    :data:`CPU_LAYOUTS`): this process's, without the device count sisajax added to XLA_FLAGS."""
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    env[DEVICES_ENV] = CPU_LAYOUTS[layout]
    return env


def in_layout(layout: str) -> bool:
    """Whether this process started in CPU layout ``layout``."""
    return (os.environ.get(DEVICES_ENV) or "auto") == CPU_LAYOUTS[layout]


def child_json(module: str, args: list[str], layout: str, what: str) -> Any:
    """Run ``python -m module args`` in a fresh process started in CPU layout ``layout`` and
    return the JSON its last line of output holds (RuntimeError naming ``what`` if it fails)."""
    cmd = [sys.executable, "-m", module, *args]
    env = layout_env(layout)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{what} in the {layout} layout failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rerun_in_layout(module: str, argv: list[str] | None, layout: str) -> int:
    """Run ``python -m module argv`` again in a process started in CPU layout ``layout`` (fixed
    when jax starts, so a benchmark that needs another layout restarts itself); its exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    log(f"restarting in the {layout} CPU layout ({DEVICES_ENV}={CPU_LAYOUTS[layout]})")
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, env=layout_env(layout), check=False).returncode


# -- timing ---------------------------------------------------------------------------------------


_JIT_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_jit_total = [0.0]
_listening = [False]


def _on_event(event: str, duration: float, **_: Any) -> None:
    if event in _JIT_EVENTS:
        _jit_total[0] += duration


def jit_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling jitted functions (all of
    them, not only the engine's training program), from ``jax.monitoring`` events."""
    if not _listening[0]:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listening[0] = True
    return _jit_total[0]


@dataclasses.dataclass
class Span:
    """Wall and CPU seconds (this process and waited-for children) of a measured block, and the
    part of the wall clock spent tracing/lowering/compiling any jitted function (``jit_s``)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    children_cpu_s: float = 0.0
    jit_s: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in dataclasses.asdict(self).items()}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@contextmanager
def span() -> Iterator[Span]:
    s = Span(load_before=(loadavg() or [0.0])[0])
    j0 = jit_seconds()
    w0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    try:
        yield s
    finally:
        s.wall_s = time.perf_counter() - w0
        s.jit_s = jit_seconds() - j0
        s.cpu_s = time.process_time() - c0
        s.children_cpu_s = _children_cpu() - k0
        s.load_after = (loadavg() or [0.0])[0]


def steady(wall_s: float, engine_compile_s: float, jit_s: float) -> float:
    """Wall clock without the training programs' compile (measured by the engine itself; the
    monitoring events in ``jit_s`` overlap each other and other threads, so they are reported,
    not subtracted)."""
    del jit_s
    return wall_s - engine_compile_s


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def count_files(path: Path) -> int:
    return sum(1 for p in Path(path).rglob("*") if p.is_file())


# -- trained runs, reused between benchmarks --------------------------------------------------------


def cache_root(args: argparse.Namespace) -> Path | None:
    if args.cache is not None and str(args.cache).lower() == "none":
        return None
    return args.cache or (REPO / "runs" / ("bench-cache-quick" if args.quick else "bench-cache"))


def _run_key(cfg) -> str:
    import jax

    blob = json.dumps(
        {
            "config": cfg.to_dict(),
            "source": source_digest(),
            "jax": jax.__version__,
            "devices": [d.device_kind for d in jax.local_devices()],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


KEEP_CACHED_RUNS = 3


def _prune_cache(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently used cached runs (a full-size run is ~380 MB)."""
    runs = sorted(
        (p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for p in runs[keep:]:
        shutil.rmtree(p, ignore_errors=True)
        p.with_name(f"{p.name}.json").unlink(missing_ok=True)


def trained_run(args: argparse.Namespace, cfg, dataset, dest: Path) -> tuple[Any, dict[str, Any]]:
    """A run of ``cfg`` on ``dataset`` at ``dest`` (a copy the caller may change).

    Trains it, or copies a run trained earlier with the same config, library sources, JAX version
    and device kind from the cache. Returns ``(run, info)``; ``info`` has the train cost and
    whether it came from the cache.
    """
    import sisajax as sj

    root = cache_root(args)
    if root is None:
        with span() as sp:
            run, cost = sj.train(cfg, dataset, dest)
        return run, {"cached": False, "train_cost": cost.to_dict(), "train_span": sp.to_dict()}
    src = root / _run_key(cfg)
    if not (src / "MANIFEST.json").is_file():
        if src.exists():
            shutil.rmtree(src)
        src.parent.mkdir(parents=True, exist_ok=True)
        _prune_cache(root, keep=KEEP_CACHED_RUNS - 1)
        with span() as sp:
            _, cost = sj.train(cfg, dataset, src)
        (src.parent / f"{src.name}.json").write_text(
            json.dumps({"train_cost": cost.to_dict(), "train_span": sp.to_dict()})
        )
        cached = False
    else:
        cached = True
        os.utime(src)  # most recently used
    shutil.copytree(src, dest, dirs_exist_ok=False)
    info = json.loads((src.parent / f"{src.name}.json").read_text())
    info["cached"] = cached
    return sj.open_run(dest), info


# -- tables and result files ------------------------------------------------------------------------


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 10**-(digits)):
            return f"{x:.3g}"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{max(digits - 1, 1)}f}"
    return str(x)


@dataclasses.dataclass
class Table:
    """A markdown table (printed as is; markdown reads fine in a terminal)."""

    title: str
    header: Sequence[str]
    rows: list[Sequence[Any]] = dataclasses.field(default_factory=list)
    note: str = ""

    def add(self, *cells: Any) -> None:
        self.rows.append(cells)

    def markdown(self) -> str:
        cells = [[fmt(c) for c in r] for r in self.rows]
        widths = [len(h) for h in self.header]
        for r in cells:
            widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]

        def line(r: Sequence[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

        out = [f"### {self.title}", "", line(list(self.header))]
        out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        out += [line(r) for r in cells]
        if self.note:
            out += ["", self.note]
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "header": list(self.header), "rows": self.rows}


def target(value: float | None, limit: float, *, at_most: bool) -> str:
    """``'met'``/``'missed'`` for a target ``value <= limit`` (``at_most``) or ``>=``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    ok = value <= limit if at_most else value >= limit
    return "met" if ok else "MISSED"


def machine_line(head: dict[str, Any]) -> str:
    m, v = head["machine"], head["versions"]
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['backend']} backend, {len(m['devices'])} "
        f"device(s): {', '.join(sorted(set(m['devices'])))}), "
        f"load average at start {m['loadavg_start']}. jax {v['jax']}, flax {v['flax']}, "
        f"optax {v['optax']}, orbax {v['orbax-checkpoint']}; sisajax sources "
        f"{v['sisajax_source_sha']} (git {head['git']['commit']}, "
        f"{head['git']['dirty_files']} modified tracked files)."
    )


def write_results(
    args: argparse.Namespace,
    name: str,
    head: dict[str, Any],
    tables: Sequence[Table],
    data: dict[str, Any],
) -> Path:
    """Write ``<out>/<name>[_<tag>].json`` and ``.md``; return the JSON path."""
    out = out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{args.tag}" if args.tag else name
    head = dict(head)
    head["machine"] = dict(head["machine"], loadavg_end=loadavg())
    head["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    payload = {**head, "tables": [t.to_dict() for t in tables], "results": data}
    path = out / f"{stem}.json"
    path.write_text(json.dumps(payload, indent=1, default=json_default) + "\n")
    md = [f"## {name}{' (' + args.tag + ')' if args.tag else ''}", "", machine_line(head), ""]
    md.append(
        f"Command: `{head['command']}`. Load average at end {head['machine']['loadavg_end']}."
    )
    md += [""] + [t.markdown() for t in tables]
    (out / f"{stem}.md").write_text("\n".join(md))
    return path


def json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


def show(tables: Sequence[Table], head: dict[str, Any]) -> None:
    print(machine_line(head), flush=True)
    for t in tables:
        print()
        print(t.markdown(), flush=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()[:1]}] {msg}", file=sys.stderr, flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def main_wrapper(fn: Callable[[list[str] | None], int]) -> None:
    sys.exit(fn(None))
