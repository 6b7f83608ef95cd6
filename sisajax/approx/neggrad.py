"""NegGrad+: gradient ascent on the forget set and descent on the retain set, weighted.

Kurmanji et al., "Towards Unbounded Machine Unlearning", NeurIPS 2023 (the NegGrad+ baseline):
each step minimises ``beta * CE(retain batch) - (1 - beta) * CE(forget batch)``. Cost: ``steps``
steps of ``batch_size`` retain rows plus ``forget_batch_size`` forget rows.
"""

from __future__ import annotations

import dataclasses

import jax

from sisajax.approx.common import (
    ApplyFn,
    ApproxCost,
    Budget,
    Method,
    PyTree,
    Rows,
    ce,
    sample,
    sgd_loop,
)


@dataclasses.dataclass(frozen=True)
class NegGradParams:
    """lr, momentum: SGD; beta: weight of the retain loss (``1 - beta`` on the forget loss)."""

    lr: float = 0.03
    momentum: float = 0.9
    beta: float = 0.9


def _update(apply_fn, budget: Budget, hp: NegGradParams, params, ctx, forget, retain, key):
    def loss(p, t, k):
        kf, kr = jax.random.split(k)
        xf, yf, wf = sample(forget, kf, budget.forget_batch_size)
        xr, yr, wr = sample(retain, kr, budget.batch_size)
        keep = ce(apply_fn(p, ctx, xr), yr, wr)
        drop = ce(apply_fn(p, ctx, xf), yf, wf)
        return hp.beta * keep - (1.0 - hp.beta) * drop

    return sgd_loop(loss, params, budget.steps, key, hp.lr, hp.momentum)


def _cost(budget: Budget, hp: NegGradParams, n_forget: int, n_retain: int) -> ApproxCost:
    return ApproxCost(budget.steps * (budget.batch_size + budget.forget_batch_size), budget.steps)


METHOD = Method("neggrad_plus", NegGradParams, _update, _cost)


def neggrad_plus(
    apply_fn: ApplyFn,
    params: PyTree,
    forget: Rows,
    retain: Rows,
    budget: Budget,
    hp: NegGradParams,
    key: jax.Array,
    ctx: PyTree = None,
) -> tuple[PyTree, ApproxCost]:
    """``budget.steps`` SGD steps on ``beta * CE(retain) - (1 - beta) * CE(forget)`` with
    batches of ``budget.batch_size`` retain and ``budget.forget_batch_size`` forget rows.
    Returns ``(params, cost)``."""
    return METHOD.run(apply_fn, params, forget, retain, budget, hp, key, ctx)
