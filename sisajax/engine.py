"""The training engine: one pure train step for ONE shard, run for all shards in one program.

Structure (inside a single ``jax.jit``, state donated):
  * ``_shard_step``: one gradient step of one constituent model on a masked batch.
  * ``_train_shard``: ``lax.fori_loop`` over up to ``C`` steps of one shard (``C`` = chunk_steps,
    a fixed shape; the shard's own step count is a traced scalar, so nothing recompiles when a
    deletion shortens a shard).
  * ``_program``: all shards at once, by ``jax.vmap`` (accelerators) or ``lax.map`` (CPU; see
    STACK-NOTES). Both are exact no-ops for a shard past its step count, optimizer counters
    included (``lax.cond`` on "batch has an example"; under vmap it becomes a select).

Devices: with several local devices the shard axis ``[W]`` of the state and of every per-shard
array is split over a 1-D :class:`jax.sharding.Mesh` with axis ``"shard"`` (``NamedSharding``,
``W`` padded to a multiple of the device count with inert zero-step shards), and each device runs
the one-device ``_program`` on its own block of ``W / n_devices`` shards. Two ways to run it:

  * ``per_device`` (the default): the one-device program (width ``W / n``) is compiled for each
    device and all are dispatched asynchronously: a device runs exactly what a one-device engine
    runs for its block. With ``map`` a shard's bits do not depend on the width, so they equal the
    one-device bits at any device count. With ``vmap`` they can depend on the width (on CPU:
    600-128-100 MLP, 8 shards on 1 device vs 2 per device on 4 devices, 1.5e-8 apart), so a
    vmapped run is continued on the device count it was trained on (:func:`layout_options`).
  * ``shard_map``: one SPMD program (:func:`jax.shard_map`, one compile). Its optimised HLO is not
    the one-device HLO: with ``vmap`` XLA fused Adam differently (6e-8 apart) and the bits changed
    with the per-device width even on a fixed device count, which would break exact unlearning, so
    it is only allowed with ``map``, where it measured bit-identical to one device.

Neither has a cross-device collective (a test checks the compiled HLO). :meth:`Engine.layout`
records what a run used; :func:`layout_options` rebuilds an engine for it, or says why not.

Randomness: parameter init uses ``fold_in(PRNGKey(seed), shard)``; batch order comes from
:mod:`sisajax.data.schedule` (keys: seed, shard, slice, epoch). Nothing reads global RNG state.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from sisajax.config import ConfigError, OptimConfig, RunConfig
from sisajax.data.schedule import slice_step_batches
from sisajax.models import build_model

PyTree = Any
Partitioning = Literal["auto", "single", "per_device", "shard_map"]
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


class LayoutError(ConfigError):
    """The devices at hand cannot reproduce the layout a run was trained with."""


class TrainState(NamedTuple):
    """State of one constituent model (or a stack ``[S, ...]`` of them)."""

    params: PyTree
    opt_state: PyTree
    step: jax.Array  # int32 scalar: gradient steps taken


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The optax transformation for ``cfg`` (sgd with optional momentum, or adam)."""
    if cfg.name == "sgd":
        tx = optax.sgd(cfg.learning_rate, momentum=cfg.momentum or None)
    else:
        tx = optax.adam(cfg.learning_rate)
    if cfg.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    return tx


def resolve_shard_exec(choice: str) -> str:
    """``auto`` -> ``map`` on CPU, ``vmap`` on accelerators."""
    if choice != "auto":
        return choice
    return "map" if jax.default_backend() == "cpu" else "vmap"


def select_devices(devices: int | Sequence[jax.Device] | None = None) -> tuple[jax.Device, ...]:
    """The devices an :class:`Engine` spreads shards over (this process's devices only).

    Args:
      devices: ``None`` -> all local devices of the default backend; an int ``n`` -> the first
        ``n`` of them; or an explicit sequence of devices of one platform.

    Raises:
      LayoutError: fewer devices than asked for, none, or mixed platforms.
    """
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
    else:
        chosen = tuple(devices)
    if not chosen:
        raise LayoutError("no devices given")
    if len({d.platform for d in chosen}) > 1:
        raise LayoutError(f"devices of mixed platforms: {sorted({d.platform for d in chosen})}")
    return chosen


def _cpu_hint(platform: str, n: int) -> str:
    if platform != "cpu" or n < 1:
        return ""
    return (
        f"; on a CPU start the process with XLA_FLAGS=--xla_force_host_platform_device_count={n}"
        " (set before jax is imported)"
    )


def layout_options(layout: dict[str, Any] | None, *, strict: bool = False) -> dict[str, Any]:
    """Engine keyword arguments (``devices``, ``partitioning``) to continue a run on its layout.

    The platform and device kind must match the run's (other hardware gives other bits, so
    unlearning could not be exact). The stored device count is used when this process has that
    many devices. With fewer: a ``map`` run's bits do not depend on the device count (tested), so
    ``strict=False`` uses the devices at hand (``strict=True`` refuses); a ``vmap`` run's bits can
    depend on the shards per device, so it always needs its device count.

    Args:
      layout: a stored :meth:`Engine.layout`, or ``None`` for a run from before layouts were
        recorded (one device).
      strict: require the stored device count.

    Returns:
      ``{"devices": tuple of devices, "partitioning": str}`` for :class:`Engine`.

    Raises:
      LayoutError: the platform or device kind differs, or too few devices (strict or vmap).
    """
    local = jax.local_devices()
    if layout is None:
        return {"devices": (local[0],), "partitioning": "single"}
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
    n = min(want, len(local))
    partitioning = layout.get("partitioning", "single") if n > 1 else "single"
    return {"devices": tuple(local[:n]), "partitioning": partitioning}


def collectives_in(hlo_text: str) -> list[str]:
    """Cross-device collective ops named in HLO text (e.g. ``compiled.as_text()``), sorted."""
    found = set()
    for line in hlo_text.splitlines():
        for op in COLLECTIVE_OPS:
            if f" {op}(" in line or f" {op}-start(" in line:
                found.add(op)
    return sorted(found)


def pad_rows(tree: PyTree, width: int) -> PyTree:
    """Pad axis 0 of every leaf to ``width`` with copies of row 0 (numpy; inert filler)."""

    def pad(a: Any) -> np.ndarray:
        a = np.asarray(a)
        if len(a) >= width:
            return a
        return np.concatenate([a, np.repeat(a[:1], width - len(a), axis=0)])

    return jax.tree.map(pad, tree)


class PerDeviceProgram:
    """The one-device program compiled once per device, run on each device's block of shards.

    Called like the one-device program but with global arrays sharded along axis 0 over
    ``devices`` (numpy inputs are placed first); returns global arrays sharded the same way.
    Dispatch is asynchronous, so the devices run concurrently.
    """

    def __init__(self, executables: Sequence[Any], devices: Sequence[jax.Device], sharding):
        self.executables = list(executables)
        self.devices = tuple(devices)
        self.sharding = sharding

    def __call__(self, *args: PyTree) -> PyTree:
        args = jax.device_put(args, self.sharding)
        flat, tree = jax.tree.flatten(args)
        blocks = [_blocks(a, self.devices) for a in flat]
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


def _blocks(a: jax.Array, devices: Sequence[jax.Device]) -> list[jax.Array]:
    by_device = {s.device: s.data for s in a.addressable_shards}
    return [by_device[d] for d in devices]


def stack_states(states: Sequence[PyTree]) -> PyTree:
    """``[W]`` list of per-shard pytrees -> one pytree with a leading ``[W]`` axis (numpy)."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)


def unstack_state(states: PyTree, i: int) -> PyTree:
    """Row ``i`` of a stacked pytree."""
    return jax.tree.map(lambda x: x[i], states)


@dataclasses.dataclass
class TrainStats:
    """What a training call cost. ``examples`` counts real (unmasked) rows processed."""

    examples: int = 0
    grad_steps: int = 0
    shard_slices: int = 0
    compile_s: float = 0.0
    train_s: float = 0.0
    program_calls: int = 0

    def add(self, other: TrainStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclasses.dataclass(frozen=True)
class ShardData:
    """The retained training data of one shard, sorted by id.

    Attributes:
      ids: ``[n]`` int64.  x: ``[n, *feat]``.  y: ``[n]`` int32.  slices: ``[n]`` int32 slice of each id.
    """

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    slices: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class Engine:
    """Compiled programs for one (model, optimizer, batch size, chunk) configuration.

    Compiled executables are cached per (width, capacity) and compile time is measured apart from
    training time (ahead-of-time ``lower().compile()``).

    Args:
      config: the run configuration (``sisa.shard_exec`` resolved or ``auto``).
      feature_shape: shape of one example.
      x_dtype: dtype of the stored features.
      num_classes: number of output classes.
      devices: local devices to spread shards over: ``None`` = all of this process's devices, an
        int = the first that many, or explicit devices. One device = the one-device program.
      partitioning: ``auto`` (``per_device`` with several devices), ``per_device``,
        ``shard_map`` (``map`` only; see the module docstring) or ``single`` (one device).

    Raises:
      LayoutError: devices unavailable, or ``shard_map`` with ``vmap``.
    """

    def __init__(
        self,
        config: RunConfig,
        feature_shape: tuple[int, ...],
        x_dtype: np.dtype,
        num_classes: int,
        *,
        devices: int | Sequence[jax.Device] | None = None,
        partitioning: Partitioning = "auto",
    ):
        self.config = config
        self.model = build_model(config.model, num_classes)
        self.tx = make_optimizer(config.optim)
        self.feature_shape = tuple(feature_shape)
        self.x_dtype = np.dtype(x_dtype)
        self.num_classes = num_classes
        self.batch_size = config.sisa.batch_size
        self.chunk_steps = config.sisa.chunk_steps
        self.shard_exec = resolve_shard_exec(config.sisa.shard_exec)
        self.devices = select_devices(devices)
        if partitioning not in ("auto", "single", "per_device", "shard_map"):
            raise LayoutError(f"unknown partitioning {partitioning!r}")
        if len(self.devices) == 1:
            partitioning = "single"
        elif partitioning == "single":
            raise LayoutError(f"partitioning='single' with {len(self.devices)} devices")
        elif partitioning == "auto":
            partitioning = "per_device"
        if partitioning == "shard_map" and self.shard_exec != "map":
            raise LayoutError(
                "partitioning='shard_map' needs shard_exec='map': with vmap its bits differ from "
                "one device's and change with the number of shards per device even on a fixed "
                "layout; use partitioning='per_device'"
            )
        self.partitioning: str = partitioning
        self.mesh = Mesh(np.array(self.devices), (SHARD_AXIS,)) if len(self.devices) > 1 else None
        self._compiled: dict[tuple[int, int], Any] = {}
        self._init_fn = jax.jit(self._init_one)
        self._predict_fn = jax.jit(self._predict_stack)

    # -- layout -------------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def layout(self) -> dict[str, Any]:
        """Where this engine runs shards, as JSON for a run's manifest.

        Keys: ``num_devices`` (this process's devices used), ``platform`` (``cpu``/``gpu``/
        ``tpu``), ``device_kind``, ``partitioning`` (``single``/``per_device``/``shard_map``),
        ``shard_exec`` (``map``/``vmap``), ``num_processes`` (``jax.process_count()``).
        """
        d = self.devices[0]
        return {
            "num_devices": self.num_devices,
            "platform": d.platform,
            "device_kind": d.device_kind,
            "partitioning": self.partitioning,
            "shard_exec": self.shard_exec,
            "num_processes": jax.process_count(),
        }

    def padded_width(self, width: int) -> int:
        """``width`` rounded up to a multiple of the device count (at least one per device)."""
        n = self.num_devices
        return -(-max(width, 1) // n) * n

    def shard_sharding(self) -> jax.sharding.Sharding:
        """Sharding of a ``[W, ...]`` array: axis 0 split over the devices (or on the one)."""
        if self.mesh is None:
            return SingleDeviceSharding(self.devices[0])
        return NamedSharding(self.mesh, PartitionSpec(SHARD_AXIS))

    def put(self, tree: PyTree) -> PyTree:
        """Place a pytree of ``[W, ...]`` arrays (``W`` a multiple of the device count)."""
        return jax.device_put(tree, self.shard_sharding())

    # -- init ---------------------------------------------------------------------------------
    def _init_one(self, key: jax.Array) -> TrainState:
        dummy = jnp.zeros((1, *self.feature_shape), jnp.float32)
        params = self.model.init(key, dummy)
        return TrainState(params, self.tx.init(params), jnp.zeros((), jnp.int32))

    def init_state(self, shard: int) -> PyTree:
        """Initial state of shard ``shard`` (numpy pytree), from ``fold_in(PRNGKey(seed), shard)``.

        Always built by the same width-1 program, so its bits never depend on which shards are
        initialised together.
        """
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.sisa.seed), shard)
        return jax.device_get(self._init_fn(key))

    def state_template(self) -> PyTree:
        """Abstract (shape/dtype) pytree of one shard's state."""
        return jax.eval_shape(self._init_one, jax.random.PRNGKey(0))

    # -- the step -----------------------------------------------------------------------------
    def _shard_step(self, state: TrainState, xb, yb, mask) -> TrainState:
        w = mask.astype(jnp.float32)

        def loss_fn(params):
            logits = self.model.apply(params, xb)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

        grads = jax.grad(loss_fn)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1)

    def _train_shard(self, state, x, y, rows, mask, n_steps):
        """Run ``n_steps`` (<= C) steps of one shard. x: ``[Ncap, *feat]``, rows/mask: ``[C, B]``."""

        def body(t, st):
            r, m = rows[t], mask[t]
            xb = x[r]
            xb = jnp.where(m.reshape((-1,) + (1,) * (xb.ndim - 1)), xb, jnp.zeros_like(xb))
            yb = jnp.where(m, y[r], 0)
            return jax.lax.cond(
                jnp.any(m), lambda s: self._shard_step(s, xb, yb, m), lambda s: s, st
            )

        return jax.lax.fori_loop(0, n_steps, body, state)

    def _program(self, states, x, y, rows, mask, n_steps):
        """All shards: states ``[W]``, x ``[W, Ncap, *feat]``, y ``[W, Ncap]``, rows/mask ``[W, C, B]``."""
        if self.shard_exec == "vmap":
            return jax.vmap(self._train_shard)(states, x, y, rows, mask, n_steps)
        return jax.lax.map(lambda a: self._train_shard(*a), (states, x, y, rows, mask, n_steps))

    def _shard_map_program(self, states, x, y, rows, mask, n_steps):
        """``_program`` on every device's block of shards, as one SPMD program."""
        spec = PartitionSpec(SHARD_AXIS)
        return jax.shard_map(self._program, mesh=self.mesh, in_specs=spec, out_specs=spec)(
            states, x, y, rows, mask, n_steps
        )

    def _lower(self, fn, width: int, capacity: int, sharding) -> jax.stages.Lowered:
        def spec(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        state = jax.tree.map(lambda s: spec((width, *s.shape), s.dtype), self.state_template())
        c, b = self.chunk_steps, self.batch_size
        args = (
            state,
            spec((width, capacity, *self.feature_shape), self.x_dtype),
            spec((width, capacity), jnp.int32),
            spec((width, c, b), jnp.int32),
            spec((width, c, b), jnp.bool_),
            spec((width,), jnp.int32),
        )
        return jax.jit(fn, donate_argnums=0).lower(*args)

    def compiled(self, width: int, capacity: int, stats: TrainStats | None = None):
        """The compiled program for ``width`` shards of ``capacity`` rows (cached).

        It takes states ``[W, ...]``, x ``[W, Ncap, *feat]``, y ``[W, Ncap]``, rows/mask
        ``[W, C, B]`` and n_steps ``[W]`` placed by :meth:`shard_sharding`, returns the states
        (donating the input states), and has ``as_text()``. With several devices ``W`` must be a
        multiple of the device count (:meth:`padded_width`).
        """
        if width % self.num_devices:
            raise ValueError(f"width {width} is not a multiple of {self.num_devices} devices")
        key = (width, capacity)
        if key not in self._compiled:
            t0 = time.perf_counter()
            if self.partitioning == "single":
                sharding = self.shard_sharding()
                program = self._lower(self._program, width, capacity, sharding).compile()
            elif self.partitioning == "shard_map":
                sharding = self.shard_sharding()
                program = self._lower(self._shard_map_program, width, capacity, sharding)
                program = program.compile()
            else:
                local = width // self.num_devices
                program = PerDeviceProgram(
                    [
                        self._lower(
                            self._program, local, capacity, SingleDeviceSharding(d)
                        ).compile()
                        for d in self.devices
                    ],
                    self.devices,
                    self.shard_sharding(),
                )
            self._compiled[key] = program
            if stats is not None:
                stats.compile_s += time.perf_counter() - t0
        return self._compiled[key]

    # -- driving slices -----------------------------------------------------------------------
    def train_slices(
        self,
        shards: Sequence[int],
        data: Sequence[ShardData],
        start_states: PyTree,
        start_slices: Sequence[int],
        *,
        capacity: int | None = None,
        on_slice: Callable[[int, PyTree], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[PyTree, TrainStats]:
        """Train shards from their start slice to the last slice, all in one program.

        Args:
          shards: ``[W]`` shard indices (they key the batch order).
          data: ``[W]`` each shard's retained data.
          start_states: stacked ``[W, ...]`` state of each shard just before its start slice.
          start_slices: ``[W]`` first slice to (re)train for each shard (0-based).
          capacity: rows per shard in the device array (>= the largest shard); fixed per run so
            deletions never change shapes.
          on_slice: called as ``on_slice(j, states)`` after slice ``j`` with the stacked numpy
            states ``[W, ...]``; rows of shards with ``start_slices[i] > j`` are their start state.
          progress: called with the number of gradient steps just run (for progress bars).

        Returns:
          (final stacked states ``[W, ...]`` as numpy, :class:`TrainStats`).
        """
        sisa = self.config.sisa
        width = len(shards)
        cap = max(1, max(len(d) for d in data)) if capacity is None else capacity
        if any(len(d) > cap for d in data):
            raise ValueError("a shard holds more rows than the capacity")
        stats = TrainStats()
        # with several devices: pad to a multiple of the device count with inert shards
        padded = self.padded_width(width) if self.num_devices > 1 else width
        program = self.compiled(padded, cap, stats)
        x = np.zeros((padded, cap, *self.feature_shape), self.x_dtype)
        y = np.zeros((padded, cap), np.int32)
        for i, d in enumerate(data):
            x[i, : len(d)] = d.x
            y[i, : len(d)] = d.y
        x_dev, y_dev = self.put(x), self.put(y)
        states = self.put(pad_rows(start_states, padded))

        def to_host(st: PyTree) -> PyTree:
            got = jax.device_get(st)
            return got if padded == width else jax.tree.map(lambda a: a[:width], got)

        c, b = self.chunk_steps, self.batch_size
        first = min(start_slices) if len(start_slices) else sisa.slices
        t0 = time.perf_counter()
        for j in range(first, sisa.slices):
            batches = []
            for i, d in enumerate(data):
                if start_slices[i] > j:
                    batches.append(None)
                    continue
                sel = d.slices <= j
                batches.append(
                    slice_step_batches(
                        d.ids[sel],
                        np.flatnonzero(sel),
                        seed=sisa.seed,
                        shard=int(shards[i]),
                        slice_index=j,
                        epochs=sisa.epochs_per_slice_step,
                        batch_size=b,
                    )
                )
                stats.shard_slices += 1
            steps = np.array([0 if sb is None else sb.num_steps for sb in batches])
            for chunk in range(math.ceil(steps.max(initial=0) / c)):
                rows = np.zeros((padded, c, b), np.int32)
                mask = np.zeros((padded, c, b), bool)
                n_steps = np.zeros(padded, np.int32)
                n_steps[:width] = np.clip(steps - chunk * c, 0, c)
                for i, sb in enumerate(batches):
                    if n_steps[i]:
                        lo = chunk * c
                        rows[i, : n_steps[i]] = sb.rows[lo : lo + n_steps[i]]
                        mask[i, : n_steps[i]] = sb.mask[lo : lo + n_steps[i]]
                        stats.examples += int(mask[i].sum())
                states = program(states, x_dev, y_dev, *self.put((rows, mask, n_steps)))
                stats.program_calls += 1
                if progress is not None:
                    progress(int(n_steps.sum()))
            stats.grad_steps += int(steps.sum())
            if on_slice is not None:
                on_slice(j, to_host(states))
        states = to_host(jax.block_until_ready(states))
        stats.train_s += time.perf_counter() - t0
        return states, stats

    # -- inference ----------------------------------------------------------------------------
    def _predict_stack(self, params, x):
        if self.partitioning != "shard_map":
            return jax.vmap(lambda p: self.model.apply(p, x))(params)
        spec = PartitionSpec(SHARD_AXIS)
        return jax.shard_map(
            lambda p, xb: jax.vmap(lambda q: self.model.apply(q, xb))(p),
            mesh=self.mesh,
            in_specs=(spec, PartitionSpec()),
            out_specs=spec,
        )(params, x)

    def _predict(self, params: PyTree, n_models: int) -> Callable[[np.ndarray], np.ndarray]:
        """``xb [M, *feat] -> [S, M, C]`` with the models split over the devices."""
        if self.num_devices == 1:
            return lambda xb: np.asarray(self._predict_fn(params, xb))
        params = self.put(pad_rows(params, self.padded_width(n_models)))
        if self.partitioning == "shard_map":
            return lambda xb: np.asarray(self._predict_fn(params, xb))[:n_models]
        flat, tree = jax.tree.flatten(params)
        blocks = [_blocks(a, self.devices) for a in flat]
        per_device = [
            jax.tree.unflatten(tree, [b[i] for b in blocks]) for i in range(self.num_devices)
        ]

        def run(xb: np.ndarray) -> np.ndarray:
            outs = [
                self._predict_fn(p, jax.device_put(xb, d))
                for p, d in zip(per_device, self.devices, strict=True)
            ]
            return np.concatenate([np.asarray(o) for o in outs])[:n_models]

        return run

    def logits(self, params: PyTree, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        """``[S, M, num_classes]`` logits of every constituent model for ``x`` ``[M, *feat]``.

        With several devices the ``S`` models are split over them and ``x`` goes to each.
        """
        predict = self._predict(params, len(jax.tree.leaves(params)[0]))
        outs = []
        for lo in range(0, len(x), batch):
            xb = np.asarray(x[lo : lo + batch])
            pad = batch - len(xb) if len(x) > batch else 0
            if pad:
                xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            out = predict(xb)
            outs.append(out[:, : out.shape[1] - pad] if pad else out)
        if not outs:
            return np.zeros((0, 0, self.num_classes), np.float32)
        return np.concatenate(outs, axis=1)
