"""Transfer learning for SISA: a frozen feature extractor shared by all shards.

The paper's ImageNet setting trains only small per-shard heads on top of a feature extractor that
all constituent models share. Here (nothing may be downloaded) the extractor is a small network
pretrained on a designated **public split**: a fixed, keyed-hash-chosen set of training ids that
is removed from the SISA training set before anything else happens. The data is mapped through
the frozen extractor once; SISA then trains, checkpoints and unlearns only the heads (a
``linear`` or small ``mlp`` model from :mod:`sisajax.models`) on those features.

Why the extractor is never retrained on deletion: it has only ever seen the public split, and no
public id is a training id of the SISA run (``sj.forget`` rejects them as unknown ids). Deleting a
SISA training point therefore cannot change what the extractor would have been had that point
never existed, so exact unlearning only needs the heads of the affected shards to be retrained,
which ``sj.forget`` already does. (Were the extractor trained on deletable data, every deletion
would require retraining it and then every head: no SISA speed-up at all.) The features of a
deletable point are inputs, not model state: they leave the run with the point's row. The
features are standardised with the embedding's mean and standard deviation over the public split,
which are part of the frozen function for the same reason.

Typical use::

    ds = sj.load_dataset("fashion_mnist")
    sisa_ds, public = split_public(ds, fraction=0.1, seed=0)
    ex = pretrain_extractor(public, ExtractorConfig(name="cnn", epochs=5))
    feats = extract_features(ex, sisa_ds)           # same ids, x: [N, embed_dim] float32
    run, cost = sj.train(cfg_with_linear_head, feats, "runs/transfer")

Everything is deterministic: the public split is a pure function of ``(seed, id)``, pretraining
draws its initial parameters from ``PRNGKey(seed)`` and its batch order from keyed hashes of the
public ids, so the same inputs on the same backend give bit-identical extractor parameters and
features.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sisajax.config import ConfigError
from sisajax.data.datasets import DataError, Dataset
from sisajax.data.partition import hash64, uniform_hash

PyTree = Any
_PUBLIC_STREAM = 0x9AB11C  # keyed-hash stream of the public split (independent of partitions)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class ExtractorConfig:
    """How the frozen feature extractor is built and pretrained on the public split.

    Attributes:
      name: ``cnn`` (images ``[H, W]``/``[H, W, C]``, or flat square images) or ``mlp`` (any
        feature shape, flattened).
      conv_features: channels of the 3x3 conv layers (``cnn``), each followed by 2x2 avg-pooling.
      hidden: hidden layer sizes before the embedding (``mlp``).
      embed_dim: D, the size of the extracted feature vector (ReLU activations).
      epochs: pretraining epochs over the public split.
      batch_size: pretraining batch size (the last partial batch of each epoch is dropped).
      learning_rate: Adam learning rate for pretraining.
      seed: parameter init and batch order.
    """

    name: str = "cnn"
    conv_features: tuple[int, ...] = (16, 32)
    hidden: tuple[int, ...] = ()
    embed_dim: int = 64
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv_features", tuple(int(f) for f in self.conv_features))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.name not in _EXTRACTORS:
            raise ConfigError(
                f"unknown extractor {self.name!r}; available: {', '.join(sorted(_EXTRACTORS))}"
            )
        if self.embed_dim < 1 or self.batch_size < 1 or self.epochs < 0:
            raise ConfigError("extractor embed_dim and batch_size must be >= 1, epochs >= 0")
        if not self.learning_rate > 0:
            raise ConfigError(f"extractor learning_rate must be > 0, got {self.learning_rate}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExtractorConfig:
        """Build from a plain dict (e.g. a YAML ``features`` section); unknown keys fail."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(d) - names
        if bad:
            raise ConfigError(f"unknown extractor keys {sorted(bad)} (known: {sorted(names)})")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["conv_features"] = list(self.conv_features)
        d["hidden"] = list(self.hidden)
        return d


# ---------------------------------------------------------------------------------------------
# Models: an embedding network with a classification layer used only during pretraining


class ConvExtractor(nn.Module):
    """``[B, H, W, C]`` float images -> ``[B, embed_dim]`` ReLU features (or class logits)."""

    conv_features: Sequence[int]
    embed_dim: int
    num_classes: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, features_only: bool = False) -> jnp.ndarray:
        for f in self.conv_features:
            x = nn.relu(nn.Conv(f, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(self.embed_dim)(x.reshape((x.shape[0], -1))))
        if features_only:
            return x
        return nn.Dense(self.num_classes)(x)


class DenseExtractor(nn.Module):
    """``[B, F]`` float features -> ``[B, embed_dim]`` ReLU features (or class logits)."""

    hidden: Sequence[int]
    embed_dim: int
    num_classes: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, features_only: bool = False) -> jnp.ndarray:
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        x = nn.relu(nn.Dense(self.embed_dim)(x))
        if features_only:
            return x
        return nn.Dense(self.num_classes)(x)


_EXTRACTORS: dict[str, Callable[[ExtractorConfig, int], nn.Module]] = {
    "cnn": lambda c, k: ConvExtractor(c.conv_features, c.embed_dim, k),
    "mlp": lambda c, k: DenseExtractor(c.hidden, c.embed_dim, k),
}


def register_extractor(name: str, factory: Callable[[ExtractorConfig, int], nn.Module]) -> None:
    """Register ``factory(config, num_classes) -> module``; the module's ``__call__`` must take
    ``(x, features_only: bool)`` and return ``[B, D]`` features when ``features_only``."""
    _EXTRACTORS[name] = factory


# ---------------------------------------------------------------------------------------------
# Inputs


def input_scale(x: np.ndarray) -> float:
    """1/255 for uint8 pixel data (values above 1), else 1 (binary or float features)."""
    if x.dtype == np.uint8 and x.size and int(x.max()) > 1:
        return 1.0 / 255.0
    return 1.0


def _as_model_input(x: np.ndarray, name: str, scale: float) -> np.ndarray:
    """``[N, *feat]`` stored features -> float32 model input (``[N, H, W, C]`` for ``cnn``)."""
    x = np.asarray(x, dtype=np.float32) * np.float32(scale)
    if name != "cnn":
        return x.reshape((len(x), -1))
    if x.ndim == 3:
        return x[..., None]
    if x.ndim == 4:
        return x
    if x.ndim == 2:
        side = math.isqrt(x.shape[1])
        if side * side == x.shape[1]:
            return x.reshape((len(x), side, side, 1))
    raise DataError(
        f"the cnn extractor needs images [N, H, W(, C)] or flat square images, got {x.shape[1:]}; "
        "use extractor name 'mlp' for other features"
    )


def scale_features(ds: Dataset, scale: float) -> Dataset:
    """The same data set with features ``float32(x) * scale`` (e.g. 1/255 for pixels)."""
    return dataclasses.replace(
        ds,
        x_train=ds.x_train.astype(np.float32) * np.float32(scale),
        x_test=ds.x_test.astype(np.float32) * np.float32(scale),
    )


# ---------------------------------------------------------------------------------------------
# The public split


def public_mask(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``[N]`` bool: which training ids belong to the public split (pure function of seed, id)."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"public_fraction must be in (0, 1), got {fraction}")
    return uniform_hash(np.asarray(ids, np.int64), seed, stream=_PUBLIC_STREAM) < fraction


def split_public(ds: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split the training ids into (SISA training set, public split); both keep the test split.

    The public split is never handed to SISA, so it is never subject to deletion; pretrain the
    extractor on it.

    Returns:
      ``(sisa_ds, public_ds)``: the same data set restricted to the non-public / public training
      rows (ids unchanged).
    """
    pub = public_mask(ds.train_ids, fraction, seed)
    if pub.all() or not pub.any():
        raise DataError(
            f"public_fraction={fraction} leaves {int(pub.sum())} public and "
            f"{int((~pub).sum())} SISA training ids; both must be non-empty"
        )

    def take(m: np.ndarray) -> Dataset:
        return dataclasses.replace(
            ds, train_ids=ds.train_ids[m], x_train=ds.x_train[m], y_train=ds.y_train[m]
        )

    return take(~pub), take(pub)


# ---------------------------------------------------------------------------------------------
# Pretraining and extraction


@dataclasses.dataclass
class Extractor:
    """A pretrained, frozen feature extractor.

    Attributes:
      config: how it was built.
      params: its Flax parameters (classification layer included, unused for features).
      scale: multiplier applied to stored features before the network (1/255 for pixels).
      input_shape: shape of one stored example it accepts.
      num_classes: classes of the pretraining task.
      public_ids: ``[P]`` the ids it was trained on (never SISA training ids).
      stats: pretraining facts (steps, seconds, public/test accuracy).
      feature_mean, feature_std: ``[D]`` statistics of the embedding over the public split;
        :meth:`__call__` standardises with them (part of the frozen function: computed from
        public data only, so they never depend on a deletable point).
    """

    config: ExtractorConfig
    params: PyTree
    scale: float
    input_shape: tuple[int, ...]
    num_classes: int
    public_ids: np.ndarray
    stats: dict[str, Any]
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None

    @property
    def module(self) -> nn.Module:
        return _EXTRACTORS[self.config.name](self.config, self.num_classes)

    def fingerprint(self) -> str:
        """sha256 over the parameter bytes (names exactly the frozen function)."""
        h = hashlib.sha256()
        for leaf in [*jax.tree.leaves(self.params), self.feature_mean, self.feature_std]:
            if leaf is not None:
                h.update(np.asarray(leaf).tobytes())
        return h.hexdigest()

    def embed(self, x: np.ndarray, batch: int = 2048) -> np.ndarray:
        """``[M, *input_shape]`` -> ``[M, embed_dim]`` raw (unstandardised) ReLU embeddings."""
        return _apply(self, x, batch, features_only=True)

    def __call__(self, x: np.ndarray, batch: int = 2048) -> np.ndarray:
        """``[M, *input_shape]`` stored features -> ``[M, embed_dim]`` float32 features,
        standardised by the public split's statistics."""
        f = self.embed(x, batch)
        if self.feature_mean is not None and self.feature_std is not None:
            f = (f - self.feature_mean) / self.feature_std
        return f.astype(np.float32)

    def logits(self, x: np.ndarray, batch: int = 2048) -> np.ndarray:
        """``[M, num_classes]`` logits of the pretraining head (for checking the extractor)."""
        return _apply(self, x, batch, features_only=False)


@functools.lru_cache(maxsize=16)
def _apply_fn(config: ExtractorConfig, num_classes: int, features_only: bool) -> Callable:
    """One jitted apply per (extractor config, classes, output): compiled once per batch shape."""
    module = _EXTRACTORS[config.name](config, num_classes)
    return jax.jit(lambda p, xb: module.apply(p, xb, features_only=features_only))


def _apply(ex: Extractor, x: np.ndarray, batch: int, *, features_only: bool) -> np.ndarray:
    x = np.asarray(x)
    if tuple(x.shape[1:]) != ex.input_shape:
        raise DataError(f"extractor expects examples of shape {ex.input_shape}, got {x.shape[1:]}")
    fn = _apply_fn(ex.config, ex.num_classes, features_only)
    out = []
    for lo in range(0, len(x), batch):
        xb = _as_model_input(x[lo : lo + batch], ex.config.name, ex.scale)
        pad = batch - len(xb) if len(x) > batch else 0  # one shape for every batch
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
        res = np.asarray(fn(ex.params, xb))
        out.append(res[: len(res) - pad] if pad else res)
    if not out:
        width = ex.config.embed_dim if features_only else ex.num_classes
        return np.zeros((0, width), np.float32)
    return np.concatenate(out).astype(np.float32)


def pretrain_extractor(public: Dataset, config: ExtractorConfig) -> Extractor:
    """Pretrain an extractor (with a temporary classification layer) on ``public``'s training rows.

    Adam, softmax cross-entropy, ``config.epochs`` epochs of full batches; batch order per epoch is
    a keyed hash of the public ids by ``(seed, epoch)``. Deterministic for fixed inputs.

    Args:
      public: the public split (``split_public``); its test split is used only to report the
        extractor's own accuracy.
      config: the extractor configuration.

    Returns:
      the frozen :class:`Extractor`.
    """
    t0 = time.perf_counter()
    x_in = _as_model_input(public.x_train[:1], config.name, 1.0)  # shape check before training
    scale = input_scale(public.x_train)
    module = _EXTRACTORS[config.name](config, public.num_classes)
    params = module.init(jax.random.PRNGKey(config.seed), jnp.asarray(x_in))
    tx = optax.adam(config.learning_rate)

    def loss_fn(p, xb, yb):
        logits = module.apply(p, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    # A Python loop of jitted steps: on XLA:CPU a lax.scan over conv steps ran ~6x slower.
    @jax.jit
    def step(p, opt, x_all, y_all, idx):
        grads = jax.grad(loss_fn)(p, x_all[idx], y_all[idx])
        upd, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, upd), opt

    opt = tx.init(params)
    x_all = jnp.asarray(_as_model_input(public.x_train, config.name, scale))
    y_all = jnp.asarray(public.y_train)
    n, b = len(public.train_ids), min(config.batch_size, len(public.train_ids))
    per_epoch = n // b
    for epoch in range(config.epochs):
        order = np.argsort(hash64(public.train_ids, config.seed, 0xEB0C, epoch), kind="stable")
        batches = jnp.asarray(order[: per_epoch * b].reshape(per_epoch, b).astype(np.int32))
        for t in range(per_epoch):
            params, opt = step(params, opt, x_all, y_all, batches[t])
    steps = per_epoch * config.epochs
    params = jax.device_get(params)
    ex = Extractor(
        config,
        params,
        scale,
        tuple(public.x_train.shape[1:]),
        public.num_classes,
        np.sort(public.train_ids),
        {},
    )
    emb = ex.embed(public.x_train)
    ex.feature_mean = emb.mean(0).astype(np.float32)
    ex.feature_std = np.maximum(emb.std(0), 1e-3).astype(np.float32)  # dead units stay ~0
    ex.stats = {
        "public_examples": int(n),
        "steps": steps,
        "pretrain_s": time.perf_counter() - t0,
        "public_accuracy": float(np.mean(ex.logits(public.x_train).argmax(-1) == public.y_train)),
        "test_accuracy": float(np.mean(ex.logits(public.x_test).argmax(-1) == public.y_test))
        if len(public.y_test)
        else float("nan"),
    }
    return ex


def extract_features(extractor: Extractor, ds: Dataset, batch: int = 2048) -> Dataset:
    """Map ``ds`` through the frozen extractor once, keeping every id, label and the split.

    Args:
      extractor: a pretrained :class:`Extractor`.
      ds: the data to map (its training ids must not include public ids).
      batch: examples per extractor call.

    Returns:
      a :class:`Dataset` named ``<name>+<extractor>`` with ``x_train [N, D]`` and ``x_test [M, D]``
      float32 features, the same ids and labels.

    Raises:
      DataError: a training id of ``ds`` is one of the extractor's public ids (it would make a
        deletable point part of the frozen extractor).
    """
    leak = np.intersect1d(ds.train_ids, extractor.public_ids)
    if leak.size:
        raise DataError(
            f"{leak.size} training ids were used to pretrain the extractor (e.g. "
            f"{leak[:5].tolist()}); remove the public split first (split_public)"
        )
    return dataclasses.replace(
        ds,
        name=f"{ds.name}+{extractor.config.name}",
        x_train=extractor(ds.x_train, batch),
        x_test=extractor(ds.x_test, batch),
    )


def transfer_dataset(
    ds: Dataset, config: ExtractorConfig, public_fraction: float, public_seed: int = 0
) -> tuple[Dataset, Extractor, dict[str, Any]]:
    """Split off the public split, pretrain the extractor on it, and map the rest through it.

    Returns:
      ``(features, extractor, stats)``: the SISA training set as features (public ids removed,
      test split kept), the frozen extractor, and timings/sizes for reports.
    """
    sisa_ds, public = split_public(ds, public_fraction, public_seed)
    ex = pretrain_extractor(public, config)
    t0 = time.perf_counter()
    feats = extract_features(ex, sisa_ds)
    stats = {
        **ex.stats,
        "extract_s": time.perf_counter() - t0,
        "sisa_train_examples": len(feats.train_ids),
        "public_fraction": public_fraction,
        "public_seed": public_seed,
        "embed_dim": config.embed_dim,
        "fingerprint": ex.fingerprint(),
    }
    return feats, ex, stats


__all__ = [
    "ConvExtractor",
    "DenseExtractor",
    "Extractor",
    "ExtractorConfig",
    "extract_features",
    "input_scale",
    "pretrain_extractor",
    "public_mask",
    "register_extractor",
    "scale_features",
    "split_public",
    "transfer_dataset",
]
