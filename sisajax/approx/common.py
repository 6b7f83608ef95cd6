"""Shared pieces of the approximate-unlearning methods: data, budget, cost, losses, the SGD loop.

A model is a pure function ``apply_fn(params, ctx, x) -> logits [B, C]`` (float32): ``params``
are what a method changes, ``ctx`` is anything else the model reads and no method changes (e.g.
BatchNorm statistics; ``None`` for most models). Models are applied in evaluation mode (no
dropout, fixed normalisation statistics).

Data comes as :class:`Rows`: arrays padded to a fixed length plus the count of real rows, so
one compiled program serves sets of different sizes and several shards can be stacked and
vmapped. Batches are drawn uniformly with replacement from the real rows, from explicit keys.

Costs count the way :mod:`sisajax.costs` does: ``examples`` are rows that went through a
gradient computation (forward and backward), ``grad_steps`` are parameter updates;
``forward_examples`` counts forward-only rows (a teacher's predictions) separately.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
ApplyFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]


class Rows(NamedTuple):
    """A set of labelled examples padded to a fixed length.

    Attributes:
      x: ``[N, *feat]`` model inputs (rows ``>= n`` are padding).
      y: ``[N]`` int32 labels.
      n: int32 scalar, the number of real rows (``[S]`` when stacked over shards).
    """

    x: jax.Array
    y: jax.Array
    n: jax.Array


def rows(x: Any, y: Any, length: int | None = None) -> Rows:
    """:class:`Rows` of ``x [n, *feat]``, ``y [n]``, zero-padded to ``length`` rows (default n)."""
    x = np.asarray(x)
    y = np.asarray(y, np.int32)
    n = len(y)
    length = n if length is None else length
    if length < n:
        raise ValueError(f"cannot pad {n} rows to {length}")
    pad = length - n
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        y = np.concatenate([y, np.zeros(pad, np.int32)])
    return Rows(jnp.asarray(x), jnp.asarray(y), jnp.asarray(n, jnp.int32))


def num_rows(r: Rows) -> int:
    """The number of real rows of ``r`` (a host integer)."""
    return int(np.asarray(r.n))


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a method may spend.

    Attributes:
      steps: gradient steps (parameter updates).
      batch_size: retain rows per step.
      forget_batch_size: forget rows per step (methods that step on the forget set).
    """

    steps: int = 100
    batch_size: int = 32
    forget_batch_size: int = 32


@dataclasses.dataclass
class ApproxCost:
    """Work done by an approximate-unlearning call.

    Attributes:
      examples: rows through a gradient computation (forward + backward), retain and forget.
      grad_steps: parameter updates.
      forward_examples: rows through forward-only passes (e.g. a teacher model).
      models: models the call changed.
    """

    examples: int = 0
    grad_steps: int = 0
    forward_examples: int = 0
    models: int = 1

    def __add__(self, other: ApproxCost) -> ApproxCost:
        return ApproxCost(
            self.examples + other.examples,
            self.grad_steps + other.grad_steps,
            self.forward_examples + other.forward_examples,
            self.models + other.models,
        )

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def sample(r: Rows, key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(x [B, *feat], y [B], w [B])``: ``batch`` rows drawn uniformly with replacement from the
    real rows of ``r``; ``w`` is 1.0, or 0.0 for every row when ``r`` has no real row."""
    idx = jax.random.randint(key, (batch,), 0, jnp.maximum(r.n, 1))
    w = jnp.full((batch,), (r.n > 0).astype(jnp.float32))
    return r.x[idx], r.y[idx], w


def ce(logits: jax.Array, y: jax.Array, w: jax.Array | None = None) -> jax.Array:
    """Weighted mean softmax cross-entropy of ``logits [B, C]`` against labels ``y [B]``
    (one-hot targets; ``w [B]`` row weights, default all 1)."""
    loss = optax.softmax_cross_entropy(
        logits.astype(jnp.float32), jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.float32)
    )
    if w is None:
        return jnp.mean(loss)
    return jnp.sum(loss * w) / jnp.maximum(jnp.sum(w), 1.0)


def kl_div(
    teacher: jax.Array, student: jax.Array, temperature: float, w: jax.Array | None = None
) -> jax.Array:
    """Weighted mean ``KL(softmax(teacher / T) || softmax(student / T)) * T**2`` over rows of
    ``[B, C]`` logits (the distillation loss of Hinton et al. 2015)."""
    t = jnp.float32(temperature)
    p_t = jax.nn.log_softmax(teacher.astype(jnp.float32) / t)
    p_s = jax.nn.log_softmax(student.astype(jnp.float32) / t)
    kl = jnp.sum(jnp.exp(p_t) * (p_t - p_s), axis=-1) * t * t
    if w is None:
        return jnp.mean(kl)
    return jnp.sum(kl * w) / jnp.maximum(jnp.sum(w), 1.0)


def sgd_loop(
    loss_fn: Callable[[PyTree, jax.Array, jax.Array], jax.Array],
    params: PyTree,
    steps: int,
    key: jax.Array,
    lr: float,
    momentum: float,
    grad_mask: PyTree | None = None,
) -> PyTree:
    """``steps`` SGD(+momentum) updates of ``params`` on ``loss_fn(params, t, key_t)``, with
    ``key_t = fold_in(key, t)`` for step ``t``; gradients multiplied by ``grad_mask`` (a pytree
    like ``params``) when given. Jittable, vmappable; returns the new params."""
    tx = optax.sgd(lr, momentum=momentum or None)

    def body(carry, t):
        p, opt = carry
        g = jax.grad(loss_fn)(p, t, jax.random.fold_in(key, t))
        if grad_mask is not None:
            g = jax.tree.map(lambda a, m: a * m.astype(a.dtype), g, grad_mask)
        upd, opt = tx.update(g, opt, p)
        return (optax.apply_updates(p, upd), opt), None

    (params, _), _ = jax.lax.scan(
        body, (params, tx.init(params)), jnp.arange(steps, dtype=jnp.int32)
    )
    return params


def check_budget(budget: Budget) -> Budget:
    """``budget`` if its counts are non-negative integers (steps may be 0), else ValueError."""
    for f in ("steps", "batch_size", "forget_batch_size"):
        v = getattr(budget, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if f == "steps" else 1):
            raise ValueError(f"budget.{f} must be an integer >= {0 if f == 'steps' else 1}: {v!r}")
    return budget


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
    """One approximate-unlearning method, in two parts the registry and the SISA helper share.

    Attributes:
      name: the registry name (and ``conf/unlearn/<name>.yaml``).
      hparams: the frozen dataclass of its hyperparameters.
      update: ``(apply_fn, budget, hp, params, ctx, forget, retain, key) -> params``, pure and
        jittable (``apply_fn``, ``budget``, ``hp`` static) and vmappable over the rest.
      cost: ``(budget, hp, n_forget, n_retain) -> ApproxCost`` (host integers in, exact counts).
    """

    name: str
    hparams: type
    update: Callable[..., PyTree]
    cost: Callable[[Budget, Any, int, int], ApproxCost]

    def __post_init__(self):
        object.__setattr__(self, "_jit", jax.jit(self.update, static_argnums=(0, 1, 2)))

    def run(
        self,
        apply_fn: ApplyFn,
        params: PyTree,
        forget: Rows,
        retain: Rows,
        budget: Budget,
        hp: Any,
        key: jax.Array,
        ctx: PyTree = None,
    ) -> tuple[PyTree, ApproxCost]:
        """``(new params, cost)`` of the method on one model (one compiled program per
        ``apply_fn``, budget, hyperparameters and data shapes)."""
        if not isinstance(hp, self.hparams):
            raise TypeError(f"{self.name}: hyperparameters must be {self.hparams.__name__}")
        check_budget(budget)
        new = self._jit(apply_fn, budget, hp, params, ctx, forget, retain, key)
        return new, self.cost(budget, hp, num_rows(forget), num_rows(retain))
