"""Data sets as plain numpy arrays: Fashion-MNIST (IDX files) and scikit-learn digits.

Everything is loaded into an :class:`ArrayDataset` (``x``: float32 ``(N, 1, H, W)`` in
[0, 1]; ``y``: int64 ``(N,)``). Nothing is downloaded: Fashion-MNIST is read from the
Debian package ``dataset-fashion-mnist`` (installed under :data:`FASHION_MNIST_DIR`) or a
directory the user points at, and digits ships inside scikit-learn.

Fashion-MNIST: Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms", arXiv:1708.07747 (2017). The IDX format is the
one described on LeCun's MNIST page: a big-endian header (two zero bytes, a type code,
the number of dimensions, then one uint32 per dimension) followed by the raw data.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feddistill.registry import Registry

__all__ = [
    "DataError",
    "ArrayDataset",
    "Dataset",
    "DATASETS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "DATASET_CLASSES",
    "FLIP_KEEPS_CLASS",
    "read_idx",
    "load_fashion_mnist",
    "load_digits_dataset",
    "load_dataset",
    "register_dataset",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Base names of the four files, as published; each may also be stored un-gzipped.
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)
_MAGIC_KIND = {IDX_IMAGES_MAGIC: "an IDX image file", IDX_LABELS_MAGIC: "an IDX label file"}

_FIX_HINT = (
    "reinstall with `apt-get install -y dataset-fashion-mnist` or pass a directory "
    "holding the four Fashion-MNIST IDX files"
)


class DataError(ValueError):
    """Missing/corrupt data; the message names the file and how to fix it."""


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array equality has no truth value
class ArrayDataset:
    """An in-memory image classification data set.

    ``x`` is float32 ``(N, 1, H, W)`` with values in [0, 1]; ``y`` is int64 ``(N,)`` with
    values in ``0..num_classes-1``. Inputs of another dtype are converted on construction.
    Arrays returned by :func:`load_dataset` are shared through its cache: treat them as
    read-only (``subset`` always returns copies).
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        # Convert here so every consumer can rely on the documented dtypes.
        x = np.asarray(self.x, dtype=np.float32)
        y = np.asarray(self.y, dtype=np.int64)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"ArrayDataset.x must have shape (N, 1, H, W), got {x.shape}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"ArrayDataset.y must have shape ({x.shape[0]},), got {y.shape}")
        if self.num_classes < 1:
            raise ValueError(f"ArrayDataset.num_classes must be >= 1, got {self.num_classes}")
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(
                f"ArrayDataset.y has labels outside 0..{self.num_classes - 1} (min {y.min()}, max {y.max()})"
            )
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """Return the examples at ``indices`` (int positions or a boolean mask), copied."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False)
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes)


# --------------------------------------------------------------------------- IDX reading


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping it (detected by content, not by name)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; {_FIX_HINT}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc}); {_FIX_HINT}") from exc
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        # EOFError is what a truncated gzip stream raises; BadGzipFile is an OSError.
        raise DataError(f"{path}: corrupt or truncated gzip data ({exc}); {_FIX_HINT}") from exc


def read_idx(
    path: str | Path,
    *,
    expected_magic: int,
    expected_count: int | None = None,
    expected_item_shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped or plain) and validate it.

    Checks the magic number, that the header holds as many dimensions as the magic
    number says, that the payload is exactly ``prod(dims)`` bytes (catches truncation
    and trailing garbage), and optionally the item count and per-item shape.
    Returns a uint8 array of shape ``dims``. Every failure is a :class:`DataError`
    naming the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: file is {len(data)} bytes, too short for an IDX header; {_FIX_HINT}")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        kind = _MAGIC_KIND.get(expected_magic, "an IDX file")
        raise DataError(
            f"{path}: bad magic number 0x{magic:08x} (expected 0x{expected_magic:08x}, {kind}); {_FIX_HINT}"
        )
    ndim = magic & 0xFF  # low byte of the magic number = number of dimensions
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {header_len}); {_FIX_HINT}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    payload = len(data) - header_len
    expected_payload = int(np.prod(dims, dtype=np.int64))
    if payload != expected_payload:
        raise DataError(
            f"{path}: header says {dims} = {expected_payload} data bytes but the file holds "
            f"{payload} (truncated or corrupt); {_FIX_HINT}"
        )
    if expected_count is not None and dims[0] != expected_count:
        raise DataError(f"{path}: holds {dims[0]} items, expected {expected_count}; {_FIX_HINT}")
    if expected_item_shape is not None and tuple(dims[1:]) != tuple(expected_item_shape):
        raise DataError(
            f"{path}: items have shape {tuple(dims[1:])}, expected {tuple(expected_item_shape)}; {_FIX_HINT}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims).copy()


# --------------------------------------------------------------------------- Fashion-MNIST


def _find_idx_file(directory: Path, base: str) -> Path:
    """Prefer ``base.gz``; accept the un-gzipped ``base`` too."""
    for candidate in (directory / f"{base}.gz", directory / base):
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory / (base + '.gz')}: file not found (nor {base}); {_FIX_HINT}")


def _load_fashion_part(directory: Path, images_key: str, labels_key: str) -> ArrayDataset:
    images_path = _find_idx_file(directory, FASHION_MNIST_FILES[images_key])
    labels_path = _find_idx_file(directory, FASHION_MNIST_FILES[labels_key])
    images = read_idx(images_path, expected_magic=IDX_IMAGES_MAGIC, expected_item_shape=(28, 28))
    labels = read_idx(labels_path, expected_magic=IDX_LABELS_MAGIC, expected_count=images.shape[0])
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9; {_FIX_HINT}")
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    return ArrayDataset(x, labels.astype(np.int64), 10)


def load_fashion_mnist(data_dir: str | Path | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """Load Fashion-MNIST (Xiao et al. 2017) as ``(train, test)``.

    With the standard files that is 60000 and 10000 examples of ``(1, 28, 28)``, pixel
    values scaled by 1/255. ``data_dir`` defaults to :data:`FASHION_MNIST_DIR`. Counts are
    not pinned to 60000/10000 (so small fixtures work); image and label counts must agree.
    """
    directory = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR)
    if not directory.is_dir():
        raise DataError(f"{directory}: Fashion-MNIST directory not found; {_FIX_HINT}")
    train = _load_fashion_part(directory, "train_images", "train_labels")
    test = _load_fashion_part(directory, "test_images", "test_labels")
    return train, test


# --------------------------------------------------------------------------- digits


def load_digits_dataset() -> ArrayDataset:
    """scikit-learn's 8x8 handwritten digits (1797 examples, 10 classes), values 0..16 scaled by 1/16.

    The data ship inside scikit-learn (the UCI "Optical Recognition of Handwritten Digits"
    test set), so this needs no network or extra package.
    """
    from sklearn.datasets import load_digits  # deferred: sklearn import is slow-ish

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    return ArrayDataset(x, np.asarray(bunch.target, dtype=np.int64), 10)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Dataset:
    """A data set the config may name (``data.dataset``).

    ``load(data_dir)`` returns ``(train, test)``, ``test`` None when the data set has no test split
    of its own (the splits then cut one); ``num_classes`` is the number of columns of an answer (the
    SecAgg+ union bound counts its entries); ``flip_keeps_class`` says whether a horizontal flip keeps
    an image's class (garments: yes; digits: no), for augmentations."""

    name: str
    load: Callable[[str | None], tuple[ArrayDataset, ArrayDataset | None]]
    num_classes: int
    flip_keeps_class: bool


#: The data sets by name: the config's ``data.dataset`` choices and what :func:`load_dataset` loads.
DATASETS: Registry[Dataset] = Registry(
    "data set", error=DataError, unknown="unknown {kind} {name!r}; valid names: {known}"
)


def register_dataset(
    name: str,
    load: Callable[[str | None], tuple[ArrayDataset, ArrayDataset | None]],
    *,
    num_classes: int,
    flip_keeps_class: bool,
) -> Dataset:
    return DATASETS.register(name, Dataset(name, load, num_classes, flip_keeps_class))


register_dataset("digits", lambda data_dir: (load_digits_dataset(), None), num_classes=10, flip_keeps_class=False)
register_dataset("fashion-mnist", load_fashion_mnist, num_classes=10, flip_keeps_class=True)

#: Views of :data:`DATASETS`: name -> classes, name -> whether a horizontal flip keeps the class.
DATASET_CLASSES = DATASETS.view("num_classes")
FLIP_KEEPS_CLASS = DATASETS.view("flip_keeps_class")


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: str | None) -> tuple[ArrayDataset, ArrayDataset | None]:
    return DATASETS.lookup(name).load(data_dir)


def load_dataset(name: str, data_dir: str | None = None) -> tuple[ArrayDataset, ArrayDataset | None]:
    """Load a data set by name: ``"digits"`` -> ``(all 1797, None)``; ``"fashion-mnist"`` -> ``(train, test)``.

    Results are cached per process (each Flower client worker loads a data set once).
    The cached arrays are shared: do not modify them in place.
    """
    DATASETS.lookup(name)  # an unknown name fails here, before the cache
    # Normalise the directory so "x", "x/" and Path("x") share one cache entry.
    key_dir = os.path.abspath(os.fspath(data_dir)) if data_dir is not None else None
    return _load_cached(name, key_dir)
