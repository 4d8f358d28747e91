"""DS-FL's entropy-reduction aggregation (ERA).

Itahara, Nishio, Koda, Morikura & Yamamoto (2021), "Distillation-Based
Semi-Supervised Federated Learning for Communication-Efficient Collaborative
Training with Non-IID Private Data", IEEE TMC: average the clients' outputs,
then sharpen the average with a softmax at a low temperature T (about 0.1 in
implementations), which lowers the entropy that averaging non-IID clients adds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from feddistill.strategies.base import AnswerStrategy
from feddistill.strategies.registry import register_aggregator


def entropy_reduction(mean_probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(mean / T), row-wise, computed stably."""
    z = mean_probs / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@register_aggregator("era", reads={"temperature": "distill.era-temperature"})
class EntropyReducedMean(AnswerStrategy):
    def __init__(self, *args: Any, temperature: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.temperature = temperature

    def aggregate_answers(self, answers: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return entropy_reduction(answers.mean(axis=0), self.temperature)
