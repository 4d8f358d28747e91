"""Which reference rows the fleet labels, and which rows a round asks about.

PATE's route past a noisy ensemble (Papernot et al. 2017, 2018): the student learns from
the teachers' labels only where they confidently agree, and semi-supervised from the
unlabelled rest. Here the teachers are the clients, and agreement is measured over rounds:

- :class:`FleetLabels` accumulates, per reference row, every round's released teacher
  signal on it (the aggregate the server computes anyway, noised under client-level DP, so
  accumulating it is post-processing and costs no privacy). With ``distill.fleet-labels =
  "answered"`` every answered row is a fleet label (its latest aggregate, as before); with
  ``"consensus"`` only rows whose mean aggregate puts at least a *share threshold* on one
  class, the threshold being the smallest that reaches ``distill.consensus-precision`` on
  the held-out public labels (the release gate's validation rows: public, never trained on,
  never test, never private). Accepted rows carry the consensus class as a hard label.
- :func:`select_queries` picks a round's queries: uniformly, or (``"uncertain"``) mostly
  among rows the released student is least sure of (smallest top-1 minus top-2 margin),
  skipping rows already labelled; a quarter stays uniform so calibration keeps seeing
  public rows. The student is public, so the choice costs no privacy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FleetLabels", "MIN_CALIBRATION_ROWS", "SHARE_GRID", "calibrate_share", "select_queries"]

SHARE_GRID = tuple(np.round(np.arange(0.3, 1.0001, 0.05), 2))
MIN_CALIBRATION_ROWS = 20  # fewer answered validation rows than this: accept nothing yet
UNIFORM_SHARE = 0.25  # share of an "uncertain" round's queries still drawn uniformly


def calibrate_share(share: np.ndarray, label: np.ndarray, truth: np.ndarray, precision: float) -> float | None:
    """The smallest share threshold on :data:`SHARE_GRID` whose rows (share >= it) have at least
    ``precision`` accuracy against ``truth`` and number at least :data:`MIN_CALIBRATION_ROWS`;
    None when no threshold qualifies."""
    for threshold in SHARE_GRID:
        kept = share >= threshold
        if kept.sum() < MIN_CALIBRATION_ROWS:
            return None
        if (label[kept] == truth[kept]).mean() >= precision:
            return float(threshold)
    return None


@dataclass
class FleetLabels:
    """The fleet's answers per reference row, accumulated over rounds (checkpointed)."""

    num_rows: int
    num_classes: int
    mode: str = "answered"  # distill.fleet-labels
    precision: float = 0.9  # distill.consensus-precision
    sums: np.ndarray = field(init=False)
    times: np.ndarray = field(init=False)
    threshold: float | None = None  # the last calibrated share threshold (consensus)

    def __post_init__(self) -> None:
        self.sums = np.zeros((self.num_rows, self.num_classes))
        self.times = np.zeros(self.num_rows, dtype=np.int64)

    def add(self, rows: np.ndarray, signal_rows: np.ndarray) -> None:
        """One round's aggregate on ``rows`` (its answered queries)."""
        self.sums[rows] += signal_rows
        self.times[rows] += 1

    def consensus(self) -> tuple[np.ndarray, np.ndarray]:
        """(class, share of the mean aggregate on it) per row; share 0 where never answered."""
        mean = self.sums / np.maximum(self.times, 1)[:, None]
        return mean.argmax(axis=1), mean.max(axis=1)

    def accepted(self, validation_rows: np.ndarray, validation_labels: np.ndarray) -> np.ndarray:
        """Rows whose fleet label the student trains on (bool, per reference row)."""
        answered = self.times > 0
        if self.mode == "answered":
            return answered
        label, share = self.consensus()
        seen = answered[validation_rows]
        self.threshold = calibrate_share(
            share[validation_rows][seen], label[validation_rows][seen], validation_labels[seen], self.precision
        )
        if self.threshold is None:
            return np.zeros(self.num_rows, dtype=bool)
        return answered & (share >= self.threshold)

    def apply(self, signal: np.ndarray, teacher_signal: np.ndarray, accepted: np.ndarray) -> None:
        """Consensus mode: the signal is the public teacher's, with the accepted rows' consensus
        class as a hard label (in place). Answered mode keeps the signal as the rounds left it."""
        if self.mode == "answered":
            return
        label, _ = self.consensus()
        signal[:] = teacher_signal
        signal[accepted] = np.eye(self.num_classes, dtype=signal.dtype)[label[accepted]]

    def state(self) -> dict[str, Any]:
        return {"sums": self.sums.copy(), "times": self.times.copy(), "threshold": self.threshold}

    def restore(self, state: dict[str, Any]) -> None:
        self.sums = np.asarray(state["sums"], dtype=np.float64)
        self.times = np.asarray(state["times"], dtype=np.int64)
        self.threshold = state["threshold"]


def select_queries(
    rng: np.random.Generator, size: int, how: str, margin: np.ndarray | None, labelled: np.ndarray
) -> np.ndarray:
    """A round's query rows (sorted): ``size`` rows drawn uniformly, or with ``how =
    "uncertain"`` three quarters among the unlabelled rows of smallest ``margin`` (the released
    student's top-1 minus top-2 probability on each reference row) and the rest uniformly."""
    n = len(labelled)
    if how == "uniform" or margin is None:
        return np.sort(rng.choice(n, size=size, replace=False))
    uncertain = int(round(size * (1 - UNIFORM_SHARE)))
    candidates = np.flatnonzero(~labelled)
    order = candidates[np.argsort(margin[candidates], kind="stable")]
    picked = order[:uncertain]
    rest = np.setdiff1d(np.arange(n), picked)
    extra = rng.choice(rest, size=size - len(picked), replace=False)
    return np.sort(np.concatenate([picked, extra]))
