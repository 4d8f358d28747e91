"""Privacy wired into the round protocol: device budgets, local noise, server budgets, reporting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest
from flwr.app import Context, RecordDict

from feddistill import protocol
from feddistill.client.distill import handle_distill
from feddistill.client.state import load_state
from feddistill.config import ConfigError, load_config
from feddistill.data.fleet import load_fleet
from feddistill.privacy.plan import upload_privacy
from test_simulation import SMALL, _request

pytestmark = pytest.mark.e2e(seconds=25)


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _context(pid=1) -> Context:
    return Context(
        run_id=1, node_id=1, node_config={"partition-id": pid, "num-partitions": 5}, state=RecordDict(), run_config={}
    )


def test_device_enforces_its_own_record_budget_across_rounds(tmp_path):
    cfg = load_config(
        None,
        {
            **SMALL,
            "output_dir": str(tmp_path),
            "privacy.record_level": True,
            "privacy.record_noise_multiplier": 2.0,
            "distill.revisit_epochs": 1,
        },
    )
    digest = load_fleet(cfg.data, cfg.fleet, cfg.seed).splits.reference_digest
    context = _context()
    first = handle_distill(_request(cfg, digest, rnd=1), context, cfg)
    assert not first.has_error()
    eps1 = first.content.metric_records[protocol.METRICS_RECORD]["record-epsilon"]
    assert eps1 > 0 and load_state(tmp_path / "clients", 1, 2).ledger_json is not None
    # The same device, now with a budget just above what it has spent: the next round is refused,
    # whatever the server asks, and nothing is trained or sent.
    tight = load_config(
        None,
        {
            **SMALL,
            "output_dir": str(tmp_path),
            "privacy.record_level": True,
            "privacy.record_noise_multiplier": 2.0,
            "privacy.record_target_epsilon": eps1 * 1.01,
            "distill.revisit_epochs": 1,
        },
    )
    second = handle_distill(_request(tight, digest, rnd=2), context, tight)
    assert second.has_error() and second.error.code == protocol.REFUSED
    assert "record-level budget" in second.error.reason
    # without a target, the ledger keeps composing: epsilon grows
    third = handle_distill(_request(cfg, digest, rnd=3), context, cfg)
    assert third.content.metric_records[protocol.METRICS_RECORD]["record-epsilon"] > eps1


def test_local_noise_is_added_on_the_device_with_std_z_times_sensitivity(tmp_path):
    cfg = load_config(
        None,
        {
            **SMALL,
            "output_dir": str(tmp_path),
            "privacy.client_level": "local",
            "privacy.noise_multiplier": 0.05,
            "distill.answer_dtype": "float32",
            "distill.digest_epochs": 0,
            "distill.revisit_epochs": 0,
        },
    )
    plan = upload_privacy(cfg)
    assert plan.sensitivity == pytest.approx(np.sqrt(cfg.distill.query_size))  # probs, add/remove
    digest = load_fleet(cfg.data, cfg.fleet, cfg.seed).splits.reference_digest
    reply = handle_distill(_request(cfg, digest), _context(), cfg)
    answers = reply.content.array_records[protocol.ANSWERS_RECORD][protocol.ANSWERS].numpy()
    # the rows of a noiseless answer sum to 1: the row sums' spread is the noise (C entries per row)
    row_sums = answers.sum(axis=1)
    expected = plan.noise_std * np.sqrt(answers.shape[1])
    assert np.std(row_sums) == pytest.approx(expected, rel=0.15)
    assert np.mean(row_sums) == pytest.approx(1.0, abs=3 * expected / np.sqrt(len(row_sums)))


def test_privacy_config_errors():
    with pytest.raises(ConfigError, match="needs 'privacy.noise-multiplier' > 0"):
        load_config(None, {"privacy.client_level": "central"})
    with pytest.raises(ConfigError, match="needs 'fleet.sampling' = 'poisson'"):
        load_config(
            None, {"privacy.client_level": "central", "privacy.noise_multiplier": 1.0, "fleet.sampling": "fixed"}
        )
    with pytest.raises(ConfigError, match="needs 'privacy.bound' = 'votes'"):
        load_config(None, {"privacy.client_level": "gnmax", "privacy.noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="record-level"):
        load_config(None, {"privacy.record_level": True})
    with pytest.raises(ConfigError, match="'privacy.delta'"):
        load_config(None, {"privacy.delta": 0.0})


def test_server_stops_before_a_round_that_would_exceed_the_client_level_budget(tmp_path):
    """A real Flower simulation: central noise z=2, q=1; the target admits 2 rounds, not 3."""
    event = dp_accounting.GaussianDpEvent(2.0)
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(event, 2)
    eps_two_rounds = acc.get_epsilon(1e-5)
    out = tmp_path / "run"
    settings = {
        **SMALL,
        "rounds": 4,
        "privacy.client_level": "central",
        "privacy.noise_multiplier": 2.0,
        "privacy.target_epsilon": round(eps_two_rounds * 1.02, 4),
        "baselines.local_only": False,
        "baselines.centralized": False,
        "baselines.fedavg": False,
    }
    args = [sys.executable, "-m", "feddistill.cli", "simulate", "--out", str(out)]
    for key, value in settings.items():
        args += ["--set", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results["rounds"]) == 2
    assert "client-level budget: round 3" in results["stop_reason"]
    client = results["privacy"]["client_level"]
    assert results["privacy"]["record_level"] is None
    assert (client["unit"], client["neighbouring"], client["accountant"]) == ("client", "add/remove", "pld")
    assert client["delta"] == 1e-5 and "central Gaussian" in client["mechanism"]
    assert (client["noise_multiplier"], client["sampling_rate"], client["steps"]) == (2.0, 1.0, 2)
    # independent check with dp-accounting, and never below it
    assert client["epsilon"] == pytest.approx(eps_two_rounds, rel=0.01)
    assert client["epsilon"] >= eps_two_rounds * (1 - 1e-6)
    assert client["epsilon_rdp"] >= client["epsilon"]
    assert client["sensitivity"] == pytest.approx(np.sqrt(SMALL["distill.query_size"]))
    assert "client-level" in proc.stdout or "client-level" in proc.stderr
