"""Loaders for real data files on disk, registered as data sets (nothing is downloaded).

Registered names (``load_dataset(name, **params)``; in configs ``data.params.<param>=...``):

  * ``idx``: an MNIST-style directory of IDX files (``train-images-idx3-ubyte[.gz]``,
    ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``,
    ``t10k-labels-idx1-ubyte[.gz]``). Params ``path``, ``n_train``, ``n_test``, ``num_classes``.
  * ``fashion_mnist``: ``idx`` with the Debian ``dataset-fashion-mnist`` location as default path.
  * ``purchase``: the Purchase-100 text release (``label,f1,...,f600`` per line). Params ``path``,
    ``test_fraction``, ``split_seed``, ``label_offset``, ``num_features``, ``num_classes``.
  * ``svhn``: SVHN cropped digits (``train_32x32.mat``, ``test_32x32.mat``). Params ``path``,
    ``n_train``, ``n_test``, ``include_extra``.
  * ``cifar10``: the CIFAR-10 python pickles (``cifar-10-batches-py``). Params ``path``,
    ``n_train``, ``n_test``.
  * ``npz``: a ``.npz`` with ``x_train, y_train, x_test, y_test`` (optional ``train_ids,
    test_ids``). Params ``path``, ``num_classes``.
  * ``csv``: a CSV with a header row. Params ``path``, ``label_column``, ``id_column``,
    ``test_fraction``, ``split_seed``, ``delimiter``, ``num_classes``.

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
import gzip
import io
import itertools
import pickle
import re
from pathlib import Path
from typing import IO, Any

import numpy as np

from sisajax.data.datasets import DataError, Dataset, from_arrays, register_dataset, split_by_hash

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist/"

_FASHION_HINT = (
    "install Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    "or pass data.params.path=<directory with the IDX files>"
)
_IDX_HINT = "pass data.params.path=<directory with the MNIST-style IDX files>"
_PURCHASE_HINT = (
    "get the Purchase-100 release of Shokri et al. (used by SISA): dataset_purchase.tgz from "
    "https://github.com/privacytrustlab/datasets (originally "
    "https://www.comp.nus.edu.sg/~reza/files/dataset_purchase.tgz), extract it and pass "
    "data.params.path=<.../dataset_purchase>"
)
_SVHN_HINT = (
    "download train_32x32.mat and test_32x32.mat (Format 2, cropped digits) from "
    "http://ufldl.stanford.edu/housenumbers/ and pass data.params.path=<their directory>"
)
_CIFAR_HINT = (
    "download and extract 'CIFAR-10 python version' (cifar-10-python.tar.gz) from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and pass "
    "data.params.path=<.../cifar-10-batches-py>"
)

# ---------------------------------------------------------------------------------------------
# Helpers


def _why(e: BaseException) -> str:
    """Why reading failed, without echoing file content: the position numpy reports (``row R,
    column C`` / ``line L``) or the exception type."""
    pos = re.findall(r"(?:at )?(row \d+, column \d+|line \d+|row \d+)", str(e))
    return f"{type(e).__name__} at {pos[0]}" if pos else type(e).__name__


def _require_file(path: Path, what: str, hint: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what}: expected file {path} not found; {hint}")
    return path


def _require_dir(path: str | Path | None, what: str, hint: str) -> Path:
    if path is None:
        raise DataError(f"{what}: no path given; {hint}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{what}: expected directory {p} not found; {hint}")
    return p


def _check_count(n: int | None, what: str) -> None:
    if n is not None and n < 0:
        raise DataError(f"{what} must be >= 0, got {n}")


def _int_labels(y: np.ndarray, source: str) -> np.ndarray:
    """``[N]`` labels of any numeric dtype -> int64, rejecting non-integer values."""
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.array_equal(y, np.round(y)):
            raise DataError(f"{source}: labels must be integers")
    elif y.dtype.kind not in "iub":
        raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def _check_labels(y: np.ndarray, num_classes: int, source: str) -> None:
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{source}: labels span [{y.min()}, {y.max()}], outside [0, {num_classes})")


def _fixed_split(
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


def _hash_split(
    name: str,
    ids: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    tf: float,
    seed: int,
    class_names: tuple[str, ...] | None = None,
) -> Dataset:
    if not 0.0 <= tf < 1.0:
        raise DataError(f"{name}: test_fraction must be in [0, 1), got {tf}")
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


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open_maybe_gz(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def _read_exact(f: IO[bytes], n: int, path: Path, what: str) -> bytes:
    try:
        buf = f.read(n)
    except (OSError, EOFError) as e:  # gzip: bad CRC, truncated stream, not gzip
        raise DataError(f"{path}: cannot read {what} ({_why(e)})") from None
    if len(buf) != n:
        raise DataError(f"{path}: truncated {what}: expected {n} bytes, got {len(buf)}")
    return buf


def read_idx_header(f: IO[bytes], path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """Parse an IDX header: 2 zero bytes, a type code, ``ndim``, then ``ndim`` big-endian uint32.

    Returns:
      The (big-endian) element dtype and the full shape stored in the file.
    """
    magic = _read_exact(f, 4, path, "IDX header")
    if magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES or magic[3] == 0:
        raise DataError(f"{path}: not an IDX file (bad magic number 0x{magic.hex()})")
    ndim = magic[3]
    dims = np.frombuffer(_read_exact(f, 4 * ndim, path, "IDX dimensions"), dtype=">u4")
    return _IDX_DTYPES[magic[2]], tuple(int(d) for d in dims)


def read_idx(path: str | Path, max_rows: int | None = None) -> tuple[np.ndarray, int]:
    """Read an IDX file (optionally gzipped, by a ``.gz`` suffix) with numpy.

    Args:
      path: the ``*-ubyte`` or ``*-ubyte.gz`` file.
      max_rows: read only the first ``max_rows`` rows along the first axis (``None``: all).

    Returns:
      ``(array, total_rows)``: ``[min(max_rows, D0), D1, ...]`` in native byte order (uint8 stays
      uint8), and ``D0``, the number of rows the file holds.
    """
    path = Path(path)
    with _open_maybe_gz(path) as f:
        dtype, shape = read_idx_header(f, path)
        total = shape[0]
        rows = total if max_rows is None else min(max_rows, total)
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        nbytes = rows * row_items * dtype.itemsize
        buf = _read_exact(f, nbytes, path, f"IDX data for shape {shape}")
        if rows == total:
            try:
                extra = f.read(1)
            except (OSError, EOFError) as e:
                raise DataError(f"{path}: cannot read IDX data ({_why(e)})") from None
            if extra:
                raise DataError(f"{path}: trailing bytes after IDX data of shape {shape}")
    arr = np.frombuffer(buf, dtype=dtype).reshape((rows, *shape[1:]))
    return arr.astype(dtype.newbyteorder("="), copy=True), total


def _find_idx(directory: Path, stem: str, what: str, hint: str) -> Path:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{what}: expected file {directory / stem}[.gz] not found; {hint}")


def _load_idx_pair(
    directory: Path, prefix: str, n: int | None, what: str, hint: str
) -> tuple[np.ndarray, np.ndarray, int]:
    img_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte", what, hint)
    lab_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte", what, hint)
    x, n_img = read_idx(img_path, n)
    y, n_lab = read_idx(lab_path, n)
    if n_img != n_lab:
        raise DataError(f"{img_path}: {n_img} images but {lab_path} has {n_lab} labels")
    if y.ndim != 1:
        raise DataError(f"{lab_path}: labels must be 1-d, got shape {y.shape}")
    if x.ndim < 2:
        raise DataError(f"{img_path}: images must be at least 2-d, got shape {x.shape}")
    return x, _int_labels(y, str(lab_path)), n_img


def load_idx(
    path: str | Path | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    num_classes: int | None = None,
    *,
    name: str = "idx",
    hint: str = _IDX_HINT,
) -> Dataset:
    """An MNIST-style IDX directory as a Dataset.

    Args:
      path: directory with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
      n_train, n_test: keep only the first rows of each split (``None``: all). Ids do not move.
      num_classes: default ``max label + 1`` over the loaded rows.

    Returns:
      ``x_train [N, H, W]`` in the file's dtype (uint8 for (Fashion-)MNIST), ids ``0..N-1`` for
      train and ``N_file..`` for test.
    """
    _check_count(n_train, f"{name}: n_train")
    _check_count(n_test, f"{name}: n_test")
    d = _require_dir(path, name, hint)
    x_tr, y_tr, n_full = _load_idx_pair(d, "train", n_train, name, hint)
    x_te, y_te, _ = _load_idx_pair(d, "t10k", n_test, name, hint)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{name} ({d}): train images {x_tr.shape[1:]} != test {x_te.shape[1:]}")
    if num_classes is None:
        num_classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    _check_labels(y_tr, num_classes, f"{name} ({d}) train labels")
    _check_labels(y_te, num_classes, f"{name} ({d}) test labels")
    return _fixed_split(name, x_tr, y_tr, x_te, y_te, n_full, num_classes)


@register_dataset("idx")
def _idx(
    path: str | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    num_classes: int | None = None,
) -> Dataset:
    return load_idx(path, n_train, n_test, num_classes)


@register_dataset("fashion_mnist")
def load_fashion_mnist(
    path: str = FASHION_MNIST_DIR, n_train: int | None = None, n_test: int | None = None
) -> Dataset:
    """Fashion-MNIST: ``[60000, 28, 28]`` + ``[10000, 28, 28]`` uint8 images, 10 classes."""
    return load_idx(path, n_train, n_test, 10, name="fashion_mnist", hint=_FASHION_HINT)


# ---------------------------------------------------------------------------------------------
# Purchase-100 (text)


def _loadtxt(path: Path, what: str, **kw: Any) -> np.ndarray:
    try:
        return np.loadtxt(path, ndmin=2, **kw)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot parse {what} ({_why(e)})") from None


def _read_label_rows(
    path: Path, what: str, chunk_rows: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``label,f1,...,fK`` integer lines (``.gz`` ok) in chunks of rows.

    Each chunk is parsed as int32 and cast to uint8 features at once, so the peak memory stays
    near the uint8 result rather than a full integer copy of the file.

    Returns:
      ``labels [N]`` int64 and ``features [N, K]`` uint8.
    """
    ys: list[np.ndarray] = []
    xs: list[np.ndarray] = []
    start = 0
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            while lines := list(itertools.islice(f, chunk_rows)):
                where = f"lines {start + 1}..{start + len(lines)}"
                try:
                    block = np.loadtxt(lines, delimiter=",", dtype=np.int32, ndmin=2)
                except ValueError as e:
                    raise DataError(
                        f"{path}: cannot parse {what} in {where} "
                        f"(row numbers count from line {start + 1}; {_why(e)})"
                    ) from e
                if xs and block.shape[1] != xs[0].shape[1] + 1:
                    raise DataError(
                        f"{path}: {block.shape[1]} columns in {where}, {xs[0].shape[1] + 1} before"
                    )
                feats = block[:, 1:]
                if feats.size and (feats.min() < 0 or feats.max() > 255):
                    raise DataError(f"{path}: features outside [0, 255] in {where}")
                ys.append(block[:, 0].astype(np.int64))
                xs.append(feats.astype(np.uint8))
                start += len(lines)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read {what} ({_why(e)})") from None
    if not xs:
        raise DataError(f"{path}: no rows")
    return np.concatenate(ys), np.concatenate(xs)


@register_dataset("purchase")
def load_purchase(
    path: str | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    label_offset: int | None = None,
    num_features: int | None = 600,
    num_classes: int | None = None,
) -> Dataset:
    """Purchase-100 from its text release: one ``label,f1,...,f600`` line per customer.

    Args:
      path: the ``dataset_purchase`` file (or ``.gz``), or a directory containing it.
      test_fraction, split_seed: hash split over ids (= 0-based line numbers).
      label_offset: subtracted from labels; ``None`` (auto) subtracts 1 when the smallest label
        is 1 (the original release is 1-based).
      num_features: expected feature columns (``None``: any); a mismatch raises ``DataError``.
      num_classes: default ``max label + 1`` after the offset (100 for the release).

    Returns:
      Features ``[N, num_features]`` uint8 (0/1 in the release), ids ``0..N-1`` split by hash.
    """
    if path is None:
        raise DataError(f"purchase: no path given; {_PURCHASE_HINT}")
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "dataset_purchase"
    _require_file(p, "purchase", _PURCHASE_HINT)
    y, x = _read_label_rows(p, "Purchase-100 text (label,f1,...,fK per line)")
    if num_features is not None and x.shape[1] != num_features:
        raise DataError(
            f"{p}: expected {num_features + 1} columns (label + {num_features} features), "
            f"got {x.shape[1] + 1}"
        )
    if label_offset is None:
        label_offset = 1 if y.min() == 1 else 0
    y = y - label_offset
    if num_classes is None:
        num_classes = int(y.max()) + 1
    _check_labels(y, num_classes, f"{p} (label_offset={label_offset})")
    ids = np.arange(len(y), dtype=np.int64)
    return _hash_split("purchase", ids, x, y, num_classes, test_fraction, split_seed)


# ---------------------------------------------------------------------------------------------
# SVHN (.mat)


def _read_svhn_mat(path: Path, n: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except Exception as e:  # MatReadError, NotImplementedError (v7.3/HDF5), ValueError, ...
        raise DataError(f"{path}: cannot read as a MATLAB v5 .mat file ({_why(e)})") from None
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: expected variables 'X' and 'y', found {sorted(mat)}")
    x, y = mat["X"], mat["y"]
    if x.ndim != 4 or x.shape[2] != 3:
        raise DataError(f"{path}: 'X' must be [H, W, 3, N], got shape {x.shape}")
    y = _int_labels(y, str(path))
    total = x.shape[3]
    if len(y) != total:
        raise DataError(f"{path}: {total} images but {len(y)} labels")
    rows = total if n is None else min(n, total)
    if len(y) and (y.min() < 0 or y.max() > 10):
        raise DataError(f"{path}: SVHN labels must be in 1..10 (10 = digit 0)")
    y = np.where(y[:rows] == 10, 0, y[:rows])
    x = np.ascontiguousarray(np.moveaxis(x[..., :rows], 3, 0)).astype(np.uint8, copy=False)
    return x, y, total


@register_dataset("svhn")
def load_svhn(
    path: str | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    include_extra: bool = False,
) -> Dataset:
    """SVHN cropped digits from ``train_32x32.mat`` / ``test_32x32.mat``.

    Args:
      path: directory with the ``.mat`` files.
      n_train, n_test: keep only the first rows of each split (``None``: all). Ids do not move.
      include_extra: also add ``extra_32x32.mat`` to the training split, with ids after the test
        ids (so train/test ids are the same either way).

    Returns:
      ``x [N, 32, 32, 3]`` uint8, labels 0..9 (the files' label 10 is digit 0).
    """
    _check_count(n_train, "svhn: n_train")
    _check_count(n_test, "svhn: n_test")
    d = _require_dir(path, "svhn", _SVHN_HINT)
    tr = _require_file(d / "train_32x32.mat", "svhn", _SVHN_HINT)
    te = _require_file(d / "test_32x32.mat", "svhn", _SVHN_HINT)
    x_tr, y_tr, n_full = _read_svhn_mat(tr, n_train)
    x_te, y_te, m_full = _read_svhn_mat(te, n_test)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"svhn ({d}): train images {x_tr.shape[1:]} != test {x_te.shape[1:]}")
    ds = _fixed_split("svhn", x_tr, y_tr, x_te, y_te, n_full, 10)
    if not include_extra:
        return ds
    ex = _require_file(d / "extra_32x32.mat", "svhn (include_extra=True)", _SVHN_HINT)
    x_ex, y_ex, _ = _read_svhn_mat(ex, None)
    ex_ids = np.arange(n_full + m_full, n_full + m_full + len(x_ex), dtype=np.int64)
    return Dataset(
        "svhn",
        np.concatenate([ds.train_ids, ex_ids]),
        np.concatenate([ds.x_train, x_ex]),
        np.concatenate([ds.y_train, y_ex.astype(np.int32)]),
        ds.test_ids,
        ds.x_test,
        ds.y_test,
        10,
        ds.preprocessing,
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles)

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds: dicts, lists, bytes/str, numbers and numpy
    arrays. Any other global (``os.system``, ``builtins.eval``, ...) is refused, so a crafted
    file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module[:40]}.{name[:40]}")
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch (a pickled dict with ``data [N, 3072]`` uint8 and ``labels``).

    Read with a restricted unpickler (:class:`_CifarUnpickler`): a file holding anything but
    dicts, lists, strings, numbers and numpy arrays is refused, never executed.

    Returns:
      ``x [N, 32, 32, 3]`` uint8 (channels last) and ``y [N]`` int64.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        msg = str(e) if str(e).startswith("refused global") else "unreadable pickle"
        raise DataError(f"{path}: not a CIFAR-10 python batch ({msg})") from None
    except Exception as e:  # garbage can raise almost anything while unpickling; never echo it
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: expected keys 'data' and 'labels', found {sorted(batch)}")
    data = np.asarray(batch["data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be [N, 3072], got shape {data.shape}")
    y = _int_labels(np.asarray(batch["labels"]), str(path))
    if len(y) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(y)} labels")
    x = data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), y


@register_dataset("cifar10")
def load_cifar10(
    path: str | None = None, n_train: int | None = None, n_test: int | None = None
) -> Dataset:
    """CIFAR-10 from the python pickles (``data_batch_1..5``, ``test_batch``).

    Args:
      path: the ``cifar-10-batches-py`` directory (or the directory that contains it).
      n_train, n_test: keep only the first rows of each split (``None``: all). Ids do not move.

    Returns:
      ``x [N, 32, 32, 3]`` uint8 (50,000 train / 10,000 test in the release), 10 classes; train
      ids follow batch order ``0..49999``, test ids ``50000..``.
    """
    _check_count(n_train, "cifar10: n_train")
    _check_count(n_test, "cifar10: n_test")
    d = _require_dir(path, "cifar10", _CIFAR_HINT)
    if not (d / "test_batch").is_file() and (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    files = [_require_file(d / b, "cifar10", _CIFAR_HINT) for b in CIFAR10_TRAIN_BATCHES]
    te_file = _require_file(d / "test_batch", "cifar10", _CIFAR_HINT)
    xs, ys = zip(*(read_cifar_batch(f) for f in files), strict=True)
    x_tr, y_tr = np.concatenate(xs), np.concatenate(ys)
    x_te, y_te = read_cifar_batch(te_file)
    n_full = len(x_tr)
    x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    x_te, y_te = x_te[:n_test], y_te[:n_test]
    _check_labels(y_tr, 10, f"cifar10 ({d}) train labels")
    _check_labels(y_te, 10, f"cifar10 ({d}) test labels")
    return _fixed_split("cifar10", x_tr, y_tr, x_te, y_te, n_full, 10)


# ---------------------------------------------------------------------------------------------
# Plain .npz and CSV


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
    p = _require_file(Path(path).expanduser(), "npz", hint)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{p}: cannot read as .npz ({_why(e)})") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{p}: missing arrays {missing}; found {sorted(arrays)}")
    try:
        x_tr, x_te = _feature_dtype(arrays["x_train"]), _feature_dtype(arrays["x_test"])
    except DataError as e:
        raise DataError(f"{p}: {e}") from e
    y_tr = _int_labels(arrays["y_train"], f"{p} y_train")
    y_te = _int_labels(arrays["y_test"], f"{p} y_test")
    ids = {}
    for k in ("train_ids", "test_ids"):
        if k in arrays:
            ids[k] = _int_labels(arrays[k], f"{p} {k}")  # integer check, then int64
    if num_classes is not None:
        _check_labels(y_tr, num_classes, f"{p} y_train")
        _check_labels(y_te, num_classes, f"{p} y_test")
    if min(y_tr.min(initial=0), y_te.min(initial=0)) < 0:
        raise DataError(f"{p}: negative labels")
    try:
        return from_arrays(x_tr, y_tr, x_te, y_te, num_classes=num_classes, name="npz", **ids)
    except DataError as e:
        raise DataError(f"{p}: {e}") from e


def _csv_header(p: Path, delimiter: str) -> list[str]:
    try:
        with open(p, newline="", encoding="utf-8") as f:
            header = next(csv.reader(io.StringIO(f.readline()), delimiter=delimiter), [])
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read CSV header ({_why(e)})") from None
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
    p = _require_file(Path(path).expanduser(), "csv", hint)
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
    _check_labels(y, num_classes, f"{p} column {label_column!r}")
    return _hash_split("csv", ids, x, y, num_classes, test_fraction, split_seed, names)
