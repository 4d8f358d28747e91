"""A simulated fleet's data, loaded once per process and indexed by partition.

Every Ray worker that runs ClientApps calls :func:`load_fleet` with the same
(frozen, hashable) config sections and gets the cached splits and partitions,
so a client message costs an index lookup, not a data load.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from feddistill.config import DataConfig, FleetConfig
from feddistill.data import ArrayDataset, Splits, label_histograms, load_dataset, make_splits, partition


@dataclass(frozen=True)
class Fleet:
    splits: Splits
    parts: list[np.ndarray]  # private-pool indices of each client

    @property
    def num_classes(self) -> int:
        return self.splits.test.num_classes

    @property
    def image_size(self) -> int:
        return int(self.splits.test.x.shape[-1])

    def private_data(self, partition_id: int) -> ArrayDataset:
        return self.splits.private_pool.subset(self.parts[partition_id])

    def label_histograms(self) -> np.ndarray:
        return label_histograms(self.splits.private_pool.y, self.parts, self.num_classes)


@lru_cache(maxsize=4)
def load_fleet(data: DataConfig, fleet: FleetConfig, seed: int) -> Fleet:
    train, test = load_dataset(data.dataset, data.data_dir or None)
    splits = make_splits(
        train,
        test,
        reference_size=data.reference_size,
        public_labelled_size=data.public_labelled_size,
        test_size=data.test_size,
        seed=seed,
    )
    parts = partition(
        splits.private_pool.y,
        fleet.num_clients,
        scheme=fleet.partition,
        alpha=fleet.alpha,
        shards_per_client=fleet.shards_per_client,
        seed=seed,
    )
    return Fleet(splits=splits, parts=parts)


@lru_cache(maxsize=16)
def as_tensors(dataset: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch views of a data set (cached: the reference set is used every round)."""
    return torch.from_numpy(dataset.x), torch.from_numpy(dataset.y)
