"""Tests for feddistill.data: IDX reading, data set loading, splits and partitions."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from feddistill.data import (
    FASHION_MNIST_DIR,
    ArrayDataset,
    DataError,
    label_histograms,
    load_dataset,
    load_digits_dataset,
    load_fashion_mnist,
    make_splits,
    partition,
    read_idx,
    reference_digest,
)

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


# --------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None, compress: bool = True) -> Path:
    """Tiny IDX writer: big-endian magic (type 0x08 = ubyte, ndim), dims, raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 | array.ndim
    blob = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(blob) if compress else blob)
    return path


def write_fashion_dir(directory: Path, n_train: int = 30, n_test: int = 12, *, compress: bool = True) -> dict:
    rng = np.random.default_rng(123)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    for name, arr in arrays.items():
        write_idx(directory / (name + (".gz" if compress else "")), arr, compress=compress)
    return arrays


def toy_dataset(n: int = 200, num_classes: int = 10, seed: int = 0) -> ArrayDataset:
    """Every row is unique (the first pixel encodes the index) so rows identify examples."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 4, 4), dtype=np.float32)
    x[:, 0, 0, 0] = np.arange(n) / n
    y = np.arange(n) % num_classes
    return ArrayDataset(x, y, num_classes)


def row_ids(ds: ArrayDataset, n: int) -> np.ndarray:
    return np.rint(ds.x[:, 0, 0, 0] * n).astype(np.int64)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    ip = write_idx(tmp_path / "imgs", images, compress=compress)
    lp = write_idx(tmp_path / "lbls", labels, compress=compress)
    got = read_idx(ip, expected_magic=IMAGES_MAGIC, expected_count=5, expected_item_shape=(7, 3))
    assert got.dtype == np.uint8 and got.shape == (5, 7, 3)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(read_idx(lp, expected_magic=LABELS_MAGIC, expected_count=5), labels)


def test_idx_bad_magic(tmp_path: Path) -> None:
    # A label file where an image file is expected.
    p = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(4))
    with pytest.raises(DataError) as err:
        read_idx(p, expected_magic=IMAGES_MAGIC)
    msg = str(err.value)
    assert str(p) in msg and "bad magic number 0x00000801" in msg and "0x00000803" in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg


def test_idx_truncated_payload(tmp_path: Path) -> None:
    p = tmp_path / "imgs"
    write_idx(p, np.ones((3, 4, 4)), compress=False)
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(p, expected_magic=IMAGES_MAGIC)


def test_idx_trailing_garbage(tmp_path: Path) -> None:
    p = tmp_path / "imgs"
    write_idx(p, np.ones((3, 4, 4)), compress=False)
    p.write_bytes(p.read_bytes() + b"xx")
    with pytest.raises(DataError, match="holds 50"):
        read_idx(p, expected_magic=IMAGES_MAGIC)


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    p = write_idx(tmp_path / "imgs.gz", np.arange(2000).reshape(20, 10, 10) % 256)
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(DataError, match="gzip") as err:
        read_idx(p, expected_magic=IMAGES_MAGIC)
    assert str(p) in str(err.value)


def test_idx_short_header(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(struct.pack(">I", IMAGES_MAGIC) + b"\x00\x00")
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx(p, expected_magic=IMAGES_MAGIC)
    p.write_bytes(b"\x00")
    with pytest.raises(DataError, match="too short"):
        read_idx(p, expected_magic=IMAGES_MAGIC)


def test_idx_count_and_shape_mismatch(tmp_path: Path) -> None:
    p = write_idx(tmp_path / "imgs.gz", np.zeros((3, 28, 28)))
    with pytest.raises(DataError, match="holds 3 items, expected 4"):
        read_idx(p, expected_magic=IMAGES_MAGIC, expected_count=4)
    with pytest.raises(DataError, match=r"shape \(28, 28\), expected \(8, 8\)"):
        read_idx(p, expected_magic=IMAGES_MAGIC, expected_item_shape=(8, 8))


def test_idx_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope" / "train-labels-idx1-ubyte.gz"
    with pytest.raises(DataError) as err:
        read_idx(p, expected_magic=LABELS_MAGIC)
    assert str(p) in str(err.value) and "not found" in str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value)


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("compress", [True, False])
def test_load_fashion_mnist_generated(tmp_path: Path, compress: bool) -> None:
    arrays = write_fashion_dir(tmp_path, compress=compress)
    train, test = load_fashion_mnist(tmp_path)
    assert train.x.shape == (30, 1, 28, 28) and test.x.shape == (12, 1, 28, 28)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.num_classes == test.num_classes == 10
    np.testing.assert_allclose(train.x[:, 0], arrays["train-images-idx3-ubyte"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(test.y, arrays["t10k-labels-idx1-ubyte"])
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0


def test_load_fashion_mnist_missing_file(tmp_path: Path) -> None:
    write_fashion_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        load_fashion_mnist(tmp_path)
    assert "t10k-labels-idx1-ubyte" in str(err.value) and "apt-get" in str(err.value)


def test_load_fashion_mnist_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="directory not found"):
        load_fashion_mnist(tmp_path / "absent")


def test_load_fashion_mnist_label_count_mismatch(tmp_path: Path) -> None:
    write_fashion_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29))
    with pytest.raises(DataError, match="train-labels.*holds 29 items, expected 30"):
        load_fashion_mnist(tmp_path)


def test_load_fashion_mnist_bad_label(tmp_path: Path) -> None:
    write_fashion_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(12, 10))
    with pytest.raises(DataError, match="label 10 outside 0..9"):
        load_fashion_mnist(tmp_path)


def test_load_fashion_mnist_wrong_image_size(tmp_path: Path) -> None:
    write_fashion_dir(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((30, 8, 8)))
    with pytest.raises(DataError, match=r"expected \(28, 28\)"):
        load_fashion_mnist(tmp_path)


def test_load_dataset_fashion_cached(tmp_path: Path) -> None:
    write_fashion_dir(tmp_path)
    a = load_dataset("fashion-mnist", str(tmp_path))
    b = load_dataset("fashion-mnist", str(tmp_path) + "/")
    assert a is b and a[1] is not None


def test_real_fashion_mnist() -> None:
    """Loads the Debian package's files when installed (CI); required if FEDDISTILL_REQUIRE_FASHION=1."""
    if not os.path.isdir(FASHION_MNIST_DIR):
        if os.environ.get("FEDDISTILL_REQUIRE_FASHION") == "1":
            pytest.fail(
                f"{FASHION_MNIST_DIR} is missing but FEDDISTILL_REQUIRE_FASHION=1; "
                "install it with `apt-get install -y dataset-fashion-mnist`"
            )
        # Not installed here: the generated-file tests above cover the loader.
        return
    train, test = load_dataset("fashion-mnist")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert np.array_equal(np.bincount(train.y), np.full(10, 6000))
    assert np.array_equal(np.bincount(test.y), np.full(10, 1000))
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0
    splits = make_splits(train, test, reference_size=10000, public_labelled_size=1000, seed=0)
    assert len(splits.private_pool) == 50000
    np.testing.assert_array_equal(splits.reference.x, train.x[50000:])


# --------------------------------------------------------------------------- digits / registry


def test_digits_shape_and_range() -> None:
    ds = load_digits_dataset()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.float32
    assert ds.y.shape == (1797,) and ds.y.dtype == np.int64
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert set(np.unique(ds.y)) == set(range(10)) and ds.num_classes == 10


def test_load_dataset_digits_and_cache() -> None:
    train, test = load_dataset("digits")
    assert test is None and len(train) == 1797
    assert load_dataset("digits")[0] is train


def test_load_dataset_unknown_name() -> None:
    with pytest.raises(DataError, match="unknown data set 'mnist'.*digits, fashion-mnist"):
        load_dataset("mnist")


def test_array_dataset_subset_and_validation() -> None:
    ds = toy_dataset(20)
    sub = ds.subset(np.array([3, 1]))
    assert len(sub) == 2 and sub.y.tolist() == [3, 1] and sub.num_classes == 10
    assert len(ds.subset(ds.y == 0)) == 2
    converted = ArrayDataset(np.zeros((2, 1, 2, 2)), [0, 1], 2)
    assert converted.x.dtype == np.float32 and converted.y.dtype == np.int64
    with pytest.raises(ValueError, match="shape"):
        ArrayDataset(np.zeros((2, 2, 2)), np.zeros(2), 2)
    with pytest.raises(ValueError, match="outside"):
        ArrayDataset(np.zeros((2, 1, 2, 2)), np.array([0, 2]), 2)


# --------------------------------------------------------------------------- splits


def test_fashion_rule_reference_is_tail() -> None:
    train, test = toy_dataset(100), toy_dataset(30, seed=1)
    s = make_splits(train, test, reference_size=20, public_labelled_size=5, seed=3)
    np.testing.assert_array_equal(s.reference.x, train.x[80:])
    np.testing.assert_array_equal(s.private_pool.x, train.x[:80])
    assert s.test is test
    ref_ids, pub_ids = set(row_ids(s.reference, 100)), set(row_ids(s.public_labelled, 100))
    assert len(pub_ids) == 5 and pub_ids <= ref_ids
    assert s.reference_digest == reference_digest(train.x[80:])
    # Seed changes which references are labelled, never the reference set itself.
    s2 = make_splits(train, test, reference_size=20, public_labelled_size=5, seed=4)
    assert s2.reference_digest == s.reference_digest
    assert not np.array_equal(s2.source_indices["public_labelled"], s.source_indices["public_labelled"])


def test_digits_rule_sizes_disjoint_stratified() -> None:
    ds = load_digits_dataset()
    s = make_splits(ds, None, reference_size=500, public_labelled_size=100, test_size=300, seed=0)
    assert (len(s.test), len(s.reference), len(s.public_labelled), len(s.private_pool)) == (300, 500, 100, 997)
    idx = s.source_indices
    test_i, ref_i, pool_i = idx["test"], idx["reference"], idx["private_pool"]
    assert len(np.intersect1d(test_i, ref_i)) == 0
    assert len(np.intersect1d(test_i, pool_i)) == 0
    assert len(np.intersect1d(ref_i, pool_i)) == 0
    assert len(np.union1d(np.union1d(test_i, ref_i), pool_i)) == len(ds)
    assert np.isin(idx["public_labelled"], ref_i).all()
    # The reference set comes from a shuffle of the remainder, not its first examples.
    remainder = np.setdiff1d(np.arange(len(ds)), test_i)
    assert not np.array_equal(ref_i, remainder[:500])
    assert ref_i.max() > remainder[500]
    # Indices really describe the data that was cut.
    np.testing.assert_array_equal(s.reference.x, ds.x[ref_i])
    np.testing.assert_array_equal(s.test.y, ds.y[test_i])
    # Stratified: each class's share of the test set is within one example of proportional.
    expected = np.bincount(ds.y) * 300 / len(ds)
    assert np.all(np.abs(np.bincount(s.test.y, minlength=10) - expected) < 1)


def test_splits_disjoint_by_unique_rows() -> None:
    ds = toy_dataset(150)
    s = make_splits(ds, None, reference_size=40, public_labelled_size=10, test_size=30, seed=7)
    t, r, p = (set(row_ids(d, 150)) for d in (s.test, s.reference, s.private_pool))
    assert len(t) == 30 and len(r) == 40 and len(p) == 80
    assert not (t & r) and not (t & p) and not (r & p)
    assert t | r | p == set(range(150))
    assert set(row_ids(s.public_labelled, 150)) <= r


def test_splits_deterministic_and_seed_dependent() -> None:
    ds = load_digits_dataset()
    kw = dict(reference_size=400, public_labelled_size=50, test_size=200)
    a = make_splits(ds, None, seed=11, **kw)
    b = make_splits(ds, None, seed=11, **kw)
    c = make_splits(ds, None, seed=12, **kw)
    assert a.reference_digest == b.reference_digest
    for key in a.source_indices:
        np.testing.assert_array_equal(a.source_indices[key], b.source_indices[key])
    np.testing.assert_array_equal(a.public_labelled.x, b.public_labelled.x)
    assert a.reference_digest != c.reference_digest
    assert not np.array_equal(a.source_indices["test"], c.source_indices["test"])


def test_reference_digest_is_float32_bytes() -> None:
    x = np.arange(12, dtype=np.float64).reshape(3, 1, 2, 2)
    assert reference_digest(x) == reference_digest(x.astype(np.float32))
    assert reference_digest(np.asfortranarray(x)) == reference_digest(x)
    assert reference_digest(x) != reference_digest(x + 1)
    assert len(reference_digest(x)) == 64


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(reference_size=0, public_labelled_size=1, test_size=10), "reference_size must be positive"),
        (dict(reference_size=10, public_labelled_size=0, test_size=10), "public_labelled_size must be positive"),
        (dict(reference_size=10, public_labelled_size=11, test_size=10), r"public_labelled_size \(11\) must be <="),
        (dict(reference_size=10, public_labelled_size=5), "test_size must be positive"),
        (dict(reference_size=150, public_labelled_size=5, test_size=50), r"reference_size \+ test_size \(200\)"),
    ],
)
def test_make_splits_errors_no_test(kwargs: dict, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        make_splits(toy_dataset(200), None, **kwargs)


def test_make_splits_errors_with_test() -> None:
    train, test = toy_dataset(50), toy_dataset(10)
    with pytest.raises(DataError, match=r"reference_size \(50\) must be < the 50"):
        make_splits(train, test, reference_size=50, public_labelled_size=5)
    with pytest.raises(DataError, match="test_size=5 is only used"):
        make_splits(train, test, reference_size=10, public_labelled_size=5, test_size=5)


# --------------------------------------------------------------------------- partition


def _labels(n: int = 2000, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=n)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_covers_everything_disjointly(scheme: str) -> None:
    labels = _labels(1003)
    parts = partition(labels, 7, scheme=scheme, alpha=0.5, seed=1)
    assert len(parts) == 7
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    allidx = np.concatenate(parts)
    assert len(allidx) == 1003 and np.array_equal(np.sort(allidx), np.arange(1003))


def test_partition_iid_balanced() -> None:
    sizes = [len(p) for p in partition(_labels(1003), 7, scheme="iid")]
    assert max(sizes) - min(sizes) <= 1


def test_partition_shards() -> None:
    labels = _labels(1005)
    parts = partition(labels, 10, scheme="shards", shards_per_client=2, seed=3)
    allidx = np.concatenate(parts)
    shard_size = 1005 // 20
    assert len(allidx) == len(np.unique(allidx)) == 20 * shard_size  # remainder of 5 dropped
    assert all(len(p) == 2 * shard_size and np.all(np.diff(p) > 0) for p in parts)
    hist = label_histograms(labels, parts, 10)
    # A contiguous run of a label-sorted array spans few labels: two shards of ~5 % of the
    # data each touch at most 2 labels apiece here (every class has ~100 examples > 50).
    assert (hist > 0).sum(axis=1).max() <= 2 * 2
    assert (hist > 0).sum(axis=1).mean() < 3.5


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_deterministic(scheme: str) -> None:
    labels = _labels(500)
    a = partition(labels, 5, scheme=scheme, seed=42)
    b = partition(labels, 5, scheme=scheme, seed=42)
    c = partition(labels, 5, scheme=scheme, seed=43)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _mean_max_class_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    hist = label_histograms(labels, parts, 10).astype(float)
    return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))


def test_dirichlet_skew_depends_on_alpha() -> None:
    labels = _labels(3000)
    skewed = np.mean([_mean_max_class_fraction(labels, partition(labels, 10, alpha=0.05, seed=s)) for s in range(3)])
    flat = np.mean([_mean_max_class_fraction(labels, partition(labels, 10, alpha=100.0, seed=s)) for s in range(3)])
    assert skewed > 0.6, skewed  # mostly one class per client
    assert flat < 0.2, flat  # close to the 0.1 of IID
    assert skewed > 3 * flat


def test_dirichlet_min_size_respected() -> None:
    labels = _labels(300)
    parts = partition(labels, 10, alpha=0.1, min_size=10, seed=0)
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_min_size_gives_up_with_clear_error() -> None:
    # 10 clients, all 100 examples need >= 10 each: nearly impossible with alpha=0.01.
    with pytest.raises(ValueError, match="no draw in .* tries.*increase alpha"):
        partition(_labels(100), 10, alpha=0.01, min_size=10, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(num_clients=3, scheme="zipf"), "unknown partition scheme 'zipf'.*iid, dirichlet, shards"),
        (dict(num_clients=0), "num_clients must be >= 1"),
        (dict(num_clients=3, alpha=0.0), "alpha must be > 0"),
        (dict(num_clients=3, alpha=-1.0), "alpha must be > 0"),
        (dict(num_clients=51), r"num_clients \(51\) exceeds the number of examples \(50\)"),
        (dict(num_clients=5, min_size=11), "impossible min_size=11"),
        (dict(num_clients=5, scheme="iid", min_size=11), "impossible min_size=11"),
        (dict(num_clients=5, scheme="shards", shards_per_client=11), "lower num_clients or shards_per_client"),
        (dict(num_clients=5, scheme="shards", shards_per_client=0), "shards_per_client must be >= 1"),
        (dict(num_clients=3, scheme="shards", shards_per_client=7, min_size=15), "shards give each client 14"),
    ],
)
def test_partition_errors(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        partition(_labels(50), **kwargs)


def test_partition_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="1-D"):
        partition(np.zeros((4, 2), dtype=int), 2)
    with pytest.raises(ValueError, match="integers"):
        partition(np.array([0.5, 1.0]), 2)


def test_label_histograms() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histograms(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert hist.dtype == np.int64
    np.testing.assert_array_equal(hist, [[1, 1, 0, 0], [0, 1, 3, 0]])
    with pytest.raises(ValueError, match="num_classes"):
        label_histograms(labels, [np.arange(6)], 2)
