"""Data layer: numpy data sets, benchmark splits and client partitions."""

from .datasets import (
    DATASETS,
    FASHION_MNIST_DIR,
    ArrayDataset,
    DataError,
    Dataset,
    load_dataset,
    load_digits_dataset,
    load_fashion_mnist,
    read_idx,
    register_dataset,
)
from .partition import SCHEMES, label_histograms, partition
from .splits import Splits, make_splits, reference_digest

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "SCHEMES",
    "ArrayDataset",
    "DataError",
    "Dataset",
    "Splits",
    "label_histograms",
    "load_dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "make_splits",
    "partition",
    "read_idx",
    "reference_digest",
    "register_dataset",
]
