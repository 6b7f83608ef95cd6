"""Approximate unlearning applied to the constituent models of a trained SISA run, in memory.

Only the shards whose retained training data holds a forget id are changed; each one's retain
access is the shard's own training ids minus the forget ids (what exact SISA would retrain on).
The run directory is only read: the result is a new stack of states the caller can evaluate
(:func:`constituent_logits`, :func:`evaluate`) and compare with an exact forget. All affected
shards run in one compiled program, ``jax.vmap`` over shards (or ``lax.map``, one after another,
to save memory).

Each constituent is unlearned from its prediction weights (the averaged weights when the run
averages them); the result puts the new weights in both ``params`` and ``avg_params``, and keeps
the optimizer state and the model's other collections (e.g. BatchNorm statistics) as trained.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sisajax import aggregation as agg
from sisajax.approx.common import ApplyFn, ApproxCost, Budget, Method, Rows, check_budget, rows
from sisajax.step import StepSpec, TrainState, prepare


@dataclasses.dataclass
class ConstituentResult:
    """The run's constituents after approximate unlearning.

    Attributes:
      states: ``[S, ...]`` stacked final states, the affected shards' replaced.
      shards: the shards changed (those whose training data held a forget id), ascending.
      active: ``[S]`` bool, shards that still hold retained training data (the others drop out
        of aggregation, as after an exact forget).
      cost: summed over the changed shards (``cost.models`` = how many).
    """

    states: TrainState
    shards: list[int]
    active: np.ndarray
    cost: ApproxCost


@functools.lru_cache(maxsize=16)
def model_apply(spec: StepSpec) -> ApplyFn:
    """``apply_fn(params, model_state, x) -> logits [B, C]`` of a run's model in evaluation mode,
    ``x`` stored features (the data set's preprocessing applied inside); one function per spec,
    so compiled programs are reused."""

    def apply_fn(params, ctx, x):
        variables = {"params": params, **dict(ctx or {})}
        return spec.model.apply(variables, prepare(spec, x), **spec.model_kwargs(False))

    return apply_fn


def split_rows(ids: np.ndarray, forget_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(forget positions, retain positions)`` among the rows ``ids [N]``."""
    hit = np.isin(ids, forget_ids)
    return np.flatnonzero(hit), np.flatnonzero(~hit)


@functools.lru_cache(maxsize=32)
def _program(method: Method, apply_fn: ApplyFn, budget: Budget, hp: Any, shard_exec: str):
    def one(params, ctx, forget, retain, key):
        return method.update(apply_fn, budget, hp, params, ctx, forget, retain, key)

    if shard_exec == "vmap":
        return jax.jit(jax.vmap(one))
    return jax.jit(lambda *a: jax.lax.map(lambda b: one(*b), a))


def _stack_rows(parts: list[tuple[np.ndarray, np.ndarray]]) -> Rows:
    length = max(1, max(len(y) for _, y in parts))
    built = [rows(x, y, length) for x, y in parts]
    return Rows(*(jnp.stack(f) for f in zip(*built, strict=True)))


def unlearn_constituents(
    run: Any,
    forget_ids: Any,
    method: Method,
    budget: Budget,
    hp: Any,
    key: jax.Array,
    shard_exec: str = "vmap",
) -> ConstituentResult:
    """Apply ``method`` to every shard of ``run`` (a :class:`sisajax.SisaRun`) whose training
    data holds one of ``forget_ids`` (shard ``k`` gets the key ``fold_in(key, k)``).

    Args:
      forget_ids: training ids to forget (ids no shard holds are ignored).
      method, budget, hp: a registered method (:func:`sisajax.approx.get_method`), its budget and
        hyperparameters.
      shard_exec: ``vmap`` (one batched program) or ``map`` (one shard after another).

    Returns:
      a :class:`ConstituentResult`; the run directory is not written.
    """
    if shard_exec not in ("vmap", "map"):
        raise ValueError(f"shard_exec must be vmap or map, got {shard_exec!r}")
    if not isinstance(hp, method.hparams):
        raise TypeError(f"{method.name}: hyperparameters must be {method.hparams.__name__}")
    check_budget(budget)
    forget_ids = np.asarray(forget_ids)
    states = run.final_states()
    num_shards = run.num_shards
    affected, forget_parts, retain_parts, active = [], [], [], np.zeros(num_shards, bool)
    for k in range(num_shards):
        data = run.shard_data(k)
        f_pos, r_pos = split_rows(data.ids, forget_ids)
        active[k] = len(r_pos) > 0
        if len(f_pos):
            affected.append(k)
            forget_parts.append((data.x[f_pos], data.y[f_pos]))
            retain_parts.append((data.x[r_pos], data.y[r_pos]))
    cost = ApproxCost(models=0)
    if not affected:
        return ConstituentResult(states, [], active, cost)

    idx = np.asarray(affected)
    use_avg = states.avg_params is not None
    params = jax.tree.map(lambda a: a[idx], states.avg_params if use_avg else states.params)
    ctx = jax.tree.map(lambda a: a[idx], dict(states.model_state))
    keys = jnp.stack([jax.random.fold_in(key, k) for k in affected])
    forget, retain = _stack_rows(forget_parts), _stack_rows(retain_parts)
    program = _program(method, model_apply(run.engine.spec), budget, hp, shard_exec)
    new = jax.device_get(program(params, ctx, forget, retain, keys))

    def put(old, upd):
        out = np.array(old, copy=True)
        out[idx] = upd
        return out

    new_params = jax.tree.map(put, states.params, new)
    new_avg = jax.tree.map(put, states.avg_params, new) if use_avg else None
    for (_, yf), (_, yr) in zip(forget_parts, retain_parts, strict=True):
        cost = cost + method.cost(budget, hp, len(yf), len(yr))
    out = states._replace(params=new_params, avg_params=new_avg)
    return ConstituentResult(out, affected, active, cost)


def constituent_logits(run: Any, result: ConstituentResult, x: np.ndarray) -> np.ndarray:
    """``[S, M, C]`` logits of the result's constituents for ``x [M, *feat]``."""
    return run.engine.logits(result.states, np.asarray(x))


def evaluate(
    run: Any, result: ConstituentResult, x: np.ndarray, y: np.ndarray, aggregation: str = "vote"
) -> float:
    """Accuracy of the result's aggregate (``vote`` or ``mean_prob`` over the active shards) on
    ``x [M, *feat]``, ``y [M]``."""
    labels = agg.aggregate(constituent_logits(run, result, x), aggregation, result.active)
    return agg.accuracy(labels, y)


__all__ = [
    "ConstituentResult",
    "constituent_logits",
    "evaluate",
    "model_apply",
    "split_rows",
    "unlearn_constituents",
]
