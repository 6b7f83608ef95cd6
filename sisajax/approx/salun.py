"""SalUn: saliency-masked random-label unlearning.

Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both
Image Classification and Generation", ICLR 2024. The saliency of a weight is the magnitude of the
gradient of the forget loss (mean CE over the whole forget set) at the original model; the mask
keeps the top ``fraction`` of all weights by saliency (ties at the threshold kept). Then SGD on
``CE(forget x, random labels) + CE(retain x, true labels)`` updates only masked weights. Random
labels are drawn uniformly among the classes other than the true one, per step.

Cost: the saliency gradient over the ``n_forget`` forget rows (no step), then ``steps`` steps of
``forget_batch_size`` forget and ``batch_size`` retain rows.
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
class SalUnParams:
    """lr, momentum: SGD; fraction: share of the weights updated (the most salient)."""

    lr: float = 0.01
    momentum: float = 0.9
    fraction: float = 0.5


def saliency_mask(apply_fn: ApplyFn, params: PyTree, ctx: PyTree, forget: Rows, fraction: float):
    """A pytree like ``params`` of float32 0/1: 1 for the top ``fraction`` of weights by
    ``|d CE(forget) / d weight|`` (one threshold over every leaf)."""
    mask_rows = (jnp.arange(forget.y.shape[0]) < forget.n).astype(jnp.float32)
    g = jax.grad(lambda p: ce(apply_fn(p, ctx, forget.x), forget.y, mask_rows))(params)
    flat = jnp.concatenate([jnp.abs(a).ravel() for a in jax.tree.leaves(g)])
    keep = max(1, min(flat.size, int(round(fraction * flat.size))))
    threshold = jax.lax.top_k(flat, keep)[0][-1]
    return jax.tree.map(lambda a: (jnp.abs(a) >= threshold).astype(jnp.float32), g)


def _update(apply_fn, budget: Budget, hp: SalUnParams, params, ctx, forget: Rows, retain, key):
    mask = saliency_mask(apply_fn, params, ctx, forget, hp.fraction)

    def loss(p, t, k):
        kf, kr, kl = jax.random.split(k, 3)
        xf, yf, wf = sample(forget, kf, budget.forget_batch_size)
        xr, yr, wr = sample(retain, kr, budget.batch_size)
        logits_f = apply_fn(p, ctx, xf)
        c = logits_f.shape[-1]
        wrong = (yf + jax.random.randint(kl, yf.shape, 1, c)) % c
        return ce(logits_f, wrong, wf) + ce(apply_fn(p, ctx, xr), yr, wr)

    return sgd_loop(loss, params, budget.steps, key, hp.lr, hp.momentum, grad_mask=mask)


def _cost(budget: Budget, hp: SalUnParams, n_forget: int, n_retain: int) -> ApproxCost:
    per_step = budget.batch_size + budget.forget_batch_size
    return ApproxCost(n_forget + budget.steps * per_step, budget.steps)


METHOD = Method("salun", SalUnParams, _update, _cost)


def salun(
    apply_fn: ApplyFn,
    params: PyTree,
    forget: Rows,
    retain: Rows,
    budget: Budget,
    hp: SalUnParams,
    key: jax.Array,
    ctx: PyTree = None,
) -> tuple[PyTree, ApproxCost]:
    """Mask the top ``hp.fraction`` of weights by forget-loss gradient magnitude, then
    ``budget.steps`` masked SGD steps on random-label forget batches (``forget_batch_size``
    rows) plus true-label retain batches (``batch_size`` rows). Returns ``(params, cost)``."""
    return METHOD.run(apply_fn, params, forget, retain, budget, hp, key, ctx)
