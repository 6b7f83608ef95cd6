"""SCRUB: a student, started from the original model, moves away from it on the forget set and
stays close to it on the retain set, in alternating max and min steps.

Kurmanji et al., "Towards Unbounded Machine Unlearning", NeurIPS 2023. The teacher is the
original model (frozen). A *max* step maximises ``KL(teacher || student)`` on a forget batch; a
*min* step minimises ``gamma * CE + alpha * KL(teacher || student)`` on a retain batch (KL at
temperature ``T``, scaled by ``T**2``). The paper alternates epochs (a max epoch, then a min
epoch, for the first ``msteps`` epochs; min epochs after); under a step budget the steps come in
rounds of ``period`` steps: in each of the first ``max_rounds`` rounds the first
``max_per_period`` steps are max steps, every other step is a min step.

Cost: ``forget_batch_size`` rows per max step, ``batch_size`` rows per min step, counted in
``examples`` (the student's forward and backward) and again in ``forward_examples`` (the
teacher's forward).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sisajax.approx.common import (
    ApplyFn,
    ApproxCost,
    Budget,
    Method,
    PyTree,
    Rows,
    ce,
    kl_div,
    sample,
    sgd_loop,
)


@dataclasses.dataclass(frozen=True)
class ScrubParams:
    """lr, momentum: SGD; alpha: KL weight and gamma: CE weight of a min step; temperature: the
    distillation temperature; period, max_per_period, max_rounds: the step schedule."""

    lr: float = 0.01
    momentum: float = 0.9
    alpha: float = 0.001
    gamma: float = 0.99
    temperature: float = 4.0
    period: int = 10
    max_per_period: int = 2
    max_rounds: int = 5


def max_step_schedule(steps: int, hp: ScrubParams) -> np.ndarray:
    """``[steps]`` bool: which steps are max steps (forget set) rather than min steps."""
    t = np.arange(steps)
    return (t // hp.period < hp.max_rounds) & (t % hp.period < hp.max_per_period)


def _update(apply_fn, budget: Budget, hp: ScrubParams, params, ctx, forget, retain, key):
    teacher = jax.lax.stop_gradient(params)
    is_max = jnp.asarray(max_step_schedule(budget.steps, hp))

    def max_loss(p, k):
        x, _, w = sample(forget, k, budget.forget_batch_size)
        return -kl_div(apply_fn(teacher, ctx, x), apply_fn(p, ctx, x), hp.temperature, w)

    def min_loss(p, k):
        x, y, w = sample(retain, k, budget.batch_size)
        logits = apply_fn(p, ctx, x)
        kl = kl_div(apply_fn(teacher, ctx, x), logits, hp.temperature, w)
        return hp.gamma * ce(logits, y, w) + hp.alpha * kl

    def loss(p, t, k):
        return jax.lax.cond(is_max[t], max_loss, min_loss, p, k)

    return sgd_loop(loss, params, budget.steps, key, hp.lr, hp.momentum)


def _cost(budget: Budget, hp: ScrubParams, n_forget: int, n_retain: int) -> ApproxCost:
    n_max = int(max_step_schedule(budget.steps, hp).sum())
    rows = n_max * budget.forget_batch_size + (budget.steps - n_max) * budget.batch_size
    return ApproxCost(rows, budget.steps, rows)


METHOD = Method("scrub", ScrubParams, _update, _cost)


def scrub(
    apply_fn: ApplyFn,
    params: PyTree,
    forget: Rows,
    retain: Rows,
    budget: Budget,
    hp: ScrubParams,
    key: jax.Array,
    ctx: PyTree = None,
) -> tuple[PyTree, ApproxCost]:
    """``budget.steps`` SCRUB steps (max steps on ``forget`` batches of
    ``budget.forget_batch_size`` rows, min steps on ``retain`` batches of ``budget.batch_size``)
    with ``params`` as the frozen teacher. Returns ``(student params, cost)``."""
    return METHOD.run(apply_fn, params, forget, retain, budget, hp, key, ctx)
