"""Robust aggregators against Byzantine clients, and the attacks that play them."""

from __future__ import annotations

import numpy as np
import pytest

from feddistill.simulations.attacks import ATTACKS, corrupt_answers, hostile_clients
from feddistill.strategies.base import AnswerStrategy
from feddistill.strategies.mean import MeanAnswers
from feddistill.strategies.median import MedianAnswers
from feddistill.strategies.outlier import OutlierFilteredMean
from feddistill.strategies.trimmed_mean import TrimmedMeanAnswers

Q, C = 200, 10
HONEST, HOSTILE = 10, 2


def _honest_answers(k: int, seed: int = 0) -> np.ndarray:
    """k clients answering near one common truth (confident rows, each client with its own noise)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, Q)
    truth = 0.6 * np.eye(C)[labels] + 0.4 * rng.dirichlet(np.ones(C), Q)
    return np.stack([0.8 * truth + 0.2 * rng.dirichlet(np.ones(C), Q) for _ in range(k)]).astype(np.float32)


def _with_hostile(attacks: tuple[str, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(all answers, honest mean): HONEST honest clients first, then HOSTILE ones running ``attacks`` in turn."""
    answers = _honest_answers(HONEST + HOSTILE, seed)
    rng = np.random.default_rng(seed + 1)
    for i in range(HONEST, HONEST + HOSTILE):
        for attack in attacks:
            answers[i] = corrupt_answers(answers[i], attack, rng, num_classes=C)
    return answers, answers[:HONEST].mean(axis=0)


def _robust() -> list[AnswerStrategy]:
    return [
        MedianAnswers(sampling_rate=1.0),
        TrimmedMeanAnswers(sampling_rate=1.0),
        OutlierFilteredMean(sampling_rate=1.0),
    ]


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(axis=1) == b.argmax(axis=1)).mean())


# "scaled, label-flip": a lie amplified x10 (what damages the plain mean's argmax; scaling an
# honest matrix alone only over-weights an honest opinion).
FINITE_ATTACKS = [("label-flip",), ("random",), ("scaled",), ("label-flip", "scaled")]


@pytest.mark.parametrize("attacks", FINITE_ATTACKS, ids=lambda a: "+".join(a))
def test_robust_aggregators_stay_close_to_the_honest_mean(attacks):
    answers, honest_mean = _with_hostile(attacks)
    weights = np.full(len(answers), 50.0)
    for strategy in _robust():
        out = strategy.aggregate_answers(answers, weights)
        assert out.shape == (Q, C) and np.isfinite(out).all(), strategy.name
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5, err_msg=strategy.name)
        assert _agreement(out, honest_mean) >= 0.95, strategy.name
        assert np.abs(out - honest_mean).max() < 0.06, strategy.name


def test_plain_mean_is_damaged_by_scaled_answers():
    honest_only = MeanAnswers(sampling_rate=1.0).aggregate_answers(_honest_answers(HONEST), np.ones(HONEST))
    answers, honest_mean = _with_hostile(("label-flip", "scaled"))
    mean = MeanAnswers(sampling_rate=1.0).aggregate_answers(answers, np.ones(len(answers)))
    assert _agreement(mean, honest_mean) < 0.5  # two amplified liars outvote ten honest clients
    assert np.abs(mean - honest_mean).max() > 0.3
    assert np.abs(honest_only - honest_mean).max() < 1e-5  # (the mean of honest answers is the honest mean)
    answers, _ = _with_hostile(("scaled",))
    deviation = np.abs(MeanAnswers(sampling_rate=1.0).aggregate_answers(answers, np.ones(len(answers))) - honest_mean)
    median = MedianAnswers(sampling_rate=1.0).aggregate_answers(answers, np.ones(len(answers)))
    assert deviation.max() > 1.5 * np.abs(median - honest_mean).max()  # even honest-but-scaled answers pull it


def test_outlier_filter_excludes_exactly_the_hostile_clients():
    answers = _honest_answers(10)
    rng = np.random.default_rng(3)
    hostile = [2, 5, 9]
    for i, attack in zip(hostile, ("label-flip", "random", "scaled")):
        answers[i] = corrupt_answers(answers[i], attack, rng, num_classes=C)
    strategy = OutlierFilteredMean(sampling_rate=1.0, keep_fraction=0.7)
    out = strategy.aggregate_answers(answers, np.ones(10))
    assert strategy.last_excluded == hostile
    honest = [i for i in range(10) if i not in hostile]
    np.testing.assert_allclose(
        out, answers[honest].mean(axis=0) / answers[honest].mean(axis=0).sum(1, keepdims=True), atol=1e-6
    )
    strategy.aggregate_answers(answers[honest], np.ones(len(honest)))
    assert len(strategy.last_excluded) == 2  # floor(0.3 * 7): the filter always drops its quota


def test_outlier_filter_keeps_everyone_at_keep_fraction_one_and_at_least_one_client():
    answers = _honest_answers(4)
    everyone = OutlierFilteredMean(sampling_rate=1.0, keep_fraction=1.0)
    np.testing.assert_allclose(
        everyone.aggregate_answers(answers, np.ones(4)),
        MeanAnswers(sampling_rate=1.0).aggregate_answers(answers, np.ones(4)),
        atol=1e-6,
    )
    assert everyone.last_excluded == []
    one = OutlierFilteredMean(sampling_rate=1.0, keep_fraction=0.01)
    assert one.aggregate_answers(answers, np.ones(4)).shape == (Q, C) and len(one.last_excluded) == 3


def test_trimmed_mean_trims_floor_beta_k_per_side_and_falls_back_to_the_median():
    values = np.array([0.0, 1.0, 2.0, 3.0, 100.0]).reshape(5, 1, 1) * np.ones((5, 1, 2))
    raw = dict(sampling_rate=1.0, probabilities=False)
    np.testing.assert_allclose(TrimmedMeanAnswers(**raw, beta=0.2).aggregate_answers(values, np.ones(5)), 2.0)
    np.testing.assert_allclose(TrimmedMeanAnswers(**raw, beta=0.0).aggregate_answers(values, np.ones(5)), 21.2)
    few = values[[0, 1, 4]]  # K = 3: floor(0.2 * 3) = 0, nothing to trim -> median
    np.testing.assert_allclose(TrimmedMeanAnswers(**raw, beta=0.2).aggregate_answers(few, np.ones(3)), 1.0)
    np.testing.assert_allclose(MedianAnswers(**raw).aggregate_answers(values, np.ones(5)), 2.0)
    even = np.concatenate([values, values[:1] + 7.0])  # K = 6, beta = 0.5: nothing left to average -> median
    np.testing.assert_allclose(TrimmedMeanAnswers(**raw, beta=0.5).aggregate_answers(even, np.ones(6)), 2.5)
    with pytest.raises(ValueError):
        TrimmedMeanAnswers(sampling_rate=1.0, beta=0.6)


@pytest.mark.parametrize("make", [MedianAnswers, TrimmedMeanAnswers, OutlierFilteredMean])
def test_single_client_and_all_zero_rows_give_a_finite_distribution(make):
    answers = _honest_answers(1)
    answers[0, :3] = 0.0
    out = make(sampling_rate=1.0).aggregate_answers(answers, np.ones(1))
    assert out.shape == (Q, C) and np.isfinite(out).all()
    np.testing.assert_allclose(out[:3], 1.0 / C)  # an all-zero row becomes uniform
    np.testing.assert_allclose(out[3:], answers[0, 3:] / answers[0, 3:].sum(1, keepdims=True), atol=1e-6)


# ---- the attacks do what they claim ----


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_attacks_produce_what_they_claim(dtype):
    honest = _honest_answers(1)[0].astype(dtype)
    before = honest.copy()
    rng = np.random.default_rng(0)
    flipped = corrupt_answers(honest, "label-flip", rng, num_classes=C)
    assert flipped.shape == honest.shape and flipped.dtype == dtype
    np.testing.assert_array_equal(flipped.argmax(1), (honest.argmax(1) + 1) % C)  # a lie on every query
    # ... that is still a valid probability row
    np.testing.assert_allclose(flipped.sum(1, dtype=np.float64), honest.sum(1, dtype=np.float64), rtol=1e-9)
    rand = corrupt_answers(honest, "random", rng, num_classes=C)
    assert rand.shape == honest.shape and rand.dtype == dtype and (rand >= 0).all()
    np.testing.assert_allclose(rand.sum(1), 1.0, atol=1e-2)
    scaled = corrupt_answers(honest, "scaled", rng, num_classes=C)
    assert scaled.shape == honest.shape and np.isfinite(scaled).all() and scaled.max() > 1.0
    np.testing.assert_allclose(scaled, honest.astype(np.float64) * 10, rtol=1e-2)
    nan = corrupt_answers(honest, "nan", rng, num_classes=C)
    assert nan.shape == honest.shape and np.isnan(nan).any() and np.isinf(nan).any()
    shapes = {corrupt_answers(honest, "wrong-shape", np.random.default_rng(s), num_classes=C).shape for s in range(20)}
    assert shapes == {(Q + 1, C), (Q, C - 1)}
    np.testing.assert_array_equal(honest, before)  # inputs are never modified
    with pytest.raises(ValueError, match="unknown attack"):
        corrupt_answers(honest, "sybil", rng, num_classes=C)
    with pytest.raises(ValueError):
        corrupt_answers(honest, "random", rng, num_classes=C + 1)
    assert set(ATTACKS) == {"label-flip", "random", "scaled", "nan", "wrong-shape"}


def test_one_hot_votes_stay_one_hot_under_label_flip():
    votes = np.eye(C, dtype=np.float32)[np.arange(Q) % C]
    flipped = corrupt_answers(votes, "label-flip", np.random.default_rng(0), num_classes=C)
    np.testing.assert_array_equal(flipped, np.eye(C, dtype=np.float32)[(np.arange(Q) + 1) % C])


def test_hostile_clients_are_a_deterministic_floor_fraction():
    assert hostile_clients(10, 0.3, seed=1) == hostile_clients(10, 0.3, seed=1)
    assert len(hostile_clients(10, 0.3, seed=1)) == 3
    assert len(hostile_clients(100, 0.29, seed=0)) == 29
    assert len(hostile_clients(7, 0.5, seed=0)) == 3
    assert hostile_clients(10, 0.0, seed=0) == set() and hostile_clients(4, 1.0, seed=0) == {0, 1, 2, 3}
    assert all(0 <= i < 50 for i in hostile_clients(50, 0.2, seed=5))
    assert len({frozenset(hostile_clients(50, 0.2, seed=s)) for s in range(5)}) > 1  # the seed matters
    with pytest.raises(ValueError):
        hostile_clients(10, 1.5, seed=0)
