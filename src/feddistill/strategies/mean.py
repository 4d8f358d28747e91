"""FedMD's aggregation: the (weighted) mean of the clients' class scores.

Li & Wang (2019), "FedMD: Heterogenous Federated Learning via Model
Distillation", arXiv:1910.03581: the consensus on the public set is the average
of the participants' scores.
"""

from __future__ import annotations

import numpy as np

from feddistill.strategies.base import AnswerStrategy, normalize_rows


class MeanAnswers(AnswerStrategy):
    """Consensus = mean of answers, weighted by each client's number of private examples
    (``weighted=False`` gives the plain mean FedMD uses)."""

    name = "mean"

    def __init__(self, *args, weighted: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weighted = weighted

    def aggregate_answers(self, answers: np.ndarray, weights: np.ndarray) -> np.ndarray:
        w = weights if self.weighted else np.ones(len(answers))
        mean = np.tensordot(w / w.sum(), answers, axes=1)
        return normalize_rows(mean)
