"""The training engine: one pure train step for ONE shard, run for all shards in one program.

Structure (inside a single ``jax.jit``, state donated):
  * ``_shard_step``: one gradient step of one constituent model on a masked batch.
  * ``_train_shard``: ``lax.fori_loop`` over up to ``C`` steps of one shard (``C`` = chunk_steps,
    a fixed shape; the shard's own step count is a traced scalar, so nothing recompiles when a
    deletion shortens a shard).
  * ``_program``: all shards at once, by ``jax.vmap`` (accelerators) or ``lax.map`` (CPU; see
    STACK-NOTES). Both are exact no-ops for a shard past its step count, optimizer counters
    included (``lax.cond`` on "batch has an example"; under vmap it becomes a select).

Randomness: parameter init uses ``fold_in(PRNGKey(seed), shard)``; batch order comes from
:mod:`sisajax.data.schedule` (keys: seed, shard, slice, epoch). Nothing reads global RNG state.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sisajax.config import OptimConfig, RunConfig
from sisajax.data.schedule import slice_step_batches
from sisajax.models import build_model

PyTree = Any


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
    """

    def __init__(
        self,
        config: RunConfig,
        feature_shape: tuple[int, ...],
        x_dtype: np.dtype,
        num_classes: int,
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
        self._compiled: dict[tuple[int, int], Any] = {}
        self._init_fn = jax.jit(self._init_one)
        self._predict_fn = jax.jit(self._predict_stack)

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

    def compiled(self, width: int, capacity: int, stats: TrainStats | None = None):
        """The compiled program for ``width`` shards of ``capacity`` rows (cached)."""
        key = (width, capacity)
        if key not in self._compiled:
            t0 = time.perf_counter()
            state = jax.tree.map(
                lambda s: jax.ShapeDtypeStruct((width, *s.shape), s.dtype), self.state_template()
            )
            c, b = self.chunk_steps, self.batch_size
            args = (
                state,
                jax.ShapeDtypeStruct((width, capacity, *self.feature_shape), self.x_dtype),
                jax.ShapeDtypeStruct((width, capacity), jnp.int32),
                jax.ShapeDtypeStruct((width, c, b), jnp.int32),
                jax.ShapeDtypeStruct((width, c, b), jnp.bool_),
                jax.ShapeDtypeStruct((width,), jnp.int32),
            )
            self._compiled[key] = jax.jit(self._program, donate_argnums=0).lower(*args).compile()
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
        program = self.compiled(width, cap, stats)
        x = np.zeros((width, cap, *self.feature_shape), self.x_dtype)
        y = np.zeros((width, cap), np.int32)
        for i, d in enumerate(data):
            x[i, : len(d)] = d.x
            y[i, : len(d)] = d.y
        x_dev, y_dev = jax.device_put(x), jax.device_put(y)
        states = jax.device_put(start_states)
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
                rows = np.zeros((width, c, b), np.int32)
                mask = np.zeros((width, c, b), bool)
                n_steps = np.clip(steps - chunk * c, 0, c).astype(np.int32)
                for i, sb in enumerate(batches):
                    if n_steps[i]:
                        lo = chunk * c
                        rows[i, : n_steps[i]] = sb.rows[lo : lo + n_steps[i]]
                        mask[i, : n_steps[i]] = sb.mask[lo : lo + n_steps[i]]
                        stats.examples += int(mask[i].sum())
                states = program(states, x_dev, y_dev, rows, mask, n_steps)
                stats.program_calls += 1
                if progress is not None:
                    progress(int(n_steps.sum()))
            stats.grad_steps += int(steps.sum())
            if on_slice is not None:
                on_slice(j, jax.device_get(states))
        states = jax.device_get(jax.block_until_ready(states))
        stats.train_s += time.perf_counter() - t0
        return states, stats

    # -- inference ----------------------------------------------------------------------------
    def _predict_stack(self, params, x):
        return jax.vmap(lambda p: self.model.apply(p, x))(params)

    def logits(self, params: PyTree, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        """``[S, M, num_classes]`` logits of every constituent model for ``x`` ``[M, *feat]``."""
        outs = []
        for lo in range(0, len(x), batch):
            xb = np.asarray(x[lo : lo + batch])
            pad = batch - len(xb) if len(x) > batch else 0
            if pad:
                xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            out = np.asarray(self._predict_fn(params, xb))
            outs.append(out[:, : out.shape[1] - pad] if pad else out)
        if not outs:
            return np.zeros((0, 0, self.num_classes), np.float32)
        return np.concatenate(outs, axis=1)
