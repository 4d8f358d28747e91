"""Issue 15: a device's privacy noise comes from OS entropy, and only the answers leave it.

The attack: the server operator knows the run's seed, so it regenerates the noise the old
client code drew from ``seed * 1_000_003 + round * 10_007 + partition`` and subtracts it.
On the seeded simulation path that recovers the clean answers (the control below); on a
device it must recover nothing. Everything goes through the real ClientApp handler with a
real Flower Message and Context, the way a SuperNode delivers a round.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from feddistill import protocol
from feddistill.client.device import write_device_data
from feddistill.client.distill import handle_distill
from feddistill.client.secagg import ARRAY_NAMES, answers_as_fitres
from feddistill.config import ConfigError, load_config
from feddistill.data import ArrayDataset
from feddistill.data.fleet import load_fleet
from feddistill.privacy.accounting import GaussianEvent
from feddistill.privacy.dpsgd import dpsgd_schedule
from feddistill.privacy.ledger import PrivacyLedger
from feddistill.privacy.plan import check_devices_noise_source, record_noise_multiplier, run_privacy, upload_privacy
from feddistill.server.app import round_config
from feddistill.strategies import teacher_arrays

PID, ROUND = 1, 1
TINY = {
    "rounds": 1,
    "fleet.num_clients": 3,
    "fleet.fraction": 1.0,
    "distill.digest_epochs": 1,
    "distill.revisit_epochs": 1,
    "distill.query_size": 100,
    "distill.answer_dtype": "float32",  # the attack is exact to float32 rounding: no fp16 blur
}
LOCAL = {"privacy.client_level": "local", "privacy.noise_multiplier": 0.01}
RECORD = {"privacy.record_level": True, "privacy.record_noise_multiplier": 1.0}
OS = {"privacy.noise_source": "os-entropy"}


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _cfg(tmp_path: Path, name: str, **settings):
    return load_config(None, {**TINY, "output_dir": str(tmp_path / name), **settings})


def _request(cfg, rnd: int = ROUND) -> Message:
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    queries = np.arange(cfg.distill.query_size)
    signal = np.full((len(queries), fleet.num_classes), 1.0 / fleet.num_classes, np.float32)
    config = round_config(cfg, fleet.splits.reference_digest, run_privacy(cfg))
    config[protocol.ROUND] = rnd
    content = RecordDict({protocol.TEACHER_RECORD: teacher_arrays(signal, queries), protocol.CONFIG_RECORD: config})
    return Message(content, dst_node_id=1, message_type=protocol.DISTILL)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _device(tmp_path: Path, cfg, name: str = "device", pid: int = PID, private: ArrayDataset | None = None) -> Context:
    """A device's data dir, written as an owner would, and the Context its SuperNode gives the ClientApp."""
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    data_dir = write_device_data(tmp_path / name, private or fleet.private_data(pid), fleet.splits.reference)
    return _context({"device-id": pid, "data-dir": str(data_dir)})


def _simulated(pid: int = PID) -> Context:
    return _context({"partition-id": pid, "num-partitions": 3})


def _answers(reply: Message) -> np.ndarray:
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply.content.array_records[protocol.ANSWERS_RECORD][protocol.ANSWERS].numpy().astype(np.float64)


def _server_regenerated_noise(cfg, shape: tuple[int, ...]) -> np.ndarray:
    """The attacker's move: the old client code's noise, from the run's seed, round and partition."""
    seed = cfg.seed * 1_000_003 + ROUND * 10_007 + PID
    return np.random.default_rng(seed + 2).normal(0.0, upload_privacy(cfg).noise_std, size=shape)


# --------------------------------------------------------------------------- #
# item 1: the noise-subtraction attack against the device path
# --------------------------------------------------------------------------- #
def test_server_cannot_subtract_a_devices_local_noise(tmp_path):
    clean_cfg = _cfg(tmp_path, "clean", **OS)  # same run without local noise: the clean answers
    device_cfg = _cfg(tmp_path, "device-run", **LOCAL, **OS)
    seeded_cfg = _cfg(tmp_path, "seeded", **LOCAL)
    sigma = upload_privacy(device_cfg).noise_std
    assert sigma == pytest.approx(0.01 * np.sqrt(TINY["distill.query_size"]))

    clean = _answers(handle_distill(_request(clean_cfg), _simulated(), clean_cfg))
    context = _device(tmp_path, device_cfg)
    first = _answers(handle_distill(_request(device_cfg), context, device_cfg))
    second = _answers(handle_distill(_request(device_cfg), context, device_cfg))  # the same round, again
    simulated = _answers(handle_distill(_request(seeded_cfg), _simulated(), seeded_cfg))
    regenerated = _server_regenerated_noise(device_cfg, clean.shape)

    # control: on the seeded simulation path the attack works (that is why it is simulation only)
    assert np.abs(simulated - regenerated - clean).max() < 1e-5
    # on the device the noise is there, at its sigma ...
    assert np.std(first - clean) == pytest.approx(sigma, rel=0.1)
    # ... and subtracting the regenerated noise recovers nothing: the residual keeps the device's
    # noise and gains the regenerated one (independent), so its std is sigma*sqrt(2), never ~0
    residual = first - regenerated - clean
    assert np.std(residual) == pytest.approx(sigma * np.sqrt(2), rel=0.1)
    assert abs(np.corrcoef((first - clean).ravel(), regenerated.ravel())[0, 1]) < 0.1
    # two runs of the same round on the same device: different noise, same clean answers beneath
    assert np.std(first - second) == pytest.approx(sigma * np.sqrt(2), rel=0.1)


def test_seeded_simulation_stays_bit_reproducible(tmp_path):
    cfg_a, cfg_b = _cfg(tmp_path, "a", **LOCAL), _cfg(tmp_path, "b", **LOCAL)
    a = handle_distill(_request(cfg_a), _simulated(), cfg_a)
    b = handle_distill(_request(cfg_b), _simulated(), cfg_b)
    np.testing.assert_array_equal(_answers(a), _answers(b))
    # os-entropy in simulation: the noise is fresh in every run
    os_a, os_b = _cfg(tmp_path, "os-a", **LOCAL, **OS), _cfg(tmp_path, "os-b", **LOCAL, **OS)
    fresh = [_answers(handle_distill(_request(c), _simulated(), c)) for c in (os_a, os_b)]
    assert not np.array_equal(*fresh)


def test_device_refuses_a_round_that_asks_for_seeded_noise(tmp_path):
    cfg = _cfg(tmp_path, "run", **LOCAL)  # privacy.noise-source = "seeded", the default
    assert cfg.privacy.noise_source == "seeded"
    context = _device(tmp_path, cfg)
    reply = handle_distill(_request(cfg), context, cfg)
    assert reply.has_error() and reply.error.code == protocol.REFUSED
    assert "privacy.noise-source" in reply.error.reason and "os-entropy" in reply.error.reason
    assert not (tmp_path / "device" / "state").exists()  # refused before touching anything
    # even without any DP configured: a device never runs a seeded config
    plain = _cfg(tmp_path, "plain")
    assert handle_distill(_request(plain), context, plain).error.code == protocol.REFUSED


def test_server_refuses_to_start_a_seeded_run_with_devices(tmp_path):
    seeded, entropy = _cfg(tmp_path, "s"), _cfg(tmp_path, "o", **OS)
    with pytest.raises(ConfigError, match=r"2 node\(s\) are devices.*privacy.noise-source = 'seeded'"):
        check_devices_noise_source(seeded, 2)
    check_devices_noise_source(seeded, 0)  # a simulation: fine
    check_devices_noise_source(entropy, 2)
    with pytest.raises(ConfigError, match="'privacy.noise-source' = 'random' is not one of seeded, os-entropy"):
        load_config(None, {"privacy.noise_source": "random"})


def test_dpsgd_on_a_device_draws_fresh_noise_every_run(tmp_path):
    cfg = _cfg(tmp_path, "run", **RECORD, **OS)
    first = _answers(handle_distill(_request(cfg), _device(tmp_path, cfg, "one"), cfg))
    second = _answers(handle_distill(_request(cfg), _device(tmp_path, cfg, "two"), cfg))
    # same data, same round, same seeds for everything that protects nothing: only DP-SGD's
    # Poisson sampling and noise differ, and they do (by far more than float32 rounding, ~1e-8 here)
    assert np.abs(first - second).max() > 1e-5
    seeded = [_cfg(tmp_path, name, **RECORD) for name in ("s1", "s2")]
    again = [_answers(handle_distill(_request(c), _simulated(), c)) for c in seeded]
    np.testing.assert_array_equal(*again)  # the seeded simulation: bit-reproducible


# --------------------------------------------------------------------------- #
# item 2: only the answers leave a device
# --------------------------------------------------------------------------- #
def _schema(reply: Message) -> dict:
    content = reply.content
    return {
        "arrays": {name: list(rec.keys()) for name, rec in content.array_records.items()},
        "configs": {name: sorted(rec.keys()) for name, rec in content.config_records.items()},
        "metrics": {name: sorted(rec.keys()) for name, rec in content.metric_records.items()},
    }


def test_a_reply_carries_the_answers_round_and_digest_only(tmp_path):
    cfg = _cfg(tmp_path, "run", **LOCAL, **OS)
    reply = handle_distill(_request(cfg), _device(tmp_path, cfg), cfg)
    assert _schema(reply) == {
        "arrays": {"answers": ["answers"]},
        "configs": {"meta": ["reference-digest", "round"]},
        "metrics": {"metrics": []},
    }
    meta = reply.content.config_records[protocol.REPLY_META]
    assert meta[protocol.ROUND] == ROUND and isinstance(meta[protocol.ROUND], int)
    assert meta[protocol.DIGEST] == load_fleet(cfg.data, cfg.fleet, cfg.seed).splits.reference_digest


def test_record_epsilon_is_the_only_metric_and_does_not_depend_on_the_data(tmp_path):
    cfg = _cfg(tmp_path, "run", **RECORD, **OS)
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    full = fleet.private_data(PID)
    half = ArrayDataset(full.x[: len(full.y) // 2], full.y[: len(full.y) // 2], full.num_classes)
    replies = [
        handle_distill(_request(cfg), _device(tmp_path, cfg, name, private=data), cfg)
        for name, data in (("full", full), ("half", half))
    ]
    for reply in replies:
        assert _schema(reply)["metrics"] == {"metrics": ["record-epsilon"]}
        assert set(_schema(reply)["configs"]["meta"]) == {"round", "reference-digest"}
    eps = [r.content.metric_records[protocol.METRICS_RECORD][protocol.RECORD_EPSILON] for r in replies]
    assert eps[0] == eps[1]  # twice the records, the same epsilon: it reveals nothing about n
    # and it is exactly what public parameters give: q, revisit-epochs * int(1/q) steps, z
    rate, steps = dpsgd_schedule(cfg.privacy.record_sampling_rate, cfg.distill.revisit_epochs)
    ledger = PrivacyLedger(unit="record", delta=cfg.privacy.record_delta, target_epsilon=None, mechanism="dp-sgd")
    ledger.record(GaussianEvent(record_noise_multiplier(cfg, rate, steps), rate, steps), round=ROUND)
    assert eps[0] == pytest.approx(ledger.epsilon(), rel=1e-9)


def test_dpsgd_schedule_is_public():
    assert dpsgd_schedule(0.2, 5) == (0.2, 25)  # no number of records anywhere
    assert dpsgd_schedule(0.3, 2) == (0.3, 6)  # int(1/q) batches per epoch, as Opacus' sampler
    with pytest.raises(ConfigError, match="'privacy.record-sampling-rate' = 0.0 must be > 0 and <= 1.0"):
        load_config(None, {"privacy.record_sampling_rate": 0.0})
    with pytest.raises(ConfigError, match="record-sampling-rate"):
        load_config(None, {"privacy.record_sampling_rate": 1.5})


def test_secagg_plain_text_beside_the_masked_answers_is_record_epsilon_only(tmp_path):
    """SecAgg+'s masking stage (legacy FitIns -> FitRes): what travels unmasked is FitRes'
    metrics and num_examples; the same rule as a plain reply applies."""
    cfg = _cfg(tmp_path, "run", **RECORD, **OS, **{"distill.secure_aggregation": "secagg+"})
    request = _request(cfg)
    teacher = request.content.array_records[protocol.TEACHER_RECORD]
    config = dict(request.content.config_records[protocol.CONFIG_RECORD])
    config[ARRAY_NAMES] = json.dumps(list(teacher.keys()))
    fitins = FitIns(ndarrays_to_parameters([teacher[k].numpy() for k in teacher.keys()]), config)
    msg = Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=1, message_type="train")
    reply = answers_as_fitres(msg, _device(tmp_path, cfg), cfg, handle_distill)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
    assert set(fitres.metrics) == {protocol.RECORD_EPSILON} and fitres.metrics[protocol.RECORD_EPSILON] > 0
    assert fitres.num_examples == 1  # never the private-set size


# --------------------------------------------------------------------------- #
# the device's own rules, whatever the server's run config says
# --------------------------------------------------------------------------- #
def _with_cap(context: Context, cap) -> Context:
    return _context({**dict(context.node_config), "max-record-epsilon": cap})


def test_a_devices_own_record_cap_wins_over_the_servers_target(tmp_path):
    generous = _cfg(tmp_path, "run", **RECORD, **OS, **{"privacy.record_target_epsilon": 1000.0})
    device = _device(tmp_path, generous)
    first = handle_distill(_request(generous), device, generous)
    eps = first.content.metric_records[protocol.METRICS_RECORD][protocol.RECORD_EPSILON]
    # a cap below what one more round costs: the device refuses, although the server allows 1000
    capped = _with_cap(device, eps * 1.5)
    reply = handle_distill(_request(generous, rnd=2), capped, generous)
    assert reply.has_error() and reply.error.code == protocol.REFUSED and "record-level budget" in reply.error.reason
    # a device that demands record-level DP refuses a run without it
    plain = _cfg(tmp_path, "plain", **OS)
    reply = handle_distill(_request(plain), _with_cap(_device(tmp_path, plain, "other"), 3.0), plain)
    assert reply.has_error() and "requires record-level DP" in reply.error.reason
    with pytest.raises(ValueError, match="max-record-epsilon"):
        handle_distill(_request(generous), _with_cap(device, "lots"), generous)


def test_simulation_scenarios_never_run_on_a_device(tmp_path):
    """The scenarios are the simulation's ClientApp mod; installed on a device's app, it passes through."""
    from feddistill.simulations.scenarios import scenario_mods

    hostile = {"scenario.dropout": 1.0, "scenario.hostile_fraction": 1.0, "scenario.attack": "nan"}
    cfg = _cfg(tmp_path, "run", **OS, **hostile)
    (mod,) = scenario_mods(cfg)

    def honest(msg: Message, context: Context) -> Message:
        return handle_distill(msg, context, cfg)

    simulated = mod(_request(cfg), _simulated(), honest)
    assert simulated.has_error() and simulated.error.code == protocol.DROPPED
    answers = _answers(mod(_request(cfg), _device(tmp_path, cfg), honest))  # neither drops nor lies
    assert np.isfinite(answers).all()


def test_flwr_run_installs_no_scenario_and_refuses_a_run_config_that_asks_for_one(tmp_path):
    from feddistill.server.app import refuse_scenarios
    from feddistill.server.loop import DistillationRun

    for key, value in (("scenario.dropout", 0.3), ("scenario.hostile_fraction", 0.2), ("scenario.shift_round", 1)):
        with pytest.raises(ConfigError, match="feddistill simulate"):
            refuse_scenarios(_cfg(tmp_path, "run", **{key: value}))
    refuse_scenarios(_cfg(tmp_path, "plain"))
    refuse_scenarios(_cfg(tmp_path, "peer", method="fedavg", **{"scenario.dropout": 0.3}))  # FedAvg never used them
    # the round loop without the simulation's sampling hook: no silent run without the label shift
    with pytest.raises(RuntimeError, match="does not install"):
        DistillationRun(None, _cfg(tmp_path, "shift", **{"scenario.shift_round": 1}))
