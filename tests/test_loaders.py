"""File-format loaders: each reads small files written here and round-trips known content."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

import sisajax as sj
import sisajax.data.published as published
from sisajax.data.datasets import DataError, available_datasets, load_dataset

# ---------------------------------------------------------------------------------------------
# IDX


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    be = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(be).tobytes()


def _write(path: Path, data: bytes, gz: bool) -> None:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def _mnist_dir(tmp_path: Path, gz: bool, n: int = 5, m: int = 3) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, size=(m, 28, 28), dtype=np.uint8),
        "y_test": np.array([9, 0, 4][:m], dtype=np.uint8),
    }
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(arrays["x_train"]), gz)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(arrays["y_train"]), gz)
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx_bytes(arrays["x_test"]), gz)
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(arrays["y_test"]), gz)
    return tmp_path, arrays


def test_all_formats_registered():
    names = set(available_datasets())
    assert {"idx", "fashion_mnist", "purchase", "svhn", "cifar10", "npz", "csv"} <= names


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    d, a = _mnist_dir(tmp_path, gz)
    ds = load_dataset("idx", path=str(d))
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (5, 28, 28)
    np.testing.assert_array_equal(ds.x_train, a["x_train"])
    np.testing.assert_array_equal(ds.x_test, a["x_test"])
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(ds.y_test, [9, 0, 4])
    assert ds.y_train.dtype == np.int32 and ds.num_classes == 10
    np.testing.assert_array_equal(ds.train_ids, np.arange(5))
    np.testing.assert_array_equal(ds.test_ids, [5, 6, 7])


def test_idx_first_rows_keep_ids(tmp_path):
    d, a = _mnist_dir(tmp_path, gz=True)
    ds = load_dataset("idx", path=str(d), n_train=2, n_test=1, num_classes=10)
    np.testing.assert_array_equal(ds.x_train, a["x_train"][:2])
    np.testing.assert_array_equal(ds.train_ids, [0, 1])
    np.testing.assert_array_equal(ds.test_ids, [5])  # N is the file's train size, not n_train
    np.testing.assert_array_equal(ds.y_test, [9])


def test_read_idx_non_uint8_big_endian(tmp_path):
    arr = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    (tmp_path / "a").write_bytes(_idx_bytes(arr, 0x0C))
    out, total = published.read_idx(tmp_path / "a")
    np.testing.assert_array_equal(out, arr)
    assert total == 2 and out.dtype == np.int32
    f = np.array([0.5, -1.25], dtype=np.float32)
    (tmp_path / "b").write_bytes(_idx_bytes(f, 0x0D))
    np.testing.assert_array_equal(published.read_idx(tmp_path / "b")[0], f)


def test_idx_bad_magic(tmp_path):
    d, _ = _mnist_dir(tmp_path, gz=False)
    p = d / "train-images-idx3-ubyte"
    p.write_bytes(b"\x12\x34" + p.read_bytes()[2:])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*bad magic"):
        load_dataset("idx", path=str(d))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    d, a = _mnist_dir(tmp_path, gz)
    name = "t10k-images-idx3-ubyte"
    _write(d / name, _idx_bytes(a["x_test"])[:-10], gz)
    with pytest.raises(DataError, match=rf"{name}.*truncated"):
        load_dataset("idx", path=str(d))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "dims",
    [(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (1 << 20, 1 << 12, 1 << 12)],  # overflows / 16 TiB
)
def test_idx_header_claiming_more_than_the_file_holds(tmp_path, gz, dims):
    """A header whose shape overflows int64 or claims terabytes is a truncated file (a
    DataError naming it), not an overflow, a negative read size or an attempt to allocate."""
    import struct

    d, _ = _mnist_dir(tmp_path, gz)
    head = bytes([0, 0, 0x08, len(dims)]) + b"".join(struct.pack(">I", v) for v in dims)
    _write(d / "train-images-idx3-ubyte", head + bytes(16), gz)
    for n_train in (None, 5):
        with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
            load_dataset("idx", path=str(d), n_train=n_train)


def test_idx_truncated_gzip_stream(tmp_path):
    d, _ = _mnist_dir(tmp_path, gz=True)
    p = d / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-30])  # cut the compressed stream itself
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("idx", path=str(d))


def test_idx_count_mismatch(tmp_path):
    d, _ = _mnist_dir(tmp_path, gz=False)
    _write(d / "train-labels-idx1-ubyte", _idx_bytes(np.zeros(4, np.uint8)), False)
    with pytest.raises(DataError, match=r"5 images but .*train-labels-idx1-ubyte has 4 labels"):
        load_dataset("idx", path=str(d))


def test_idx_missing_file_and_dir(tmp_path):
    d, _ = _mnist_dir(tmp_path, gz=False)
    (d / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\[\.gz\] not found"):
        load_dataset("idx", path=str(d))
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", path=str(tmp_path / "nowhere"))


@pytest.mark.skipif(
    not Path(published.FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_fashion_mnist_installed():
    ds = load_dataset("fashion_mnist", n_train=100, n_test=10)
    assert ds.x_train.shape == (100, 28, 28) and ds.x_train.dtype == np.uint8
    assert ds.test_ids[0] == 60_000 and ds.num_classes == 10


# ---------------------------------------------------------------------------------------------
# Purchase-100


def _purchase_file(path: Path, labels: list[int], k: int = 600) -> np.ndarray:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, size=(len(labels), k))
    path.write_text(
        "".join(f"{y}," + ",".join(map(str, r)) + "\n" for y, r in zip(labels, x, strict=True))
    )
    return x


def test_purchase_one_based_labels_and_split(tmp_path):
    labels = [1 + (i % 100) for i in range(200)]
    x = _purchase_file(tmp_path / "dataset_purchase", labels)
    ds = load_dataset("purchase", path=str(tmp_path), test_fraction=0.25, split_seed=3)
    assert ds.x_train.dtype == np.uint8 and ds.feature_shape == (600,)
    assert ds.num_classes == 100
    ids = np.concatenate([ds.train_ids, ds.test_ids])
    np.testing.assert_array_equal(np.sort(ids), np.arange(200))
    assert 20 < len(ds.test_ids) < 80
    # Every row's features/label match line `id` of the file, labels shifted to 0-based.
    y_all = np.asarray(labels) - 1
    np.testing.assert_array_equal(ds.x_train, x[ds.train_ids])
    np.testing.assert_array_equal(ds.y_test, y_all[ds.test_ids])
    # The split is a pure function of (seed, id): same seed, same split.
    again = load_dataset(
        "purchase", path=str(tmp_path / "dataset_purchase"), test_fraction=0.25, split_seed=3
    )
    np.testing.assert_array_equal(again.test_ids, ds.test_ids)


def test_purchase_label_offset(tmp_path):
    p = tmp_path / "p.txt"
    _purchase_file(p, [0, 1, 2, 1], k=4)
    ds = load_dataset("purchase", path=str(p), num_features=4, test_fraction=0.0)
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 1])  # min is 0: auto keeps labels
    ds = load_dataset("purchase", path=str(p), num_features=4, test_fraction=0.0, label_offset=-1)
    np.testing.assert_array_equal(ds.y_train, [1, 2, 3, 2])
    gz = tmp_path / "p.txt.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    ds_gz = load_dataset("purchase", path=str(gz), num_features=4, test_fraction=0.0)
    np.testing.assert_array_equal(ds_gz.x_train, ds.x_train)


def test_purchase_wrong_columns(tmp_path):
    p = tmp_path / "p.txt"
    _purchase_file(p, [1, 2, 3], k=599)
    with pytest.raises(DataError, match=r"p\.txt: expected 601 columns .* got 600"):
        load_dataset("purchase", path=str(p))
    p.write_text("1,0,1,0\n2,1,0\n")  # ragged rows
    with pytest.raises(DataError, match=r"p\.txt: cannot parse"):
        load_dataset("purchase", path=str(p), num_features=3)
    p.write_text("1,0,1\n2,1,0\n3,1,1,1\n")  # column count changes in a later chunk
    with pytest.raises(DataError, match=r"p\.txt: 4 columns in lines 3\.\.3, 3 before"):
        published.read_label_rows(p, "test", chunk_rows=2)
    p.write_text("1,0,300\n")
    with pytest.raises(DataError, match=r"p\.txt: features outside \[0, 255\]"):
        load_dataset("purchase", path=str(p), num_features=2)


def test_purchase_missing(tmp_path):
    with pytest.raises(DataError, match=r"dataset_purchase not found.*privacytrustlab"):
        load_dataset("purchase", path=str(tmp_path))
    with pytest.raises(DataError, match="no path given"):
        load_dataset("purchase")


# ---------------------------------------------------------------------------------------------
# SVHN


def _svhn_mat(path: Path, x_nhwc: np.ndarray, y: np.ndarray) -> None:
    from scipy.io import savemat

    savemat(path, {"X": np.moveaxis(x_nhwc, 0, 3), "y": y.reshape(-1, 1).astype(np.uint8)})


def test_svhn_round_trip_and_label_10(tmp_path):
    rng = np.random.default_rng(2)
    x_tr = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    _svhn_mat(tmp_path / "train_32x32.mat", x_tr, np.array([10, 1, 5, 10]))
    _svhn_mat(tmp_path / "test_32x32.mat", x_te, np.array([9, 10]))
    ds = load_dataset("svhn", path=str(tmp_path))
    assert ds.x_train.shape == (4, 32, 32, 3) and ds.x_train.dtype == np.uint8
    np.testing.assert_array_equal(ds.x_train, x_tr)
    np.testing.assert_array_equal(ds.x_test, x_te)
    np.testing.assert_array_equal(ds.y_train, [0, 1, 5, 0])  # 10 means digit 0
    np.testing.assert_array_equal(ds.y_test, [9, 0])
    np.testing.assert_array_equal(ds.test_ids, [4, 5])
    sub = load_dataset("svhn", path=str(tmp_path), n_train=1, n_test=1)
    np.testing.assert_array_equal(sub.x_train, x_tr[:1])
    np.testing.assert_array_equal(sub.test_ids, [4])

    x_ex = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    _svhn_mat(tmp_path / "extra_32x32.mat", x_ex, np.array([3, 10, 7]))
    ext = load_dataset("svhn", path=str(tmp_path), include_extra=True)
    np.testing.assert_array_equal(ext.train_ids, [0, 1, 2, 3, 6, 7, 8])
    np.testing.assert_array_equal(ext.x_train[4:], x_ex)
    np.testing.assert_array_equal(ext.y_train[4:], [3, 0, 7])


def test_svhn_errors(tmp_path):
    with pytest.raises(DataError, match=r"train_32x32\.mat not found.*ufldl\.stanford\.edu"):
        load_dataset("svhn", path=str(tmp_path))
    x = np.zeros((3, 32, 32, 3), np.uint8)
    _svhn_mat(tmp_path / "train_32x32.mat", x, np.array([1, 2]))
    _svhn_mat(tmp_path / "test_32x32.mat", x, np.array([1, 2, 3]))
    with pytest.raises(DataError, match=r"train_32x32\.mat: 3 images but 2 labels"):
        load_dataset("svhn", path=str(tmp_path))
    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataError, match=r"train_32x32\.mat: cannot read"):
        load_dataset("svhn", path=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def _cifar_dir(root: Path, per_batch: int = 2) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir()
    for i, name in enumerate([*published.CIFAR10_TRAIN_BATCHES, "test_batch"]):
        n = per_batch
        # Channel planes: R = 10*i + row, G = 100 + row, B = 200 + pixel index mod 50.
        data = np.empty((n, 3, 1024), dtype=np.uint8)
        for r in range(n):
            data[r, 0] = 10 * i + r
            data[r, 1] = 100 + r
            data[r, 2] = 200 + np.arange(1024) % 50
        batch = {b"data": data.reshape(n, 3072), b"labels": [(i + r) % 10 for r in range(n)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return d


def test_cifar10_channel_layout(tmp_path):
    _cifar_dir(tmp_path)
    ds = load_dataset("cifar10", path=str(tmp_path))  # parent dir also accepted
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (2, 32, 32, 3)
    # Row 3 = batch 2 (i=1), r=1: R plane constant 11, G 101, B 200 + (h*32 + w) % 50.
    img = ds.x_train[3]
    assert np.all(img[..., 0] == 11) and np.all(img[..., 1] == 101)
    assert img[0, 1, 2] == 201 and img[1, 0, 2] == 200 + 32 % 50 and img[2, 5, 2] == 200 + 69 % 50
    np.testing.assert_array_equal(ds.y_train, [0, 1, 1, 2, 2, 3, 3, 4, 4, 5])
    np.testing.assert_array_equal(ds.y_test, [5, 6])
    np.testing.assert_array_equal(ds.test_ids, [10, 11])
    assert np.all(ds.x_test[..., 0][0] == 50)  # test_batch is i=5
    sub = load_dataset("cifar10", path=str(tmp_path / "cifar-10-batches-py"), n_train=3, n_test=1)
    np.testing.assert_array_equal(sub.x_train, ds.x_train[:3])
    np.testing.assert_array_equal(sub.test_ids, [10])


def test_cifar10_errors(tmp_path):
    d = _cifar_dir(tmp_path)
    (d / "data_batch_4").unlink()
    with pytest.raises(DataError, match=r"data_batch_4 not found.*cs\.toronto\.edu/~kriz/cifar"):
        load_dataset("cifar10", path=str(d))
    with open(d / "data_batch_4", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, f)
    with pytest.raises(DataError, match=r"data_batch_4: 2 images but 1 labels"):
        load_dataset("cifar10", path=str(d))
    (d / "data_batch_4").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match=r"data_batch_4: not a CIFAR-10 python batch"):
        load_dataset("cifar10", path=str(d))
    # pixels in a wider dtype: kept when they are 0..255, refused (never wrapped) otherwise
    for data, ok in ((np.full((1, 3072), 255, np.int64), True), (np.full((1, 3072), 256), False)):
        with open(d / "data_batch_4", "wb") as f:
            pickle.dump({b"data": data, b"labels": [1]}, f)
        if ok:
            assert (published.read_cifar_batch(d / "data_batch_4")[0] == 255).all()
        else:
            with pytest.raises(DataError, match="pixels span"):
                published.read_cifar_batch(d / "data_batch_4")


# ---------------------------------------------------------------------------------------------
# npz and CSV


def test_npz_round_trip(tmp_path):
    x_tr = np.arange(12, dtype=np.float64).reshape(4, 3) / 4
    x_te = np.ones((2, 3))
    p = tmp_path / "d.npz"
    np.savez(p, x_train=x_tr, y_train=[0, 1, 2, 1], x_test=x_te, y_test=[2, 0])
    ds = load_dataset("npz", path=str(p))
    assert ds.x_train.dtype == np.float32 and ds.num_classes == 3
    np.testing.assert_array_equal(ds.x_train, x_tr.astype(np.float32))
    np.testing.assert_array_equal(ds.test_ids, [4, 5])
    np.testing.assert_array_equal(ds.y_test, [2, 0])

    np.savez(
        p,
        x_train=np.zeros((2, 2), np.uint8),
        y_train=[0, 1],
        x_test=np.zeros((1, 2), np.uint8),
        y_test=[1],
        train_ids=[100, 7],
        test_ids=[42],
    )
    ds = load_dataset("npz", path=str(p), num_classes=5)
    assert ds.x_train.dtype == np.uint8 and ds.num_classes == 5
    np.testing.assert_array_equal(ds.train_ids, [100, 7])
    assert ds.train_ids.dtype == np.int64 and ds.test_ids.tolist() == [42]


def test_npz_errors(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x_train=np.zeros((2, 2)), y_train=[0, 1], x_test=np.zeros((1, 2)))
    with pytest.raises(DataError, match=r"d\.npz: missing arrays \['y_test'\]"):
        load_dataset("npz", path=str(p))
    np.savez(p, x_train=np.zeros((2, 2)), y_train=[0, 1], x_test=np.zeros((1, 2)), y_test=[0.5])
    with pytest.raises(DataError, match=r"d\.npz y_test: labels must be integers"):
        load_dataset("npz", path=str(p))
    with pytest.raises(DataError, match=r"missing\.npz not found"):
        load_dataset("npz", path=str(tmp_path / "missing.npz"))


def test_csv_round_trip(tmp_path):
    p = tmp_path / "t.csv"
    rows = [(i, 0.5 * i, i % 3, -float(i), 10_000_000_000_000_000 + i) for i in range(40)]
    p.write_text("a,label,b,uid\n" + "".join(f"{a},{y},{b},{u}\n" for a, _, y, b, u in rows))
    ds = load_dataset("csv", path=str(p), test_fraction=0.3, split_seed=1)
    assert ds.x_train.dtype == np.float32 and ds.feature_shape == (3,)  # a, b, uid
    assert ds.num_classes == 3
    np.testing.assert_array_equal(np.sort(np.r_[ds.train_ids, ds.test_ids]), np.arange(40))
    i = int(ds.test_ids[0])
    np.testing.assert_array_equal(ds.x_test[0][:2], [i, -float(i)])
    assert ds.y_test[0] == i % 3

    by_id = load_dataset("csv", path=str(p), id_column="uid", test_fraction=0.3)
    assert by_id.feature_shape == (2,)
    ids = np.sort(np.r_[by_id.train_ids, by_id.test_ids])
    np.testing.assert_array_equal(ids, 10_000_000_000_000_000 + np.arange(40))  # exact int64
    j = int(np.flatnonzero(by_id.train_ids == 10_000_000_000_000_005)[0])
    np.testing.assert_array_equal(by_id.x_train[j], [5.0, -5.0])
    assert by_id.y_train[j] == 2


def test_csv_errors(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("x,y\n1,0\n")
    with pytest.raises(DataError, match=r"t\.csv: no column 'label'"):
        load_dataset("csv", path=str(p))
    p.write_text("x,label\n1.5,0\n2.5,1,7\n")
    with pytest.raises(DataError, match=r"t\.csv: cannot parse"):
        load_dataset("csv", path=str(p))
    p.write_text("x,label,id\n1,0,3\n2,1,3\n")
    with pytest.raises(DataError, match="duplicate"):
        load_dataset("csv", path=str(p), id_column="id")


def test_csv_with_class_names_as_labels(tmp_path):
    p = tmp_path / "iris.csv"
    names = ["virginica", "setosa", "versicolor"]
    rows = "".join(f"{i},{i * 0.5},{names[i % 3]}\n" for i in range(30))
    p.write_text("a,b,species\n" + rows.replace("setosa", '"setosa"'))  # quoted or not
    ds = load_dataset("csv", path=str(p), label_column="species", test_fraction=0.2)
    assert ds.class_names == ("setosa", "versicolor", "virginica")  # sorted -> 0..C-1
    assert ds.num_classes == 3 and ds.feature_shape == (2,)
    for ids, x, y in ((ds.train_ids, ds.x_train, ds.y_train), (ds.test_ids, ds.x_test, ds.y_test)):
        want = [ds.class_names.index(names[i % 3]) for i in ids.tolist()]
        np.testing.assert_array_equal(y, want)
        np.testing.assert_array_equal(x[:, 0], ids)
    assert "3 classes (0=setosa, 1=versicolor, 2=virginica)" in ds.summary()
    assert f"float32 in 0..{ds.x_train.max():g}, 3 classes" in ds.summary()  # x_train's range

    p.write_text("a,label\n1,0.5\n2,1\n")  # numbers, not all integers: refused, not names
    with pytest.raises(DataError, match="not all integers"):
        load_dataset("csv", path=str(p))
    p.write_text("a,label\n1,cat\n2,\n")
    with pytest.raises(DataError, match=r"empty label in column 'label' \(data row 2\)"):
        load_dataset("csv", path=str(p))
    p.write_text("a,label\n1,cat\n2,dog\n")
    with pytest.raises(DataError, match="names 2 classes"):
        load_dataset("csv", path=str(p), num_classes=5)
    p.write_text("a,label\nsecret-token,cat\n2,dog\n")
    with pytest.raises(DataError, match="cannot parse") as e:
        load_dataset("csv", path=str(p))
    assert "secret-token" not in str(e.value)


def test_summary_states_the_value_range_and_preprocessing():
    import sisajax as sj

    x = np.array([[0, 3], [255, 7]], np.uint8)
    ds = sj.from_arrays(x, [0, 1], x, [1, 0])
    assert "features (2,) uint8 in 0..255, 2 classes" in ds.summary()
    scaled = sj.Dataset(**{**ds.__dict__, "preprocessing": {"scale": 1 / 255}})
    assert "uint8 in 0..255 (model input x * 0.00392157 + 0: 0..1)" in scaled.summary()


def test_cifar10_pickle_that_would_run_code_is_refused(tmp_path):
    """A crafted batch file whose unpickling calls os.system: refused, never executed."""
    d = _cifar_dir(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    with open(d / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(
        DataError, match=r"data_batch_2: not a CIFAR-10 python batch \(refused global"
    ):
        load_dataset("cifar10", path=str(d))
    assert not marker.exists()
    (d / "data_batch_2").write_bytes(pickle.dumps(eval))  # builtins.eval is refused too
    with pytest.raises(DataError, match="refused global builtins.eval"):
        load_dataset("cifar10", path=str(d))


def test_parse_errors_do_not_echo_file_content(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("label,a,b\n1,2,3\n0,secret-token,5\n")
    with pytest.raises(DataError) as e:
        load_dataset("csv", path=str(p))
    assert "secret-token" not in str(e.value) and "bad.csv" in str(e.value)
    purchase = tmp_path / "dataset_purchase"
    purchase.write_text("1," + ",".join(["0"] * 599) + ",secret-token\n")
    with pytest.raises(DataError) as e:
        load_dataset("purchase", path=str(purchase))
    assert "secret-token" not in str(e.value)


def test_no_id_or_label_is_wrapped_or_truncated_on_the_way_in(tmp_path):
    """Values that a cast would silently change are refused: a uint64 id beyond int64 (it
    would become negative), a label beyond int32, float ids and labels with a fraction, float
    labels handed to a Dataset directly."""
    x = np.random.default_rng(0).random((40, 4)).astype(np.float32)
    p = tmp_path / "wrap.npz"
    np.savez(p, x_train=x[:4], y_train=np.array([0, 2**32 + 1, 0, 1]), x_test=x[4:6],
             y_test=np.array([0, 1]))  # fmt: skip
    with pytest.raises(DataError, match="labels span"):
        load_dataset("npz", path=str(p))
    np.savez(p, x_train=x[:4], y_train=np.array([0, 1, 0, 1]), x_test=x[4:6],
             y_test=np.array([0, 1]), train_ids=np.array([2**64 - 1, 2, 0, 1], np.uint64))  # fmt: skip
    with pytest.raises(DataError, match="ids span"):
        load_dataset("npz", path=str(p))
    y = np.arange(30) % 3
    with pytest.raises(DataError, match="y_train labels must be integers"):
        sj.from_arrays(x[:30], y + 0.9, x[30:], y[:10])
    with pytest.raises(DataError, match="train_ids must be integers"):
        sj.from_arrays(x[:30], y, x[30:], y[:10], train_ids=np.arange(30) + 0.5)
    ok = sj.from_arrays(x[:30], y.astype(np.float64), x[30:], y[:10])  # whole floats are fine
    assert ok.y_train.dtype == np.int32 and ok.num_classes == 3
    with pytest.raises(DataError, match="labels must have an integer dtype"):
        sj.Dataset("d", np.arange(30, dtype=np.int64), x[:30], y + 0.5,
                   np.arange(30, 40, dtype=np.int64), x[30:], y[:10], 4)  # fmt: skip


def test_csv_hash_signs_are_data_and_a_byte_order_mark_is_not(tmp_path):
    """No comment character: a class named ``C#`` stays distinct from ``C`` and a row starting
    with ``#`` is refused (not dropped); a UTF-8 byte-order mark before the header (a
    spreadsheet's "CSV UTF-8") is not part of the first column's name."""
    p = tmp_path / "keys.csv"
    p.write_text("a,b,label\n1,2,C#\n3,4,C\n5,6,F#\n7,8,F\n")
    ds = load_dataset("csv", path=str(p), test_fraction=0.0)
    assert ds.class_names == ("C", "C#", "F", "F#") and ds.y_train.tolist() == [1, 0, 3, 2]
    p.write_text("a,b,label\n1,2,1\n#3,4,0\n5,6,0\n")
    with pytest.raises(DataError, match="cannot parse"):
        load_dataset("csv", path=str(p), test_fraction=0.0)
    p.write_bytes("\ufefflabel,a,b\n0,1,2\n1,3,4\n".encode())
    ds = load_dataset("csv", path=str(p), test_fraction=0.0)
    assert ds.y_train.tolist() == [0, 1] and ds.x_train.tolist() == [[1, 2], [3, 4]]


def test_bfloat16_features_with_nan_are_refused():
    """ml_dtypes floats (bfloat16: numpy kind "V") get the same NaN / inf check as float32."""
    import ml_dtypes

    x = np.ones((4, 2), ml_dtypes.bfloat16)
    x[1, 1] = np.nan
    with pytest.raises(DataError, match="NaN or inf"):
        sj.Dataset("d", np.arange(4, dtype=np.int64), x, np.zeros(4, np.int32),
                   np.arange(4, 6, dtype=np.int64), x[:2] * 0, np.zeros(2, np.int32), 2)  # fmt: skip
