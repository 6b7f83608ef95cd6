"""The training step of one constituent model, as pure module-level functions.

Everything a gradient step depends on is an argument: a static :class:`StepSpec` (model,
optimizer, recipe, preprocessing; built once per run), the :class:`TrainState`, the batch and a
:class:`StepMeta` (shard, slice, position in the slice step, the slice step's budget). Nothing
reads global state, so the same call gives the same bits, and every function here can be jitted
and tested on its own::

    spec = StepSpec.build(run_config, num_classes=10)
    state = init_state(spec, jax.random.PRNGKey(0), (8, 8))
    state, loss = jax.jit(functools.partial(shard_step, spec))(state, xb, yb, mask, key)

The program the engine compiles is :func:`train_chunk` (one shard, a fixed number ``C`` of steps)
mapped over shards by :func:`train_chunk_shards` (``jax.vmap`` on accelerators, ``lax.map`` on a
CPU). It is built to run without host round trips on a GPU:

* a static trip count: ``lax.scan`` over the chunk's ``C`` steps (``unroll`` of them per loop
  iteration); steps past a shard's budget carry an all-false mask and are exact no-ops by a
  ``where`` select over the whole state (optimizer counters and model statistics included), not
  by ``lax.cond``, which makes a GPU wait for the host;
* no scatter: cross-entropy against one-hot targets built by comparison with an iota, so its
  gradient is ``softmax - onehot`` (the integer-label form gathers the label's logit, and the
  gather's gradient is a scatter-add that XLA's deterministic mode runs as a serial loop);
* no index arithmetic in the loop: the host hands each step its row indices (already offset into
  the flattened ``[W * Ncap]`` data under ``lax.map``) and its labels.

Randomness: the initial state of shard ``k`` comes from ``fold_in(PRNGKey(seed), k)``; the step
key of step ``t`` of slice step ``j`` is ``fold_in(fold_in(fold_in(PRNGKey(seed), k), j), t)``
(dropout uses it, augmentation a fold-in of it), so a retrain replays exactly the random stream
a run from scratch uses.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sisajax.augment import augment_batch
from sisajax.config import OptimConfig, RunConfig
from sisajax.models import build_model

PyTree = Any

# Folded into a step key to derive the augmentation key (dropout uses the step key itself).
AUGMENT_STREAM = 0x6175


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


class StepMeta(NamedTuple):
    """Where a chunk of steps sits in the run (int32 scalars, or ``[W]`` for a stack of shards).

    Attributes:
      shard: the constituent model's shard index (keys dropout and augmentation).
      slice: the slice step ``j`` (trains on slices ``0..j``).
      first_step: index, within the slice step, of the chunk's first step.
      budget: gradient steps of the whole slice step (the schedule's horizon).
    """

    shard: jax.Array
    slice: jax.Array
    first_step: jax.Array
    budget: jax.Array

    @staticmethod
    def stack(shard, slice_, first_step, budget) -> np.ndarray:
        """``[W, 4]`` int32 rows in field order (what the compiled programs take)."""
        return np.stack([shard, slice_, first_step, budget], axis=-1).astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
    """Everything static about a run's step (built once; closed over by compiled programs).

    Attributes:
      model: the Flax module.
      tx: the optax transformation.
      optim: the optimizer and recipe config.
      seed: the run's seed (root of every key).
      shards: S (the learning-rate scaling ``S ** lr_shard_exponent``).
      slices: R (the ``run`` schedule horizon).
      preprocessing: ``(scale, shift)`` applied to stored features, or None.
      call_kwargs: which of ``train``/``mask`` the model's ``__call__`` takes.
    """

    model: Any
    tx: optax.GradientTransformation
    optim: OptimConfig
    seed: int
    shards: int
    slices: int
    preprocessing: tuple[float, float] | None = None
    call_kwargs: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls, config: RunConfig, num_classes: int, preprocessing: dict[str, float] | None = None
    ) -> StepSpec:
        """The spec of ``config`` for a data set with ``num_classes`` classes."""
        model = build_model(config.model, num_classes)
        prep = None
        if preprocessing:
            prep = (float(preprocessing.get("scale", 1.0)), float(preprocessing.get("shift", 0.0)))
        return cls(
            model,
            make_optimizer(config.optim),
            config.optim,
            config.sisa.seed,
            config.sisa.shards,
            config.sisa.slices,
            prep,
            frozenset(model_call_kwargs(model)),
        )

    def model_kwargs(self, train: bool, mask: jax.Array | None = None) -> dict[str, Any]:
        """Keyword arguments for the model's ``__call__`` (only those it accepts)."""
        kw: dict[str, Any] = {}
        if "train" in self.call_kwargs:
            kw["train"] = train
        if mask is not None and "mask" in self.call_kwargs:
            kw["mask"] = mask
        return kw


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The optax transformation for ``cfg`` (sgd with optional momentum, or adam)."""
    if cfg.name == "sgd":
        tx = optax.sgd(cfg.learning_rate, momentum=cfg.momentum or None)
    else:
        tx = optax.adam(cfg.learning_rate)
    if cfg.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    return tx


def model_call_kwargs(model: Any) -> set[str]:
    """Keyword arguments the model's ``__call__`` accepts among ``train`` and ``mask``."""
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return set()
    return {k for k in ("train", "mask") if k in params}


def prepare(spec: StepSpec, x: jax.Array) -> jax.Array:
    """Stored features ``[..., *feat]`` -> model input (the data set's preprocessing)."""
    if spec.preprocessing is None:
        return x
    scale, shift = spec.preprocessing
    return x.astype(jnp.float32) * jnp.float32(scale) + jnp.float32(shift)


def init_state(spec: StepSpec, key: jax.Array, feature_shape: tuple[int, ...]) -> TrainState:
    """The initial state of one constituent model from ``key``."""
    dummy = jnp.zeros((1, *feature_shape), jnp.float32)
    p_key, d_key = jax.random.split(key)
    variables = dict(
        spec.model.init({"params": p_key, "dropout": d_key}, dummy, **spec.model_kwargs(False))
    )
    params = variables.pop("params")
    avg = params if spec.optim.averaging != "none" else None
    return TrainState(params, spec.tx.init(params), jnp.zeros((), jnp.int32), variables, avg)


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


def recipe_factors(
    spec: StepSpec, slice_index: jax.Array, t: jax.Array, budget: jax.Array
) -> tuple[jax.Array | None, jax.Array | None]:
    """``(learning-rate factor or None, tail count or None)`` at step ``t`` of the slice step
    ``slice_index`` with ``budget`` steps.

    Pure functions of (slice index, step, the slice step's own budget), which depend only on the
    slice prefix the step trains on: a forget restarting at slice r recomputes exactly the
    factors a from-scratch run uses from slice r on. The tail count is the number of iterates in
    the current ``averaging=tail`` window so far (0 before it starts).
    """
    optim = spec.optim
    base = float(spec.shards) ** optim.lr_shard_exponent
    lr = None
    if optim.has_schedule:
        frac = t.astype(jnp.float32) / jnp.maximum(budget, 1).astype(jnp.float32)
        if optim.schedule_horizon == "run":
            frac = (slice_index.astype(jnp.float32) + frac) / jnp.float32(spec.slices)
        lr = schedule_factor(optim, frac) * jnp.float32(base)
    elif base != 1.0:
        lr = jnp.float32(base)
    tail = None
    if optim.averaging == "tail":
        keep = jnp.ceil(budget.astype(jnp.float32) * optim.tail_fraction).astype(jnp.int32)
        start = budget - jnp.maximum(keep, 1)
        tail = jnp.where(t >= start, t - start + 1, 0)
    return lr, tail


def update_average(
    cfg: OptimConfig, avg: PyTree, params: PyTree, step: jax.Array, tail_count: Any = None
) -> PyTree:
    """The weight average after a step (None when averaging is off).

    ``ema``: decay ``min(ema_decay, (1 + t) / (10 + t))``; ``polyak``: running mean of every
    iterate; ``tail``: running mean of the iterates in the current window (``tail_count`` is
    this iterate's index in it, 0 before it starts; see :func:`recipe_factors`)."""
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


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """``[B]`` softmax cross-entropy of ``logits [B, C]`` against integer ``labels [B]``.

    The targets are one-hot rows built by comparing ``labels`` with an iota (optionally
    smoothed), never a gather of the label's logit: the gradient is ``softmax - targets``, with
    no scatter-add.
    """
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def shard_step(
    spec: StepSpec,
    state: TrainState,
    xb: jax.Array,
    yb: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    lr_scale: jax.Array | None = None,
    tail_count: jax.Array | None = None,
) -> tuple[TrainState, jax.Array]:
    """One gradient step of one model on a masked batch.

    Args:
      state: the model's state.
      xb: ``[B, *feat]`` model inputs (preprocessed; masked rows already zeroed).
      yb: ``[B]`` int32 labels.
      mask: ``[B]`` bool, True for real examples (the loss is their mean).
      key: the step key (dropout; augmentation is applied by the caller).
      lr_scale: multiplies the update (the schedule's factor), or None.
      tail_count: this iterate's index in the ``averaging=tail`` window, or None.

    Returns:
      ``(new state, summed loss over the real examples)``. The step always moves the state:
      callers that may pass an empty batch select the old state themselves (:func:`train_chunk`).
    """
    w = mask.astype(jnp.float32)
    mutable = list(state.model_state)
    smoothing = spec.optim.label_smoothing
    kw = spec.model_kwargs(True, mask)

    def loss_fn(params):
        variables = {"params": params, **state.model_state}
        if mutable:
            logits, new_state = spec.model.apply(
                variables, xb, rngs={"dropout": key}, mutable=mutable, **kw
            )
        else:
            logits, new_state = spec.model.apply(variables, xb, rngs={"dropout": key}, **kw), {}
        total = jnp.sum(cross_entropy(logits, yb, smoothing) * w)
        return total / jnp.maximum(jnp.sum(w), 1.0), (new_state, total)

    grads, (new_model_state, total) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    if lr_scale is not None:
        updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    avg = update_average(spec.optim, state.avg_params, params, step, tail_count)
    return TrainState(params, opt_state, step, dict(new_model_state), avg), total


def slice_key(seed: int, shard: jax.Array, slice_index: jax.Array) -> jax.Array:
    """The key of slice step ``slice_index`` of ``shard``: ``fold_in(fold_in(PRNGKey(seed),
    shard), slice_index)``; step ``t``'s key folds ``t`` into it (:func:`step_key`)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), shard), slice_index)


def step_key(seed: int, shard: jax.Array, slice_index: jax.Array, t: jax.Array) -> jax.Array:
    """The key of step ``t`` of slice step ``slice_index`` of ``shard``."""
    return jax.random.fold_in(slice_key(seed, shard, slice_index), t)


def train_chunk(
    spec: StepSpec,
    state: TrainState,
    x: jax.Array,
    rows: jax.Array,
    mask: jax.Array,
    labels: jax.Array,
    meta: jax.Array,
    unroll: int = 1,
    trip: str = "static",
) -> tuple[TrainState, jax.Array]:
    """Up to ``C`` consecutive steps of one shard.

    Args:
      state: the shard's state.
      x: ``[N, *feat]`` stored features the rows index (the shard's, or every shard's
        flattened).
      rows: ``[C, B]`` int32 row of each example of each step.
      mask: ``[C, B]`` bool; the live steps (those with an example) come first.
      labels: ``[C, B]`` int32 (0 where masked).
      meta: ``[4]`` int32, a :class:`StepMeta` row.
      unroll: steps per loop iteration of the ``static`` loop (the ``dynamic`` loop runs one
        step per iteration; training refuses ``sisa.unroll > 1`` with it).
      trip: ``static``: a loop of exactly ``C`` steps whose empty steps are exact no-ops (a
        ``where`` select keeps the state bit-identical): no host round trip on an accelerator,
        where the loop's trip count must be known. ``dynamic``: a loop over the live steps only
        (its trip count is data): on a CPU, where a loop costs nothing to test, no step is
        wasted on a chunk's empty tail.

    Returns:
      ``(state, summed training loss over the chunk's real examples)``.
    """
    m = StepMeta(*(meta[i] for i in range(4)))
    augment = spec.optim.augment
    pad = spec.optim.augment_pad
    base = slice_key(spec.seed, m.shard, m.slice)  # once per chunk, not per step

    def step(st, t, r, mk, yb):
        xb = prepare(spec, x[r])
        live_rows = mk.reshape((-1,) + (1,) * (xb.ndim - 1))
        xb = jnp.where(live_rows, xb, jnp.zeros_like(xb))
        index = m.first_step + t
        k = jax.random.fold_in(base, index)  # = step_key(seed, shard, slice, index)
        if augment != "none":
            xb = augment_batch(xb, jax.random.fold_in(k, AUGMENT_STREAM), kind=augment, pad=pad)
            xb = jnp.where(live_rows, xb, jnp.zeros_like(xb))
        lr, tail = recipe_factors(spec, m.slice, index, m.budget)
        return shard_step(spec, st, xb, yb, mk, k, lr, tail)

    zero = state.step.astype(jnp.float32) * 0.0  # carries the state's sharding type
    if trip == "dynamic":
        n = jnp.sum(jnp.any(mask, axis=1)).astype(jnp.int32)

        def dyn_body(t, carry):
            st, loss = carry
            st, total = step(st, t, rows[t], mask[t], labels[t])
            return st, loss + total

        return jax.lax.fori_loop(0, n, dyn_body, (state, zero))

    def body(carry, inputs):
        st, loss = carry
        t, r, mk, yb = inputs
        new, total = step(st, t, r, mk, yb)
        live = jnp.any(mk)
        st = jax.tree.map(lambda a, b: jnp.where(live, a, b), new, st)
        return (st, loss + jnp.where(live, total, 0.0)), None

    steps = jnp.arange(rows.shape[0], dtype=jnp.int32)
    (state, loss), _ = jax.lax.scan(body, (state, zero), (steps, rows, mask, labels), unroll=unroll)
    return state, loss


def train_chunk_shards(
    spec: StepSpec,
    shard_exec: str,
    states: TrainState,
    x: jax.Array,
    rows: jax.Array,
    mask: jax.Array,
    labels: jax.Array,
    meta: jax.Array,
    unroll: int = 1,
    trip: str = "static",
) -> tuple[TrainState, jax.Array]:
    """:func:`train_chunk` for ``W`` shards at once.

    Args:
      shard_exec: ``vmap`` (one batched program: accelerators) or ``map`` (``lax.map``, one shard
        after another: CPUs; bits independent of the width and of the device).
      states: ``[W, ...]`` stacked states.
      x: ``[W, Ncap, *feat]`` each shard's stored features.
      rows: ``[W, C, B]``; under ``map`` indices into the flattened ``[W * Ncap]`` data
        (position ``p``'s rows offset by ``p * Ncap``), under ``vmap`` into the shard's own.
      mask, labels: ``[W, C, B]``.  meta: ``[W, 4]``.
      unroll, trip: see :func:`train_chunk`.

    Returns:
      ``(states [W, ...], summed loss per shard [W])``.
    """

    def chunk(s, xs, r, mk, yb, mt):
        return train_chunk(spec, s, xs, r, mk, yb, mt, unroll, trip)

    if shard_exec == "vmap":
        return jax.vmap(chunk)(states, x, rows, mask, labels, meta)
    flat = x.reshape((-1, *x.shape[2:]))  # free: rows already carry each position's offset
    return jax.lax.map(lambda a: chunk(a[0], flat, *a[1:]), (states, rows, mask, labels, meta))


CHUNK_STEPS_AUTO = {"dynamic": 128, "static": 32}


def resolve_chunk_steps(choice: int | str, trip: str, unroll: int = 1) -> int:
    """``sisa.chunk_steps``: an int as it is; ``auto`` -> 128 under a ``dynamic`` chunk loop
    (fewer program calls; no step is wasted) and 32 under a ``static`` one (a slice step's last
    chunk is padded with no-op steps that cost a live step's time), rounded up to a multiple of
    ``unroll``."""
    if choice != "auto":
        return int(choice)
    c = CHUNK_STEPS_AUTO[trip]
    return -(-c // unroll) * unroll


def resolve_trip(choice: str, shard_exec: str, platform: str | None = None) -> str:
    """``auto`` -> ``dynamic`` under ``map`` on a CPU (no wasted steps), else ``static``: under
    ``vmap``, and under ``map`` on an accelerator, where a loop with a data-dependent trip count
    copies its predicate to the host every iteration (~1.7x the step time of the static loop for
    one model on a GPU). ``platform``: the devices' platform (default: jax's default backend)."""
    if choice != "auto":
        return choice
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "dynamic" if shard_exec == "map" and platform == "cpu" else "static"


__all__ = [
    "AUGMENT_STREAM",
    "StepMeta",
    "StepSpec",
    "TrainState",
    "cross_entropy",
    "init_state",
    "make_optimizer",
    "model_call_kwargs",
    "prepare",
    "recipe_factors",
    "resolve_trip",
    "schedule_factor",
    "shard_step",
    "slice_key",
    "step_key",
    "train_chunk",
    "train_chunk_shards",
    "update_average",
]
