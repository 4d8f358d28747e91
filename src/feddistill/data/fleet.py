"""A fleet's data (splits and partitions), loaded once per process and indexed by partition.

Every Ray worker that runs ClientApps calls :func:`load_fleet` with the same
(frozen, hashable) config sections and gets the cached splits and partitions,
so a client message costs an index lookup, not a data load.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from feddistill.config import DataConfig, FleetConfig, RunConfig
from feddistill.data import ArrayDataset, Splits, label_histograms, load_dataset, make_splits, partition


@dataclass(frozen=True, eq=False)
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


@dataclass(frozen=True, eq=False)
class Canaries:
    """One-run audit canaries (Steinke, Nasr & Jagielski 2023): m marked examples, each
    included in one client's private data independently with probability 1/2.

    Canaries are uniform-noise images with random labels: they belong to no split (so
    they cannot leak into evaluation) and are as memorable as an example can be, which
    makes the audit's lower bound as strong as possible.
    """

    x: np.ndarray  # (m, 1, H, W) float32
    y: np.ndarray  # (m,) int64
    included: np.ndarray  # (m,) bool
    client: int


def make_canaries(m: int, client: int, image_size: int, num_classes: int, seed: int) -> Canaries:
    rng = np.random.default_rng([seed, 0xCA4A])
    return Canaries(
        x=rng.random((m, 1, image_size, image_size), dtype=np.float32),
        y=rng.integers(0, num_classes, size=m).astype(np.int64),
        included=rng.random(m) < 0.5,
        client=client,
    )


@lru_cache(maxsize=64)
def private_tensors(fleet: Fleet, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's private data as tensors, cached per worker (bounded: 1000-client fleets)."""
    data = fleet.private_data(partition_id)
    return torch.from_numpy(data.x), torch.from_numpy(data.y)


def training_data(fleet: Fleet, partition_id: int, canaries: Canaries | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's private training data, with the included canaries when it is the canary client."""
    x, y = private_tensors(fleet, partition_id)
    if canaries is None or canaries.client != partition_id or not canaries.included.any():
        return x, y
    keep = canaries.included
    return (torch.cat([x, torch.from_numpy(canaries.x[keep])]), torch.cat([y, torch.from_numpy(canaries.y[keep])]))


def fleet_canaries(cfg: RunConfig) -> Canaries | None:
    """The run's canaries (None when the audit asks for none)."""
    if cfg.audit.canaries == 0:
        return None
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    return make_canaries(cfg.audit.canaries, cfg.audit.canary_client, fleet.image_size, fleet.num_classes, cfg.seed)
