"""PATE's noisy-argmax aggregation of one-hot votes.

Papernot, Abadi, Erlingsson, Goodfellow & Talwar (2017), "Semi-supervised Knowledge
Transfer for Deep Learning from Private Training Data" (GNMax as in Papernot, Song,
Mironov, Raghunathan, Talwar & Erlingsson (2018), "Scalable Private Learning with
PATE"): each client votes with a one-hot row per query; the server adds Gaussian noise
to the vote counts and releases the noisy argmax. Confident-GNMax first checks that the
noisy top count clears a threshold and leaves the other queries unanswered: their rows
come back as NaN and are not taken into the teacher signal.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from feddistill.strategies.base import AnswerStrategy


class GNMaxVotes(AnswerStrategy):
    name = "gnmax"

    def __init__(
        self,
        *args: Any,
        sigma: float,
        noise_rng: np.random.Generator,
        threshold: float | None = None,
        sigma_threshold: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sigma = sigma
        self.threshold = threshold
        self.sigma_threshold = sigma_threshold
        self.noise = noise_rng
        if threshold is not None:
            self.name = "confident-gnmax"

    def aggregate_answers(self, answers: np.ndarray, weights: np.ndarray) -> np.ndarray:
        # imported here: the config's aggregator check imports every module of this package
        from feddistill.privacy.mechanisms import confident_gnmax, gnmax

        counts = answers.sum(axis=0)
        num_classes = counts.shape[1]
        if self.threshold is None:
            return one_hot(gnmax(counts, sigma=self.sigma, rng=self.noise), num_classes)
        assert self.sigma_threshold is not None, "confident-gnmax needs sigma_threshold with its threshold"
        answered, labels = confident_gnmax(
            counts,
            threshold=self.threshold,
            sigma_threshold=self.sigma_threshold,
            sigma_answer=self.sigma,
            rng=self.noise,
        )
        signal = np.full(counts.shape, np.nan, dtype=np.float32)
        signal[answered] = one_hot(labels[answered], num_classes)
        return signal

    def signal_from_mean(self, mean: np.ndarray) -> np.ndarray:
        """Under SecAgg+ the clients add the Gaussian noise to their votes (distributed DP): the
        mean is the noisy counts / m, whose argmax is the noisy argmax. Confident-GNMax would
        need a second noisy sum, so the config refuses it with SecAgg+."""
        if self.threshold is not None:
            raise ValueError("confident-gnmax needs two noisy sums; SecAgg+ delivers one")
        return one_hot(mean.argmax(axis=1), mean.shape[1])


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """One float32 row per label, 1 at the label."""
    return np.eye(num_classes, dtype=np.float32)[labels]
