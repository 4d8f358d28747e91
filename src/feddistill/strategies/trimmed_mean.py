"""Coordinate-wise trimmed mean of the clients' answers.

Yin, Chen, Ramchandran & Bartlett (2018), "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML: for every coordinate, drop the largest
and the smallest ``floor(beta K)`` of the K values and average the rest; robust
while the fraction of Byzantine workers is below ``beta``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from feddistill.strategies.base import AnswerStrategy, normalize_rows, probability_answers
from feddistill.strategies.median import coordinate_median
from feddistill.strategies.registry import register_aggregator


def coordinate_trimmed_mean(answers: np.ndarray, beta: float) -> np.ndarray:
    """(K, Q, C) -> (Q, C). Falls back to the median when ``floor(beta K)`` is 0 (too few
    clients to trim anything: a plain mean would let one hostile client through) or when
    nothing would be left (beta = 0.5, K even)."""
    k = len(answers)
    trim = math.floor(beta * k + 1e-9)  # the epsilon keeps 0.29 * 100 (28.999...) from flooring to 28
    if (beta > 0 and trim == 0) or k - 2 * trim < 1:
        return coordinate_median(answers)
    ordered = np.sort(answers, axis=0)
    return ordered[trim : k - trim].mean(axis=0)


@register_aggregator("trimmed-mean", reads={"beta": "distill.trim-beta", "probabilities": probability_answers})
class TrimmedMeanAnswers(AnswerStrategy):
    """Consensus = coordinate-wise beta-trimmed mean of the answers (unweighted).

    Parameters
    ----------
    beta : float
        Fraction trimmed from EACH end of every coordinate, in [0, 0.5]; 0 gives the
        plain mean, 0.5 the median. Set it at or above the expected fraction of hostile clients.
    probabilities : bool
        The answers are probability-like: renormalise every output row with
        :func:`normalize_rows`. ``False`` (clipped logits) returns the raw values.
    """

    def __init__(self, *args: Any, beta: float = 0.2, probabilities: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= beta <= 0.5:
            raise ValueError(f"beta must be in [0, 0.5], got {beta}")
        self.beta = beta
        self.probabilities = probabilities

    def aggregate_answers(self, answers: np.ndarray, weights: np.ndarray) -> np.ndarray:
        trimmed = coordinate_trimmed_mean(answers, self.beta)
        return normalize_rows(trimmed) if self.probabilities else trimmed
