"""Flax (linen) models by name.

A model is used functionally: ``init(key, x) -> variables`` and ``apply(variables, x) -> logits``.
Built in: ``mlp``, ``cnn`` (small networks for tabular data and small images) and the standard
image networks ``resnet18`` (the CIFAR ResNet-18) and ``wrn`` (a wide ResNet, WRN-16-4 by
default), defined in :mod:`sisajax.resnets`. Register more with :func:`register_model`; configs pick models by name (no import
paths in YAML).

Every model returns float32 logits ``[B, num_classes]``. With ``model.compute_dtype: bfloat16``
convolutions and dense layers compute in bfloat16 while their parameters stay float32; BatchNorm
statistics are always reduced in float32.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sisajax.config import ConfigError, ModelConfig
from sisajax.resnets import CONV_IMPLS, ResNet, WideResNet

_ACTIVATIONS: dict[str, Callable] = {"tanh": jnp.tanh, "relu": nn.relu, "gelu": nn.gelu}
_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class MLP(nn.Module):
    """Fully connected classifier: ``[B, *feat] -> [B, num_classes]`` float32 logits.

    ``dropout`` (after each hidden layer) and ``input_dropout`` are active only in training; their
    keys come from (seed, shard, slice, step), so they stay exact under forgetting.
    """

    hidden: Sequence[int]
    num_classes: int
    activation: str = "tanh"
    dropout: float = 0.0
    input_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        act = _ACTIVATIONS[self.activation]
        x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        if self.input_dropout:
            x = nn.Dropout(self.input_dropout, deterministic=not train)(x)
        for h in self.hidden:
            x = act(nn.Dense(h, dtype=self.dtype)(x))
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class CNN(nn.Module):
    """Small convolutional classifier: images ``[B, H, W]`` or ``[B, H, W, C]`` ->
    ``[B, num_classes]`` float32 logits (3x3 conv + 2x2 average pool per entry of ``features``,
    then dense layers)."""

    features: Sequence[int]
    hidden: Sequence[int]
    num_classes: int
    activation: str = "relu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        act = _ACTIVATIONS[self.activation]
        x = x.astype(jnp.float32)
        if x.ndim == 3:
            x = x[..., None]
        for f in self.features:
            x = act(nn.Conv(f, (3, 3), dtype=self.dtype)(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = act(nn.Dense(h, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Factories: ModelConfig -> module (each refuses model.params keys it does not know)


def _params(cfg: ModelConfig, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``cfg.params``, or :class:`ConfigError` naming the allowed keys if it has others."""
    extra = set(cfg.params) - set(allowed)
    if extra:
        may = ", ".join(allowed) if allowed else "nothing"
        raise ConfigError(f"model.params for {cfg.name} may set {may}; got {sorted(extra)}")
    return cfg.params


def _int_param(params: dict[str, Any], key: str, default: int, lo: int = 1) -> int:
    v = params.get(key, default)
    integral = isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer()
    if not integral or v < lo:
        raise ConfigError(f"model.params.{key} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _rate_param(params: dict[str, Any], key: str) -> float:
    v = params.get(key, 0.0)
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v < 1.0:
        raise ConfigError(f"model.params.{key} must be in [0, 1), got {v!r}")
    return float(v)


def _int_list_param(params: dict[str, Any], key: str, default: Sequence[int]) -> tuple[int, ...]:
    v = params.get(key, default)
    if not isinstance(v, list | tuple) or not v:
        raise ConfigError(f"model.params.{key} must be a non-empty list of integers, got {v!r}")
    return tuple(_int_param({key: e}, key, 1) for e in v)


def _choice_param(params: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    v = params.get(key, choices[0])
    if v not in choices:
        raise ConfigError(f"model.params.{key} must be one of {', '.join(choices)}, got {v!r}")
    return str(v)


def _dtype(cfg: ModelConfig) -> Any:
    return _DTYPES[cfg.compute_dtype]


def _mlp(cfg: ModelConfig, num_classes: int) -> MLP:
    p = _params(cfg, ("dropout", "input_dropout"))
    rates = {k: _rate_param(p, k) for k in ("dropout", "input_dropout")}
    return MLP(tuple(cfg.hidden), num_classes, cfg.activation, **rates, dtype=_dtype(cfg))


def _cnn(cfg: ModelConfig, num_classes: int) -> CNN:
    p = _params(cfg, ("features",))
    features = _int_list_param(p, "features", (16, 32))
    return CNN(features, tuple(cfg.hidden), num_classes, cfg.activation, dtype=_dtype(cfg))


def _resnet18(cfg: ModelConfig, num_classes: int) -> ResNet:
    p = _params(cfg, ("width", "stages", "conv"))
    return ResNet(
        num_classes,
        width=_int_param(p, "width", 64),
        stages=_int_list_param(p, "stages", (2, 2, 2, 2)),
        dtype=_dtype(cfg),
        conv=_choice_param(p, "conv", CONV_IMPLS),
    )


def _wrn(cfg: ModelConfig, num_classes: int) -> WideResNet:
    p = _params(cfg, ("depth", "widen", "dropout", "conv"))
    depth = _int_param(p, "depth", 16, lo=10)
    if (depth - 4) % 6:
        raise ConfigError(
            f"model.params.depth of wrn must be 6n + 4 (10, 16, 22, 28, ...), got {depth}"
        )
    return WideResNet(
        num_classes,
        depth=depth,
        widen=_int_param(p, "widen", 4),
        dropout=_rate_param(p, "dropout"),
        dtype=_dtype(cfg),
        conv=_choice_param(p, "conv", CONV_IMPLS),
    )


_REGISTRY: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet18": _resnet18,
    "wrn": _wrn,
}
BUILTIN_MODELS: tuple[str, ...] = tuple(_REGISTRY)  # the rest come from plug-ins


# Registered models (plug-ins): name -> the model.params keys declared at registration, or None
# (then the keys the factory reads are the allowed ones). Built-in factories validate themselves.
_REGISTERED_PARAMS: dict[str, tuple[str, ...] | None] = {}


def register_model(
    name: str,
    factory: Callable[[ModelConfig, int], nn.Module],
    params: Sequence[str] | None = None,
) -> None:
    """Register ``factory(model_config, num_classes) -> flax module`` under ``name``.

    ``params`` names the ``model.params`` keys the model accepts: any other key is refused before
    the factory is called. Without it, keys the factory never reads (``cfg.params[key]``,
    ``.get(key)``, ``key in``) while building the module are refused after it returns.

    Raises:
      ConfigError: ``params`` is not a list of key names.
    """
    if params is not None:
        if isinstance(params, str) or not all(isinstance(p, str) for p in params):
            raise ConfigError(
                f"register_model({name!r}): params must be a list of key names, got {params!r}"
            )
        params = tuple(params)
    _REGISTRY[name] = factory
    _REGISTERED_PARAMS[name] = params
    package = getattr(factory, "__module__", None) or "__main__"
    if package != "__main__":
        from sisajax.plugins import first_source_hash

        first_source_hash(package.split(".")[0])  # the code registered now, before any edit


class _ReadTracking(dict):
    """``model.params`` handed to a registered factory: a dict that remembers which keys were
    asked for (present or not). Iterating it, or copying it whole, counts as reading every key."""

    def __init__(self, params: dict[str, Any]):
        super().__init__(params)
        self.asked: set[Any] = set()

    def _all(self) -> None:
        self.asked.update(super().keys())

    def __getitem__(self, key: Any) -> Any:
        self.asked.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __contains__(self, key: Any) -> bool:
        self.asked.add(key)
        return super().__contains__(key)

    def pop(self, key: Any, *default: Any) -> Any:
        self.asked.add(key)
        return super().pop(key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.asked.add(key)
        return super().setdefault(key, default)

    def __iter__(self):
        self._all()
        return super().__iter__()

    def keys(self):
        self._all()
        return super().keys()

    def values(self):
        self._all()
        return super().values()

    def items(self):
        self._all()
        return super().items()

    def copy(self) -> dict[str, Any]:
        self._all()
        return dict(super().items())


def code_fingerprint(name: str, module: nn.Module) -> str | None:
    """A sha256 of the code that defines model ``name`` beyond sisajax's own: ``"builtin"`` for
    sisajax's models; for a registered model, the sources of the packages (or files) holding its
    factory and its module's class, as this process first saw them (the factory's when it was
    registered). None when a source cannot be read (e.g. a model defined in a notebook or in
    ``__main__``), or when it changed on disk since: the code this process runs is then not the
    code the files hold, and no hash names it."""
    if name not in _REGISTERED_PARAMS:
        return "builtin"
    from sisajax.plugins import first_source_hash, source_hash

    h = hashlib.sha256()
    for mod in sorted({_REGISTRY[name].__module__, type(module).__module__}):
        if mod == "__main__":
            return None
        package = mod.split(".")[0]
        digest = first_source_hash(package)
        if digest is None or source_hash(package) != digest:
            return None
        h.update(f"{mod}\0{digest}\n".encode())
    return h.hexdigest()


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The Flax module named by ``cfg.name``.

    Raises:
      ConfigError: an unknown model or activation, or ``model.params`` keys the model does not
        take (a registered model's: keys outside its declared ``params``, or never read).
    """
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"unknown model {cfg.name!r}; available: {', '.join(sorted(_REGISTRY))}")
    if cfg.activation not in _ACTIVATIONS:
        raise ConfigError(
            f"unknown activation {cfg.activation!r}; available: {', '.join(sorted(_ACTIVATIONS))}"
        )
    factory = _REGISTRY[cfg.name]
    if cfg.name not in _REGISTERED_PARAMS:
        return factory(cfg, num_classes)
    declared = _REGISTERED_PARAMS[cfg.name]
    if declared is not None:
        _params(cfg, declared)
        return factory(cfg, num_classes)
    tracked = _ReadTracking(cfg.params)
    view = copy.copy(cfg)
    object.__setattr__(view, "params", tracked)  # the frozen config, with reads recorded
    module = factory(view, num_classes)
    _params(cfg, tuple(sorted(k for k in tracked.asked if isinstance(k, str))))
    return module
