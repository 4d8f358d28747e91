"""Label-shift scenario: the client population's label distribution changes mid-run.

The fleet's clients are split by their private label mix into population A (most of
their labels in the lower half of the classes) and population B (the rest). Rounds
before ``scenario.shift-round`` sample clients from A only, rounds from it on from B
only: the fleet's knowledge moves from one half of the classes to the other, which the
server sees as a jump of its teacher signal (``feddistill.server.drift``).

Simulation only: it needs the partition's label histograms, which on real devices
nobody but the devices knows. Restricting who may be sampled never raises a client's
sampling probability above q, so the client-level accountant's bound still holds
(it over-reports for clients that were not eligible).
"""

from __future__ import annotations

import numpy as np


def shift_populations(histograms: np.ndarray) -> tuple[list[int], list[int]]:
    """(A, B): partition ids whose label mass is mostly in the lower half of the classes, and the rest."""
    histograms = np.asarray(histograms, dtype=np.float64)
    half = histograms.shape[1] // 2
    low = histograms[:, :half].sum(axis=1)
    total = histograms.sum(axis=1)
    in_a = low > total / 2
    return [int(i) for i in np.flatnonzero(in_a)], [int(i) for i in np.flatnonzero(~in_a)]


def eligible_partitions(rnd: int, shift_round: int, populations: tuple[list[int], list[int]]) -> list[int]:
    """The partition ids that round `rnd` may sample."""
    return populations[0] if rnd < shift_round else populations[1]


def check_populations(populations: tuple[list[int], list[int]]) -> None:
    a, b = populations
    if not a or not b:
        raise ValueError(
            f"scenario.shift-round: the fleet has {len(a)} clients whose labels are mostly in the lower half of "
            f"the classes and {len(b)} others; both must be non-empty (use a skewed partition, e.g. "
            'fleet.partition = "shards" or a small fleet.alpha)'
        )
