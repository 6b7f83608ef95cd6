"""Checks and builders shared by the file loaders (:mod:`sisajax.data.loaders` for the user's
own files, :mod:`sisajax.data.published` for published releases).

Every check raises :class:`~sisajax.data.datasets.DataError` with a message that names the file or
the data set; none echoes file content.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np

from sisajax.data.datasets import (
    LABEL_MAX,
    DataError,
    Dataset,
    check_test_fraction,
    int64_ids,
    integer_values,
    split_by_hash,
)


def why(e: BaseException) -> str:
    """Why reading failed, without echoing file content: the position numpy reports (``row R,
    column C`` / ``line L``) or the exception type."""
    name = "zlib.error" if isinstance(e, zlib.error) else type(e).__name__  # not just "error"
    pos = re.findall(r"(?:at )?(row \d+, column \d+|line \d+|row \d+)", str(e))
    return f"{name} at {pos[0]}" if pos else name


def require_file(path: Path, what: str, hint: str) -> Path:
    """``path`` if it is a file, else ``DataError`` naming ``what``, the path and ``hint``."""
    if not path.is_file():
        raise DataError(f"{what}: expected file {path} not found; {hint}")
    return path


def require_dir(path: str | Path | None, what: str, hint: str) -> Path:
    """``path`` (``~`` expanded) if it is a directory, else ``DataError`` with ``hint``."""
    if path is None:
        raise DataError(f"{what}: no path given; {hint}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{what}: expected directory {p} not found; {hint}")
    return p


def check_count(n: int | None, what: str) -> None:
    """``DataError`` if the row count ``n`` is negative (``None``, meaning all rows, passes)."""
    if n is not None and n < 0:
        raise DataError(f"{what} must be >= 0, got {n}")


def int_labels(y: np.ndarray, source: str) -> np.ndarray:
    """``[N]`` labels of any numeric dtype -> int64, rejecting non-integer values and values no
    class index can have (beyond int32: they would wrap when stored)."""
    return integer_values(y, f"{source}: labels", -LABEL_MAX, LABEL_MAX)


def int_ids(ids: np.ndarray, source: str) -> np.ndarray:
    """``[N]`` ids of any numeric dtype -> int64 (:func:`~sisajax.data.datasets.int64_ids`),
    errors naming ``source``."""
    return int64_ids(ids, f"{source}: ids")


def check_labels(y: np.ndarray, num_classes: int, source: str) -> None:
    """``DataError`` naming ``source`` if any label lies outside ``[0, num_classes)``."""
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{source}: labels span [{y.min()}, {y.max()}], outside [0, {num_classes})")


def fixed_split(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_train_full: int,
    num_classes: int,
) -> Dataset:
    """Dataset with ids ``0..`` for train rows and ``n_train_full..`` for test rows.

    uint8 pixel data declares the preprocessing ``x / 255`` (applied inside the compiled
    programs; the stored copies stay uint8)."""
    train_ids = np.arange(len(x_train), dtype=np.int64)
    test_ids = np.arange(n_train_full, n_train_full + len(x_test), dtype=np.int64)
    return Dataset(
        name,
        train_ids,
        x_train,
        y_train.astype(np.int32),
        test_ids,
        x_test,
        y_test.astype(np.int32),
        int(num_classes),
        pixel_preprocessing(x_train),
    )


def pixel_preprocessing(x: np.ndarray) -> dict[str, float]:
    """``{"scale": 1/255}`` for uint8 images (pixels to [0, 1]), else no preprocessing."""
    return {"scale": 1.0 / 255.0} if x.dtype == np.uint8 and x.ndim >= 3 else {}


def hash_split(
    name: str,
    ids: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    tf: float,
    seed: int,
    class_names: tuple[str, ...] | None = None,
) -> Dataset:
    """Dataset split by :func:`~sisajax.data.datasets.split_by_hash` over ``ids``: the test rows
    are a pure function of ``(seed, id)``, a share ``tf`` of them on average.

    Raises:
      DataError: ``tf`` outside ``[0, 1)``.
    """
    check_test_fraction(tf, name)
    test = split_by_hash(ids, tf, seed)
    y = y.astype(np.int32)
    return Dataset(
        name,
        ids[~test],
        x[~test],
        y[~test],
        ids[test],
        x[test],
        y[test],
        int(num_classes),
        class_names=class_names,
    )
