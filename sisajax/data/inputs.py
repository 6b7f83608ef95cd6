"""Feature arrays to predict on, read from a file (``.npy``, ``.npz`` or ``.csv``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sisajax.data.datasets import DataError, integer_values
from sisajax.data.file_checks import why
from sisajax.errors import DAMAGED_ARCHIVE_ERRORS, UserInputError


def read_features(
    path: str | Path, feature_shape: tuple[int, ...], dtype: np.dtype | str
) -> np.ndarray:
    """``[M, *feature_shape]`` features from ``path``, cast to ``dtype``.

    ``.npy``: the array itself. ``.npz``: its ``x`` array (or its only array). ``.csv``: one
    example per row, comma-separated numbers, reshaped to ``feature_shape``. A CSV is read as
    data rows unless its first line has no numeric field, which makes it a header (skipped): a
    header of numbers (``0,1,2``, column indices) cannot be told from data and is read as a row.
    Features must be what the run trained on (after its data set's preprocessing).

    For an integer ``dtype`` (uint8 pixels, 0/1 items) every value must be an integer in the
    dtype's range (0 or 1 for bool): nothing is truncated or wrapped on the way. For a float
    ``dtype`` every value must be finite once cast (no NaN, no overflow to infinity).

    Raises:
      UserInputError: a missing, unreadable or damaged file, an unknown suffix, a feature shape
        that is not the run's, a malformed CSV row, or values the run's dtype cannot hold.
    """
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"input {p}: no such file")
    try:
        if p.suffix == ".npy":
            x = np.load(p, allow_pickle=False)
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                names = list(z.files)
                if "x" not in names and len(names) != 1:
                    raise UserInputError(f"input {p}: holds {names}; name the features 'x'")
                x = z["x" if "x" in names else names[0]]
        elif p.suffix == ".csv":
            x = _read_csv(p)
        else:
            raise UserInputError(f"input {p}: use a .npy, .npz or .csv file")
    except (OSError, ValueError, EOFError, *DAMAGED_ARCHIVE_ERRORS) as e:
        raise UserInputError(f"input {p}: cannot read it ({why(e)})") from None
    x = np.asarray(x)
    if x.ndim == 2 and len(feature_shape) > 1 and x.shape[1] == int(np.prod(feature_shape)):
        x = x.reshape(len(x), *feature_shape)
    if x.ndim == len(feature_shape):  # one example
        x = x[None]
    if tuple(x.shape[1:]) != tuple(feature_shape):
        raise UserInputError(
            f"input {p}: examples of shape {tuple(x.shape[1:])}, the run's are {tuple(feature_shape)}"
        )
    if not np.issubdtype(x.dtype, np.number) and x.dtype != bool:
        raise UserInputError(f"input {p}: features must be numbers, not {x.dtype}")
    target = np.dtype(dtype)
    if target.kind in "biu":
        info = np.iinfo(target) if target.kind != "b" else None
        lo, hi = (0, 1) if info is None else (int(info.min), int(info.max))
        try:  # only a check: the cast below is exact once it passes
            integer_values(x, f"input {p}: features for a run on {target} data", lo, hi)
        except DataError as e:
            raise UserInputError(str(e)) from None
        return x.astype(target, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        out = x.astype(target, copy=False)
    if out.dtype.kind in "fc" and not np.all(np.isfinite(out)):
        raise UserInputError(
            f"input {p}: features must be finite numbers a {target} run can hold "
            "(NaN, infinity, or a value beyond its range)"
        )
    return out


def _read_csv(p: Path) -> np.ndarray:
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    if not lines:
        raise UserInputError(f"input {p}: empty")
    if not any(_is_number(v) for v in lines[0].split(",")):
        lines = lines[1:]  # a header row: not one field is a number
    rows = []
    for n, ln in enumerate(lines, 1):
        try:
            rows.append([float(v) for v in ln.split(",")])
        except ValueError:
            raise UserInputError(f"input {p}: row {n} is not all numbers") from None
    if len({len(r) for r in rows}) > 1:
        raise UserInputError(f"input {p}: rows differ in length")
    return np.array(rows)


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True
