"""Residual networks for 32x32 images: the CIFAR ResNet-18 and the wide ResNet (WRN-d-k).

Both take images ``[B, H, W]`` or ``[B, H, W, C]`` and return float32 logits ``[B, num_classes]``;
BatchNorm reduces its statistics over the real rows of a batch only (``mask``), so padding rows
never reach them. Their convolutions are computed by ``lax.conv`` or, with ``conv="patches"``, as
the image's patches times the kernel (see :data:`CONV_IMPLS`). Built by name in
:mod:`sisajax.models` (``resnet18``, ``wrn``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

# He initialisation (fan-out, untruncated normal) for the convolutions of the residual networks:
# the usual choice for ReLU networks with BatchNorm.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# BatchNorm running statistics: new = 0.9 * old + 0.1 * batch.
_BN_MOMENTUM = 0.9


def _images(x: jnp.ndarray) -> jnp.ndarray:
    """``[B, H, W]`` or ``[B, H, W, C]`` -> ``[B, H, W, C]`` float32."""
    x = x.astype(jnp.float32)
    return x[..., None] if x.ndim == 3 else x


def _batch_norm(x: jnp.ndarray, train: bool, mask: jnp.ndarray | None, dtype: Any) -> jnp.ndarray:
    """BatchNorm over every axis but the last; in training the batch statistics use only the rows
    where ``mask`` (``[B]`` bool) is True, so padding rows never reach the running statistics.

    Creates a submodule: call it only inside a compact ``__call__``.
    """
    m = None if mask is None or not train else mask.reshape((-1,) + (1,) * (x.ndim - 1))
    bn = nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, dtype=dtype)
    return bn(x, mask=m)


# How a residual network computes its convolutions (``model.params.conv``): "xla" is
# ``lax.conv_general_dilated`` (cuDNN on a GPU); "patches" is one matrix product of the image's
# patches with the kernel per layer. Vmapped across shards (one kernel per shard) the first becomes
# a grouped convolution, a slow path on GPUs; the second becomes a batched matrix product.
CONV_IMPLS = ("xla", "patches")


def image_patches(x: jnp.ndarray, kernel: int, strides: int) -> jnp.ndarray:
    """``[B, H, W, C] -> [B, H', W', kernel * kernel * C]``: the ``kernel x kernel`` window at
    every output position (zero padding ``kernel // 2``, stride ``strides``), channels fastest,
    then window column, then window row: the order of a ``[k, k, C, F]`` kernel reshaped to
    ``[k * k * C, F]``. Only pads and strided slices, so its gradient is pads and adds."""
    pad = kernel // 2
    b, h, w, c = x.shape
    ho, wo = (h + 2 * pad - kernel) // strides + 1, (w + 2 * pad - kernel) // strides + 1
    if pad:
        x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    windows = [
        lax.slice(
            x,
            (0, i, j, 0),
            (b, i + strides * (ho - 1) + 1, j + strides * (wo - 1) + 1, c),
            (1, strides, strides, 1),
        )
        for i in range(kernel)
        for j in range(kernel)
    ]
    return windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)


class PatchConv(nn.Module):
    """A bias-free ``kernel x kernel`` convolution ``[B, H, W, C] -> [B, H', W', features]``
    (padding ``kernel // 2``) computed as :func:`image_patches` times the kernel reshaped to
    ``[k * k * C, features]``: the same function and the same ``kernel`` parameter ``[k, k, C,
    features]`` as :class:`flax.linen.Conv`, another summation order. Vmapped across shards it is
    one batched matrix product per layer for all shards."""

    features: int
    kernel: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        shape = (self.kernel, self.kernel, x.shape[-1], self.features)
        k = self.param("kernel", _CONV_INIT, shape, jnp.float32)
        patches = image_patches(x.astype(self.dtype), self.kernel, self.strides)
        return jnp.einsum("bhwk,kf->bhwf", patches, k.astype(self.dtype).reshape(-1, self.features))


def conv2d(features: int, kernel: int, strides: int, dtype: Any, impl: str = "xla") -> nn.Module:
    """A bias-free ``kernel x kernel`` convolution with symmetric padding ``kernel // 2``,
    computed by ``impl`` (one of :data:`CONV_IMPLS`)."""
    if impl == "patches":
        return PatchConv(features, kernel, strides, dtype)
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_CONV_INIT,
    )


def _head(x: jnp.ndarray, num_classes: int, dtype: Any) -> jnp.ndarray:
    """Global average pool ``[B, H, W, C] -> [B, C]``, then a dense layer; float32 logits."""
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32)(x).astype(jnp.float32)


class BasicBlock(nn.Module):
    """ResNet basic block: ``[B, H, W, C] -> [B, H/s, W/s, features]``.

    conv3x3(stride s) - BN - ReLU - conv3x3 - BN, plus the input (through a 1x1 conv and BN when
    the shape changes), then ReLU.
    """

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    conv: str = "xla"

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False, mask: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        y = conv2d(self.features, 3, self.strides, self.dtype, self.conv)(x)
        y = nn.relu(_batch_norm(y, train, mask, self.dtype))
        y = conv2d(self.features, 3, 1, self.dtype, self.conv)(y)
        y = _batch_norm(y, train, mask, self.dtype)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv2d(self.features, 1, self.strides, self.dtype, self.conv)(x)
            x = _batch_norm(x, train, mask, self.dtype)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """The CIFAR ResNet: images ``[B, H, W(, C)]`` -> ``[B, num_classes]`` float32 logits.

    3x3 stem convolution with ``width`` channels (no max-pool), then stage i of ``stages[i]``
    :class:`BasicBlock` s with ``width * 2**i`` channels (stride 1 in the first stage, 2 at the
    start of every later one), global average pool and a dense head. ``width=64`` and
    ``stages=(2, 2, 2, 2)`` is ResNet-18.
    """

    num_classes: int
    width: int = 64
    stages: Sequence[int] = (2, 2, 2, 2)
    dtype: Any = jnp.float32
    conv: str = "xla"

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False, mask: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        x = conv2d(self.width, 3, 1, self.dtype, self.conv)(_images(x))
        x = nn.relu(_batch_norm(x, train, mask, self.dtype))
        for i, blocks in enumerate(self.stages):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                block = BasicBlock(self.width * 2**i, strides, self.dtype, self.conv)
                x = block(x, train, mask)
        return _head(x, self.num_classes, self.dtype)


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block: ``[B, H, W, C] -> [B, H/s, W/s, features]``.

    BN - ReLU - conv3x3(stride s) - BN - ReLU - Dropout - conv3x3, plus the input (through a 1x1
    conv of the pre-activated input when the shape changes).
    """

    features: int
    strides: int = 1
    dropout: float = 0.0
    dtype: Any = jnp.float32
    conv: str = "xla"

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False, mask: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        o = nn.relu(_batch_norm(x, train, mask, self.dtype))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv2d(self.features, 1, self.strides, self.dtype, self.conv)(o)
        y = conv2d(self.features, 3, self.strides, self.dtype, self.conv)(o)
        y = nn.relu(_batch_norm(y, train, mask, self.dtype))
        if self.dropout:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        return x + conv2d(self.features, 3, 1, self.dtype, self.conv)(y)


class WideResNet(nn.Module):
    """WRN-d-k: images ``[B, H, W(, C)]`` -> ``[B, num_classes]`` float32 logits.

    3x3 stem convolution with 16 channels, three groups of n = (d - 4) / 6 :class:`WideBlock` s
    with 16k, 32k, 64k channels (strides 1, 2, 2), BN - ReLU, global average pool, dense head.
    ``depth=16, widen=4`` is WRN-16-4. ``dropout`` (between a block's convolutions) needs the
    ``dropout`` RNG stream in training.
    """

    num_classes: int
    depth: int = 16
    widen: int = 4
    dropout: float = 0.0
    dtype: Any = jnp.float32
    conv: str = "xla"

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False, mask: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        n = (self.depth - 4) // 6
        x = conv2d(16, 3, 1, self.dtype, self.conv)(_images(x))
        for i, strides in enumerate((1, 2, 2)):
            for j in range(n):
                block = WideBlock(
                    16 * 2**i * self.widen,
                    strides if j == 0 else 1,
                    self.dropout,
                    self.dtype,
                    self.conv,
                )
                x = block(x, train, mask)
        x = nn.relu(_batch_norm(x, train, mask, self.dtype))
        return _head(x, self.num_classes, self.dtype)


__all__ = [
    "CONV_IMPLS",
    "BasicBlock",
    "PatchConv",
    "ResNet",
    "WideBlock",
    "WideResNet",
    "conv2d",
    "image_patches",
]
