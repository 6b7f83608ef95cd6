"""Feature arrays to predict on, read from a file (``.npy``, ``.npz`` or ``.csv``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sisajax.errors import UserInputError


def read_features(
    path: str | Path, feature_shape: tuple[int, ...], dtype: np.dtype | str
) -> np.ndarray:
    """``[M, *feature_shape]`` features from ``path``, cast to ``dtype``.

    ``.npy``: the array itself. ``.npz``: its ``x`` array (or its only array). ``.csv``: one
    example per row, comma-separated numbers (a header row is skipped), reshaped to
    ``feature_shape``. Features must be what the run trained on (after its data set's
    preprocessing).

    Raises:
      UserInputError: a missing or unreadable file, an unknown suffix, or a feature shape that
        is not the run's.
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
    except (OSError, ValueError) as e:
        raise UserInputError(f"input {p}: cannot read it ({type(e).__name__})") from None
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
    return x.astype(dtype, copy=False)


def _read_csv(p: Path) -> np.ndarray:
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    if not lines:
        raise UserInputError(f"input {p}: empty")
    try:
        [float(v) for v in lines[0].split(",")]
    except ValueError:
        lines = lines[1:]  # a header row
    rows = []
    for n, ln in enumerate(lines, 1):
        try:
            rows.append([float(v) for v in ln.split(",")])
        except ValueError:
            raise UserInputError(f"input {p}: row {n} is not all numbers") from None
    if len({len(r) for r in rows}) > 1:
        raise UserInputError(f"input {p}: rows differ in length")
    return np.array(rows)
