"""FedMD's aggregation: the mean of the clients' class scores.

Li & Wang (2019), "FedMD: Heterogenous Federated Learning via Model
Distillation", arXiv:1910.03581: the consensus on the public set is the average
of the participants' scores.
"""

from __future__ import annotations

import numpy as np

from feddistill.strategies.base import AnswerStrategy, normalize_rows


class MeanAnswers(AnswerStrategy):
    """Consensus = the plain mean of the answers (FedMD). Unweighted: a reply carries no
    example count (it would reveal the size of the private set), so ``weights`` are ignored."""

    name = "mean"

    def aggregate_answers(self, answers: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return normalize_rows(answers.mean(axis=0, dtype=np.float64))
