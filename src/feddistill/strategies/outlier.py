"""Outlier-filtered mean: drop the clients whose answers lie farthest from the median.

Blanchard, El Mhamdi, Guerraoui & Stainer (2017), "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS (Krum): score each
worker by how far its vector lies from the others and trust only the closest.
Here the score is the Frobenius distance of a client's whole answer matrix to
the coordinate-wise median (Yin et al. 2018), which is itself robust, so one
hostile client cannot drag the reference point; the farthest
``floor((1 - keep_fraction) K)`` clients are dropped and the rest averaged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from feddistill.strategies.base import AnswerStrategy, normalize_rows, probability_answers
from feddistill.strategies.median import coordinate_median
from feddistill.strategies.registry import register_aggregator


def distances_to_median(answers: np.ndarray) -> np.ndarray:
    """(K, Q, C) -> (K,): Frobenius distance of each client's answers to the coordinate-wise median."""
    diff = answers - coordinate_median(answers)[None]
    return np.sqrt(np.square(diff).sum(axis=(1, 2)))


def farthest_clients(answers: np.ndarray, keep_fraction: float) -> list[int]:
    """Indices (into ``answers``) of the clients to drop; at least one client is always kept."""
    k = len(answers)
    drop = min(k - 1, math.floor((1.0 - keep_fraction) * k + 1e-9))
    if drop <= 0:
        return []
    order = np.argsort(-distances_to_median(answers), kind="stable")  # farthest first; ties: lower index first
    return sorted(int(i) for i in order[:drop])


@register_aggregator(
    "outlier-filtered", reads={"keep_fraction": "distill.keep-fraction", "probabilities": probability_answers}
)
class OutlierFilteredMean(AnswerStrategy):
    """Consensus = mean of the answers closest to the coordinate-wise median.

    Parameters
    ----------
    keep_fraction : float
        Fraction of the round's clients kept, in (0, 1]; the farthest
        ``floor((1 - keep_fraction) K)`` are dropped (1 = plain mean).
    probabilities : bool
        The answers are probability-like: renormalise every output row with
        :func:`normalize_rows`. ``False`` (clipped logits) returns the raw mean.

    Attributes
    ----------
    last_excluded : list[int]
        Indices into the last call's ``answers`` (= positions in
        ``RoundReplies.senders``) of the clients dropped, for the server's log.
    """

    def __init__(self, *args: Any, keep_fraction: float = 0.7, probabilities: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        self.keep_fraction = keep_fraction
        self.probabilities = probabilities
        self.last_excluded: list[int] = []

    def aggregate_answers(self, answers: np.ndarray, weights: np.ndarray) -> np.ndarray:
        self.last_excluded = farthest_clients(answers, self.keep_fraction)
        kept = np.setdiff1d(np.arange(len(answers)), self.last_excluded)
        mean = answers[kept].mean(axis=0, dtype=np.float64)  # unweighted: a reply carries no example count
        return normalize_rows(mean) if self.probabilities else mean
