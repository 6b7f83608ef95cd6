"""Seeded data generators (no download, no file): the same parameters give the same bytes on
every machine.

  * ``purchase_synthetic``: shaped like Purchase-100 (600 binary features, 100 classes from
    prototype shoppers plus noise), with its exact Bayes-optimal test accuracy
    (:func:`bayes_accuracy`): the ceiling no classifier beats in expectation.
  * ``cifar_synthetic``: shaped like CIFAR-10 (uint8 images ``[32, 32, 3]``, 10 classes of
    translated colour textures plus clutter and noise).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sisajax.data.datasets import DataError, Dataset, register_dataset


def _check_seed(name: str, seed: Any) -> None:
    """``DataError`` naming ``data.params.seed`` unless ``seed`` is an integer >= 0 (what numpy's
    ``SeedSequence`` takes)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"{name}: data.params.seed must be an integer >= 0, got {seed!r}")


def _first_rows_train(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    n_train: int,
    num_classes: int,
    preprocessing: dict[str, float] | None = None,
) -> Dataset:
    """Generated rows ``[n, ...]`` with ids ``0..n-1``: the first ``n_train`` train, the rest
    test."""
    ids = np.arange(len(x), dtype=np.int64)
    t = slice(None, n_train), slice(n_train, None)
    return Dataset(
        name,
        ids[t[0]],
        x[t[0]],
        y[t[0]],
        ids[t[1]],
        x[t[1]],
        y[t[1]],
        num_classes,
        dict(preprocessing or {}),
    )


@register_dataset("purchase_synthetic")
def make_purchase_synthetic(
    n_train: int = 10_000,
    n_test: int = 2_000,
    num_features: int = 600,
    num_classes: int = 100,
    items_per_prototype: int = 60,
    keep_prob: float = 0.7,
    noise_prob: float = 0.02,
    seed: int = 0,
    modes: int = 1,
    groups: int = 20,
    shared_items: int = 0,
) -> Dataset:
    """A seeded generator shaped like Purchase-100 (binary "items bought" vectors).

    Each class is a prototype shopper: a random basket of ``items_per_prototype`` items. A sample
    keeps each prototype item with probability ``keep_prob`` and adds each other item with
    probability ``noise_prob``. Features are uint8 0/1, ``[n, num_features]``.

    The defaults are easy (a nearest-class-mean classifier reaches 100%). The harder variant
    (``data=purchase_hard``) gives every class ``modes`` different baskets (shoppers of one class
    buy different things) and makes the classes of each of ``groups`` groups share
    ``shared_items`` items, so classes overlap: a single MLP reaches ~87-90%.
    """
    if n_train < 1 or n_test < 0:
        raise DataError("purchase_synthetic: n_train must be >= 1 and n_test >= 0")
    if modes < 1 or groups < 1 or not 0 <= shared_items < items_per_prototype:
        raise DataError(
            "purchase_synthetic: modes and groups must be >= 1 and 0 <= shared_items < "
            "items_per_prototype"
        )
    _check_seed("purchase_synthetic", seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9C4A5E]))
    n = n_train + n_test
    protos = _purchase_prototypes(
        rng, num_features, num_classes, items_per_prototype, modes, groups, shared_items
    )
    y = rng.integers(0, num_classes, size=n).astype(np.int32)
    if modes == 1 and shared_items == 0:  # the original generator, stream for stream
        basket = protos[y, 0]
    else:
        basket = protos[y, rng.integers(0, modes, size=n)]
    keep = rng.random((n, num_features), dtype=np.float32) < keep_prob
    noise = rng.random((n, num_features), dtype=np.float32) < noise_prob
    x = np.where(basket, keep, noise).astype(np.uint8)
    return _first_rows_train("purchase_synthetic", x, y, n_train, num_classes)


def _purchase_prototypes(
    rng: np.random.Generator,
    num_features: int,
    num_classes: int,
    items_per_prototype: int,
    modes: int,
    groups: int,
    shared_items: int,
) -> np.ndarray:
    """The baskets of :func:`make_purchase_synthetic`, drawn from ``rng`` first (so the rest of
    the stream is unchanged): ``[num_classes, modes, num_features]`` bool, True = in the basket."""
    if modes == 1 and shared_items == 0:  # the original generator, stream for stream
        protos = np.zeros((num_classes, 1, num_features), dtype=bool)
        for c in range(num_classes):
            protos[c, 0, rng.choice(num_features, size=items_per_prototype, replace=False)] = True
        return protos
    pools = [rng.choice(num_features, size=shared_items, replace=False) for _ in range(groups)]
    protos = np.zeros((num_classes, modes, num_features), dtype=bool)
    for c in range(num_classes):
        pool = pools[c % groups]
        rest = np.setdiff1d(np.arange(num_features), pool)
        for m in range(modes):
            protos[c, m, pool] = True
            own = rng.choice(rest, size=items_per_prototype - shared_items, replace=False)
            protos[c, m, own] = True
    return protos


def purchase_class_conditionals(**params: Any) -> np.ndarray:
    """The class-conditional model of ``purchase_synthetic`` with these parameters (defaults as
    :func:`make_purchase_synthetic`), regenerated from its seed.

    Returns:
      ``[num_classes, modes, num_features]`` float64: P(feature = 1 | class, mode); features are
      independent given (class, mode), and class and mode are uniform.
    """
    import inspect

    try:
        bound = inspect.signature(make_purchase_synthetic).bind(**params)
    except TypeError as e:
        raise DataError(f"bad parameters for data set 'purchase_synthetic': {e}") from e
    bound.apply_defaults()
    a = bound.arguments
    make_purchase_synthetic(**{**a, "n_train": 1, "n_test": 0})  # the generator's own checks
    rng = np.random.default_rng(np.random.SeedSequence([a["seed"], 0x9C4A5E]))
    protos = _purchase_prototypes(
        rng,
        a["num_features"],
        a["num_classes"],
        a["items_per_prototype"],
        a["modes"],
        a["groups"],
        a["shared_items"],
    )
    return np.where(protos, float(a["keep_prob"]), float(a["noise_prob"]))


def bernoulli_mixture_bayes_accuracy(
    x: np.ndarray, y: np.ndarray, probs: np.ndarray, chunk: int = 4096
) -> float:
    """Accuracy of the Bayes-optimal classifier on ``(x, y)`` when, given the class, the features
    are a uniform mixture over modes of independent Bernoulli variables; classes are uniform.

    Args:
      x: ``[N, F]`` binary features.
      y: ``[N]`` labels in ``[0, C)``.
      probs: ``[C, M, F]`` P(feature = 1 | class, mode), 0 and 1 allowed (exact: a feature value
        with probability 0 rules the (class, mode) out).
      chunk: examples per block (memory ``chunk x C x M`` float64).

    Returns:
      the mean over examples of 1 / (number of classes of maximal posterior) when the label is
      one of them, else 0: the exact posterior's argmax, ties broken uniformly at random (in
      expectation).
    """
    c, m, f = probs.shape
    p = probs.reshape(c * m, f).astype(np.float64)
    with np.errstate(divide="ignore"):
        log1, log0 = np.log(p), np.log1p(-p)
    never1, never0 = (p == 0.0).astype(np.float64), (p == 1.0).astype(np.float64)
    log1[p == 0.0] = 0.0  # the impossible cases are counted apart, so no 0 * -inf arises
    log0[p == 1.0] = 0.0
    credit = 0.0
    for start in range(0, len(x), chunk):
        xb = np.asarray(x[start : start + chunk], np.float64)
        ll = xb @ log1.T + (1.0 - xb) @ log0.T  # [n, C * M]
        impossible = xb @ never1.T + (1.0 - xb) @ never0.T > 0
        ll[impossible] = -np.inf
        ll = ll.reshape(len(xb), c, m)
        top = ll.max(axis=2, keepdims=True)
        safe = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):
            post = safe[..., 0] + np.log(np.exp(ll - safe).sum(axis=2))  # log p(x | class) + const
        best = post.max(axis=1, keepdims=True)
        tol = 1e-9 * np.maximum(1.0, np.abs(best))
        winners = post >= best - tol
        yb = np.asarray(y[start : start + chunk])
        hit = winners[np.arange(len(xb)), yb]
        credit += float((hit / winners.sum(axis=1)).sum())
    return credit / max(len(x), 1)


def bayes_accuracy(name: str, **params: Any) -> float:
    """The Bayes-optimal accuracy on the test split of a generated data set: the accuracy of the
    classifier that knows the generator's class-conditional distributions (regenerated from the
    seed), computed exactly per test example. No model can beat it in expectation.

    Supported: ``purchase_synthetic`` (see :func:`has_bayes_accuracy`).

    Raises:
      DataError: the data set has no known class-conditional model, or bad parameters.
    """
    if name != "purchase_synthetic":
        raise DataError(f"no Bayes-optimal accuracy is known for data set {name!r}")
    probs = purchase_class_conditionals(**params)
    ds = make_purchase_synthetic(**params)
    return bernoulli_mixture_bayes_accuracy(ds.x_test, ds.y_test, probs)


def has_bayes_accuracy(name: str) -> bool:
    """Whether :func:`bayes_accuracy` knows the data set's generator."""
    return name == "purchase_synthetic"


# ---------------------------------------------------------------------------------------------
# CIFAR-shaped generator

_CIFAR_SIDE = 32
_CIFAR_CHUNK = 4096  # ids generated per random stream: an image depends only on (seed, id)


def _fourier_basis(side: int, max_freq: int) -> tuple[np.ndarray, np.ndarray]:
    """Low-frequency 2-D Fourier basis on a ``side x side`` torus.

    Returns:
      ``omega [F, 2]`` angular frequencies (every ``(ky, kx)`` with ``0 <= ky, kx <= max_freq``
      except ``(0, 0)``) and ``basis [2F, side * side]`` float32: ``cos(omega . p)`` rows, then
      ``-sin(omega . p)`` rows, for the pixel positions p in row-major order.
    """
    k = np.array([(a, b) for a in range(max_freq + 1) for b in range(max_freq + 1)][1:])
    omega = 2.0 * np.pi * k / side
    yy, xx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    phase = omega[:, :1] * yy.reshape(1, -1) + omega[:, 1:] * xx.reshape(1, -1)
    return omega, np.concatenate([np.cos(phase), -np.sin(phase)]).astype(np.float32)


@register_dataset("cifar_synthetic")
def make_cifar_synthetic(
    n_train: int = 50_000,
    n_test: int = 10_000,
    num_classes: int = 10,
    prototypes: int = 3,
    max_freq: int = 3,
    shift: int = 8,
    clutter: float = 0.8,
    noise: float = 0.35,
    seed: int = 0,
) -> Dataset:
    """A seeded generator shaped like CIFAR-10: uint8 images ``[n, 32, 32, 3]``, 10 classes.

    Each class has ``prototypes`` smooth colour textures: random sums of the low 2-D frequencies
    ``(ky, kx)``, ``0 <= ky, kx <= max_freq`` (amplitude ~ 1 / (1 + |k|)), plus a mean colour.
    An image is one of its class's textures, translated (periodically) by up to ``shift``
    pixels in each direction, with a random contrast (x0.7-1.3) and brightness, class-independent
    smooth clutter (a texture of the same kind, relative amplitude ``clutter``) and per-pixel
    uniform noise (standard deviation ``noise``; a texture's is 1); pixels are
    ``clip(128 + 40 * value)``. The defaults make a task a small CNN learns well above chance but
    not perfectly. Measured with 20,000 training images: nearest class mean 46%, logistic
    regression on pixels (5,000 images) 50%, the ``cnn`` model (features [16, 32], hidden [64],
    Adam 1e-3, batch 128) 84% after 4 epochs.

    Ids are ``0..n_train + n_test - 1`` (train first). Images are drawn in blocks of 4,096 ids,
    each from its own stream of (seed, block), so an id's image and label do not depend on
    ``n_train`` or ``n_test``. The model sees ``pixels / 255`` (``preprocessing``).
    """
    if n_train < 1 or n_test < 0:
        raise DataError("cifar_synthetic: n_train must be >= 1 and n_test >= 0")
    if num_classes < 2 or prototypes < 1 or max_freq < 1 or shift < 0:
        raise DataError(
            "cifar_synthetic: num_classes >= 2, prototypes >= 1, max_freq >= 1 and shift >= 0"
        )
    if clutter < 0 or noise < 0:
        raise DataError("cifar_synthetic: clutter and noise must be >= 0")
    _check_seed("cifar_synthetic", seed)
    side, ch = _CIFAR_SIDE, 3
    omega, basis = _fourier_basis(side, max_freq)
    nf = len(omega)
    decay = (1.0 / (1.0 + np.hypot(omega[:, 0], omega[:, 1]) * side / (2 * np.pi))).astype(
        np.float32
    )
    decay /= np.sqrt(np.sum(decay**2))  # a texture's pixels then have variance 1
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC1FA, 0]))
    # texture coefficients [class, prototype, channel, (cos | sin) x frequency] and mean colours
    protos = rng.standard_normal((num_classes, prototypes, ch, 2, nf), dtype=np.float32) * decay
    colours = rng.uniform(-0.5, 0.5, (num_classes, prototypes, ch)).astype(np.float32)

    n = n_train + n_test
    x = np.empty((n, side, side, ch), dtype=np.uint8)
    y = np.empty(n, dtype=np.int32)
    for start in range(0, n, _CIFAR_CHUNK):
        stop = min(start + _CIFAR_CHUNK, n)
        block = start // _CIFAR_CHUNK
        r = np.random.default_rng(np.random.SeedSequence([seed, 0xC1FA, 1, block]))
        m = _CIFAR_CHUNK  # draw a full block, keep the first rows: ids stay put
        yc = r.integers(0, num_classes, size=m)
        pc = r.integers(0, prototypes, size=m)
        s = r.integers(-shift, shift + 1, size=(m, 2)).astype(np.float32)
        gain = r.uniform(0.7, 1.3, size=(m, 1, 1)).astype(np.float32)
        bright = r.normal(0.0, 0.2, size=(m, 1, 1)).astype(np.float32)
        junk = r.standard_normal((m, ch, 2, nf), dtype=np.float32) * (clutter * decay)
        eps = r.random((m, ch, side * side), dtype=np.float32)
        rows = slice(0, stop - start)
        # translating a texture by s rotates each frequency's (cos, sin) pair by -omega . s
        theta = (s[rows] @ omega.T.astype(np.float32))[:, None, :]  # [m, 1, F]
        c, si = np.cos(theta), np.sin(theta)
        a, b = protos[yc[rows], pc[rows], :, 0], protos[yc[rows], pc[rows], :, 1]
        coef = np.concatenate([a * c + b * si, b * c - a * si], axis=-1)  # [m, ch, 2F]
        coef += junk[rows].reshape(-1, ch, 2 * nf)
        # pixel = 128 + 40 * (gain * texture + colour + brightness + noise), in place
        img = (coef.reshape(-1, 2 * nf) @ basis).reshape(-1, ch, side * side)
        img *= 40.0 * gain[rows]
        amp = np.float32(40.0 * noise * np.sqrt(12.0))  # uniform noise of std 40 * noise
        img += 128.0 + 40.0 * (colours[yc[rows], pc[rows]][..., None] + bright[rows]) - amp / 2
        eps *= amp
        img += eps[rows]
        np.clip(np.rint(img, out=img), 0, 255, out=img)
        x[start:stop] = img.reshape(-1, ch, side, side).transpose(0, 2, 3, 1)
        y[start:stop] = yc[rows]
    return _first_rows_train("cifar_synthetic", x, y, n_train, num_classes, {"scale": 1.0 / 255.0})


__all__ = [
    "bayes_accuracy",
    "bernoulli_mixture_bayes_accuracy",
    "has_bayes_accuracy",
    "make_cifar_synthetic",
    "make_purchase_synthetic",
    "purchase_class_conditionals",
]
