"""The ceiling benchmark's aggregations (bench/ceiling.py) do what their names say."""

from __future__ import annotations

import numpy as np
import pytest
from bench.ceiling import AGGREGATIONS, aggregate


def _fleet(k: int = 4, n: int = 50, c: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, n, c)) * 3, rng.integers(0, 40, size=(k, c)).astype(float)


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_aggregations_return_one_finite_row_per_query(how):
    logits, counts = _fleet()
    signal = aggregate(logits, counts, how)
    assert signal.shape == logits.shape[1:]
    assert np.isfinite(signal).all() and (signal >= 0).all()


def test_mean_and_vote():
    logits, counts = _fleet()
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(aggregate(logits, counts, "mean"), probs.mean(0))
    votes = aggregate(logits, counts, "vote")
    np.testing.assert_allclose(votes.sum(1), 1.0)
    for q in range(logits.shape[1]):  # each client's top class gets 1/K of the row
        expected = np.bincount(logits[:, q].argmax(1), minlength=logits.shape[2]) / len(logits)
        np.testing.assert_allclose(votes[q], expected)


def test_prior_correction_undoes_a_client_skew():
    logits, _ = _fleet(k=1)
    uniform = np.full((1, logits.shape[2]), 7.0)
    np.testing.assert_allclose(aggregate(logits, uniform, "prior-corrected"), aggregate(logits, uniform, "mean"))
    skewed = uniform.copy()
    skewed[0, 0] = 1000.0  # a client that saw mostly class 0: its class-0 scores are discounted
    assert (aggregate(logits, skewed, "prior-corrected")[:, 0] < aggregate(logits, uniform, "mean")[:, 0]).all()


def test_count_weighting_hands_each_class_to_the_clients_that_hold_it():
    logits, _ = _fleet(k=2, c=2)
    counts = np.array([[10.0, 0.0], [0.0, 10.0]])  # client 0 holds class 0 only, client 1 class 1 only
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    signal = aggregate(logits, counts, "count-weighted")
    np.testing.assert_allclose(signal[:, 0], probs[0, :, 0])
    np.testing.assert_allclose(signal[:, 1], probs[1, :, 1])
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(logits, counts, "median")
