"""Distillation loss, aggregation rules, reply validation and config validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict

from feddistill import protocol
from feddistill.config import ConfigError, RunConfig, load_config, parse_config
from feddistill.model_names import MODEL_NAMES
from feddistill.models import build_model
from feddistill.strategies import EntropyReducedMean, MeanAnswers, ReplyCheck, check_reply, entropy_reduction
from feddistill.training import expected_calibration_error, kd_loss, train_distill

# ---- knowledge distillation ----


def test_kd_loss_matches_hand_computed_value():
    # Teacher p=[0.8, 0.2] softened at T=2 -> [2/3, 1/3]; student logits [1, 0] at T=2 ->
    # softmax([0.5, 0]) = [0.62246, 0.37754]; T^2 * KL = 4 * 0.0042295 = 0.0169179.
    loss = kd_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.8, 0.2]]), temperature=2.0)
    assert float(loss) == pytest.approx(0.01691793020784202, rel=1e-5)


def test_kd_loss_is_zero_when_student_matches_teacher_and_positive_otherwise():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    assert float(kd_loss(torch.log(probs), probs, 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(torch.zeros(1, 3), probs, 3.0)) > 1e-3


def test_distillation_moves_student_toward_teacher():
    x = torch.randn(64, 1, 8, 8)
    teacher = torch.softmax(torch.randn(64, 10) * 3, dim=1)
    model = build_model("mlp", 8, 10, seed=0)
    before = float(kd_loss(model(x), teacher, 2.0))
    train_distill(model, x, teacher, temperature=2.0, epochs=30, batch_size=16, lr=0.05)
    assert float(kd_loss(model(x), teacher, 2.0)) < 0.5 * before


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size", [8, 28])
def test_models_map_images_to_logits(name, size):
    assert build_model(name, size, 10, seed=0)(torch.zeros(3, 1, size, size)).shape == (3, 10)


def test_ece_of_perfectly_calibrated_and_overconfident_predictions():
    labels = np.array([0, 0, 1, 1])
    assert expected_calibration_error(np.eye(2)[labels], labels) == pytest.approx(0.0)
    wrong = np.eye(2)[1 - labels]  # confident and always wrong
    assert expected_calibration_error(wrong, labels) == pytest.approx(1.0)


# ---- aggregation ----


def _answers(k=4, q=5, c=3, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random((k, q, c))
    return a / a.sum(axis=2, keepdims=True)


def test_mean_aggregation_is_the_plain_mean_whatever_the_weights():
    # no reply carries a weight (an example count would reveal the private set's size)
    answers = _answers()
    plain = MeanAnswers(sampling_rate=1.0).aggregate_answers(answers, np.array([1, 1, 1, 5.0]))
    np.testing.assert_allclose(plain, answers.mean(axis=0), atol=1e-12)


def test_era_sharpens_the_mean_and_keeps_its_argmax():
    answers = _answers(seed=1)
    mean = answers.mean(axis=0)
    era = EntropyReducedMean(sampling_rate=1.0, temperature=0.1).aggregate_answers(answers, np.ones(4))
    np.testing.assert_allclose(era.sum(axis=1), 1.0)
    np.testing.assert_array_equal(era.argmax(1), mean.argmax(1))

    def entropy(p):
        return -(p * np.log(p)).sum(axis=1)

    assert (entropy(era) < entropy(mean)).all()
    # by definition: softmax(mean / T)
    z = np.exp(mean[0] / 0.1)
    np.testing.assert_allclose(era[0], z / z.sum())
    # a high temperature flattens toward uniform instead
    assert entropy(entropy_reduction(mean, 100.0)).mean() > entropy(mean).mean() - 1e-9


def test_poisson_sampling_picks_each_node_independently_with_rate_q():
    strategy = MeanAnswers(sampling_rate=0.1, sampling="poisson", seed=0)
    sizes = [len(strategy.sample_nodes(list(range(200)))) for _ in range(300)]
    assert np.mean(sizes) == pytest.approx(20, rel=0.05)
    assert np.std(sizes) > 2  # a fixed-size sample would have no spread
    fixed = MeanAnswers(sampling_rate=0.1, sampling="fixed", seed=0)
    assert {len(fixed.sample_nodes(list(range(200)))) for _ in range(20)} == {20}


# ---- reply validation ----


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower's runtime sets the identity of the running task; building Messages outside it needs one.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


CHECK = ReplyCheck(round=3, digest="abc", num_queries=5, num_classes=3)


def _request() -> Message:
    return Message(RecordDict({}), dst_node_id=1, message_type=protocol.DISTILL)


def _reply(answers, *, round=3, digest="abc", extra=None) -> Message:
    arrays = {protocol.ANSWERS: Array(np.ascontiguousarray(answers))}
    if extra:
        arrays.update(extra)
    content = RecordDict(
        {
            protocol.ANSWERS_RECORD: ArrayRecord(arrays),
            protocol.REPLY_META: ConfigRecord({protocol.ROUND: round, protocol.DIGEST: digest}),
        }
    )
    return Message(content, reply_to=_request())


def test_valid_reply_is_accepted():
    answers, reason = check_reply(_reply(_answers(1)[0].astype(np.float32)), CHECK)
    assert reason is None and answers.shape == (5, 3)


@pytest.mark.parametrize(
    "reply, reason",
    [
        (lambda: _reply(_answers(1)[0].astype(np.float32), round=2), "wrong round"),
        (lambda: _reply(_answers(1)[0].astype(np.float32), digest="xyz"), "wrong reference-set digest"),
        (lambda: _reply(np.full((5, 3), np.nan, np.float32)), "non-finite"),
        (lambda: _reply(np.full((5, 3), np.inf, np.float32)), "non-finite"),
        (lambda: _reply(np.ones((4, 3), np.float32) / 3), "wrong shape"),
        (lambda: _reply(np.ones((5, 3), np.float64) / 3), "wrong dtype"),
        (lambda: _reply(np.full((5, 3), 7.0, np.float32)), "values outside"),
        (
            lambda: _reply(np.ones((5, 3), np.float32) / 3, extra={"weights": Array(np.zeros(3, np.float32))}),
            "unexpected arrays",
        ),
        (lambda: Message(Error(protocol.REFUSED, "over budget"), reply_to=_request()), "refused"),
        (lambda: Message(Error(99, "crashed"), reply_to=_request()), "error reply"),
    ],
)
def test_bad_replies_are_rejected_with_a_reason(reply, reason):
    answers, why = check_reply(reply(), CHECK)
    assert answers is None and why.startswith(reason)


# ---- config ----


def test_defaults_are_valid_and_round_trip_through_flower_run_config():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert parse_config(cfg.to_flat(), "flat") == cfg


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('rounds = 3\n[fleet]\nnum-clients = 7\nstudents = "mlp,cnn"\n')
    cfg = load_config(path, {"distill.aggregator": "era"})
    assert (cfg.rounds, cfg.fleet.num_clients, cfg.distill.aggregator) == (3, 7, "era")
    assert [cfg.student_for(i) for i in range(3)] == ["mlp", "cnn", "mlp"]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rounds": 0}, "'rounds' = 0 must be >= 1"),
        ({"rounds": "5"}, "'rounds': expected int"),
        ({"rounds": True}, "'rounds': expected int"),
        ({"fleet": {"alpha": 0.0}}, "'fleet.alpha' = 0.0 must be > 0"),
        ({"fleet": {"fraction": 1.5}}, "'fleet.fraction' = 1.5 must be > 0 and <= 1.0"),
        ({"fleet": {"num-clinets": 3}}, "unknown key 'fleet.num-clinets'"),
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"distill": {"aggregator": "max"}}, "'distill.aggregator' = 'max' is not one of"),
        ({"fleet": {"students": "mlp,resnet"}}, "unknown model 'resnet'"),
        (
            {"data": {"public-labelled-size": 500, "reference-size": 100}, "distill": {"query-size": 50}},
            "must not exceed 'data.reference-size'",
        ),
        ({"fleet": 3}, "'fleet' must be a table"),
    ],
)
def test_bad_configs_are_rejected_with_key_and_source(values, message):
    with pytest.raises(ConfigError) as info:
        parse_config(values, "my.toml")
    assert message in str(info.value) and str(info.value).startswith("my.toml")


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


# ---- DP aggregation ----


class _Passthrough(MeanAnswers):
    def aggregate_answers(self, answers, weights):
        return answers[0]


def test_central_gaussian_noises_the_sum_and_divides_by_the_expected_count():
    from feddistill.strategies import CentralGaussianAnswers

    dp = CentralGaussianAnswers(
        _Passthrough(sampling_rate=0.5), noise_std=3.0, expected_clients=4.0, rng=np.random.default_rng(0)
    )
    answers = np.ones((4, 200, 50)) / 50  # 4 clients, sum = 4/50 per entry
    out = dp.aggregate_answers(answers, np.ones(4))
    assert out.mean() == pytest.approx(4 / 50 / 4, abs=0.01)
    assert out.std() == pytest.approx(3.0 / 4, rel=0.05)  # noise_std / expected clients


def test_gnmax_releases_the_consensus_and_confident_gnmax_abstains_without_one():
    from feddistill.strategies import GNMaxVotes

    votes = np.zeros((30, 6, 4))
    votes[:, :3, 2] = 1  # queries 0-2: all 30 clients vote class 2
    votes[:, 3:, :] = np.eye(4)[np.arange(30) % 4][:, None, :]  # queries 3-5: votes split evenly
    plain = GNMaxVotes(sampling_rate=1.0, sigma=1.0, noise_rng=np.random.default_rng(0))
    out = plain.aggregate_answers(votes, np.ones(30))
    assert (out[:3].argmax(1) == 2).all() and np.allclose(out.sum(1), 1)
    confident = GNMaxVotes(
        sampling_rate=1.0, sigma=1.0, noise_rng=np.random.default_rng(0), threshold=20, sigma_threshold=1.0
    )
    out = confident.aggregate_answers(votes, np.ones(30))
    assert (out[:3].argmax(1) == 2).all()
    assert np.isnan(out[3:]).all()  # max count ~8 < 20: not answered, not used


def test_uint8_answers_round_trip_within_half_a_step():
    from feddistill.encoding import decode_answers, encode_answers

    probs = _answers(1, q=50, c=10)[0]
    encoded = encode_answers(probs, "uint8")
    assert encoded.dtype == np.uint8 and encoded.nbytes == probs.size
    np.testing.assert_allclose(decode_answers(encoded), probs, atol=0.5 / 255 + 1e-7)
    assert check_reply(_reply(encoded), ReplyCheck(round=3, digest="abc", num_queries=50, num_classes=10))[1] is None
    with pytest.raises(ConfigError, match="uint8"):
        parse_config(
            {"distill": {"answer-dtype": "uint8"}, "privacy": {"client-level": "local", "noise-multiplier": 1.0}}
        )


def test_vote_answers_are_one_byte_per_query_and_decode_to_one_hot_rows():
    from feddistill.encoding import encode_answers

    probs = _answers(1, q=50, c=10)[0]
    votes = encode_answers(probs, "vote")
    assert votes.dtype == np.uint8 and votes.shape == (50,) and votes.nbytes == 50
    check = ReplyCheck(round=3, digest="abc", num_queries=50, num_classes=10, votes=True)
    decoded, reason = check_reply(_reply(votes), check)
    assert reason is None
    np.testing.assert_array_equal(decoded, np.eye(10, dtype=np.float32)[probs.argmax(1)])
    bad = votes.copy()
    bad[7] = 10  # no class 10
    assert "vote for class 10" in check_reply(_reply(bad), check)[1]
    assert "wrong shape" in check_reply(_reply(votes[:-1]), check)[1]
    assert "wrong dtype" in check_reply(_reply(votes.astype(np.int32)), check)[1]
    assert "wrong dtype" in check_reply(_reply(probs.astype(np.float16)), check)[1]  # a matrix when votes are due
    assert (
        "wrong shape"
        in check_reply(_reply(votes), ReplyCheck(round=3, digest="abc", num_queries=50, num_classes=10))[1]
    )  # votes when a matrix is due
    with pytest.raises(ConfigError, match="vote"):
        parse_config(
            {"distill": {"answer-dtype": "vote"}, "privacy": {"client-level": "local", "noise-multiplier": 1.0}}
        )


# ---- the public teacher's cache ----


def test_public_teacher_cache_returns_the_same_teacher_without_training_or_inference(tmp_path, monkeypatch):
    """Weights, reference-set probabilities and test metrics come back from the cache; a
    corrupt entry is retrained, never trusted."""
    from feddistill.config import TeacherConfig
    from feddistill.data.fleet import load_fleet
    from feddistill.server import teacher as teacher_mod

    monkeypatch.setenv("FEDDISTILL_CACHE", str(tmp_path))
    cfg = load_config(None, {"fleet.num_clients": 3})
    splits = load_fleet(cfg.data, cfg.fleet, cfg.seed).splits
    tcfg = TeacherConfig(model="mlp", epochs=2)
    first = teacher_mod.public_teacher(tcfg, splits, seed=0)
    (entry,) = tmp_path.glob("teacher-*.pt")

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached teacher must not be trained or evaluated again")

    for name in ("train_supervised", "predict_probs", "evaluate_model"):
        monkeypatch.setattr(teacher_mod, name, forbidden)
    again = teacher_mod.public_teacher(tcfg, splits, seed=0)
    np.testing.assert_array_equal(again.reference_probs, first.reference_probs)
    assert again.test == first.test
    for key, value in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value)

    entry.write_bytes(b"not a torch file")
    with pytest.raises(AssertionError, match="must not be trained"):  # it retrains: the cache is not trusted
        teacher_mod.public_teacher(tcfg, splits, seed=0)
    assert not entry.exists()
