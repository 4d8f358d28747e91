"""The canary-client estimator against a Gaussian release of known mu (issue 19's calibration).

Synthetic releases of the central mechanism at q = 1 (the sum of the answers of a few honest
clients and 48 audit nodes, plus N(0, (z sqrt(Q))^2) per entry over R rounds: mu = sqrt(R) / z),
built from the same canary answers an audit SuperNode sends. Fast (about 2 s).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from feddistill.client.canary import canary_logits
from feddistill.privacy.accounting import GaussianEvent, epsilon_pld
from feddistill.privacy.audit.canary_clients import (
    canary_statistics,
    claimed_mu,
    estimate_from_canaries,
    gdp_epsilon,
)
from feddistill.privacy.mechanisms import bound_answers

SECRET = bytes(range(32))
NODES = list(range(100, 148))


def _release(mu: float, rounds: int = 2, q_size: int = 400, honest: int = 4, post: bool = False) -> dict:
    """The noisy sum of every round (``post``: clipped at 0 and renormalised, as the mean aggregator releases it)."""
    rng = np.random.default_rng(0)
    c, z = 10, math.sqrt(rounds) / mu
    labels = rng.integers(0, c, 1000)
    released = {}
    for rnd in range(1, rounds + 1):
        q = rng.choice(1000, q_size, replace=False)
        total = np.eye(c)[np.broadcast_to(labels[q], (honest, q_size))].sum(0)
        for node in NODES:
            total += bound_answers(canary_logits(SECRET, node, rnd, q, c, 16, "probs"), "probs")
        total += rng.normal(0.0, z * math.sqrt(q_size), total.shape)
        if post:
            total = np.clip(total, 0.0, None)
            total /= np.maximum(total.sum(axis=1, keepdims=True), 1e-12)
        released[rnd] = (q, total)
    return released


@pytest.fixture(scope="module")
def gaussian():
    return canary_statistics(_release(4.0), SECRET, NODES, 16)


def test_the_estimate_of_a_gaussian_release_is_its_mu(gaussian):
    est = estimate_from_canaries(gaussian, 1e-5)
    assert est["mu_client_se"] < 0.3  # 48 audit nodes: about 1.1 * sqrt(2 / 48)
    assert abs(est["mu_client"] - 4.0) < 3 * est["mu_client_se"]
    low, high = est["mu_client_interval"]
    assert low < 4.0 < high


def test_the_test_statistic_would_read_low_which_is_why_the_estimate_does_not_use_it(gaussian):
    """The rows the test statistic keeps depend on the canary (module docstring): extrapolated like
    the linear statistic, it misses the known mu by several standard errors."""
    inserted = gaussian.of("inserted")
    null = np.concatenate([gaussian.of("held-out"), gaussian.of("generated")])
    ratio = np.sqrt(gaussian.client_rows / gaussian.rows[gaussian.group == "inserted"]) / gaussian.scale
    old = float(((inserted - null.mean()) / null.std(ddof=1) * ratio).mean())
    est = estimate_from_canaries(gaussian, 1e-5)
    assert old < 4.0 - 2 * est["mu_client_se"] < est["mu_client"]


def test_a_post_processed_release_reads_below_its_gaussian_and_above_nothing():
    est = estimate_from_canaries(canary_statistics(_release(4.0, post=True), SECRET, NODES, 16), 1e-5)
    assert 2.0 < est["mu_client"] < 4.0


def test_fewer_audit_nodes_give_a_wider_interval(gaussian):
    few = estimate_from_canaries(gaussian.subset(NODES[:12] + [-i for i in range(1, 17)]), 1e-5)
    many = estimate_from_canaries(gaussian, 1e-5)
    width = [e["mu_client_interval"][1] - e["mu_client_interval"][0] for e in (few, many)]
    assert width[0] > 1.5 * width[1]  # sqrt(48 / 12) = 2 in expectation


def test_claimed_mu_is_the_composition_of_the_claims_gaussians():
    claim = {"history": [{"noise_multiplier": 2.0, "sampling_rate": 1.0, "steps": 1} for _ in range(5)]}
    mu = claimed_mu(claim)
    assert mu == pytest.approx(math.sqrt(5) / 2.0)
    assert gdp_epsilon(mu, 1e-5) == pytest.approx(epsilon_pld([GaussianEvent(2.0, 1.0, 5)], 1e-5), rel=0.02)
    sampled = {"history": [{"noise_multiplier": 2.0, "sampling_rate": 0.5, "steps": 1}]}
    assert claimed_mu(sampled) is None and claimed_mu(None) is None and claimed_mu({"history": []}) is None


def test_the_interval_carries_the_fitted_nulls_uncertainty(gaussian):
    """Every canary's mu is measured against the held-out and generated canaries' mean: with as
    many audit nodes as here, its error weighs about as much as the inserted canaries' spread."""
    est = estimate_from_canaries(gaussian, 1e-5)
    inserted = gaussian.linear_of("inserted")
    null = np.concatenate([gaussian.linear_of("held-out"), gaussian.linear_of("generated")])
    ratio = np.sqrt(gaussian.client_rows / gaussian.linear_rows[gaussian.group == "inserted"])
    each = (inserted - null.mean()) / null.std(ddof=1) * ratio / gaussian.linear_coefficient
    spread_only = each.std(ddof=1) / math.sqrt(each.size)
    assert est["mu_client_se"] > 1.2 * spread_only
