"""Label-shift scenario: the client population's label distribution changes mid-run.

The fleet's clients are split by their private label mix into population A (most of
their labels in the lower half of the classes) and population B (the rest). Rounds
before ``scenario.shift-round`` sample clients from A only, rounds from it on from B
only: the fleet's knowledge moves from one half of the classes to the other, which the
server sees as a jump of its teacher signal (``feddistill.server.drift``).

Simulation only: it needs the partition's label histograms, which on real devices
nobody but the devices knows. :class:`LabelShift` is the sampling hook
(``feddistill.server.loop.SamplingHook``) that ``feddistill.simulations.run`` gives the
ServerApp; the production ServerApp installs none. Restricting who may be sampled never raises a client's
sampling probability above q, so the client-level accountant's bound still holds
(it over-reports for clients that were not eligible).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from feddistill.config import RunConfig

if TYPE_CHECKING:
    from feddistill.data.fleet import Fleet

log = logging.getLogger("feddistill")


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


class LabelShift:
    """The sampling hook of the label-shift scenario: rounds before ``shift_round`` sample
    population A, the others population B."""

    def __init__(self, shift_round: int) -> None:
        self.shift_round = shift_round
        self.populations: tuple[list[int], list[int]] = ([], [])

    def start(self, fleet: Fleet, devices: set[int]) -> None:
        if devices:
            raise RuntimeError("scenario.shift-round is a simulation scenario: real devices' label mixes are unknown")
        self.populations = shift_populations(fleet.label_histograms())
        check_populations(self.populations)
        log.info(
            "label-shift scenario: rounds < %d sample %d clients (labels mostly in the lower classes), "
            "later rounds the other %d",
            self.shift_round,
            len(self.populations[0]),
            len(self.populations[1]),
        )

    def eligible(self, rnd: int) -> list[int]:
        return eligible_partitions(rnd, self.shift_round, self.populations)

    def population(self, rnd: int) -> str:
        return "A" if rnd < self.shift_round else "B"


def sampling_hook(cfg: RunConfig) -> LabelShift | None:
    """The sampling hook a simulation of ``cfg`` installs on its ServerApp (None without a label shift)."""
    return LabelShift(cfg.scenario.shift_round) if cfg.scenario.shift_round else None
