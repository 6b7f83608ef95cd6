"""Populations of independently seeded models (or SISA ensembles) trained in one program.

Forget-quality measures compare the *distribution* of a model's outputs with the oracle's, so
they need many models of each kind: N models unlearned by a method, N oracle models retrained
without the forget set, and N more oracle models for the noise floor. A population of N SISA
ensembles with S shards each is one :class:`~sisajax.engine.Engine` program of width N x S
(vmapped or mapped like any run), ensemble ``e`` partitioning the ids with its own seed; a
population of single models is the case S = R = 1. Removing ids from a hash partition moves no
other id, so the population trained on ``ids`` minus a forget set is exactly what SISA's exact
unlearning makes of the population trained on ``ids``, in distribution and, within one
program, bit for bit: each ensemble's forget retrains the affected shards on the retained ids
with the same keys.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from sisajax.aggregation import softmax
from sisajax.config import RunConfig
from sisajax.data.partition import hash_partition, key_word
from sisajax.engine import Engine
from sisajax.jobs import ShardData, ShardJob, TrainStats, stack_states, unstack_state
from sisajax.layout import resolve_shard_exec


@dataclasses.dataclass
class ModelPopulation:
    """N ensembles of S constituent models (S = 1: N single models), trained together.

    Attributes:
      engine: the program that trained them (width N x S) and predicts with them.
      states: stacked ``[N*S, ...]`` train states, ensemble ``e``'s shard ``k`` at ``e*S + k``.
      num_models: N.  shards: S.
      active: ``[N, S]`` bool, constituents that trained on at least one example.
      stats: examples, gradient steps and seconds of the training.
    """

    engine: Engine
    states: Any
    num_models: int
    shards: int
    active: np.ndarray
    stats: TrainStats
    wall_s: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``[N, S, M, C]`` logits of every constituent for ``x`` ``[M, *feat]``."""
        z = self.engine.logits(self.states, np.asarray(x))
        return z.reshape(self.num_models, self.shards, *z.shape[1:])

    def probs(self, x: np.ndarray) -> np.ndarray:
        """``[N, M, C]`` each ensemble's mean probability over its active constituents."""
        p = softmax(self.logits(x))  # [N, S, M, C]
        w = self.active[:, :, None, None].astype(p.dtype)
        return (p * w).sum(1) / np.maximum(w.sum(1), 1)

    def model_state(self, e: int, k: int = 0) -> Any:
        """Ensemble ``e``'s constituent ``k`` as one (unstacked) train state."""
        return unstack_state(self.states, e * self.shards + k)

    def with_states(self, states: list[Any]) -> ModelPopulation:
        """The same population with ``[N*S]`` new per-constituent states (e.g. after an
        approximate unlearning method changed them)."""
        return dataclasses.replace(self, states=stack_states(states))


def train_population(
    config: RunConfig,
    ids: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    num_models: int,
    *,
    seed: int,
    preprocessing: dict[str, float] | None = None,
) -> ModelPopulation:
    """Train ``num_models`` ensembles of ``config``'s recipe (S shards, R slices, epochs, batch,
    optimizer) on the examples ``ids [P]``, ``x [P, *feat]``, ``y [P]``, in one program.

    Ensemble ``e`` partitions ``ids`` with the seed ``key_word(seed, e)`` and its constituents
    draw their keys from that run seed like any run's shards: two populations with different
    ``seed`` are independent draws of the same training distribution.
    """
    t0 = time.perf_counter()
    if num_models < 1:
        raise ValueError("a population needs at least one model")
    ids = np.asarray(ids, np.int64)
    order = np.argsort(ids, kind="stable")
    ids, x, y = ids[order], np.asarray(x)[order], np.asarray(y)[order]
    s, r = config.sisa.shards, config.sisa.slices
    width = num_models * s
    # The recipe keeps S (learning rate and epochs scale with S, not with the program's width).
    cfg = config.replace(
        sisa={
            "seed": int(key_word(seed, 0x909) & 0x7FFFFFFF),
            "shard_exec": resolve_shard_exec(config.sisa.shard_exec),
        }
    )
    data: list[ShardData] = []
    for e in range(num_models):
        part = hash_partition(ids, s, r, int(key_word(seed, e) & 0x7FFFFFFF))
        for k in range(s):
            sel = part.shard == k
            data.append(ShardData(ids[sel], x[sel], y[sel], part.slice[sel]))
    engine = Engine(
        cfg, x.shape[1:], x.dtype, num_classes, vmap_width=width, preprocessing=preprocessing
    )
    capacity = int(-(-max(1, max(len(d) for d in data)) // 8) * 8)
    final, stats = engine.run([ShardJob(w, d) for w, d in enumerate(data)], capacity=capacity)
    active = np.array([len(d) > 0 for d in data]).reshape(num_models, s)
    states = jax.device_get(stack_states(final))
    return ModelPopulation(engine, states, num_models, s, active, stats, time.perf_counter() - t0)
