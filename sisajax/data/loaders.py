"""Loaders for the user's own data files, registered as data sets, and the conventions every
file loader follows.

Registered names (``load_dataset(name, **params)``; in configs ``data.params.<param>=...``):

  * ``npz``: a ``.npz`` with ``x_train, y_train, x_test, y_test`` (optional ``train_ids,
    test_ids``). Params ``path``, ``num_classes``.
  * ``csv``: a CSV with a header row. Params ``path``, ``label_column``, ``id_column``,
    ``test_fraction``, ``split_seed``, ``delimiter``, ``num_classes``.

The published releases (``idx``, ``fashion_mnist``, ``purchase``, ``svhn``, ``cifar10``) live in
:mod:`sisajax.data.published`; the checks both modules share in :mod:`sisajax.data.file_checks`.

Conventions: ids are int64 and stable (a row keeps its id however many rows are loaded), labels
int32 in ``[0, num_classes)``, pixel and binary features stay uint8 (models cast to float32),
float features are float32. Files with a fixed train/test split keep it: train rows get ids
``0..N-1`` and test rows ``N..N+M-1``, with ``N`` the full train size in the file. Files without
one are split by :func:`~sisajax.data.datasets.split_by_hash`, a pure function of
``(split_seed, id)``.

Missing files raise :class:`~sisajax.data.datasets.DataError` saying what was expected and where
to get it; malformed files raise ``DataError`` naming the file.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from sisajax.data.datasets import DataError, Dataset, from_arrays, register_dataset
from sisajax.data.file_checks import (
    check_labels,
    hash_split,
    int_ids,
    int_labels,
    require_file,
    why,
)
from sisajax.errors import DAMAGED_ARCHIVE_ERRORS

# ---------------------------------------------------------------------------------------------
# Plain .npz and CSV


def _loadtxt(path: Path, what: str, **kw: Any) -> np.ndarray:
    """``np.loadtxt`` (at least 2-d); a parse failure raises ``DataError`` naming ``what``.
    No comment character: ``#`` is data (a class named ``C#``, a row starting with ``#``), never
    a reason to drop or cut a row."""
    kw.setdefault("comments", None)
    try:
        return np.loadtxt(path, ndmin=2, **kw)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot parse {what} ({why(e)})") from None


def _feature_dtype(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    if x.dtype.kind == "b":
        return x.astype(np.uint8)
    if x.dtype.kind not in "iu":
        raise DataError(f"features must be numeric, got dtype {x.dtype}")
    return x


@register_dataset("npz")
def load_npz(path: str | None = None, num_classes: int | None = None) -> Dataset:
    """A ``.npz`` with ``x_train, y_train, x_test, y_test`` and optional ``train_ids, test_ids``.

    Args:
      path: the ``.npz`` file (loaded with ``allow_pickle=False``).
      num_classes: default ``max label + 1``.

    Returns:
      The arrays as stored (float features as float32, bool as uint8); ids default to
      ``0..N-1`` and ``N..N+M-1``.
    """
    hint = "pass data.params.path=<file.npz> with arrays x_train, y_train, x_test, y_test"
    if path is None:
        raise DataError(f"npz: no path given; {hint}")
    p = require_file(Path(path).expanduser(), "npz", hint)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, *DAMAGED_ARCHIVE_ERRORS) as e:
        raise DataError(f"{p}: cannot read as .npz ({why(e)})") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{p}: missing arrays {missing}; found {sorted(arrays)}")
    scalars = sorted(k for k, a in arrays.items() if a.ndim == 0)
    if scalars:
        raise DataError(f"{p}: arrays {scalars} hold a single value, not one per example")
    try:
        x_tr, x_te = _feature_dtype(arrays["x_train"]), _feature_dtype(arrays["x_test"])
    except DataError as e:
        raise DataError(f"{p}: {e}") from e
    y_tr = int_labels(arrays["y_train"], f"{p} y_train")
    y_te = int_labels(arrays["y_test"], f"{p} y_test")
    ids = {}
    for k in ("train_ids", "test_ids"):
        if k in arrays:
            ids[k] = int_ids(arrays[k], f"{p} {k}")  # integer check, then int64
    if num_classes is not None:
        check_labels(y_tr, num_classes, f"{p} y_train")
        check_labels(y_te, num_classes, f"{p} y_test")
    if min(y_tr.min(initial=0), y_te.min(initial=0)) < 0:
        raise DataError(f"{p}: negative labels")
    try:
        return from_arrays(x_tr, y_tr, x_te, y_te, num_classes=num_classes, name="npz", **ids)
    except DataError as e:
        raise DataError(f"{p}: {e}") from e


def _csv_header(p: Path, delimiter: str) -> list[str]:
    try:
        # utf-8-sig: a byte-order mark (spreadsheets' "CSV UTF-8") is not part of a name
        with open(p, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(io.StringIO(f.readline()), delimiter=delimiter), [])
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read CSV header ({why(e)})") from None
    header = [h.strip() for h in header]
    if not header:
        raise DataError(f"{p}: empty file (a header row is required)")
    if len(set(header)) != len(header):
        raise DataError(f"{p}: duplicate column names in header {header}")
    return header


def _csv_class_names(
    p: Path, column: str, li: int, kw: dict[str, Any]
) -> tuple[np.ndarray, tuple[str, ...]] | None:
    """``(labels [N] int64, class names)`` for a label column that holds class names (``cat``,
    ``dog``): the names sorted, each label the index of its name. None when every label is an
    integer (the plain case, parsed with the other integer columns).

    Raises:
      DataError: an empty label, or labels that are numbers but not all integers.
    """
    raw = _loadtxt(p, f"label column {column!r}", dtype=str, usecols=[li], quotechar='"', **kw)
    labels = np.char.strip(raw[:, 0])
    if all(v.lstrip("+-").isdigit() for v in labels.tolist()):
        return None
    empty = np.flatnonzero(labels == "")
    if empty.size:
        raise DataError(f"{p}: empty label in column {column!r} (data row {empty[0] + 1})")
    try:
        labels.astype(np.float64)
    except ValueError:
        names = np.unique(labels)  # sorted
        return np.searchsorted(names, labels).astype(np.int64), tuple(names.tolist())
    raise DataError(
        f"{p}: labels in column {column!r} are numbers but not all integers (a class label is an "
        "integer or a name)"
    )


@register_dataset("csv")
def load_csv(
    path: str | None = None,
    label_column: str = "label",
    id_column: str | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    delimiter: str = ",",
    num_classes: int | None = None,
) -> Dataset:
    """A CSV with a header row: one label column, optional id column, the rest numeric features.

    Args:
      path: the CSV file.
      label_column: name of the label column: integer labels, or class names (``cat``, ``dog``),
        which become labels ``0..C-1`` in sorted order (``Dataset.class_names`` keeps the names).
      id_column: name of an integer id column; ``None``: ids are 0-based data row numbers.
      test_fraction, split_seed: hash split over ids.
      delimiter: field separator.
      num_classes: default ``max label + 1`` (or the number of class names).

    Returns:
      Features ``[N, F]`` float32 (columns in file order, label/id columns removed).
    """
    hint = "pass data.params.path=<file.csv> (a header row, numeric feature columns)"
    if path is None:
        raise DataError(f"csv: no path given; {hint}")
    p = require_file(Path(path).expanduser(), "csv", hint)
    header = _csv_header(p, delimiter)
    for col in (label_column, id_column):
        if col is not None and col not in header:
            raise DataError(f"{p}: no column {col!r} in header {header}")
    li = header.index(label_column)
    ii = None if id_column is None else header.index(id_column)
    feat_cols = [i for i in range(len(header)) if i not in (li, ii)]
    if not feat_cols:
        raise DataError(f"{p}: no feature columns besides {label_column!r}/{id_column!r}")
    kw = {"delimiter": delimiter, "skiprows": 1, "encoding": "utf-8"}
    named = _csv_class_names(p, label_column, li, kw)
    names = None if named is None else named[1]
    # Parse the full row set once (so a wrong column count anywhere is caught), then the integer
    # columns exactly (int64, not through float64, so large ids survive). A column of class names
    # is read as text above, so this parse skips it.
    skip = {} if named is None else {"converters": {li: lambda _: 0.0}}
    raw = _loadtxt(p, f"CSV with {len(header)} columns", dtype=np.float64, **skip, **kw)
    if raw.size == 0:
        raise DataError(f"{p}: no data rows")
    if raw.shape[1] != len(header):
        raise DataError(f"{p}: {raw.shape[1]} columns in data rows, {len(header)} in header")
    int_cols = ([li] if named is None else []) + ([] if ii is None else [ii])
    ints = (
        _loadtxt(p, f"integer columns {int_cols}", dtype=np.int64, usecols=int_cols, **kw)
        if int_cols
        else np.zeros((len(raw), 0), np.int64)
    )
    y = ints[:, 0] if named is None else named[0]
    ids = np.arange(len(y), dtype=np.int64) if ii is None else ints[:, -1].copy()
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{p}: id column {id_column!r} has duplicate values")
    x = raw[:, feat_cols].astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{p}: features contain NaN or inf (or overflow float32)")
    if y.min() < 0:
        raise DataError(f"{p}: negative labels in column {label_column!r}")
    if names is not None and num_classes is not None and num_classes != len(names):
        raise DataError(
            f"{p}: num_classes={num_classes}, but column {label_column!r} names {len(names)} "
            "classes (leave num_classes unset)"
        )
    if num_classes is None:
        num_classes = int(y.max()) + 1 if names is None else len(names)
    check_labels(y, num_classes, f"{p} column {label_column!r}")
    return hash_split("csv", ids, x, y, num_classes, test_fraction, split_seed, names)
