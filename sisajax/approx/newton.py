"""Removal by one Newton step for an L2-regularised linear model (or a linear head).

Guo et al., "Certified Data Removal from Machine Learning Models", ICML 2020. For a model whose
parameters ``w*`` minimise the strongly convex objective

    J(w; D) = mean_{i in D} CE(f(w, x_i), y_i) + (l2 / 2) * ||w||^2

the parameters after removing the forget rows are approximated by one Newton step on the
retained data ``D'``: ``w = w* - H^-1 grad J(w*; D')`` with ``H`` the Hessian of ``J(.; D')`` at
``w*``. For softmax regression the error against retraining on ``D'`` is second order in the
share of removed rows. Guo et al. certify removal by also training with a random linear term
and bounding the step's residual gradient; neither the perturbation nor the bound is applied
here: this is the removal step only, an approximate baseline.

A linear head over frozen features is the same problem: pass the features as ``x`` and the
head's parameters. :func:`fit_l2` trains such a model to convergence by Newton's method.

Cost: the gradient and Hessian over the ``n_retain`` retained rows (``examples``) and one update
(``grad_steps = 1``); the forget rows are not read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sisajax.approx.common import ApplyFn, ApproxCost, Budget, Method, PyTree, Rows, ce


@dataclasses.dataclass(frozen=True)
class NewtonParams:
    """l2: the L2 coefficient the model was trained with (``J`` above)."""

    l2: float = 1e-3


def linear_apply(params: PyTree, ctx: PyTree, x: jax.Array) -> jax.Array:
    """Softmax-regression logits ``[B, C]`` of ``x [B, *feat]`` (flattened) with
    ``params = {"kernel": [D, C], "bias": [C]}``; ``ctx`` is unused."""
    x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
    return x @ params["kernel"] + params["bias"]


def l2_objective(
    apply_fn: ApplyFn, params: PyTree, ctx: PyTree, data: Rows, l2: float
) -> jax.Array:
    """``J(params; data)``: mean CE over the real rows of ``data`` plus
    ``l2 / 2 * ||params||^2``."""
    w = (jnp.arange(data.y.shape[0]) < data.n).astype(jnp.float32)
    sq = sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(params))
    return ce(apply_fn(params, ctx, data.x), data.y, w) + 0.5 * l2 * sq


def newton_step(apply_fn: ApplyFn, params: PyTree, ctx: PyTree, data: Rows, l2: float) -> PyTree:
    """One Newton update of ``params`` on ``J(.; data)`` (dense Hessian of the flattened
    ``[P]`` parameters, solved with a Cholesky factorisation)."""
    flat, unravel = ravel_pytree(params)

    def j(v):
        return l2_objective(apply_fn, unravel(v), ctx, data, l2)

    g = jax.grad(j)(flat)
    h = jax.hessian(j)(flat)
    h = 0.5 * (h + h.T)
    delta = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(h), g)
    return unravel(flat - delta)


def fit_l2(
    apply_fn: ApplyFn,
    params: PyTree,
    data: Rows,
    l2: float,
    iterations: int = 30,
    ctx: PyTree = None,
) -> PyTree:
    """Minimise ``J(.; data)`` from ``params`` by ``iterations`` Newton steps (what retraining
    an L2-regularised linear model to convergence means here)."""

    @jax.jit
    def run(p, d):
        return jax.lax.fori_loop(
            0, iterations, lambda _, q: newton_step(apply_fn, q, ctx, d, l2), p
        )

    return run(params, data)


def _update(apply_fn, budget: Budget, hp: NewtonParams, params, ctx, forget, retain, key):
    return newton_step(apply_fn, params, ctx, retain, hp.l2)


def _cost(budget: Budget, hp: NewtonParams, n_forget: int, n_retain: int) -> ApproxCost:
    return ApproxCost(n_retain, 1)


METHOD = Method("newton", NewtonParams, _update, _cost)


def newton_removal(
    apply_fn: ApplyFn,
    params: PyTree,
    forget: Rows,
    retain: Rows,
    budget: Budget,
    hp: NewtonParams,
    key: jax.Array,
    ctx: PyTree = None,
) -> tuple[PyTree, ApproxCost]:
    """Remove ``forget`` from ``params`` (the minimiser of ``J`` on forget and retain rows) by
    one Newton step on ``J(.; retain)``. ``budget`` and ``key`` are unused (deterministic).
    Returns ``(params, cost)``."""
    return METHOD.run(apply_fn, params, forget, retain, budget, hp, key, ctx)
