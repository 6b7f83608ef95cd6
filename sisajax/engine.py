"""The training engine: one pure train step for ONE shard, run for many shards in one program.

Structure (one compiled program per (width, capacity); nothing recompiles when deletions shrink
a shard):
  * ``_shard_step``: one gradient step of one constituent model on a masked batch.
  * ``_train_shard``: ``lax.fori_loop`` over up to ``C`` steps of one shard (``C`` =
    ``sisa.chunk_steps``; the shard's own step count is a traced scalar).
  * ``_program``: many shards at once, by ``jax.vmap`` (accelerators) or ``lax.map`` (CPU, see
    STACK-NOTES). A shard past its step count is an exact no-op (``lax.cond`` on "batch has an
    example"), optimizer counters included.

:meth:`Engine.run` is the one training recipe every caller uses (``train``, ``forget``,
``verify``, membership-inference shadows, multi-process training, benchmarks): it takes
:class:`ShardJob` s (a shard, its data, the slice to start from and the state before it), places
them on the devices (:mod:`sisajax.layout`), pads the width with inert shards, runs every slice
step, and hands each slice's states to ``on_slice`` as soon as the slice is done (device arrays;
nothing waits for them), so checkpoint writing overlaps with the next slice.

Randomness: parameter init uses ``fold_in(PRNGKey(seed), shard)``; batch order comes from
:mod:`sisajax.data.schedule` (keys: seed, shard, slice, epoch); dropout keys are
``fold_in(fold_in(fold_in(PRNGKey(seed), shard), slice), step within the slice step)``. Nothing
reads global RNG state, so a retrain replays exactly what training from scratch does.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from sisajax.config import OptimConfig, RunConfig
from sisajax.data.schedule import slice_step_batches
from sisajax.layout import (
    SHARD_AXIS,
    LayoutError,
    PerDeviceProgram,
    device_blocks,
    resolve_shard_exec,
    select_devices,
)
from sisajax.models import build_model

PyTree = Any
Partitioning = Literal["auto", "single", "per_device", "shard_map"]


class TrainState(NamedTuple):
    """State of one constituent model (or a stack ``[W, ...]`` of them).

    Attributes:
      params: the model's parameters.
      opt_state: the optimizer's state.
      step: int32 scalar, gradient steps taken (masked steps do not count).
      model_state: the model's other variable collections (e.g. BatchNorm ``batch_stats``);
        ``{}`` for models without any.
      avg_params: averaged parameters used for prediction when weight averaging is on, else None.
    """

    params: PyTree
    opt_state: PyTree
    step: jax.Array
    model_state: PyTree
    avg_params: PyTree


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The optax transformation for ``cfg`` (sgd with optional momentum, or adam)."""
    if cfg.name == "sgd":
        tx = optax.sgd(cfg.learning_rate, momentum=cfg.momentum or None)
    else:
        tx = optax.adam(cfg.learning_rate)
    if cfg.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    return tx


def pad_rows(tree: PyTree, width: int) -> PyTree:
    """Pad axis 0 of every leaf to ``width`` with copies of row 0 (numpy; inert filler)."""

    def pad(a: Any) -> np.ndarray:
        a = np.asarray(a)
        if len(a) >= width:
            return a
        return np.concatenate([a, np.repeat(a[:1], width - len(a), axis=0)])

    return jax.tree.map(pad, tree)


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
      ids: ``[n]`` int64.  x: ``[n, *feat]``.  y: ``[n]`` int32.  slices: ``[n]`` int32.
    """

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    slices: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def without(self, ids: np.ndarray) -> ShardData:
        keep = ~np.isin(self.ids, ids)
        return ShardData(self.ids[keep], self.x[keep], self.y[keep], self.slices[keep])

    def empty(self) -> ShardData:
        return ShardData(self.ids[:0], self.x[:0], self.y[:0], self.slices[:0])


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One shard to train: from ``start_slice`` to the last slice.

    Attributes:
      shard: the shard index (keys its init, batch order and dropout).
      data: its retained data.
      start_slice: first slice to (re)train (0-based); ``R`` trains nothing.
      start_state: its state just before ``start_slice`` (one shard, numpy); None = its initial
        state (requires ``start_slice == 0``).
    """

    shard: int
    data: ShardData
    start_slice: int = 0
    start_state: PyTree | None = None


@dataclasses.dataclass(frozen=True)
class SliceOutput:
    """The states after one slice step, handed to ``on_slice`` (nothing has waited for them).

    Attributes:
      slice: the slice index ``j``.
      states: stacked ``[W, ...]`` device arrays of every position (inert ones included).
      positions: ``{job index: position in states}`` of the jobs trained up to slice ``j``.
      losses: per program call of the slice step, the summed training loss ``[W]`` (device).
      examples: ``[W]`` real examples each position trained on in this slice step.
    """

    slice: int
    states: PyTree
    positions: dict[int, int]
    losses: list[Any] = dataclasses.field(default_factory=list)
    examples: np.ndarray | None = None

    def fetch(self) -> dict[int, PyTree]:
        """``{job index: one-shard numpy state}`` (waits for the slice to be computed)."""
        host = jax.device_get(self.states)
        return {
            i: jax.tree.map(lambda a, p=p: np.asarray(a[p]), host)
            for i, p in self.positions.items()
        }

    def mean_loss(self) -> dict[int, float]:
        """``{job index: mean training loss per example over this slice step}``."""
        if not self.losses:
            return {i: float("nan") for i in self.positions}
        total = sum(np.asarray(x, np.float64) for x in jax.device_get(self.losses))
        n = self.examples if self.examples is not None else np.zeros(len(total))
        return {i: float(total[p] / max(n[p], 1)) for i, p in self.positions.items()}


class Engine:
    """Compiled programs for one (model, optimizer, batch size, chunk) configuration.

    Args:
      config: the run configuration (``sisa.shard_exec`` resolved or ``auto``).
      feature_shape: shape of one example.
      x_dtype: dtype of the stored features.
      num_classes: number of output classes.
      devices: local devices to spread shards over: ``None`` = all of this process's devices, an
        int = the first that many, or explicit devices.
      partitioning: ``auto`` (``per_device`` with several devices), ``per_device``,
        ``shard_map`` (``map`` only) or ``single`` (one device).
      vmap_width: the run's program width (its shard count; default ``config.sisa.shards``):
        under ``vmap``, where a shard's bits can depend on the width, every program of the run
        has this width; under ``map`` it caps the positions per device.
      preprocessing: the data set's input map ``{"scale": s, "shift": b}`` (``float32(x) * s + b``),
        applied inside the programs; empty or None: the stored features as they are.

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
        vmap_width: int | None = None,
        preprocessing: dict[str, float] | None = None,
    ):
        self.config = config
        self.preprocessing = dict(preprocessing or {})
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
                "one device's and change with the number of shards per device; use per_device"
            )
        self.partitioning: str = partitioning
        self.vmap_width = self.padded_width(vmap_width or config.sisa.shards)
        self.mesh = Mesh(np.array(self.devices), (SHARD_AXIS,)) if len(self.devices) > 1 else None
        self._compiled: dict[tuple[int, int], Any] = {}
        self._narrowed: dict[int, Engine] = {}
        self._init_fn = jax.jit(self._init_one)
        self._predict_fn = jax.jit(self._predict_stack)
        self._template: PyTree | None = None
        self._call_kwargs = _call_kwargs(self.model)

    # -- layout -------------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def layout(self) -> dict[str, Any]:
        """Where this engine runs shards, as JSON for a run's manifest."""
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

    # -- state --------------------------------------------------------------------------------
    def _variables(self, key: jax.Array) -> dict[str, Any]:
        dummy = jnp.zeros((1, *self.feature_shape), jnp.float32)
        p_key, d_key = jax.random.split(key)
        variables = self.model.init({"params": p_key, "dropout": d_key}, dummy, **self._kw(False))
        return dict(variables)

    def _init_one(self, key: jax.Array) -> TrainState:
        variables = self._variables(key)
        params = variables.pop("params")
        avg = params if self.config.optim.averaging != "none" else None
        return TrainState(params, self.tx.init(params), jnp.zeros((), jnp.int32), variables, avg)

    def init_state(self, shard: int) -> PyTree:
        """Initial state of ``shard`` (numpy), from ``fold_in(PRNGKey(seed), shard)``.

        Always built by the same width-1 program, so its bits never depend on which shards are
        initialised together.
        """
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.sisa.seed), shard)
        return jax.device_get(self._init_fn(key))

    def state_template(self) -> PyTree:
        """Abstract (shape/dtype) pytree of one shard's state (computed once)."""
        if self._template is None:
            self._template = jax.eval_shape(self._init_one, jax.random.PRNGKey(0))
        return self._template

    def leaf_paths(self) -> list[str]:
        """``jax.tree_util.keystr`` of every leaf of the state, in flatten order."""
        flat = jax.tree_util.tree_flatten_with_path(self.state_template())[0]
        return [jax.tree_util.keystr(p) for p, _ in flat]

    # -- the step -----------------------------------------------------------------------------
    def recipe(self, slice_index: jax.Array, t: jax.Array, budget: jax.Array) -> tuple[Any, Any]:
        """``(learning-rate factor or None, tail count or None)`` at step ``t`` of the slice step
        ``slice_index`` with ``budget`` steps.

        Pure functions of (slice index, step, the slice step's own budget), which depend only on
        the slice prefix the step trains on: a forget restarting at slice r recomputes exactly the
        factors a from-scratch run uses from slice r on. The tail count is the number of
        iterates in the current ``averaging=tail`` window so far (0 before it starts).
        """
        optim, sisa = self.config.optim, self.config.sisa
        base = float(sisa.shards) ** optim.lr_shard_exponent
        lr = None
        if optim.has_schedule:
            frac = t.astype(jnp.float32) / jnp.maximum(budget, 1).astype(jnp.float32)
            if optim.schedule_horizon == "run":
                frac = (slice_index.astype(jnp.float32) + frac) / jnp.float32(sisa.slices)
            lr = schedule_factor(optim, frac) * jnp.float32(base)
        elif base != 1.0:
            lr = jnp.float32(base)
        tail = None
        if optim.averaging == "tail":
            keep = jnp.ceil(budget.astype(jnp.float32) * optim.tail_fraction).astype(jnp.int32)
            start = budget - jnp.maximum(keep, 1)
            tail = jnp.where(t >= start, t - start + 1, 0)
        return lr, tail

    def prepare(self, x: jax.Array) -> jax.Array:
        """Stored features -> model input (the data set's preprocessing)."""
        if not self.preprocessing:
            return x
        x = x.astype(jnp.float32) * jnp.float32(self.preprocessing.get("scale", 1.0))
        return x + jnp.float32(self.preprocessing.get("shift", 0.0))

    def _kw(self, train: bool, mask: jax.Array | None = None) -> dict[str, Any]:
        kw = {}
        if "train" in self._call_kwargs:
            kw["train"] = train
        if mask is not None and "mask" in self._call_kwargs:
            kw["mask"] = mask
        return kw

    def _shard_step(
        self, state: TrainState, xb, yb, mask, key, lr_scale=None, tail_count=None
    ) -> tuple[TrainState, jax.Array]:
        """One step; returns the new state and the summed (masked) loss of the batch.

        ``lr_scale`` multiplies the update (the schedule's factor); ``tail_count`` is this
        iterate's index in the ``averaging=tail`` window (0: before it, see :meth:`recipe`)."""
        w = mask.astype(jnp.float32)
        mutable = list(state.model_state)
        smoothing = self.config.optim.label_smoothing

        def loss_fn(params):
            variables = {"params": params, **state.model_state}
            kw = self._kw(True, mask)
            if mutable:
                logits, new_state = self.model.apply(
                    variables, xb, rngs={"dropout": key}, mutable=mutable, **kw
                )
            else:
                logits, new_state = self.model.apply(variables, xb, rngs={"dropout": key}, **kw), {}
            if smoothing:
                onehot = jax.nn.one_hot(yb, logits.shape[-1], dtype=logits.dtype)
                ce = optax.softmax_cross_entropy(logits, optax.smooth_labels(onehot, smoothing))
            else:
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            total = jnp.sum(ce * w)
            return total / jnp.maximum(jnp.sum(w), 1.0), (new_state, total)

        grads, (new_model_state, total) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        if lr_scale is not None:
            updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        avg = _average(self.config.optim, state.avg_params, params, step, tail_count)
        return TrainState(params, opt_state, step, dict(new_model_state), avg), total

    def _train_shard(self, state, x, y, rows, mask, n_steps, meta, pos=None):
        """Run ``n_steps`` (<= C) steps of one shard. rows/mask: ``[C, B]``, meta: ``[4]`` int32
        (shard, slice, index of the chunk's first step in the slice step, steps in the slice
        step). x: ``[Ncap, *feat]``, y: ``[Ncap]`` -- or, with ``pos``, every shard's
        ``[W, Ncap, ...]`` and this shard's position in them (the batch rows are gathered from
        there, nothing else is touched).

        Returns ``(state, summed loss over the chunk's real examples)``.
        """
        base = jax.random.PRNGKey(self.config.sisa.seed)
        key = jax.random.fold_in(jax.random.fold_in(base, meta[0]), meta[1])
        offset = meta[2]
        recipe = self.recipe

        def body(t, carry):
            st, loss = carry
            r, m = rows[t], mask[t]
            xb = self.prepare(x[r] if pos is None else x[pos, r])
            xb = jnp.where(m.reshape((-1,) + (1,) * (xb.ndim - 1)), xb, jnp.zeros_like(xb))
            yb = jnp.where(m, y[r] if pos is None else y[pos, r], 0)
            k = jax.random.fold_in(key, offset + t)
            lr, tail = recipe(meta[1], offset + t, meta[3])
            st, total = jax.lax.cond(
                jnp.any(m),
                lambda s: self._shard_step(s, xb, yb, m, k, lr, tail),
                lambda s: (s, _zero_like_step(s)),
                st,
            )
            return st, loss + total

        return jax.lax.fori_loop(0, n_steps, body, (state, _zero_like_step(state)))

    def _program(self, states, x, y, rows, mask, n_steps, meta):
        """Shards ``[W]``: x ``[W, Ncap, *feat]``, y ``[W, Ncap]``, rows/mask ``[W, C, B]``,
        n_steps ``[W]``, meta ``[W, 4]``."""
        if self.shard_exec == "vmap":
            return jax.vmap(self._train_shard)(states, x, y, rows, mask, n_steps, meta)
        # lax.map over the shards with x and y closed over (not sliced per shard): a shard that
        # runs no steps in this call costs nothing, whatever its data
        positions = jnp.arange(n_steps.shape[0], dtype=jnp.int32)

        def one(a):
            st, r, m, n, mt, p = a
            return self._train_shard(st, x, y, r, m, n, mt, p)

        return jax.lax.map(one, (states, rows, mask, n_steps, meta, positions))

    def _shard_map_program(self, *args):
        spec = PartitionSpec(SHARD_AXIS)
        return jax.shard_map(self._program, mesh=self.mesh, in_specs=spec, out_specs=spec)(*args)

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
            spec((width, 4), jnp.int32),
        )
        return jax.jit(fn).lower(*args)

    def compiled(self, width: int, capacity: int, stats: TrainStats | None = None):
        """The compiled program for ``width`` shards of ``capacity`` rows (cached).

        It takes states ``[W, ...]``, x ``[W, Ncap, *feat]``, y ``[W, Ncap]``, rows/mask
        ``[W, C, B]``, n_steps ``[W]`` and meta ``[W, 4]`` (shard, slice, first step index, the
        slice step's budget: they key dropout and the schedule), placed by
        :meth:`shard_sharding`, returns the states, and has ``as_text()``.
        """
        if width % self.num_devices:
            raise ValueError(f"width {width} is not a multiple of {self.num_devices} devices")
        key = (width, capacity)
        if key not in self._compiled:
            t0 = time.perf_counter()
            if self.partitioning == "single":
                program = self._lower(self._program, width, capacity, self.shard_sharding())
                program = program.compile()
            elif self.partitioning == "shard_map":
                program = self._lower(
                    self._shard_map_program, width, capacity, self.shard_sharding()
                )
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

    def compiled_programs(self) -> list[Any]:
        """The programs this engine has compiled so far (each has ``as_text()``)."""
        return list(self._compiled.values())

    # -- placement ----------------------------------------------------------------------------
    def place(self, jobs: Sequence[ShardJob]) -> tuple[int, list[int]]:
        """``(width, position of each job)``: where each job runs in the stacked program.

        ``vmap`` runs keep every shard at its own index in the run's width (their bits can depend
        on the width, so every program of the run has it). ``map`` runs are balanced over the
        devices by their work (largest first, each to the least loaded device), with as many
        positions per device as the busiest device needs, rounded up to a power of two (few
        distinct programs, each compiled once and kept in the persistent compilation cache) and
        at most the run's own width: a forget of one shard runs a one-shard program, not the
        training program with inert positions (each of which still costs memory traffic).
        """
        width = self.vmap_width
        if self.shard_exec == "vmap":
            positions = [j.shard % width for j in jobs]
            if len(set(positions)) != len(positions):
                raise ValueError(f"vmap jobs must be distinct shards of a width-{width} run")
            return width, positions
        n = self.num_devices
        per_device: list[list[int]] = [[] for _ in range(n)]
        load = [0] * n
        work = [len(j.data) * (self.config.sisa.slices - j.start_slice) for j in jobs]
        cap = max(width // n, 1)
        for i in sorted(range(len(jobs)), key=lambda i: -work[i]):
            free = [d for d in range(n) if len(per_device[d]) < cap] or range(n)
            d = min(free, key=lambda d: (load[d], len(per_device[d])))
            per_device[d].append(i)
            load[d] += work[i]
        most = max(len(p) for p in per_device)
        local = most if most >= cap else min(_next_power_of_two(most), cap)
        positions = [0] * len(jobs)
        for d, members in enumerate(per_device):
            for slot, i in enumerate(members):
                positions[i] = d * local + slot
        return local * n, positions

    def narrowed(self, n: int) -> Engine:
        """This engine on its first ``n`` devices only (cached; ``self`` when ``n`` is all).

        Used by :meth:`run` for ``map`` jobs that leave devices idle: per-device ``lax.map``
        programs do not depend on how many devices run them, so the states are the same bits,
        without compiling and running an inert program on every idle device (a one-shard forget
        on 2 devices lowers, loads and runs one program, not two).
        """
        if n >= self.num_devices:
            return self
        if n not in self._narrowed:
            eng = Engine(
                self.config,
                self.feature_shape,
                self.x_dtype,
                self.num_classes,
                devices=self.devices[:n],
                partitioning="single" if n == 1 else self.partitioning,
                preprocessing=self.preprocessing,
            )
            eng._template = self._template
            eng._init_fn = self._init_fn  # the same width-1 init program, compiled once
            self._narrowed[n] = eng
        return self._narrowed[n]

    # -- driving slices -----------------------------------------------------------------------
    def run(
        self,
        jobs: Sequence[ShardJob],
        *,
        capacity: int | None = None,
        on_slice: Callable[[SliceOutput], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[list[PyTree], TrainStats]:
        """Train every job from its start slice to the last slice, all in one program.

        Args:
          jobs: the shards to train (see :class:`ShardJob`).
          capacity: rows per shard in the device array (>= the largest shard); fixed per run so
            deletions never change shapes (default: the largest job).
          on_slice: called after every slice step with a :class:`SliceOutput` (device arrays;
            the engine does not wait for them, so saving overlaps with the next slice).
          progress: called with the number of gradient steps just dispatched.

        Returns:
          (``[len(jobs)]`` final one-shard states as numpy, :class:`TrainStats`).
        """
        sisa = self.config.sisa
        if not jobs:
            return [], TrainStats()
        cap = max(1, max(len(j.data) for j in jobs)) if capacity is None else capacity
        if any(len(j.data) > cap for j in jobs):
            raise ValueError("a shard holds more rows than the capacity")
        if self.shard_exec == "map" and self.partitioning == "per_device":
            narrow = self.narrowed(len(jobs))
            if narrow is not self:
                return narrow.run(jobs, capacity=cap, on_slice=on_slice, progress=progress)
        stats = TrainStats()
        width, pos = self.place(jobs)
        program = self.compiled(width, cap, stats)
        t0 = time.perf_counter()
        x = np.zeros((width, cap, *self.feature_shape), self.x_dtype)
        y = np.zeros((width, cap), np.int32)
        starts = np.full(width, sisa.slices, np.int64)
        shard_of = np.zeros(width, np.int64)
        init: list[PyTree | None] = [None] * width
        for i, job in enumerate(jobs):
            p = pos[i]
            x[p, : len(job.data)] = job.data.x
            y[p, : len(job.data)] = job.data.y
            starts[p], shard_of[p] = job.start_slice, job.shard
            if job.start_state is None and job.start_slice != 0:
                raise ValueError(f"shard {job.shard}: start_state is needed after slice 0")
            init[p] = self.init_state(job.shard) if job.start_state is None else job.start_state
        filler = next(s for s in init if s is not None)
        states = self.put(stack_states([filler if s is None else s for s in init]))
        x_dev, y_dev = self.put(x), self.put(y)
        c, b = self.chunk_steps, self.batch_size
        for j in range(int(starts.min()), sisa.slices):
            batches: dict[int, Any] = {}
            for i, job in enumerate(jobs):
                if job.start_slice > j:
                    continue
                d = job.data
                sel = d.slices <= j
                batches[pos[i]] = slice_step_batches(
                    d.ids[sel],
                    np.flatnonzero(sel),
                    seed=sisa.seed,
                    shard=job.shard,
                    slice_index=j,
                    epochs=sisa.epochs_per_slice_step,
                    batch_size=b,
                )
                stats.shard_slices += 1
            steps = np.zeros(width, np.int64)
            examples = np.zeros(width, np.int64)
            for p, sb in batches.items():
                steps[p] = sb.num_steps
                examples[p] = sb.num_examples
            losses = []
            for chunk in range(math.ceil(steps.max(initial=0) / c)):
                lo = chunk * c
                rows = np.zeros((width, c, b), np.int32)
                mask = np.zeros((width, c, b), bool)
                n_steps = np.clip(steps - lo, 0, c).astype(np.int32)
                for p, sb in batches.items():
                    t = int(n_steps[p])
                    if t:
                        rows[p, :t] = sb.rows[lo : lo + t]
                        mask[p, :t] = sb.mask[lo : lo + t]
                meta = np.stack([shard_of, np.full(width, j), np.full(width, lo), steps], 1)
                stats.examples += int(mask.sum())
                states, loss = program(
                    states, x_dev, y_dev, *self.put((rows, mask, n_steps, meta.astype(np.int32)))
                )
                losses.append(loss)
                stats.program_calls += 1
                if progress is not None:
                    progress(int(n_steps.sum()))
            stats.grad_steps += int(steps.sum())
            if on_slice is not None:
                active = {i: pos[i] for i, job in enumerate(jobs) if job.start_slice <= j}
                on_slice(SliceOutput(j, states, active, losses, examples))
        host = jax.device_get(jax.block_until_ready(states))
        stats.train_s += time.perf_counter() - t0
        finals = [jax.tree.map(lambda a, p=p: np.asarray(a[p]), host) for p in pos]
        return finals, stats

    # -- inference ----------------------------------------------------------------------------
    def _predict_stack(self, variables, x):
        x = self.prepare(x)

        def one(v):
            return self.model.apply(v, x, **self._kw(False))

        if self.partitioning != "shard_map":
            return jax.vmap(one)(variables)
        spec = PartitionSpec(SHARD_AXIS)
        return jax.shard_map(
            lambda v, xb: jax.vmap(lambda q: self.model.apply(q, xb, **self._kw(False)))(v),
            mesh=self.mesh,
            in_specs=(spec, PartitionSpec()),
            out_specs=spec,
        )(variables, x)

    def predict_variables(self, states: PyTree) -> PyTree:
        """The variables prediction uses from stacked states: averaged params when weight
        averaging is on, plus the model's other collections."""
        params = states.params if states.avg_params is None else states.avg_params
        return {"params": params, **dict(states.model_state)}

    def _predict(self, variables: PyTree, n_models: int) -> Callable[[np.ndarray], np.ndarray]:
        """``xb [M, *feat] -> [S, M, C]`` with the models split over the devices."""
        if self.num_devices == 1:
            return lambda xb: np.asarray(self._predict_fn(variables, xb))
        variables = self.put(pad_rows(variables, self.padded_width(n_models)))
        if self.partitioning == "shard_map":
            return lambda xb: np.asarray(self._predict_fn(variables, xb))[:n_models]
        flat, tree = jax.tree.flatten(variables)
        blocks = [device_blocks(a, self.devices) for a in flat]
        per_device = [
            jax.tree.unflatten(tree, [blk[i] for blk in blocks]) for i in range(self.num_devices)
        ]

        def run(xb: np.ndarray) -> np.ndarray:
            outs = [
                self._predict_fn(v, jax.device_put(xb, d))
                for v, d in zip(per_device, self.devices, strict=True)
            ]
            return np.concatenate([np.asarray(o) for o in outs])[:n_models]

        return run

    def logits(self, states: PyTree, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        """``[S, M, num_classes]`` logits of every constituent model for ``x`` ``[M, *feat]``.

        Args:
          states: stacked ``[S, ...]`` :class:`TrainState` (or bare stacked params).
        """
        variables = (
            self.predict_variables(states) if isinstance(states, TrainState) else {"params": states}
        )
        n_models = len(jax.tree.leaves(variables)[0])
        predict = self._predict(variables, n_models)
        outs = []
        for lo in range(0, len(x), batch):
            xb = np.asarray(x[lo : lo + batch])
            pad = batch - len(xb) if len(x) > batch else 0
            if pad:
                xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            out = predict(xb)
            outs.append(out[:, : out.shape[1] - pad] if pad else out)
        if not outs:
            return np.zeros((n_models, 0, self.num_classes), np.float32)
        return np.concatenate(outs, axis=1)


def _next_power_of_two(n: int) -> int:
    w = 1
    while w < n:
        w *= 2
    return w


def _zero_like_step(state: TrainState) -> jax.Array:
    """A float32 zero carrying the state's sharding type (shard_map needs matching branches)."""
    return state.step.astype(jnp.float32) * 0.0


def _average(
    cfg: OptimConfig, avg: PyTree, params: PyTree, step: jax.Array, tail_count: Any = None
) -> PyTree:
    """Update the weight average after a step (None when averaging is off).

    ``ema``: decay ``min(ema_decay, (1 + t) / (10 + t))``; ``polyak``: running mean of every
    iterate; ``tail``: running mean of the iterates in the current window (``tail_count`` is
    this iterate's index in it, 0 before it starts), see :meth:`Engine.recipe`."""
    if avg is None:
        return None
    if cfg.averaging == "ema":
        t = step.astype(jnp.float32)
        d = jnp.minimum(jnp.float32(cfg.ema_decay), (1.0 + t) / (10.0 + t))
        return jax.tree.map(lambda a, p: d * a + (1.0 - d) * p, avg, params)
    if cfg.averaging == "tail":
        inv = 1.0 / jnp.maximum(tail_count, 1).astype(jnp.float32)
        return jax.tree.map(
            lambda a, p: jnp.where(tail_count > 0, a + (p - a) * inv, p.astype(a.dtype)),
            avg,
            params,
        )
    # "polyak": running mean of the iterates: avg_t = avg_{t-1} + (p_t - avg_{t-1}) / t
    inv = 1.0 / step.astype(jnp.float32)
    return jax.tree.map(lambda a, p: a + (p - a) * inv, avg, params)


def schedule_factor(cfg: OptimConfig, progress: jax.Array) -> jax.Array:
    """The learning-rate multiplier at ``progress`` in [0, 1] of the schedule's horizon, from
    optax schedules over a fixed grid of 2**20 counts (a pure function of progress)."""
    grid = 1 << 20
    warm = int(round(cfg.warmup_fraction * grid))
    count = jnp.clip(jnp.floor(progress * grid), 0, grid).astype(jnp.int32)
    if cfg.schedule == "cosine":
        body = optax.cosine_decay_schedule(1.0, max(grid - warm, 1), alpha=cfg.final_lr_fraction)
    elif cfg.schedule == "step":
        body = optax.piecewise_constant_schedule(
            1.0, {max(grid // 2 - warm, 1): 0.1, max(3 * grid // 4 - warm, 2): 0.1}
        )
    else:
        body = optax.constant_schedule(1.0)
    if warm == 0:
        return jnp.asarray(body(count), jnp.float32)
    sched = optax.join_schedules([optax.linear_schedule(0.0, 1.0, warm), body], [warm])
    return jnp.asarray(sched(count), jnp.float32)


def _call_kwargs(model: Any) -> set[str]:
    """Keyword arguments the model's ``__call__`` accepts among ``train`` and ``mask``."""
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return set()
    return {k for k in ("train", "mask") if k in params}


__all__ = [
    "Engine",
    "LayoutError",
    "ShardData",
    "ShardJob",
    "SliceOutput",
    "TrainState",
    "TrainStats",
    "make_optimizer",
    "pad_rows",
    "stack_states",
    "unstack_state",
]
