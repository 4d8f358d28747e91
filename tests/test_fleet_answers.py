"""Debiased, abstaining client answers and the server's consensus-gated fleet labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from feddistill import protocol
from feddistill.client.answers import abstentions, answer_logits, label_counts
from feddistill.client.distill import answer_matrix
from feddistill.config import ConfigError, load_config
from feddistill.encoding import decode_votes, encode_answers
from feddistill.privacy.plan import upload_privacy
from feddistill.server.consensus import MIN_CALIBRATION_ROWS, FleetLabels, calibrate_share, select_queries
from feddistill.strategies import MeanAnswers, ReplyCheck, validate_reply
from test_simulation import ONE_CLIENT_ACTOR

pytestmark = pytest.mark.e2e(seconds=25)

C = 4


def _cfg(**overrides):
    return load_config(None, {"output_dir": "/tmp/unused", **overrides})


# ---- client side ----


def test_prior_correction_moves_answers_toward_the_classes_a_client_rarely_saw():
    counts = np.array([90, 5, 5, 5])
    logits = np.array([[2.0, 1.0, 0.0, 0.0]])  # class 0 wins only because the client mostly saw class 0
    plain = answer_logits(logits, counts, _cfg())
    corrected = answer_logits(logits, counts, _cfg(**{"distill.prior_correction": True}))
    assert plain.argmax() == 0
    np.testing.assert_allclose(corrected - logits, -np.log((counts + 1) / (counts + 1).sum())[None], rtol=1e-12)
    assert corrected.argmax() == 1


def test_abstention_by_confidence_and_by_records_held():
    counts = label_counts(np.array([0] * 30 + [1] * 3), C)
    assert counts.tolist() == [30, 3, 0, 0]
    logits = np.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0.1, 0, 0, 0]])
    assert abstentions(logits, counts, _cfg()) is None  # default: never
    unsure = abstentions(logits, counts, _cfg(**{"distill.abstain_confidence": 0.5}))
    assert unsure.tolist() == [False, False, True]
    unheld = abstentions(logits, counts, _cfg(**{"distill.abstain_min_records": 10}))
    assert unheld.tolist() == [False, True, False]  # it holds 3 records of class 1


@pytest.mark.parametrize("bound", ["probs", "votes"])
def test_an_abstained_row_is_all_zero_and_survives_the_wire(bound):
    cfg = _cfg(**{"privacy.bound": bound})
    logits = np.array([[3.0, 0, 0, 0], [0, 0, 3.0, 0]])
    answers = answer_matrix(logits, upload_privacy(cfg), 0, abstain=np.array([False, True]))
    assert answers[1].tolist() == [0.0] * C and answers[0].sum() == pytest.approx(1.0)
    votes = encode_answers(answers, "vote")
    assert votes.tolist() == [0, protocol.ABSTAIN_VOTE]
    assert decode_votes(votes, C).tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]]


# ---- the reply schema ----


@pytest.fixture()
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _reply(answers: np.ndarray) -> Message:
    content = RecordDict(
        {
            protocol.ANSWERS_RECORD: ArrayRecord({protocol.ANSWERS: Array(np.ascontiguousarray(answers))}),
            protocol.REPLY_META: ConfigRecord({protocol.ROUND: 1, protocol.DIGEST: "d"}),
        }
    )
    return Message(content, reply_to=Message(RecordDict({}), dst_node_id=7, message_type=protocol.DISTILL))


def _check(**kw) -> ReplyCheck:
    return ReplyCheck(1, "d", 3, C, nodes={7: 0}, **kw)


def test_zero_rows_and_abstain_votes_are_legal_only_when_the_run_allows_abstention(_task_identity):
    probs = np.array([[0.5, 0.5, 0, 0], [0, 0, 0, 0], [0.25] * 4], dtype=np.float16)
    reply, reason = validate_reply(_reply(probs), _check())
    assert reply is None and "row 1 sums to 0" in reason
    reply, reason = validate_reply(_reply(probs), _check(abstain=True))
    assert reason is None and reply.answers[1].tolist() == [0.0] * C
    bad = probs.copy()
    bad[2] = [0.5, 0, 0, 0]  # not zero, not a distribution: still refused, and named by its row
    assert "row 2 sums to 0.5" in validate_reply(_reply(bad), _check(abstain=True))[1]
    votes = np.array([1, protocol.ABSTAIN_VOTE, 3], dtype=np.uint8)
    assert "vote out of range" in validate_reply(_reply(votes), _check(votes=True, bound="votes"))[1]
    reply, reason = validate_reply(_reply(votes), _check(votes=True, bound="votes", abstain=True))
    assert reason is None and reply.answers.sum(axis=1).tolist() == [1.0, 0.0, 1.0]
    votes[0] = 7  # still a class that does not exist
    assert "vote out of range" in validate_reply(_reply(votes), _check(votes=True, bound="votes", abstain=True))[1]


def test_the_mean_leaves_abstentions_out_and_leaves_unanswered_rows_unanswered():
    a = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]])
    b = np.array([[0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 0]])
    mean = MeanAnswers(0.1, abstain=True).aggregate_answers(np.stack([a, b]), np.ones(2))
    np.testing.assert_allclose(mean[0], [1, 0, 0, 0])  # one answer, not diluted by the abstention
    np.testing.assert_allclose(mean[1], [0, 0.5, 0.5, 0])
    assert np.isnan(mean[2]).all()
    full = np.stack([a + 0.25, b + 0.25]) / 1.25
    assert np.array_equal(
        MeanAnswers(0.1, abstain=True).aggregate_answers(full, np.ones(2)),
        MeanAnswers(0.1).aggregate_answers(full, np.ones(2)),
    )  # no abstention: as before


def test_config_refuses_abstention_where_a_zero_row_is_ambiguous_or_the_counts_are_unprotected():
    with pytest.raises(ConfigError, match="abstention"):
        _cfg(**{"distill.abstain_confidence": 0.5, "distill.aggregator": "median"})
    with pytest.raises(ConfigError, match="abstention"):
        _cfg(**{"distill.abstain_min_records": 5, "privacy.bound": "clipped_logits"})
    record = {"privacy.record_level": True, "privacy.record_noise_multiplier": 1.0}
    with pytest.raises(ConfigError, match="DP-SGD does not protect"):
        _cfg(**record, **{"distill.prior_correction": True})
    with pytest.raises(ConfigError, match="DP-SGD does not protect"):
        _cfg(**record, **{"distill.abstain_min_records": 5})
    _cfg(**record, **{"distill.abstain_confidence": 0.5})  # reads only the DP-trained model
    with pytest.raises(ConfigError, match="validation-fraction"):
        _cfg(
            **{
                "distill.fleet_labels": "consensus",
                "release.validation_fraction": 0.0,
                "release.gate": False,
                "release.calibrate": False,
            }
        )


# ---- the server's consensus gate and query choice ----


def test_calibration_picks_the_smallest_share_that_reaches_the_precision():
    rng = np.random.default_rng(0)
    share = rng.uniform(0.3, 1.0, size=400)
    truth = rng.integers(0, C, size=400)
    right = rng.random(400) < share  # labels right about as often as their share says
    label = np.where(right, truth, (truth + 1) % C)
    t = calibrate_share(share, label, truth, precision=0.9)
    assert t is not None
    assert (label[share >= t] == truth[share >= t]).mean() >= 0.9
    lower = round(t - 0.05, 2)
    assert (label[share >= lower] == truth[share >= lower]).mean() < 0.9
    assert (
        calibrate_share(
            share[: MIN_CALIBRATION_ROWS - 1], label[: MIN_CALIBRATION_ROWS - 1], truth[: MIN_CALIBRATION_ROWS - 1], 0.5
        )
        is None
    )  # too few to judge


def test_consensus_accepts_only_agreeing_rows_as_hard_labels_and_checkpoints():
    n = 60
    fleet = FleetLabels(n, C, mode="consensus", precision=0.9)
    truth = np.arange(n) % C
    agreeing = np.eye(C)[truth]
    split = np.full((n, C), 0.25)
    rows = np.arange(n)
    fleet.add(rows[:40], agreeing[:40])  # rows 0..39: the fleet agrees, and is right
    fleet.add(rows[40:], split[40:])  # rows 40..59: no consensus
    validation = np.arange(0, 40, 2)  # 20 held-out rows, all agreeing and right
    accepted = fleet.accepted(validation, truth[validation])
    assert fleet.threshold == 0.3 and accepted[:40].all() and not accepted[40:].any()
    signal, teacher = np.full((n, C), 0.25, np.float32), np.full((n, C), 0.25, np.float32)
    fleet.apply(signal, teacher, accepted)
    assert np.array_equal(signal[:40], agreeing[:40]) and np.array_equal(signal[40:], teacher[40:])
    wrong = FleetLabels(n, C, mode="consensus", precision=0.9)
    wrong.restore(fleet.state())
    assert not wrong.accepted(validation, (truth[validation] + 1) % C).any()  # the fleet is wrong there
    answered = FleetLabels(n, C)
    answered.add(rows[:5], agreeing[:5])
    assert answered.accepted(validation, truth[validation]).sum() == 5  # "answered": every answered row


def test_uncertain_queries_go_where_the_student_is_least_sure():
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    labelled = np.zeros(100, dtype=bool)
    assert np.array_equal(
        select_queries(rng_a, 10, "uniform", None, labelled), np.sort(rng_b.choice(100, size=10, replace=False))
    )  # uniform: the historical draw
    margin = np.linspace(0, 1, 100)
    labelled[:3] = True  # already labelled: not asked again on purpose
    picked = select_queries(np.random.default_rng(2), 20, "uncertain", margin, labelled)
    assert len(picked) == 20 == len(set(picked.tolist()))
    assert set(range(3, 18)) <= set(picked.tolist())  # 15 of 20: the least sure unlabelled rows


def test_a_simulation_with_abstaining_debiased_answers_and_consensus_labels(tmp_path):
    """Digits on Flower's simulation engine: clients correct their prior and abstain, the server
    accepts only consensus rows, queries go where the student is unsure; the run records it."""
    out = tmp_path / "consensus"
    settings = {
        "rounds": 3,
        "fleet.num_clients": 5,
        "fleet.fraction": 1.0,
        "teacher.epochs": 40,
        "data.public_labelled_size": 200,  # 40 held-out validation rows calibrate the gate
        "distill.digest_epochs": 2,
        "distill.revisit_epochs": 2,
        "distill.query_size": 300,
        "distill.prior_correction": "true",
        "distill.abstain_confidence": 0.6,
        "distill.abstain_min_records": 5,
        "distill.fleet_labels": '"consensus"',
        "distill.consensus_precision": 0.8,
        "distill.query_selection": '"uncertain"',
        "distill.answer_dtype": '"vote"',
        "privacy.bound": '"votes"',
        **ONE_CLIENT_ACTOR,
    }
    args = [sys.executable, "-m", "feddistill.cli", "simulate", "--no-baselines", "--out", str(out)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert all(r["replies"] == 5 and not r["dropped"] for r in rounds)  # abstentions are legal replies
    assert all(0 <= r["fleet_labelled_rows"] <= 450 for r in rounds)
    assert any(r["consensus_threshold"] is not None for r in rounds)
    assert results["final"]["fleet_labelled_rows"] == rounds[-1]["fleet_labelled_rows"] > 0
    assert results["final"]["student_accuracy"] > 0.6
