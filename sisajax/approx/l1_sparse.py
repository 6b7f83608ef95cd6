"""l1-sparse: fine-tune on the retained data with an l1 penalty on the parameters.

Jia et al., "Model Sparsity Can Simplify Machine Unlearning", NeurIPS 2023: the penalty
``gamma * ||theta||_1`` pushes the model toward a sparse one, which the paper finds forgets more
under fine-tuning. The paper decays ``gamma`` linearly to 0 over the unlearning run; so does
this (``decay=True``). Cost: as FT, ``steps`` steps of ``batch_size`` retain rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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
class L1SparseParams:
    """lr, momentum: SGD; gamma: l1 coefficient (at step 0); decay: linear decay to 0."""

    lr: float = 0.01
    momentum: float = 0.9
    gamma: float = 5e-4
    decay: bool = True


def _update(apply_fn, budget: Budget, hp: L1SparseParams, params, ctx, forget, retain: Rows, key):
    steps = max(budget.steps, 1)

    def loss(p, t, k):
        x, y, w = sample(retain, k, budget.batch_size)
        g = jnp.float32(hp.gamma)
        if hp.decay:
            g = g * (1.0 - t.astype(jnp.float32) / steps)
        l1 = sum(jnp.sum(jnp.abs(a)) for a in jax.tree.leaves(p))
        return ce(apply_fn(p, ctx, x), y, w) + g * l1

    return sgd_loop(loss, params, budget.steps, key, hp.lr, hp.momentum)


def _cost(budget: Budget, hp: L1SparseParams, n_forget: int, n_retain: int) -> ApproxCost:
    return ApproxCost(budget.steps * budget.batch_size, budget.steps)


METHOD = Method("l1_sparse", L1SparseParams, _update, _cost)


def l1_sparse(
    apply_fn: ApplyFn,
    params: PyTree,
    forget: Rows,
    retain: Rows,
    budget: Budget,
    hp: L1SparseParams,
    key: jax.Array,
    ctx: PyTree = None,
) -> tuple[PyTree, ApproxCost]:
    """Fine-tune ``params`` on ``retain`` with ``gamma * ||params||_1`` added to the loss, for
    ``budget.steps`` steps of ``budget.batch_size`` rows. Returns ``(params, cost)``."""
    return METHOD.run(apply_fn, params, forget, retain, budget, hp, key, ctx)
