"""Data sets by name: stable int64 ids, features, labels and a fixed train/test split.

Built in (no download at run time):
  * ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).
  * ``purchase_synthetic`` and ``cifar_synthetic``: seeded generators (:mod:`sisajax.data.synthetic`).

Register more with :func:`register_dataset`.
"""

from __future__ import annotations

import dataclasses
import inspect
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


def check_test_fraction(tf: float, name: str) -> None:
    """``DataError`` naming ``name`` unless the test fraction ``tf`` is a number in ``[0, 1)``
    (1 would leave nothing to train on, a negative one is meaningless, NaN is refused)."""
    number = isinstance(tf, int | float | np.integer | np.floating) and not isinstance(tf, bool)
    if not number or not 0.0 <= tf < 1.0:
        raise DataError(
            f"{name}: test_fraction must be in [0, 1), got {tf if number else repr(tf)}"
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
    loader = _REGISTRY[name]
    try:
        signature = inspect.signature(loader)
    except (TypeError, ValueError):  # a callable without a readable signature: no check here
        signature = None
    if signature is not None:
        try:
            signature.bind(**params)
        except TypeError as e:  # unknown, missing or positional-only parameter names
            raise DataError(f"bad parameters for data set {name!r}: {e}") from e
    try:
        return loader(**params)
    except TypeError as e:  # raised inside the loader, e.g. a parameter of the wrong type
        raise DataError(f"data set {name!r}: loading failed ({type(e).__name__}: {e})") from e


@register_dataset("digits")
def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled handwritten digits: ``[1797, 64]`` pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as _sk_digits

    check_test_fraction(test_fraction, "digits")
    bunch = _sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    ids = np.arange(len(x), dtype=np.int64)
    test = split_by_hash(ids, test_fraction, split_seed)
    return Dataset("digits", ids[~test], x[~test], y[~test], ids[test], x[test], y[test], 10)


__all__ = [
    "DataError",
    "Dataset",
    "available_datasets",
    "check_test_fraction",
    "from_arrays",
    "int64_ids",
    "integer_values",
    "load_dataset",
    "load_digits",
    "register_dataset",
    "split_by_hash",
    "validate_split",
]
