"""Central DP: a wrapper that noises the sum of answers before any strategy aggregates it.

Like Flower's ``DifferentialPrivacyServerSideFixedClipping(FedAvg(...))``, DP wraps a
strategy rather than being a flag inside each one. Answers are bounded by the clients
(probabilities/votes: row norm <= 1), so no server-side clipping is needed; the server
adds N(0, (z Delta)^2) to the sum and divides by the EXPECTED number of sampled clients
(q N): dividing by the actual count would make the normaliser data-dependent.
"""

from __future__ import annotations

import numpy as np

from feddistill.strategies.base import AnswerStrategy


class CentralGaussianAnswers(AnswerStrategy):
    name = "central-gaussian"

    def __init__(self, inner: AnswerStrategy, *, noise_std: float, expected_clients: float, rng: np.random.Generator):
        super().__init__(inner.sampling_rate, inner.sampling, min_replies=inner.min_replies)
        self.rng = inner.rng  # one sampling RNG: the inner strategy's
        self.inner = inner
        self.noise_std = noise_std
        self.expected_clients = expected_clients
        self.noise = rng
        self.name = f"central-gaussian({inner.name})"

    def aggregate_answers(self, answers: np.ndarray, weights: np.ndarray) -> np.ndarray:
        total = answers.sum(axis=0)
        noisy_mean = (total + self.noise.normal(0.0, self.noise_std, size=total.shape)) / self.expected_clients
        return self.inner.aggregate_answers(noisy_mean[None], np.ones(1))

    def signal_from_mean(self, mean: np.ndarray) -> np.ndarray:
        """Under SecAgg+ the noise is the clients' (distributed DP, ``feddistill.privacy.distributed``):
        the server adds none and the inner strategy's rule makes the signal."""
        return self.inner.signal_from_mean(mean)
