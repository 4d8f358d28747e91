"""Secure aggregation of the answers with Flower's SecAgg+, and the distributed-DP calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from feddistill import protocol
from feddistill.config import ConfigError, load_config
from feddistill.encoding import decode_answers
from feddistill.privacy.distributed import (
    clip_failure_probability,
    run_secagg_noise,
    secagg_privacy,
    share_std,
)
from feddistill.privacy.mechanisms import reply_sensitivity
from feddistill.privacy.plan import upload_privacy
from feddistill.strategies import normalize_rows
from test_simulation import SMALL

pytestmark = pytest.mark.e2e(seconds=15)

SECAGG = {**SMALL, "distill.secure_aggregation": "secagg+"}


@pytest.fixture()
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def test_secagg_round_gives_the_server_the_mean_of_the_plain_answers(tmp_path, monkeypatch, task_identity):
    """5 clients, 2 rounds through Flower's SecAggPlusWorkflow + secaggplus_mod on the simulation
    engine. The test (only) records what the server received; each client's plain answer is then
    recomputed in this process from the same download and the same saved client state."""
    import feddistill.server.secagg as secagg
    from feddistill.client.distill import handle_distill
    from feddistill.simulations.run import simulate_flower

    seen = []
    real_round = secagg.secagg_round

    def recording_round(grid, messages, cfg, rnd, node_partition, **kwargs):
        signal, collected = real_round(grid, messages, cfg, rnd, node_partition, **kwargs)
        seen.append((rnd, messages[0].content, collected, signal))
        return signal, collected

    monkeypatch.setattr(secagg, "secagg_round", recording_round)
    cfg = load_config(None, {**SECAGG, "output_dir": str(tmp_path)})
    results = simulate_flower(cfg)
    assert [r["replies"] for r in results["rounds"]] == [5, 5]  # the server counts survivors, sees no answer
    assert results["privacy"]["secure_aggregation"]["reconstruction_threshold"] == 3
    assert results["final"]["student_accuracy"] > 0.6
    assert [rnd for rnd, *_ in seen] == [1, 2]
    step = run_secagg_noise(cfg).step
    for _rnd, content, collected, signal in seen:
        assert collected.answers == [] and collected.survivors == 5 and sorted(collected.senders) == list(range(5))
        plain = []
        for pid in range(5):
            context = Context(
                run_id=1,
                node_id=1,
                node_config={"partition-id": pid, "num-partitions": 5},
                state=RecordDict(),
                run_config={},
            )
            request = Message(content, dst_node_id=1, message_type=protocol.DISTILL)
            reply = handle_distill(request, context, cfg)
            plain.append(decode_answers(reply.content.array_records[protocol.ANSWERS_RECORD][protocol.ANSWERS].numpy()))
        mean = np.mean(plain, axis=0)
        assert collected.aggregate.shape == mean.shape == (cfg.distill.query_size, 10)
        # stochastic rounding: each survivor's entry is off by < one step, the mean too
        np.testing.assert_allclose(collected.aggregate, mean, rtol=0, atol=step + 1e-6)
        assert np.abs(collected.aggregate - mean).max() > 0  # it did go through quantization
        np.testing.assert_allclose(signal, normalize_rows(mean), rtol=0, atol=1e-4)  # as MeanAnswers would


def test_secagg_misconfigurations_are_refused():
    with pytest.raises(ConfigError, match="'distill.aggregator' must be 'mean'"):
        load_config(None, {**SECAGG, "distill.aggregator": "median"})
    with pytest.raises(ConfigError, match="'distill.secure-aggregation' = 'secagg' is not one of off, secagg\\+"):
        load_config(None, {**SECAGG, "distill.secure_aggregation": "secagg"})
    with pytest.raises(ConfigError, match="'distill.secagg-reconstruction-threshold' \\(5\\) must be <"):
        load_config(None, {**SECAGG, "distill.secagg_reconstruction_threshold": 5})
    with pytest.raises(ConfigError, match="'distill.secagg-quantization-range' .* must be < 2\\*\\*32"):
        load_config(None, {**SECAGG, "fleet.num_clients": 2000, "distill.secagg_quantization_range": 2**22})
    with pytest.raises(ConfigError, match="'scenario.hostile-fraction' > 0"):
        load_config(None, {**SECAGG, "scenario.hostile_fraction": 0.2})
    with pytest.raises(ConfigError, match="'confident-gnmax'"):
        load_config(
            None,
            {
                **SECAGG,
                "privacy.client_level": "confident-gnmax",
                "privacy.bound": "votes",
                "privacy.noise_multiplier": 1.0,
                "privacy.gnmax_threshold": 3.0,
                "privacy.threshold_noise_multiplier": 2.0,
            },
        )
    with pytest.raises(ConfigError, match="'distill.secagg-clipping-range' \\(0.5\\) must be >= 1"):
        load_config(None, {**SECAGG, "distill.secagg_clipping_range": 0.5})
    # a clipping range that would clip the noise shares too often for the accounting is refused
    with pytest.raises(ConfigError, match="'distill.secagg-clipping-range' = 8 clips a noise share"):
        load_config(
            None,
            {
                **SECAGG,
                "privacy.client_level": "central",
                "privacy.noise_multiplier": 1.0,
                "distill.secagg_clipping_range": 8.0,
            },
        )
    with pytest.raises(ConfigError, match="'distill.secagg-quantization-range' = 64 quantizes with step"):
        load_config(
            None,
            {
                **SECAGG,
                "privacy.client_level": "central",
                "privacy.noise_multiplier": 1.0,
                "distill.secagg_quantization_range": 64,
            },
        )


def test_client_refuses_a_server_that_lowers_the_threshold_or_changes_the_range():
    from flwr.app import ConfigRecord
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    from feddistill.client.secagg import SecAggRefused, check_setup

    cfg = load_config(None, {**SECAGG, "privacy.client_level": "central", "privacy.noise_multiplier": 1.0})
    noise = run_secagg_noise(cfg)
    good = {
        Key.CLIPPING_RANGE: noise.clipping_range,
        Key.TARGET_RANGE: noise.quantization_range,
        Key.MAX_WEIGHT: 1.0,
        Key.THRESHOLD: 3,
    }
    check_setup(ConfigRecord(good), cfg)
    with pytest.raises(SecAggRefused, match="reconstruction threshold 2 < 3"):
        check_setup(ConfigRecord({**good, Key.THRESHOLD: 2}), cfg)
    with pytest.raises(SecAggRefused, match="clipping range 8.0"):
        check_setup(ConfigRecord({**good, Key.CLIPPING_RANGE: 8.0}), cfg)


@pytest.mark.parametrize("client_level,bound", [("central", "probs"), ("gnmax", "votes")])
def test_noise_shares_of_any_accepted_number_of_survivors_carry_the_planned_noise(client_level, bound):
    cfg = load_config(
        None, {**SECAGG, "privacy.client_level": client_level, "privacy.bound": bound, "privacy.noise_multiplier": 0.8}
    )
    plan, noise = secagg_privacy(cfg)
    assert plan is not None and upload_privacy(cfg) == plan
    # replace-one sensitivity, q = 1 (no amplification claimed), sum noise z * Delta
    delta_replace = reply_sensitivity(bound, cfg.distill.query_size, neighbouring="replace-one")
    assert plan.sensitivity == pytest.approx(delta_replace) == pytest.approx(math.sqrt(2 * 200))
    assert plan.sampling_rate == 1.0 and plan.neighbouring == "replace-one"
    assert noise.sum_std == pytest.approx(0.8 * delta_replace)
    t = cfg.distill.secagg_reconstruction_threshold
    assert noise.min_survivors == t
    for m in range(t, cfg.fleet.num_clients + 1):  # every number of survivors a round accepts
        assert m * noise.share_std**2 >= noise.sum_std**2 * (1 - 1e-12)
    assert (t - 1) * noise.share_std**2 < noise.sum_std**2  # why fewer survivors are refused
    # the accountant's delta plus the clipping failure stays within the configured delta
    assert 0 < noise.clip_failure <= 0.01 * cfg.privacy.delta
    assert plan.delta + plan.clip_failure <= cfg.privacy.delta


def test_shares_through_flowers_quantization_sum_to_the_planned_variance():
    """Monte Carlo through Flower's own quantize/dequantize, as the SecAgg+ sum does it."""
    cfg = load_config(None, {**SECAGG, "privacy.client_level": "central", "privacy.noise_multiplier": 0.05})
    noise = run_secagg_noise(cfg)
    rng = np.random.default_rng(0)
    t, trials = noise.min_survivors, 20_000
    answers = rng.dirichlet(np.ones(10), size=(t, 1)).repeat(trials, axis=1)  # t clients, fixed answers
    shares = answers + rng.normal(0.0, noise.share_std, size=answers.shape)
    c, big_t = noise.clipping_range, noise.quantization_range
    assert np.abs(shares).max() < c  # the derived range does not clip
    quantized = sum(quantize([s], c, big_t)[0].astype(np.int64) for s in shares)
    total = dequantize([quantized], c, big_t)[0] - (t - 1) * c  # what the workflow's offset does
    error = total - answers.sum(axis=0)
    variance = error.var(axis=0)
    # the sum of t shares carries (at least) the planned sigma^2; quantization adds < 1e-6 of it
    assert np.all(variance >= noise.sum_std**2 * 0.95)
    assert np.abs(error.mean(axis=0)).max() < 5 * noise.sum_std / math.sqrt(trials)


def test_clip_failure_probability_is_a_union_bound_on_the_gaussian_tail():
    s = share_std(10.0, 4)
    assert s == 5.0
    assert clip_failure_probability(s, 1.0 + 5.0 * 3, 1.0, 1) == pytest.approx(math.erfc(3 / math.sqrt(2)))
    assert clip_failure_probability(s, 1.0 + 5.0 * 3, 1.0, 100) == pytest.approx(100 * math.erfc(3 / math.sqrt(2)))
    assert clip_failure_probability(0.0, 1.0, 1.0, 10**9) == 0.0
    assert clip_failure_probability(s, 0.5, 1.0, 1) == 1.0


def test_secagg_keys_are_in_the_flower_run_config():
    import tomllib
    from pathlib import Path

    from feddistill.config import parse_config

    flwr = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    default = parse_config({}, "defaults").to_flat()
    keys = [k for k in default if k.startswith(("distill.secagg-", "distill.secure-"))]
    assert len(keys) == 5
    for key in keys:
        assert flwr[key] == default[key], key


@pytest.mark.parametrize("client_level,bound", [("off", "probs"), ("central", "probs"), ("gnmax", "votes")])
def test_the_secagg_signal_is_the_round_strategys_rule_without_server_noise(client_level, bound):
    from feddistill.privacy.plan import upload_privacy
    from feddistill.server.loop import build_strategy

    overrides = {} if client_level == "off" else {"privacy.noise_multiplier": 0.8}
    cfg = load_config(None, {**SECAGG, "privacy.client_level": client_level, "privacy.bound": bound, **overrides})
    strategy = build_strategy(cfg, upload_privacy(cfg), np.random.default_rng(0))
    mean = np.random.default_rng(1).dirichlet(np.ones(10), size=cfg.distill.query_size)
    signal = strategy.signal_from_mean(mean)
    np.testing.assert_array_equal(signal, strategy.signal_from_mean(mean))  # the server adds no noise of its own
    if client_level == "gnmax":
        np.testing.assert_array_equal(signal, np.eye(10, dtype=np.float32)[mean.argmax(axis=1)])
    else:  # MeanAnswers' rule for one (already averaged) matrix
        np.testing.assert_allclose(signal, normalize_rows(mean), rtol=0, atol=1e-12)
