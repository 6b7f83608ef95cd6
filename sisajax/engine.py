"""The training engine: compiles the pure step of :mod:`sisajax.step`, places shards on devices,
and drives slice steps. It holds no training rule of its own.

Structure (one compiled program per (width, capacity); nothing recompiles when deletions shrink
a shard): :func:`sisajax.step.train_chunk_shards` runs ``C = sisa.chunk_steps`` steps of ``W``
shards (``jax.vmap`` on accelerators, ``lax.map`` on CPUs); a shard with fewer steps left gets
all-false masks, which are exact no-ops.

:meth:`Engine.run` is the one training recipe every caller uses (``train``, ``forget``,
``verify``, membership-inference shadows, multi-process training, benchmarks): it takes
:class:`ShardJob` s (a shard, its data, the slice to start from and the state before it), places
them on the devices (:mod:`sisajax.layout`), pads the width with inert shards, prepares every
chunk's rows, masks, labels and step meta on the host, dispatches the chunks asynchronously, and
hands each slice's states to ``on_slice`` as soon as the slice step is dispatched (device arrays;
nothing waits for them), so checkpoint writing overlaps with the next slice step.

Randomness: see :mod:`sisajax.step` (keys from seed, shard, slice and step only).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from sisajax import program_store
from sisajax.config import TRAINING_PROGRAM, RunConfig
from sisajax.jobs import (
    ShardData,
    ShardJob,
    SliceOutput,
    TrainStats,
    pad_rows,
    row_offsets,
    slice_step_inputs,
    stack_states,
    unstack_state,
)
from sisajax.layout import (
    SHARD_AXIS,
    LayoutError,
    PerDeviceProgram,
    check_deterministic,
    deterministic_backend,
    padded_width,
    place_shards,
    resolve_shard_exec,
    select_devices,
)
from sisajax.models import code_fingerprint
from sisajax.prediction import StackedPredictor, prediction_variables
from sisajax.step import (
    StepMeta,
    StepSpec,
    TrainState,
    init_state,
    make_optimizer,
    prepare,
    resolve_chunk_steps,
    resolve_trip,
    train_chunk_shards,
)

PyTree = Any
# How initial states are compiled on a CPU (part of the training program: it fixes their bits).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
Partitioning = Literal["auto", "single", "per_device", "shard_map"]


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
        self.spec = StepSpec.build(config, num_classes, self.preprocessing)
        self.model = self.spec.model
        self.tx = self.spec.tx
        self.feature_shape = tuple(feature_shape)
        self.x_dtype = np.dtype(x_dtype)
        self.num_classes = num_classes
        self.batch_size = config.sisa.batch_size
        self.unroll = config.sisa.unroll
        self.shard_exec = resolve_shard_exec(config.sisa.shard_exec)
        self.devices = select_devices(devices)
        self.trip = resolve_trip(config.sisa.chunk_trip, self.shard_exec, self.devices[0].platform)
        self.chunk_steps = resolve_chunk_steps(config.sisa.chunk_steps, self.trip, self.unroll)
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
        self._init_fn: Any = None
        self._predictor: StackedPredictor | None = None
        self._template: PyTree | None = None
        self._model_code: str | None = None

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
            "chunk_trip": self.trip,
            "num_processes": jax.process_count(),
            "training_program": TRAINING_PROGRAM,
            "deterministic": deterministic_backend(d.platform),
        }

    def padded_width(self, width: int) -> int:
        """``width`` rounded up to a multiple of the device count (at least one per device)."""
        return padded_width(width, self.num_devices)

    def shard_sharding(self) -> jax.sharding.Sharding:
        """Sharding of a ``[W, ...]`` array: axis 0 split over the devices (or on the one)."""
        if self.mesh is None:
            return SingleDeviceSharding(self.devices[0])
        return NamedSharding(self.mesh, PartitionSpec(SHARD_AXIS))

    def program_identity(self, program: str, **shape: Any) -> dict[str, Any] | None:
        """What this engine's ``program`` is a function of, for :mod:`sisajax.program_store`
        (``shape``: its width and capacity). None, when the store is off or the model's code
        cannot be fingerprinted (then nothing is stored)."""
        if program_store.directory() is None:
            return None
        if self._model_code is None:
            self._model_code = code_fingerprint(self.config.model.name, self.model) or ""
        if not self._model_code:
            return None
        return {
            "program": program,
            **shape,
            "config": self.config.to_dict(),
            "model_code": self._model_code,
            "num_classes": self.num_classes,
            "preprocessing": self.preprocessing,
            "feature_shape": list(self.feature_shape),
            "x_dtype": self.x_dtype.str,
            "shard_exec": self.shard_exec,
            "trip": self.trip,
            "partitioning": self.partitioning,
            "training_program": TRAINING_PROGRAM,
        }

    def put(self, tree: PyTree) -> PyTree:
        """Place a pytree of ``[W, ...]`` arrays (``W`` a multiple of the device count)."""
        return jax.device_put(tree, self.shard_sharding())

    # -- state --------------------------------------------------------------------------------
    def _init_one(self, key: jax.Array) -> TrainState:
        return init_state(self.spec, key, self.feature_shape)

    def init_state(self, shard: int) -> PyTree:
        """Initial state of ``shard`` (numpy), from ``fold_in(PRNGKey(seed), shard)``.

        Always built by the same width-1 program, so its bits never depend on which shards are
        initialised together. On a CPU that program is compiled without LLVM's optimisations
        (:data:`INIT_COMPILER_OPTIONS`): random initialisers expand to thousands of tiny ops
        (a ResNet-18's took 10 s to compile, 1.5 s this way), and an init runs once per shard.
        """
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.sisa.seed), shard)
        return jax.device_get(self._init_program()(key))

    def _init_program(self):
        if self._init_fn is None:
            device = self.devices[0]
            opts = INIT_COMPILER_OPTIONS if device.platform == "cpu" else None

            def compile_init():
                lowered = jax.jit(self._init_one).lower(jax.random.PRNGKey(0))
                return lowered.compile(compiler_options=opts)

            self._init_fn = program_store.load_or_compile(
                self.program_identity("init"), [device], compile_init
            )
        return self._init_fn

    def prepare_one_shard(self, capacity: int) -> Engine:
        """Compile (or load) what retraining one shard runs, and return the engine that runs it:
        the init program (a restart at slice 0) and the one-shard training program (``map``
        runs: on one device, :meth:`narrowed`; ``vmap`` runs: the run's own width). A
        long-lived server does this once when it starts instead of inside its first requests.
        """
        init = self._init_program()
        if self.shard_exec == "vmap":  # every program of a vmap run has the run's width
            self.compiled(self.vmap_width, capacity)
            return self
        eng = self.narrowed(1)  # what :meth:`run` uses for one map job
        eng._init_fn = eng._init_fn or init
        eng.compiled(1, capacity)
        return eng

    def state_template(self) -> PyTree:
        """Abstract (shape/dtype) pytree of one shard's state (computed once)."""
        if self._template is None:
            self._template = program_store.load_or_compute(
                self.program_identity("state_template"),
                self.devices[:1],
                lambda: jax.eval_shape(self._init_one, jax.random.PRNGKey(0)),
            )
        return self._template

    def leaf_paths(self) -> list[str]:
        """``jax.tree_util.keystr`` of every leaf of the state, in flatten order."""
        flat = jax.tree_util.tree_flatten_with_path(self.state_template())[0]
        return [jax.tree_util.keystr(p) for p, _ in flat]

    # -- the program --------------------------------------------------------------------------
    def prepare(self, x: jax.Array) -> jax.Array:
        """Stored features -> model input (the data set's preprocessing)."""
        return prepare(self.spec, x)

    def _program(self, states, x, rows, mask, labels, meta):
        """``W`` shards, ``C`` steps: see :func:`sisajax.step.train_chunk_shards`."""
        return train_chunk_shards(
            self.spec, self.shard_exec, states, x, rows, mask, labels, meta, self.unroll, self.trip
        )

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
            spec((width, c, b), np.int32),
            spec((width, c, b), np.bool_),
            spec((width, c, b), np.int32),
            spec((width, 4), np.int32),
        )
        return jax.jit(fn).lower(*args)

    def compiled(self, width: int, capacity: int, stats: TrainStats | None = None):
        """The compiled program for ``width`` shards of ``capacity`` rows (cached).

        It takes states ``[W, ...]``, x ``[W, Ncap, *feat]``, rows/mask/labels
        ``[W, C, B]`` (rows as :meth:`chunk_rows` prepares them) and meta ``[W, 4]``
        (:class:`~sisajax.step.StepMeta` rows), placed by :meth:`shard_sharding`; returns
        ``(states, summed loss [W])`` and has ``as_text()``.
        """
        if width % self.num_devices:
            raise ValueError(f"width {width} is not a multiple of {self.num_devices} devices")
        key = (width, capacity)
        if key not in self._compiled:
            t0 = time.perf_counter()
            ident = functools.partial(self.program_identity, capacity=capacity)
            if self.partitioning in ("single", "shard_map"):
                fn = self._program if self.partitioning == "single" else self._shard_map_program
                program = program_store.load_or_compile(
                    ident("train_chunk", width=width),
                    self.devices,
                    lambda: self._lower(fn, width, capacity, self.shard_sharding()).compile(),
                )
            else:
                local = width // self.num_devices

                def compile_on(d):
                    sharding = SingleDeviceSharding(d)
                    return lambda: self._lower(self._program, local, capacity, sharding).compile()

                program = PerDeviceProgram(
                    [
                        program_store.load_or_compile(
                            ident("train_chunk", width=local), [d], compile_on(d)
                        )
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
        """``(width, position of each job)`` in the stacked program: see
        :func:`sisajax.layout.place_shards`."""
        work = [len(j.data) * (self.config.sisa.slices - j.start_slice) for j in jobs]
        return place_shards(
            [j.shard for j in jobs], work, self.shard_exec, self.vmap_width, self.num_devices
        )

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
        check_deterministic(self.devices[0].platform)
        if self.shard_exec == "map" and self.partitioning == "per_device":
            narrow = self.narrowed(len(jobs))
            if narrow is not self:
                return narrow.run(jobs, capacity=cap, on_slice=on_slice, progress=progress)
        stats = TrainStats()
        width, pos = self.place(jobs)
        program = self.compiled(width, cap, stats)
        t_init = time.perf_counter()
        x = np.zeros((width, cap, *self.feature_shape), self.x_dtype)
        starts = np.full(width, sisa.slices, np.int64)
        shard_of = np.zeros(width, np.int64)
        init: list[PyTree | None] = [None] * width
        for i, job in enumerate(jobs):
            p = pos[i]
            x[p, : len(job.data)] = job.data.x
            starts[p], shard_of[p] = job.start_slice, job.shard
            if job.start_state is None and job.start_slice != 0:
                raise ValueError(f"shard {job.shard}: start_state is needed after slice 0")
            init[p] = self.init_state(job.shard) if job.start_state is None else job.start_state
        filler = next(s for s in init if s is not None)
        states = self.put(stack_states([filler if s is None else s for s in init]))
        x_dev = self.put(x)
        stats.compile_s += time.perf_counter() - t_init  # initial states: mostly their compile
        t0 = time.perf_counter()
        c = self.chunk_steps
        offsets = row_offsets(self.shard_exec, width, cap, self.num_devices)
        for j in range(int(starts.min()), sisa.slices):
            inputs = slice_step_inputs(
                jobs,
                pos,
                j,
                width=width,
                offsets=offsets,
                chunk_steps=c,
                batch_size=self.batch_size,
                seed=sisa.seed,
                epochs=sisa.epochs_per_slice_step,
            )
            stats.shard_slices += len(inputs.active)
            steps = inputs.steps
            losses = []
            for chunk in range(inputs.n_chunks):
                lo = chunk * c
                meta = StepMeta.stack(shard_of, np.full(width, j), np.full(width, lo), steps)
                mask = inputs.mask[chunk]
                stats.examples += int(mask.sum())
                chunk_in = (inputs.rows[chunk], mask, inputs.labels[chunk], meta)
                states, loss = program(states, x_dev, *self.put(chunk_in))
                losses.append(loss)
                stats.program_calls += 1
                if progress is not None:
                    progress(int(np.clip(steps - lo, 0, c).sum()))
            stats.grad_steps += int(steps.sum())
            if on_slice is not None:
                examples_seen = inputs.mask.sum(3, np.int32)
                out = SliceOutput(j, states, inputs.active, losses, inputs.examples, examples_seen)
                on_slice(out)
        host = jax.device_get(jax.block_until_ready(states))
        stats.train_s += time.perf_counter() - t0
        finals = [jax.tree.map(lambda a, p=p: np.asarray(a[p]), host) for p in pos]
        return finals, stats

    # -- inference ----------------------------------------------------------------------------
    @property
    def predictor(self) -> StackedPredictor:
        """Evaluates stacked models on this engine's devices (built once)."""
        if self._predictor is None:
            self._predictor = StackedPredictor(
                self.spec,
                self.devices,
                self.partitioning,
                self.mesh,
                self.shard_sharding(),
                self.num_classes,
            )
        return self._predictor

    def predict_variables(self, states: PyTree) -> PyTree:
        """See :func:`sisajax.prediction.prediction_variables`."""
        return prediction_variables(states)

    def logits(self, states: PyTree, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        """``[S, M, num_classes]`` logits of every constituent model for ``x`` ``[M, *feat]``
        (see :meth:`sisajax.prediction.StackedPredictor.logits`).

        Args:
          states: stacked ``[S, ...]`` :class:`TrainState` (or bare stacked params).
        """
        return self.predictor.logits(states, x, batch)


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
