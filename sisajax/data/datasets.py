"""Data sets by name: stable int64 ids, features, labels and a fixed train/test split.

Built in (no download at run time):
  * ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).
  * ``purchase_synthetic``: a seeded generator shaped like Purchase-100 (600 binary features,
    100 classes from prototype shoppers plus noise).
  * ``cifar_synthetic``: a seeded generator shaped like CIFAR-10 (uint8 images ``[32, 32, 3]``,
    10 classes of translated colour textures plus clutter and noise).

Register more with :func:`register_dataset`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from sisajax.errors import UserInputError


class DataError(UserInputError, ValueError):
    """A data set is unknown, malformed or missing."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled data set with a fixed train/test split.

    Attributes:
      name: registry name.
      train_ids: ``[N]`` int64, unique, disjoint from ``test_ids``.
      x_train: ``[N, *feature_shape]`` features (float32, or uint8 for binary/pixel data).
      y_train: ``[N]`` int32 labels in ``[0, num_classes)``.
      test_ids, x_test, y_test: the held-out split, same conventions.
      num_classes: number of classes.
      preprocessing: how the model sees the stored features, declared by the data set and
        applied inside the compiled programs (so stored copies stay compact, e.g. uint8 pixels):
        ``{"scale": s, "shift": b}`` maps ``x`` to ``float32(x) * s + b`` (default: identity).
      class_names: the name of each label ``0..num_classes-1`` when the source names classes
        (e.g. a CSV with string labels); None when labels are plain integers.
    """

    name: str
    train_ids: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    test_ids: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    preprocessing: dict[str, float] = dataclasses.field(default_factory=dict)
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        bad = set(self.preprocessing) - {"scale", "shift"}
        if bad:
            raise DataError(f"{self.name}: unknown preprocessing keys {sorted(bad)} (scale, shift)")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise DataError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes"
            )
        validate_split(self.train_ids, self.x_train, self.y_train, self.num_classes, "train")
        validate_split(self.test_ids, self.x_test, self.y_test, self.num_classes, "test")
        if np.intersect1d(self.train_ids, self.test_ids).size:
            raise DataError(f"{self.name}: train and test ids overlap")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train features {self.x_train.shape[1:]} != test {self.x_test.shape[1:]}"
            )

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def summary(self) -> str:
        """One line: sizes, feature shape, dtype and value range (and what the model sees after
        the preprocessing), classes (with their names, if any)."""
        out = (
            f"{self.name}: {len(self.train_ids)} train / {len(self.test_ids)} test, "
            f"features {self.feature_shape} {self.x_train.dtype}"
        )
        if self.x_train.size:
            lo, hi = float(self.x_train.min()), float(self.x_train.max())
            out += f" in {lo:g}..{hi:g}"
            if self.preprocessing:
                s = float(self.preprocessing.get("scale", 1.0))
                b = float(self.preprocessing.get("shift", 0.0))
                a, z = sorted((lo * s + b, hi * s + b))
                out += f" (model input x * {s:g} + {b:g}: {a:g}..{z:g})"
        out += f", {self.num_classes} classes"
        if self.class_names is not None:
            named = [f"{i}={n}" for i, n in enumerate(self.class_names[:10])]
            more = len(self.class_names) - len(named)
            out += f" ({', '.join(named)}{f', ... {more} more' if more else ''})"
        return out


LABEL_MAX = 2**31 - 1  # labels are class indices, stored as int32


def integer_values(a: np.ndarray, what: str, lo: int, hi: int) -> np.ndarray:
    """``[N]`` int64 of an integer-valued array of any numeric dtype, every value in
    ``[lo, hi]``: floats must hold whole numbers, and nothing is wrapped or truncated on the
    way (a uint64 beyond int64, a float id 0.5, a label 2**32 + 1 are refused).

    Raises:
      DataError: naming ``what``.
    """
    a = np.asarray(a).reshape(-1)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise DataError(f"{what} must be integers")
    elif a.dtype.kind not in "iub":
        raise DataError(f"{what} must be integers, got dtype {a.dtype}")
    if a.size:
        # compare as Python ints: no dtype (uint64, float64) can wrap here
        small, large = int(a.min()), int(a.max())
        if small < lo or large > hi:
            raise DataError(f"{what} span [{small}, {large}], outside [{lo}, {hi}]")
    return a.astype(np.int64)


def int64_ids(ids: np.ndarray, what: str) -> np.ndarray:
    """``[N]`` int64 ids of any numeric dtype (:func:`integer_values` over the int64 range: a
    uint64 id is never wrapped to a negative one, a float id never truncated)."""
    i64 = np.iinfo(np.int64)
    return integer_values(ids, what, int(i64.min), int(i64.max))


def validate_split(ids: np.ndarray, x: np.ndarray, y: np.ndarray, num_classes: int, what: str):
    """Raise :class:`DataError` unless ids/x/y form a consistent labelled split."""
    if ids.ndim != 1 or y.ndim != 1 or len(ids) != len(x) or len(ids) != len(y):
        raise DataError(
            f"{what}: ids {ids.shape}, features {x.shape}, labels {y.shape} do not line up"
        )
    if ids.dtype != np.int64:
        raise DataError(f"{what}: ids must be int64, got {ids.dtype}")
    if y.dtype.kind not in "iu":  # a float label 0.5 would train as class 0
        raise DataError(f"{what}: labels must have an integer dtype, got {y.dtype}")
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{what}: ids are not unique")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{what}: labels outside [0, {num_classes})")
    # kind "f", or a float from ml_dtypes (bfloat16 and friends have kind "V")
    floating = x.dtype.kind == "f" or (x.dtype.kind == "V" and "float" in x.dtype.name)
    if floating and not np.all(np.isfinite(x)):
        raise DataError(f"{what}: features contain NaN or inf")


def from_arrays(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    train_ids: np.ndarray | None = None,
    test_ids: np.ndarray | None = None,
    num_classes: int | None = None,
    name: str = "arrays",
) -> Dataset:
    """Wrap arrays a researcher already has. Ids default to ``0..N-1`` and ``N..N+M-1``."""
    n, m = len(x_train), len(x_test)
    train_ids = (
        np.arange(n, dtype=np.int64) if train_ids is None else int64_ids(train_ids, "train_ids")
    )
    test_ids = (
        np.arange(n, n + m, dtype=np.int64) if test_ids is None else int64_ids(test_ids, "test_ids")
    )
    y_train = integer_values(y_train, "y_train labels", 0, LABEL_MAX).astype(np.int32)
    y_test = integer_values(y_test, "y_test labels", 0, LABEL_MAX).astype(np.int32)
    if num_classes is None:
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return Dataset(
        name,
        train_ids,
        np.asarray(x_train),
        y_train,
        test_ids,
        np.asarray(x_test),
        y_test,
        int(num_classes),
    )


def split_by_hash(ids: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean ``[N]`` test mask: a pure function of (seed, id), so the split never moves.

    Raises:
      DataError: ``seed`` is not an integer >= 0.
    """
    from sisajax.data.partition import uniform_hash

    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"split_seed must be an integer >= 0, got {seed!r}")
    return uniform_hash(ids, int(seed), stream=0x7E57) < test_fraction


# ---------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator: make a loader available as ``load_dataset(name, **params)``."""

    def deco(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        _REGISTRY[name] = fn
        return fn

    return deco


def available_datasets() -> list[str]:
    return sorted(_REGISTRY)


def load_dataset(name: str, **params: Any) -> Dataset:
    """Load a registered data set by name (see :func:`available_datasets`)."""
    if name not in _REGISTRY:
        raise DataError(f"unknown data set {name!r}; available: {', '.join(available_datasets())}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as e:
        raise DataError(f"bad parameters for data set {name!r}: {e}") from e


@register_dataset("digits")
def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled handwritten digits: ``[1797, 64]`` pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    ids = np.arange(len(x), dtype=np.int64)
    test = split_by_hash(ids, test_fraction, split_seed)
    return Dataset("digits", ids[~test], x[~test], y[~test], ids[test], x[test], y[test], 10)


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
    ids = np.arange(n, dtype=np.int64)
    return Dataset(
        "purchase_synthetic",
        ids[:n_train],
        x[:n_train],
        y[:n_train],
        ids[n_train:],
        x[n_train:],
        y[n_train:],
        num_classes,
    )


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
    ids = np.arange(n, dtype=np.int64)
    return Dataset(
        "cifar_synthetic",
        ids[:n_train],
        x[:n_train],
        y[:n_train],
        ids[n_train:],
        x[n_train:],
        y[n_train:],
        num_classes,
        {"scale": 1.0 / 255.0},
    )
