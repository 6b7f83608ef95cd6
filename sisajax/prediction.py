"""Logits of a stack of constituent models: ``S`` models' states in, ``[S, M, C]`` logits out.

One compiled program evaluates every model on a batch of examples (``jax.vmap`` over the
models' variables); with several devices the models are split over them, either as one program
per device (``per_device``) or one ``shard_map`` program. Aggregating the models' outputs into
one prediction is :mod:`sisajax.aggregation`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from sisajax.jobs import pad_rows
from sisajax.layout import SHARD_AXIS, device_blocks, padded_width
from sisajax.step import StepSpec, TrainState, prepare

PyTree = Any


def prediction_variables(states: PyTree) -> PyTree:
    """The variables prediction uses from stacked states ``[S, ...]``: averaged params when
    weight averaging is on, plus the model's other collections (e.g. BatchNorm statistics).
    Bare stacked params (not a :class:`TrainState`) are taken as they are."""
    if not isinstance(states, TrainState):
        return {"params": states}
    params = states.params if states.avg_params is None else states.avg_params
    return {"params": params, **dict(states.model_state)}


class StackedPredictor:
    """Evaluates ``S`` stacked models on the devices a training engine uses.

    Args:
      spec: the step spec (model, its call arguments, the data set's input map).
      devices: the devices to split the models over.
      partitioning: ``single``, ``per_device`` or ``shard_map`` (as the engine resolved it).
      mesh: the 1-D device mesh of ``shard_map`` (None otherwise).
      sharding: how a ``[S, ...]`` array is split over the devices.
      num_classes: C.
    """

    def __init__(
        self,
        spec: StepSpec,
        devices: Sequence[jax.Device],
        partitioning: str,
        mesh: Mesh | None,
        sharding: jax.sharding.Sharding,
        num_classes: int,
    ):
        self.spec = spec
        self.devices = tuple(devices)
        self.partitioning = partitioning
        self.mesh = mesh
        self.sharding = sharding
        self.num_classes = num_classes
        self._fn = jax.jit(self._apply_stack)

    def _apply_one(self, variables: PyTree, x: jax.Array) -> jax.Array:
        return self.spec.model.apply(variables, x, **self.spec.model_kwargs(False))

    def _apply_stack(self, variables: PyTree, x: jax.Array) -> jax.Array:
        """``variables [S, ...]``, ``x [M, *feat]`` (stored features) -> ``[S, M, C]``."""
        x = prepare(self.spec, x)
        if self.partitioning != "shard_map":
            return jax.vmap(lambda v: self._apply_one(v, x))(variables)
        spec = PartitionSpec(SHARD_AXIS)
        return jax.shard_map(
            lambda v, xb: jax.vmap(lambda q: self._apply_one(q, xb))(v),
            mesh=self.mesh,
            in_specs=(spec, PartitionSpec()),
            out_specs=spec,
        )(variables, x)

    def _batch_fn(self, variables: PyTree, n_models: int) -> Callable[[np.ndarray], np.ndarray]:
        """``xb [M, *feat] -> [S, M, C]`` with the models split over the devices."""
        if len(self.devices) == 1:
            return lambda xb: np.asarray(self._fn(variables, xb))
        variables = jax.device_put(
            pad_rows(variables, padded_width(n_models, len(self.devices))), self.sharding
        )
        if self.partitioning == "shard_map":
            return lambda xb: np.asarray(self._fn(variables, xb))[:n_models]
        flat, tree = jax.tree.flatten(variables)
        blocks = [device_blocks(a, self.devices) for a in flat]
        per_device = [
            jax.tree.unflatten(tree, [blk[i] for blk in blocks]) for i in range(len(self.devices))
        ]

        def run(xb: np.ndarray) -> np.ndarray:
            outs = [
                self._fn(v, jax.device_put(xb, d))
                for v, d in zip(per_device, self.devices, strict=True)
            ]
            return np.concatenate([np.asarray(o) for o in outs])[:n_models]

        return run

    def logits(self, states: PyTree, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        """``[S, M, C]`` logits of every model for ``x`` ``[M, *feat]``, ``batch`` examples per
        call (a shorter last batch is padded, so one program serves every call).

        Args:
          states: stacked ``[S, ...]`` :class:`TrainState` (or bare stacked params).
        """
        variables = prediction_variables(states)
        n_models = len(jax.tree.leaves(variables)[0])
        predict = self._batch_fn(variables, n_models)
        outs = []
        for lo in range(0, len(x), batch):
            xb = np.asarray(x[lo : lo + batch])
            pad = batch - len(xb) if len(x) > batch else 0
            if pad:
                xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            out = predict(xb)
            outs.append(out[:, : out.shape[1] - pad] if pad else out)
        if not outs:
            return np.zeros((n_models, 0, self.num_classes), np.float32)
        return np.concatenate(outs, axis=1)


__all__ = ["StackedPredictor", "prediction_variables"]
