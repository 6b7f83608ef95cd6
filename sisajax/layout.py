"""Where shards run: devices, the CPU device default, and programs compiled per device.

On a CPU, XLA runs one program on a shared thread pool, and a small model at batch 16 cannot keep
two cores busy: measured here (2 cores), one training program used 1.5 cores for one core's work
(115k examples/s), while two forced CPU devices each running their own shards reached 330k
examples/s together, with bit-identical checkpoints (``lax.map`` over shards is independent of
the width and of the device a shard runs on). So sisajax's CPU default is one host device per core
(:func:`configure_cpu_devices`, applied before jax is imported), and the engine splits the shard
axis over the devices, each running the one-device program on its own block of shards
(:class:`PerDeviceProgram`). The layout a run used is recorded (:meth:`sisajax.engine.Engine.layout`)
and :func:`layout_options` rebuilds an engine for it, or says why it cannot.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
from collections.abc import Sequence
from typing import Any

from sisajax.config import ConfigError

PyTree = Any
SHARD_AXIS = "shard"
COLLECTIVE_OPS = (
    "all-reduce",
    "all-gather",
    "all-to-all",
    "ragged-all-to-all",
    "reduce-scatter",
    "collective-permute",
    "collective-broadcast",
)
DEVICES_ENV = "SISAJAX_CPU_DEVICES"
JAX_DEVICES_ENV = "JAX_NUM_CPU_DEVICES"  # jax's own CPU device count (negative: jax's default)
MAX_CPU_DEVICES = 256  # more XLA CPU devices than any host has cores only pads vmapped programs
NONDETERMINISTIC_ENV = "SISAJAX_ALLOW_NONDETERMINISTIC"
# XLA's switches for run-to-run reproducible GPU programs (deterministic reductions and
# scatters, no atomics-based ops); exact unlearning replays training, so it needs them.
GPU_DETERMINISM_FLAGS = (
    "--xla_gpu_deterministic_ops=true",
    "--xla_gpu_exclude_nondeterministic_ops=true",
)
SERIAL = "serial"
_saved_affinity: set[int] | None = None  # set by the serial layout until jax has started
_setting_error: ConfigError | None = None  # a bad SISAJAX_CPU_DEVICES seen at import
_added_count_flag: str | None = None  # the XLA_FLAGS entry configure_cpu_devices added
_serial_started = False  # jax's backend was started in the serial layout


class LayoutError(ConfigError):
    """The devices at hand cannot reproduce the layout a run was trained with."""


def configure_cpu_devices(devices: int | str | None = None) -> int | None:
    """Give XLA one CPU device per core (the fastest layout on a CPU), before jax is imported.

    Args:
      devices: a number of devices, ``"auto"`` (default: ``SISAJAX_CPU_DEVICES`` or the number of
        cores this process may use, at most 8), 0/1 to leave XLA's default (one device), or
        ``"serial"``: one device whose XLA thread pools are sized for one core (this process's CPU
        affinity is narrowed to one core until jax has started, then restored by
        :func:`restore_cpu_affinity`). Programs of one shard (a single-id forget, one full
        model) run ~1.9x faster that way on 2 cores (docs/performance.md), SISA training of many
        shards slower than one device per core; the bits of ``map`` runs are the same.

    Returns:
      the device count set, or None when nothing was changed (jax already imported, the user set
      the count in ``XLA_FLAGS`` or via jax's config, or one device asked for).
    """
    check_jax_device_count()
    if "jax" in sys.modules:
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags or os.environ.get(JAX_DEVICES_ENV):
        return None
    want = (os.environ.get(DEVICES_ENV) or "auto") if devices is None else devices
    if want == SERIAL:
        _narrow_affinity()
        return None
    if want == "auto":
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:
            n = os.cpu_count() or 1
        n = min(n, 8)
    else:
        try:
            n = int(want)
        except ValueError:
            raise ConfigError(
                f"{DEVICES_ENV} must be a number, 'auto' or '{SERIAL}', got {want!r}"
            ) from None
        if not 1 <= n <= MAX_CPU_DEVICES:
            raise ConfigError(f"{DEVICES_ENV} must be in 1..{MAX_CPU_DEVICES}, got {n}")
    if n <= 1:
        return None
    global _added_count_flag
    _added_count_flag = f"--xla_force_host_platform_device_count={n}"
    os.environ["XLA_FLAGS"] = f"{flags} {_added_count_flag}".strip()
    return n


def check_jax_device_count() -> None:
    """Refuse a ``JAX_NUM_CPU_DEVICES`` that jax would fail on with a traceback (not a whole
    number, or 0) or that no host can mean (above :data:`MAX_CPU_DEVICES`); negative values are
    jax's "not set"."""
    raw = os.environ.get(JAX_DEVICES_ENV)
    if not raw:
        return
    try:
        n = int(raw)
    except ValueError:
        n = None
    if n is None or n == 0 or n > MAX_CPU_DEVICES:
        raise ConfigError(
            f"{JAX_DEVICES_ENV} must be a number of CPU devices in 1..{MAX_CPU_DEVICES} (or "
            f"negative for jax's default), got {raw!r}"
        )


def serial_suits(run_layout: dict[str, Any] | None, shards: int) -> bool:
    """Whether retraining ``shards`` shards of a run with layout ``run_layout`` (its manifest's
    ``layout``) is faster in the ``serial`` layout than one device per core, with the same bits.

    True for one shard of a CPU run whose shards run under ``lax.map``: a single shard's program
    keeps one core busy at most, and XLA's thread pools sized for one core run its small kernels
    1.3-1.9x faster than pools shared by two devices (measured on 2 cores, docs/performance.md);
    ``map`` programs give the same bits on any number of devices. With two or more shards one
    device per core retrains them side by side, which is faster.
    """
    if not run_layout or shards != 1:
        return False
    return run_layout.get("platform") == "cpu" and run_layout.get("shard_exec") == "map"


def start_serial_backend() -> bool:
    """Start jax's CPU backend in the ``serial`` layout, in a process whose layout sisajax chose.

    For a command that learns what it will run only after reading a run (e.g. a forget that
    retrains one shard: :func:`serial_suits`). Does nothing, and returns False, when the user chose
    the devices (``SISAJAX_CPU_DEVICES``, ``JAX_NUM_CPU_DEVICES`` or a device count of their own in
    ``XLA_FLAGS``), when jax's backends have started, or when this process may use one core only.
    Returns whether the backend now runs in the serial layout.
    """
    global _added_count_flag
    if os.environ.get(DEVICES_ENV) or os.environ.get(JAX_DEVICES_ENV):
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    ours = _added_count_flag is not None and _added_count_flag in flags.split()
    if "xla_force_host_platform_device_count" in flags and not ours:
        return False
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        return False
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
    if ours:
        os.environ["XLA_FLAGS"] = " ".join(f for f in flags.split() if f != _added_count_flag)
        _added_count_flag = None
    _narrow_affinity()
    restore_cpu_affinity()  # starts the backend on one core, then gives the cores back
    return True


def xla_flag_value(name: str, flags: str | None = None) -> str | None:
    """The value XLA keeps for ``--name=...`` in ``flags`` (default: this process's
    ``XLA_FLAGS``): the last one given, or None."""
    value = None
    text = os.environ.get("XLA_FLAGS", "") if flags is None else flags
    for tok in text.split():
        if tok.startswith(f"--{name}="):
            value = tok.split("=", 1)[1]
        elif tok == f"--{name}":
            value = "true"
    return value


def configure_gpu_determinism() -> bool:
    """Ask XLA for deterministic GPU programs (:data:`GPU_DETERMINISM_FLAGS`) in ``XLA_FLAGS``,
    before jax starts its backends. Harmless on other backends. Skipped when the user chose a
    ``xla_gpu_deterministic_ops`` value or set ``SISAJAX_ALLOW_NONDETERMINISTIC=1``, or when the
    backends have started (then :func:`deterministic_backend` tells). Returns whether it set them.
    """
    if os.environ.get(NONDETERMINISTIC_ENV) == "1":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if xla_flag_value("xla_gpu_deterministic_ops", flags) is not None:
        return False
    if "jax" in sys.modules:
        try:
            from jax._src import xla_bridge

            if xla_bridge.backends_are_initialized():
                return False
        except (ImportError, AttributeError):
            return False
    os.environ["XLA_FLAGS"] = " ".join([flags, *GPU_DETERMINISM_FLAGS]).strip()
    return True


def deterministic_backend(platform: str) -> bool:
    """Whether programs on ``platform`` give the same bits run after run (what exact unlearning
    needs): CPUs and TPUs do; GPUs only with XLA's deterministic ops (``XLA_FLAGS``; the last
    value given counts, as in XLA)."""
    if platform != "gpu" and platform != "cuda" and platform != "rocm":
        return True
    return xla_flag_value("xla_gpu_deterministic_ops") in ("true", "1")


def check_deterministic(platform: str) -> None:
    """Refuse to train or retrain on a backend that is not deterministic, unless
    ``SISAJAX_ALLOW_NONDETERMINISTIC=1`` (the run's layout records ``deterministic: false``).

    Raises:
      LayoutError: a GPU without XLA's determinism flags.
    """
    if deterministic_backend(platform) or os.environ.get(NONDETERMINISTIC_ENV) == "1":
        return
    raise LayoutError(
        f"{platform} programs are not deterministic without XLA_FLAGS="
        f"'{' '.join(GPU_DETERMINISM_FLAGS)}' (sisajax sets them when it is imported before jax "
        f"starts); import sisajax first, or set {NONDETERMINISTIC_ENV}=1 to train anyway "
        "(unlearning is then not bit-exact)"
    )


def configure_cpu_devices_at_import() -> None:
    """:func:`configure_cpu_devices` for ``import sisajax``: a bad ``SISAJAX_CPU_DEVICES`` does
    not break the import; it is raised as a one-line :class:`ConfigError` when devices are first
    chosen (:func:`select_devices`), and the command line reports it before anything runs."""
    global _setting_error
    try:
        configure_cpu_devices()
    except ConfigError as e:
        _setting_error = e


def _narrow_affinity() -> None:
    """Run on one core while jax starts, so XLA sizes its CPU thread pools for one core."""
    global _saved_affinity
    if _saved_affinity is not None or not hasattr(os, "sched_setaffinity"):
        return
    cores = os.sched_getaffinity(0)
    if len(cores) > 1:
        _saved_affinity = set(cores)
        os.sched_setaffinity(0, {min(cores)})


def process_layout() -> dict[str, Any]:
    """How this process runs programs: ``{"platform", "devices", "serial"}`` (``serial``: XLA's
    CPU thread pools were sized for one core, see :func:`configure_cpu_devices`)."""
    import jax

    return {
        "platform": jax.default_backend(),
        "devices": jax.local_device_count(),
        "serial": _serial_started,
    }


def restore_cpu_affinity() -> bool:
    """Start jax's backend, then give every thread of this process back the cores the
    ``serial`` layout took away (no-op otherwise). Returns whether anything was restored."""
    global _saved_affinity
    if _saved_affinity is None:
        return False
    import jax

    jax.devices()  # the backend (and its thread pools) exists from here on
    global _serial_started
    _serial_started = True
    cores, _saved_affinity = _saved_affinity, None
    task_dir = "/proc/self/task"
    tasks = [int(t) for t in os.listdir(task_dir)] if os.path.isdir(task_dir) else [0]
    for tid in tasks:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cores)
    return True


def resolve_shard_exec(choice: str) -> str:
    """``auto`` -> ``map`` on CPU, ``vmap`` on accelerators.

    Raises:
      ConfigError: a bad device setting seen at import (before jax's backend starts with it).
    """
    if _setting_error is not None:
        raise _setting_error
    if choice != "auto":
        return choice
    import jax

    return "map" if jax.default_backend() == "cpu" else "vmap"


def select_devices(devices: int | Sequence[Any] | None = None) -> tuple[Any, ...]:
    """The devices an engine spreads shards over (this process's devices only).

    Args:
      devices: ``None`` -> all local devices of the default backend; an integer ``n`` (Python
        or numpy, not a boolean) -> the first ``n`` of them; or an explicit sequence of devices
        of one platform.

    Raises:
      LayoutError: fewer devices than asked for, none, or mixed platforms.
    """
    if _setting_error is not None:
        raise _setting_error
    if isinstance(devices, bool):  # True is an int to Python, not a number of devices
        raise LayoutError(
            f"devices must be a number of devices or a list of devices, got {devices}"
        )
    if isinstance(devices, numbers.Integral):
        devices = int(devices)
    import jax

    restore_cpu_affinity()
    local = jax.local_devices()
    if devices is None:
        chosen = tuple(local)
    elif isinstance(devices, int):
        if not 1 <= devices <= len(local):
            raise LayoutError(
                f"{devices} devices requested but this process has {len(local)} "
                f"{local[0].platform} device(s){_cpu_hint(local[0].platform, devices)}"
            )
        chosen = tuple(local[:devices])
    elif isinstance(devices, str | bytes) or not isinstance(devices, Sequence):
        raise LayoutError(
            f"devices must be a number of devices or a list of devices, got {devices!r}"
        )
    else:
        chosen = tuple(devices)
    if not chosen:
        raise LayoutError("no devices given")
    if not all(hasattr(d, "platform") for d in chosen):
        raise LayoutError(f"devices must be jax devices, got {list(chosen)!r}")
    if len({d.platform for d in chosen}) > 1:
        raise LayoutError(f"devices of mixed platforms: {sorted({d.platform for d in chosen})}")
    return chosen


def _cpu_hint(platform: str, n: int) -> str:
    if platform != "cpu" or n < 1:
        return ""
    return f"; on a CPU set {DEVICES_ENV}={n} (or XLA_FLAGS=--xla_force_host_platform_device_count={n}) before jax is imported"


def layout_options(layout: dict[str, Any] | None, *, strict: bool = False) -> dict[str, Any]:
    """Engine keyword arguments (``devices``, ``partitioning``) to continue a run on its layout.

    The platform and device kind must match the run's. With fewer devices than the run used, a
    ``map`` run continues on the devices at hand (its bits do not depend on the device count;
    ``strict=True`` refuses); a ``vmap`` run's bits can depend on the shards per device, so it
    always needs its device count.

    Raises:
      LayoutError: the platform or device kind differs, or too few devices (strict or vmap).
    """
    import jax

    local = jax.local_devices()
    if layout is None:
        return {"devices": (local[0],), "partitioning": "single"}
    from sisajax.config import TRAINING_PROGRAM

    program = int(layout.get("training_program", 1))
    if program != TRAINING_PROGRAM:
        raise LayoutError(
            f"this run was trained by training program version {program}; this sisajax trains "
            f"with version {TRAINING_PROGRAM}, whose last bits differ, so it cannot replay the "
            "run exactly: retrain it in place (sisajax train ... overwrite=true) or use the "
            "sisajax version that trained it"
        )
    here = local[0]
    platform, kind = layout.get("platform"), layout.get("device_kind")
    if platform is not None and platform != here.platform:
        raise LayoutError(
            f"this run was trained on {platform} devices but this process runs on "
            f"{here.platform}; exact unlearning needs the run's platform (or retrain it here)"
        )
    if kind is not None and kind != here.device_kind:
        raise LayoutError(
            f"this run was trained on {kind!r} devices but this process has "
            f"{here.device_kind!r}; exact unlearning needs the same kind of device"
        )
    want = int(layout.get("num_devices", 1))
    vmap = layout.get("shard_exec") == "vmap"
    if (strict or vmap) and want > len(local):
        why = " (vmap: its bits depend on the shards per device)" if vmap else ""
        raise LayoutError(
            f"this run was trained on {want} {platform} devices but this process has "
            f"{len(local)}{why}{_cpu_hint(here.platform, want)}"
        )
    n = want if vmap else len(local)
    partitioning = layout.get("partitioning", "single")
    if n > 1 and partitioning == "single":
        partitioning = "per_device"
    return {"devices": tuple(local[:n]), "partitioning": partitioning if n > 1 else "single"}


def collectives_in(hlo_text: str) -> list[str]:
    """Cross-device collective ops named in HLO text (e.g. ``compiled.as_text()``), sorted."""
    found = set()
    for line in hlo_text.splitlines():
        for op in COLLECTIVE_OPS:
            if f" {op}(" in line or f" {op}-start(" in line:
                found.add(op)
    return sorted(found)


def device_blocks(a: Any, devices: Sequence[Any]) -> list[Any]:
    """The per-device pieces of a global array sharded along axis 0, in ``devices`` order."""
    by_device = {s.device: s.data for s in a.addressable_shards}
    return [by_device[d] for d in devices]


def padded_width(width: int, num_devices: int) -> int:
    """``width`` rounded up to a multiple of ``num_devices`` (at least one position each)."""
    return -(-max(width, 1) // num_devices) * num_devices


def place_shards(
    shards: Sequence[int], work: Sequence[int], shard_exec: str, width: int, num_devices: int
) -> tuple[int, list[int]]:
    """``(program width, position of each job)`` for jobs of ``shards`` with ``work`` (rows x
    slice steps left) in a run whose programs are ``width`` wide (a multiple of the devices).

    ``vmap`` runs keep every shard at its own index in the run's width (their bits can depend
    on the width, so every program of the run has it). ``map`` runs are balanced over the
    devices by their work (largest first, each to the least loaded device), with as many
    positions per device as the busiest device needs, rounded up to a power of two (few
    distinct programs, each compiled once and kept in the persistent compilation cache) and
    at most the run's own width: a forget of one shard runs a one-shard program, not the
    training program with inert positions (each of which still costs memory traffic).

    Raises:
      ValueError: two ``vmap`` jobs for the same position.
    """
    if shard_exec == "vmap":
        positions = [s % width for s in shards]
        if len(set(positions)) != len(positions):
            raise ValueError(f"vmap jobs must be distinct shards of a width-{width} run")
        return width, positions
    n = num_devices
    per_device: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    cap = max(width // n, 1)
    for i in sorted(range(len(shards)), key=lambda i: -work[i]):
        free = [d for d in range(n) if len(per_device[d]) < cap] or range(n)
        d = min(free, key=lambda d: (load[d], len(per_device[d])))
        per_device[d].append(i)
        load[d] += work[i]
    most = max(len(p) for p in per_device)
    local = most if most >= cap else min(1 << max(most - 1, 0).bit_length(), cap)
    positions = [0] * len(shards)
    for d, members in enumerate(per_device):
        for slot, i in enumerate(members):
            positions[i] = d * local + slot
    return local * n, positions


class PerDeviceProgram:
    """The one-device program compiled once per device, run on each device's block of shards.

    Called with global arrays sharded along axis 0 over ``devices`` (numpy inputs are placed
    first); returns global arrays sharded the same way. Dispatch is asynchronous, so the devices
    run concurrently.
    """

    def __init__(self, executables: Sequence[Any], devices: Sequence[Any], sharding: Any):
        self.executables = list(executables)
        self.devices = tuple(devices)
        self.sharding = sharding

    def __call__(self, *args: PyTree) -> PyTree:
        import jax

        args = jax.device_put(args, self.sharding)
        flat, tree = jax.tree.flatten(args)
        blocks = [device_blocks(a, self.devices) for a in flat]
        outs = [
            ex(*jax.tree.unflatten(tree, [b[i] for b in blocks]))
            for i, ex in enumerate(self.executables)
        ]
        leaves = [jax.tree.leaves(o) for o in outs]
        out_tree = jax.tree.structure(outs[0])
        merged = []
        for parts in zip(*leaves, strict=True):
            shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            merged.append(jax.make_array_from_single_device_arrays(shape, self.sharding, parts))
        return jax.tree.unflatten(out_tree, merged)

    def as_text(self) -> str:
        """The compiled HLO of every device's program (identical up to device assignment)."""
        return "\n".join(ex.as_text() for ex in self.executables)
