"""Data augmentation of image batches, as pure functions of (batch, key).

A train step calls :func:`augment_batch` on its (preprocessed) batch with a key derived from
(seed, shard, slice, step): the augmented batch is then a pure function of those, so retraining a
shard after a deletion replays exactly the batches that training saw.

The compiled program is pads, per-example windows (``dynamic_slice`` under ``vmap``, a gather),
reversals and selects: no scatter and no conditional, so it runs unchanged under ``jit`` and
``vmap`` (across shards) on every backend, and each example's bits depend only on its own image
and key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sisajax.config import ConfigError

_KINDS = ("none", "crop_flip")


def augment_kinds() -> tuple[str, ...]:
    """The augmentation kinds :func:`augment_batch` accepts."""
    return _KINDS


def crop_flip_params(
    key: jax.Array, batch: int, pad: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The random choices of ``crop_flip`` for a batch of ``batch`` images.

    Example i draws three 32-bit words from ``fold_in(key, i)`` only (so its choices do not
    depend on the batch size): offsets are words modulo ``2 * pad + 1`` (bias below 1e-8), the
    flip is the top bit of the third.

    Returns:
      ``(dy, dx, flip)``: ``[batch]`` int32 crop offsets, uniform in ``[0, 2 * pad]``, and
      ``[batch]`` bool, True (probability 1/2) where the crop is flipped left-right.
    """

    def one(i: jax.Array) -> jax.Array:
        return jax.random.bits(jax.random.fold_in(key, i), (3,), jnp.uint32)

    words = jax.vmap(one)(jnp.arange(batch, dtype=jnp.int32))
    n = jnp.uint32(2 * pad + 1)
    dy, dx = ((words[:, j] % n).astype(jnp.int32) for j in (0, 1))
    return dy, dx, (words[:, 2] >> 31) == 1


def crop_flip(
    x: jax.Array, dy: jax.Array, dx: jax.Array, flip: jax.Array, *, pad: int
) -> jax.Array:
    """Zero-pad ``x`` by ``pad`` pixels on each side of H and W, crop ``H x W`` at ``(dy, dx)``,
    flip left-right where ``flip``.

    Args:
      x: ``[B, H, W]`` or ``[B, H, W, C]`` images.
      dy, dx: ``[B]`` int offsets into the padded image, in ``[0, 2 * pad]``.
      flip: ``[B]`` bool.

    Returns:
      ``[B, H, W(, C)]``, same dtype: ``out[b, i, j] = padded[b, dy + i, dx + j]``, or
      ``padded[b, dy + i, dx + W - 1 - j]`` where flipped.
    """
    if pad:
        widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 3)
        size = x.shape[1:]
        rest = (0,) * (x.ndim - 3)

        def window(img: jax.Array, y0: jax.Array, x0: jax.Array) -> jax.Array:
            return lax.dynamic_slice(img, (y0, x0, *rest), size)

        x = jax.vmap(window)(jnp.pad(x, widths), dy.astype(jnp.int32), dx.astype(jnp.int32))
    f = flip.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(f, jnp.flip(x, axis=2), x)


def augment_batch(x: jax.Array, key: jax.Array, *, kind: str, pad: int) -> jax.Array:
    """Augment a batch of images; a pure function of ``(x, key)``.

    Args:
      x: ``[B, H, W]`` or ``[B, H, W, C]`` float32 images (after the data set's preprocessing;
        padding pixels are 0 in that space).
      key: a PRNG key; example i uses ``fold_in(key, i)``.
      kind: ``none`` (returns ``x``) or ``crop_flip`` (random ``H x W`` crop of the image
        zero-padded by ``pad`` pixels, offsets uniform in ``[0, 2 * pad]``, then a left-right
        flip with probability 1/2; see :func:`crop_flip`).
      pad: padding in pixels (>= 0; 0: flips only).

    Returns:
      ``[B, H, W(, C)]``, the same shape and dtype as ``x``.
    """
    if kind not in _KINDS:
        raise ConfigError(f"augmentation kind must be one of {', '.join(_KINDS)}; got {kind!r}")
    if kind == "none":
        return x
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ConfigError(f"augmentation pad must be an integer >= 0, got {pad!r}")
    if x.ndim not in (3, 4):
        raise ValueError(f"crop_flip needs images [B, H, W] or [B, H, W, C], got shape {x.shape}")
    dy, dx, flip = crop_flip_params(key, x.shape[0], pad)
    return crop_flip(x, dy, dx, flip, pad=pad)


__all__ = ["augment_batch", "augment_kinds", "crop_flip", "crop_flip_params"]
