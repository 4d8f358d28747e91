"""FedMD's aggregation: the mean of the clients' class scores.

Li & Wang (2019), "FedMD: Heterogenous Federated Learning via Model
Distillation", arXiv:1910.03581: the consensus on the public set is the average
of the participants' scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from feddistill.config import abstains
from feddistill.strategies.base import AnswerStrategy, normalize_rows
from feddistill.strategies.registry import register_aggregator


@register_aggregator("mean", reads={"abstain": abstains})
class MeanAnswers(AnswerStrategy):
    """Consensus = the plain mean of the answers (FedMD). Unweighted: a reply carries no
    example count (it would reveal the size of the private set), so ``weights`` are ignored.

    Abstentions (all-zero rows, ``distill.abstain-*``) are left out of their row's mean; a row
    every client abstained on comes back NaN (unanswered: the server keeps its signal)."""

    def __init__(self, *args: Any, abstain: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.abstain = abstain  # whether an all-zero row means "no answer" (never true for clipped logits)

    def aggregate_answers(self, answers: np.ndarray, weights: np.ndarray) -> np.ndarray:
        answering = (answers != 0).any(axis=2)  # (K, |Q|)
        if not self.abstain or answering.all():
            return normalize_rows(answers.mean(axis=0, dtype=np.float64))
        counts = answering.sum(axis=0)
        mean = answers.sum(axis=0, dtype=np.float64) / np.maximum(counts, 1)[:, None]
        signal = normalize_rows(mean)
        signal[counts == 0] = np.nan
        return signal
