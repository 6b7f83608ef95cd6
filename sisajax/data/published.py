"""Loaders for published data set releases on disk, registered as data sets (nothing is
downloaded).

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

They follow the conventions of :mod:`sisajax.data.loaders` (ids, labels, dtypes, splits, errors):
a missing file raises :class:`~sisajax.data.datasets.DataError` saying what was expected and where
to get it.
"""

from __future__ import annotations

import gzip
import itertools
import math
import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np

from sisajax.data.datasets import DataError, Dataset, integer_values, register_dataset
from sisajax.data.file_checks import (
    check_count,
    check_labels,
    fixed_split,
    hash_split,
    int_labels,
    require_dir,
    require_file,
    why,
)
from sisajax.errors import DAMAGED_ARCHIVE_ERRORS

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
    """``path`` opened for binary reading, through gzip when its suffix is ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def _read_exact(f: IO[bytes], n: int, path: Path, what: str) -> bytes:
    """Exactly ``n`` bytes from ``f``; ``DataError`` naming ``path`` and ``what`` if truncated.

    Read in blocks, so memory grows with the bytes the file really holds: a header claiming
    terabytes ends in "truncated", not in an attempt to allocate them."""
    buf = bytearray()
    try:
        while len(buf) < n:
            block = f.read(min(n - len(buf), _READ_BLOCK))
            if not block:
                break
            buf += block
    except (OSError, EOFError, *DAMAGED_ARCHIVE_ERRORS) as e:  # gzip: corrupt, cut, not gzip
        raise DataError(f"{path}: cannot read {what} ({why(e)})") from None
    if len(buf) != n:
        raise DataError(f"{path}: truncated {what}: expected {n} bytes, got {len(buf)}")
    return bytes(buf)


_READ_BLOCK = 64 << 20


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
        row_items = math.prod(shape[1:])  # Python ints: a huge header cannot overflow
        nbytes = rows * row_items * dtype.itemsize
        buf = _read_exact(f, nbytes, path, f"IDX data for shape {shape}")
        if rows == total:
            try:
                extra = f.read(1)
            except (OSError, EOFError, *DAMAGED_ARCHIVE_ERRORS) as e:
                raise DataError(f"{path}: cannot read IDX data ({why(e)})") from None
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
    return x, int_labels(y, str(lab_path)), n_img


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
    check_count(n_train, f"{name}: n_train")
    check_count(n_test, f"{name}: n_test")
    d = require_dir(path, name, hint)
    x_tr, y_tr, n_full = _load_idx_pair(d, "train", n_train, name, hint)
    x_te, y_te, _ = _load_idx_pair(d, "t10k", n_test, name, hint)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{name} ({d}): train images {x_tr.shape[1:]} != test {x_te.shape[1:]}")
    if num_classes is None:
        num_classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    check_labels(y_tr, num_classes, f"{name} ({d}) train labels")
    check_labels(y_te, num_classes, f"{name} ({d}) test labels")
    return fixed_split(name, x_tr, y_tr, x_te, y_te, n_full, num_classes)


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


def read_label_rows(
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
                    block = np.loadtxt(lines, delimiter=",", dtype=np.int32, ndmin=2, comments=None)
                except ValueError as e:
                    raise DataError(
                        f"{path}: cannot parse {what} in {where} "
                        f"(row numbers count from line {start + 1}; {why(e)})"
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
    except (OSError, EOFError, UnicodeDecodeError, *DAMAGED_ARCHIVE_ERRORS) as e:
        raise DataError(f"{path}: cannot read {what} ({why(e)})") from None
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
    require_file(p, "purchase", _PURCHASE_HINT)
    y, x = read_label_rows(p, "Purchase-100 text (label,f1,...,fK per line)")
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
    check_labels(y, num_classes, f"{p} (label_offset={label_offset})")
    ids = np.arange(len(y), dtype=np.int64)
    return hash_split("purchase", ids, x, y, num_classes, test_fraction, split_seed)


# ---------------------------------------------------------------------------------------------
# SVHN (.mat)


def _read_svhn_mat(path: Path, n: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except Exception as e:  # MatReadError, NotImplementedError (v7.3/HDF5), ValueError, ...
        raise DataError(f"{path}: cannot read as a MATLAB v5 .mat file ({why(e)})") from None
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: expected variables 'X' and 'y', found {sorted(mat)}")
    x, y = mat["X"], mat["y"]
    if x.ndim != 4 or x.shape[2] != 3:
        raise DataError(f"{path}: 'X' must be [H, W, 3, N], got shape {x.shape}")
    y = int_labels(y, str(path))
    total = x.shape[3]
    if len(y) != total:
        raise DataError(f"{path}: {total} images but {len(y)} labels")
    rows = total if n is None else min(n, total)
    if len(y) and (y.min() < 0 or y.max() > 10):
        raise DataError(f"{path}: SVHN labels must be in 1..10 (10 = digit 0)")
    y = np.where(y[:rows] == 10, 0, y[:rows])
    x = x[..., :rows]
    if x.dtype != np.uint8:  # pixels 0..255: any other value would wrap in the cast
        pixels = integer_values(x, f"{path}: 'X' pixels", 0, 255)
        x = pixels.reshape(x.shape).astype(np.uint8)
    x = np.ascontiguousarray(np.moveaxis(x, 3, 0))
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
    check_count(n_train, "svhn: n_train")
    check_count(n_test, "svhn: n_test")
    d = require_dir(path, "svhn", _SVHN_HINT)
    tr = require_file(d / "train_32x32.mat", "svhn", _SVHN_HINT)
    te = require_file(d / "test_32x32.mat", "svhn", _SVHN_HINT)
    x_tr, y_tr, n_full = _read_svhn_mat(tr, n_train)
    x_te, y_te, m_full = _read_svhn_mat(te, n_test)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"svhn ({d}): train images {x_tr.shape[1:]} != test {x_te.shape[1:]}")
    ds = fixed_split("svhn", x_tr, y_tr, x_te, y_te, n_full, 10)
    if not include_extra:
        return ds
    ex = require_file(d / "extra_32x32.mat", "svhn (include_extra=True)", _SVHN_HINT)
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
    y = int_labels(np.asarray(batch["labels"]), str(path))
    if len(y) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(y)} labels")
    if data.dtype != np.uint8:  # pixels 0..255: any other value would wrap in the cast
        pixels = integer_values(data, f"{path}: 'data' pixels", 0, 255)
        data = pixels.reshape(data.shape).astype(np.uint8)
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
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
    check_count(n_train, "cifar10: n_train")
    check_count(n_test, "cifar10: n_test")
    d = require_dir(path, "cifar10", _CIFAR_HINT)
    if not (d / "test_batch").is_file() and (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    files = [require_file(d / b, "cifar10", _CIFAR_HINT) for b in CIFAR10_TRAIN_BATCHES]
    te_file = require_file(d / "test_batch", "cifar10", _CIFAR_HINT)
    xs, ys = zip(*(read_cifar_batch(f) for f in files), strict=True)
    x_tr, y_tr = np.concatenate(xs), np.concatenate(ys)
    x_te, y_te = read_cifar_batch(te_file)
    n_full = len(x_tr)
    x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    x_te, y_te = x_te[:n_test], y_te[:n_test]
    check_labels(y_tr, 10, f"cifar10 ({d}) train labels")
    check_labels(y_te, 10, f"cifar10 ({d}) test labels")
    return fixed_split("cifar10", x_tr, y_tr, x_te, y_te, n_full, 10)
