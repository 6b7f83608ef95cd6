"""SSD: selective synaptic dampening (no retraining).

Foster et al., "Fast Machine Unlearning Without Retraining Through Selective Synaptic
Dampening", AAAI 2024. The importance of a weight on a data set is the paper's diagonal Fisher
estimate: the squared gradient of a batch's mean CE loss (true labels), averaged over the batches
of one pass over the data (``batch_size`` rows each, in an order drawn from the key). With ``f``
the importance on the forget set and ``g`` the importance on the full training data (retain and
forget together), every weight with ``f > alpha * g`` is multiplied by ``min(lam * g / f, 1)``;
the others are left alone. (The paper's loader shuffles the full data; here its batches mix
retain and forget rows in a keyed order too.)

Cost: one pass of batch gradients over the forget rows and one over the full training data
(``examples = 2 * n_forget + n_retain``; no step, ``grad_steps = 0``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sisajax.approx.common import ApplyFn, ApproxCost, Budget, Method, PyTree, Rows, ce


@dataclasses.dataclass(frozen=True)
class SSDParams:
    """alpha: selection threshold (forget importance over global importance); lam: the
    dampening constant."""

    alpha: float = 10.0
    lam: float = 1.0


def importance(
    apply_fn: ApplyFn, params: PyTree, ctx: PyTree, r: Rows, batch: int, order: jax.Array
) -> PyTree:
    """A pytree like ``params``: the mean over batches of the squared gradient of the batch's
    mean CE loss, the batches being ``batch`` consecutive real rows of ``r`` taken in
    ``order [N]`` (a permutation of the rows; padding rows are skipped)."""
    n_rows = r.y.shape[0]
    live = jnp.arange(n_rows) < r.n
    # real rows first, in the given order
    pos = order[jnp.argsort(~live[order], stable=True)]
    n_pad = -(-n_rows // batch) * batch
    pos = jnp.concatenate([pos, jnp.zeros((n_pad - n_rows,), pos.dtype)])
    w = (jnp.arange(n_pad) < r.n).astype(jnp.float32)

    def body(acc, chunk):
        p_b, w_b = chunk
        g = jax.grad(lambda q: ce(apply_fn(q, ctx, r.x[p_b]), r.y[p_b], w_b))(params)
        used = (jnp.sum(w_b) > 0).astype(jnp.float32)
        return jax.tree.map(lambda a, b: a + used * jnp.square(b), acc, g), None

    zero = jax.tree.map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(body, zero, (pos.reshape(-1, batch), w.reshape(-1, batch)))
    n_batches = jnp.maximum(-(-r.n // batch), 1).astype(jnp.float32)
    return jax.tree.map(lambda a: a / n_batches, total)


def _concat(a: Rows, b: Rows) -> Rows:
    """The real rows of ``a`` then those of ``b``, padded to their joint length."""
    n_a, n_b = a.y.shape[0], b.y.shape[0]
    i = jnp.arange(n_a + n_b)
    src = jnp.where(i < a.n, i, jnp.where(i < a.n + b.n, n_a + i - a.n, 0))
    x = jnp.concatenate([a.x, b.x.astype(a.x.dtype)])[src]
    y = jnp.concatenate([a.y, b.y])[src]
    return Rows(x, y, a.n + b.n)


def _update(apply_fn, budget: Budget, hp: SSDParams, params, ctx, forget: Rows, retain, key):
    k_f, k_d = jax.random.split(key)
    full = _concat(retain, forget)
    b = budget.batch_size
    f_imp = importance(
        apply_fn, params, ctx, forget, b, jax.random.permutation(k_f, forget.y.shape[0])
    )
    g_imp = importance(apply_fn, params, ctx, full, b, jax.random.permutation(k_d, full.y.shape[0]))

    def dampen(p, f, g):
        select = f > hp.alpha * g
        beta = jnp.minimum(hp.lam * g / jnp.where(select, f, 1.0), 1.0)
        return jnp.where(select, p * beta.astype(p.dtype), p)

    return jax.tree.map(dampen, params, f_imp, g_imp)


def _cost(budget: Budget, hp: SSDParams, n_forget: int, n_retain: int) -> ApproxCost:
    return ApproxCost(2 * n_forget + n_retain, 0)


METHOD = Method("ssd", SSDParams, _update, _cost)


def ssd(
    apply_fn: ApplyFn,
    params: PyTree,
    forget: Rows,
    retain: Rows,
    budget: Budget,
    hp: SSDParams,
    key: jax.Array,
    ctx: PyTree = None,
) -> tuple[PyTree, ApproxCost]:
    """Dampen the weights of ``params`` far more important to ``forget`` than to the full
    training data (``forget`` and ``retain`` together); ``key`` orders the batches of the
    importance estimates, ``budget.batch_size`` sizes them, ``budget.steps`` is unused.
    Returns ``(params, cost)``."""
    return METHOD.run(apply_fn, params, forget, retain, budget, hp, key, ctx)
