"""Coordinate-wise median of the clients' answers.

Yin, Chen, Ramchandran & Bartlett (2018), "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML: the coordinate-wise median of the
workers' vectors is an order-optimal robust estimate as long as fewer than half of
the workers are Byzantine. Here each coordinate is one (query, class) score; the
medians are then renormalised row-wise, since a row of medians need not sum to 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from feddistill.strategies.base import AnswerStrategy, normalize_rows, probability_answers
from feddistill.strategies.registry import register_aggregator


def coordinate_median(answers: np.ndarray) -> np.ndarray:
    """(K, Q, C) -> (Q, C): the median over clients of every (query, class) score."""
    return np.median(answers, axis=0)


@register_aggregator("median", reads={"probabilities": probability_answers})
class MedianAnswers(AnswerStrategy):
    """Consensus = coordinate-wise median of the answers (unweighted, like Flower's ``FedMedian``).

    Parameters
    ----------
    probabilities : bool
        The answers are probability-like (``probs`` / ``votes`` bounds): renormalise
        every output row with :func:`normalize_rows`. ``False`` (clipped logits)
        returns the raw medians.
    """

    def __init__(self, *args: Any, probabilities: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.probabilities = probabilities

    def aggregate_answers(self, answers: np.ndarray, weights: np.ndarray) -> np.ndarray:
        median = coordinate_median(answers)
        return normalize_rows(median) if self.probabilities else median
