"""Edge cases of the data layer: damaged archives, extreme ids, values a dtype cannot hold,
parameters out of range. Each is refused with one line of the project's own error types."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

import sisajax.data.datasets as datasets
from sisajax.data import synthetic
from sisajax.data.datasets import DataError, load_dataset
from sisajax.data.inputs import read_features
from sisajax.data.partition import Partition, PartitionError, hash_partition
from sisajax.errors import UserInputError

I64 = np.iinfo(np.int64)


# ---------------------------------------------------------------------------------------------
# Partition ids at the ends of the int64 range


@pytest.mark.parametrize("ids", [[-1, int(I64.max)], [int(I64.min), 0, 5], [int(I64.min), 1]])
def test_partition_takes_ids_two_to_the_63_apart(ids):
    p = hash_partition(np.array(ids, np.int64), 1, 1, 0)
    assert p.ids.tolist() == sorted(ids)
    assert p.contains(np.array(ids)).all()


def test_partition_refuses_unsorted_ids_whose_difference_wraps():
    z = np.zeros(2, np.int32)
    with pytest.raises(PartitionError, match="sorted and unique"):
        Partition(np.array([I64.max, I64.min], np.int64), z, z, 1, 1)


# ---------------------------------------------------------------------------------------------
# Damaged gzip and zip archives


def _corrupt_gzip(data: bytes) -> bytes:
    gz = bytearray(gzip.compress(data))
    gz[10] ^= 0xFF  # the first byte of the deflate stream: zlib reports an invalid stream
    return bytes(gz)


def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_corrupt_gzip_idx_is_a_data_error(tmp_path):
    img, lab = np.zeros((5, 4, 4), np.uint8), np.zeros(5, np.uint8)
    for prefix in ("train", "t10k"):
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(img)))
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(lab)))
    assert len(load_dataset("idx", path=str(tmp_path)).train_ids) == 5
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(_corrupt_gzip(_idx(img)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: cannot read .*zlib\.error"):
        load_dataset("idx", path=str(tmp_path))


def test_corrupt_gzip_purchase_is_a_data_error(tmp_path):
    rows = "".join("1," + ",".join("0" for _ in range(8)) + "\n" for _ in range(30))
    p = tmp_path / "dataset_purchase.gz"
    p.write_bytes(_corrupt_gzip(rows.encode()))
    with pytest.raises(DataError, match=r"dataset_purchase\.gz: cannot read .*zlib\.error"):
        load_dataset("purchase", path=str(p), num_features=8)


_DATA_SET = {
    "x_train": np.arange(150.0).reshape(50, 3),
    "y_train": np.zeros(50, int),
    "x_test": np.zeros((5, 3)),
    "y_test": np.zeros(5, int),
}


def _damaged_npzs(tmp_path: Path, arrays: dict[str, np.ndarray]) -> dict[str, Path]:
    """The same ``.npz`` truncated, with a bad CRC, and compressed with a corrupt stream."""
    whole_path, packed_path = tmp_path / "whole.npz", tmp_path / "packed.npz"
    np.savez(whole_path, **arrays)
    np.savez_compressed(packed_path, **arrays)
    whole, packed = whole_path.read_bytes(), bytearray(packed_path.read_bytes())
    crc = bytearray(whole)
    crc[whole.find(b"\x93NUMPY") + 200] ^= 0xFF  # inside the first array's data
    first = f"{next(iter(arrays))}.npy".encode()
    packed[packed.find(first) + 40] ^= 0xFF  # inside the first array's deflate stream
    out = {"truncated": whole[: len(whole) // 2], "crc": bytes(crc), "deflate": bytes(packed)}
    for k, b in out.items():
        (tmp_path / f"{k}.npz").write_bytes(b)
    return {k: tmp_path / f"{k}.npz" for k in out}


def test_damaged_npz_data_set_is_a_data_error(tmp_path):
    for kind, p in _damaged_npzs(tmp_path, _DATA_SET).items():
        with pytest.raises(DataError, match=r"cannot read as \.npz") as e:
            load_dataset("npz", path=str(p))
        assert type(e.value) is DataError, kind


def test_damaged_npz_predict_input_is_a_user_input_error(tmp_path):
    for p in _damaged_npzs(tmp_path, {"x": np.arange(150.0).reshape(50, 3)}).values():
        with pytest.raises(UserInputError, match="cannot read it"):
            read_features(p, (3,), np.float32)


def test_truncated_partition_file_is_a_partition_error(tmp_path):
    f = tmp_path / "partition.npz"
    hash_partition(np.arange(20), 2, 2, 0).save(f, durable=False)
    assert Partition.load(f).num_shards == 2
    b = f.read_bytes()
    f.write_bytes(b[: len(b) // 2])
    with pytest.raises(PartitionError, match="not a partition file"):
        Partition.load(f)


def test_npz_with_a_scalar_array_is_a_data_error(tmp_path):
    p = tmp_path / "scalar.npz"
    np.savez(
        p, x_train=np.float64(1), y_train=np.zeros(1, int), x_test=np.zeros((1, 3)), y_test=[0]
    )
    with pytest.raises(DataError, match=r"\['x_train'\] hold a single value"):
        load_dataset("npz", path=str(p))


# ---------------------------------------------------------------------------------------------
# Features to predict on


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ([0.5, 1.0], "must be integers"),
        ([1.0, np.nan], "must be integers"),
        ([0.0, 300.0], r"span \[0, 300\], outside \[0, 255\]"),
        ([-1.0, 2.0], r"span \[-1, 2\], outside \[0, 255\]"),
    ],
)
def test_features_for_a_uint8_run_are_not_truncated_or_wrapped(tmp_path, values, why):
    p = tmp_path / "x.npy"
    np.save(p, np.array([values]))
    with pytest.raises(UserInputError, match=f"features for a run on uint8 data {why}"):
        read_features(p, (2,), np.uint8)


def test_features_for_integer_runs_pass_when_exact(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.array([[0.0, 255.0], [7.0, 1.0]]))
    x = read_features(p, (2,), np.uint8)
    assert x.dtype == np.uint8 and x.tolist() == [[0, 255], [7, 1]]
    np.save(p, np.array([[0, 1], [1, 2]], np.int64))
    with pytest.raises(UserInputError, match=r"run on bool data span \[0, 2\], outside \[0, 1\]"):
        read_features(p, (2,), bool)
    np.save(p, np.array([[70000, -5]], np.int64))
    with pytest.raises(UserInputError, match=r"outside \[-32768, 32767\]"):
        read_features(p, (2,), "int16")
    np.save(p, np.array([[0.5, 300.0]]))  # float runs take any finite value as it is
    assert read_features(p, (2,), np.float32).tolist() == [[0.5, 300.0]]
    for bad in ([[0.5, 1e300]], [[np.nan, 1.0]], [[np.inf, 1.0]]):  # 1e300 overflows float32
        np.save(p, np.array(bad))
        with pytest.raises(UserInputError, match="finite numbers a float32 run can hold"):
            read_features(p, (2,), np.float32)


def test_csv_first_line_is_a_header_only_without_numbers(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b,c\n0.5,0.25,0.125\n")
    assert read_features(p, (3,), np.float32).tolist() == [[0.5, 0.25, 0.125]]
    p.write_text("0,1,2\n0.5,0.25,0.125\n")  # a numeric header cannot be told from data
    assert read_features(p, (3,), np.float32).shape == (2, 3)
    for first in ("0.5,,0.125", "a,1,b", "0.5,x,0.125"):
        p.write_text(f"{first}\n1.5,1.25,1.125\n")
        with pytest.raises(UserInputError, match="row 1 is not all numbers"):
            read_features(p, (3,), np.float32)


# ---------------------------------------------------------------------------------------------
# SVHN pixels of another dtype


def _svhn(tmp_path: Path, pixel: float) -> Path:
    from scipy.io import savemat

    x = np.zeros((32, 32, 3, 2))
    x[0, 0, 0, 1] = pixel
    for split in ("train", "test"):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": np.array([[1], [10]])})
    return tmp_path


def test_svhn_float_pixels_are_checked_not_wrapped(tmp_path):
    ds = load_dataset("svhn", path=str(_svhn(tmp_path, 255.0)))
    assert ds.x_train.dtype == np.uint8 and ds.x_train[:, 0, 0, 0].tolist() == [0, 255]
    for pixel, why in ((256.0, r"outside \[0, 255\]"), (-1.0, "outside"), (0.5, "integers")):
        with pytest.raises(DataError, match=f"'X' pixels .*{why}"):
            load_dataset("svhn", path=str(_svhn(tmp_path, pixel)))


# ---------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize("tf", [1.0, -0.5, float("nan"), "0.2"])
def test_digits_test_fraction_is_range_checked(tf):
    with pytest.raises(DataError, match=r"digits: test_fraction must be in \[0, 1\)"):
        load_dataset("digits", test_fraction=tf)


@pytest.mark.parametrize("name", ["purchase_synthetic", "cifar_synthetic"])
@pytest.mark.parametrize("seed", [-1, 1.5])
def test_generator_seed_must_be_a_non_negative_integer(name, seed):
    with pytest.raises(DataError, match=rf"{name}: data.params.seed must be an integer >= 0"):
        load_dataset(name, n_train=4, n_test=0, seed=seed)


def test_bayes_accuracy_refuses_a_negative_seed():
    with pytest.raises(DataError, match="data.params.seed"):
        synthetic.bayes_accuracy("purchase_synthetic", n_train=4, n_test=2, seed=-1)


def test_only_wrong_parameter_names_are_called_bad_parameters(monkeypatch):
    with pytest.raises(DataError, match="bad parameters for data set 'digits'.*colour"):
        load_dataset("digits", colour=3)

    def broken(size: int = 3) -> datasets.Dataset:
        return len(size)  # a TypeError inside the loader, not in the call

    monkeypatch.setitem(datasets._REGISTRY, "broken", broken)
    with pytest.raises(DataError, match="data set 'broken': loading failed") as e:
        load_dataset("broken", size=4)
    assert "bad parameters" not in str(e.value)
    with pytest.raises(DataError, match="bad parameters for data set 'broken'"):
        load_dataset("broken", width=4)
