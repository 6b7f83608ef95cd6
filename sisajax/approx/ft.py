"""FT: fine-tune on the retained data only (the forget set is never seen again).

Catastrophic forgetting of the forget set is left to the continued training on the retain set
(Golatkar et al., "Eternal Sunshine of the Spotless Net", CVPR 2020; Warnecke et al. 2023 call it
fine-tuning). Cost: ``steps`` gradient steps of ``batch_size`` retain rows.
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
class FTParams:
    """lr: SGD learning rate; momentum: SGD momentum."""

    lr: float = 0.01
    momentum: float = 0.9


def _update(apply_fn, budget: Budget, hp: FTParams, params, ctx, forget: Rows, retain: Rows, key):
    def loss(p, t, k):
        x, y, w = sample(retain, k, budget.batch_size)
        return ce(apply_fn(p, ctx, x), y, w)

    return sgd_loop(loss, params, budget.steps, key, hp.lr, hp.momentum)


def _cost(budget: Budget, hp: FTParams, n_forget: int, n_retain: int) -> ApproxCost:
    return ApproxCost(budget.steps * budget.batch_size, budget.steps)


METHOD = Method("ft", FTParams, _update, _cost)


def fine_tune(
    apply_fn: ApplyFn,
    params: PyTree,
    forget: Rows,
    retain: Rows,
    budget: Budget,
    hp: FTParams,
    key: jax.Array,
    ctx: PyTree = None,
) -> tuple[PyTree, ApproxCost]:
    """Fine-tune ``params`` on ``retain`` (``[N, *feat]`` rows) for ``budget.steps`` steps of
    ``budget.batch_size`` rows. ``forget`` is unused. Returns ``(params, cost)``."""
    return METHOD.run(apply_fn, params, forget, retain, budget, hp, key, ctx)
