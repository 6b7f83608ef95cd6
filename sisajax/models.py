"""Small Flax (linen) models by name.

A model is used functionally: ``init(key, x) -> params`` and ``apply(params, x) -> logits``.
Register more with :func:`register_model`; configs pick models by name (no import paths in YAML).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sisajax.config import ConfigError, ModelConfig

_ACTIVATIONS: dict[str, Callable] = {"tanh": jnp.tanh, "relu": nn.relu, "gelu": nn.gelu}


class MLP(nn.Module):
    """Fully connected classifier: ``[B, *feat] -> [B, num_classes]`` logits.

    ``dropout`` (after each hidden layer) and ``input_dropout`` are active only in training; their
    keys come from (seed, shard, slice, step), so they stay exact under forgetting.
    """

    hidden: Sequence[int]
    num_classes: int
    activation: str = "tanh"
    dropout: float = 0.0
    input_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        act = _ACTIVATIONS[self.activation]
        x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        if self.input_dropout:
            x = nn.Dropout(self.input_dropout, deterministic=not train)(x)
        for h in self.hidden:
            x = act(nn.Dense(h)(x))
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


def _mlp(cfg: ModelConfig, num_classes: int) -> MLP:
    extra = set(cfg.params) - {"dropout", "input_dropout"}
    if extra:
        raise ConfigError(
            f"model.params for mlp may set dropout, input_dropout; got {sorted(extra)}"
        )
    rates = {k: float(cfg.params.get(k, 0.0)) for k in ("dropout", "input_dropout")}
    for k, v in rates.items():
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"model.params.{k} must be in [0, 1), got {v}")
    return MLP(tuple(cfg.hidden), num_classes, cfg.activation, **rates)


class CNN(nn.Module):
    """Small convolutional classifier for images ``[B, H, W]`` or ``[B, H, W, C]``."""

    features: Sequence[int]
    hidden: Sequence[int]
    num_classes: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        act = _ACTIVATIONS[self.activation]
        x = x.astype(jnp.float32)
        if x.ndim == 3:
            x = x[..., None]
        for f in self.features:
            x = act(nn.Conv(f, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = act(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)


_REGISTRY: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": lambda cfg, c: CNN(
        tuple(cfg.params.get("features", (16, 32))), tuple(cfg.hidden), c, cfg.activation
    ),
}


def register_model(name: str, factory: Callable[[ModelConfig, int], nn.Module]) -> None:
    """Register ``factory(model_config, num_classes) -> flax module`` under ``name``."""
    _REGISTRY[name] = factory


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The Flax module named by ``cfg.name``."""
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"unknown model {cfg.name!r}; available: {', '.join(sorted(_REGISTRY))}")
    if cfg.activation not in _ACTIVATIONS:
        raise ConfigError(
            f"unknown activation {cfg.activation!r}; available: {', '.join(sorted(_ACTIVATIONS))}"
        )
    return _REGISTRY[cfg.name](cfg, num_classes)
