"""One privacy object per run (issue 17, item 3): the server derives the run's privacy plan once,
keeps it in the run folder and sends it with every round; a client rebuilds it from its own config
and the server's noise multipliers, refuses any difference, and refuses a calibrated multiplier too
weak for its own target epsilon."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from feddistill import protocol
from feddistill.client.distill import handle_distill
from feddistill.config import load_config
from feddistill.privacy.accounting import GaussianEvent, epsilon_pld
from feddistill.privacy.plan import PlanRefused, RunPrivacy, accept_privacy, planned_participations, run_privacy
from test_device_noise import TINY, _request, _simulated, task_identity

PLANS = {
    "off": {},
    "local": {"privacy.client_level": "local", "privacy.target_epsilon": 4.0},
    "central": {"privacy.client_level": "central", "privacy.target_epsilon": 4.0, "fleet.fraction": 0.5},
    "gnmax": {
        "privacy.client_level": "gnmax",
        "distill.answer_dtype": "vote",
        "privacy.bound": "votes",
        "privacy.target_epsilon": 4.0,
    },
    "confident-gnmax": {
        "privacy.client_level": "confident-gnmax",
        "privacy.bound": "votes",
        "distill.answer_dtype": "vote",
        "privacy.target_epsilon": 8.0,
        "privacy.gnmax_threshold": 2.0,
        "privacy.threshold_noise_multiplier": 5.0,
        "fleet.fraction": 0.5,
    },
    "secagg+ central": {
        "privacy.client_level": "central",
        "privacy.target_epsilon": 4.0,
        "distill.secure_aggregation": "secagg+",
        "fleet.num_clients": 4,
    },
    "record": {"privacy.record_level": True, "privacy.record_target_epsilon": 3.0, "privacy.record_sampling_rate": 0.1},
}


pytestmark = pytest.mark.usefixtures(task_identity.__name__)  # a Message needs Flower's task identity


def _cfg(tmp_path: Path, **settings):
    return load_config(None, {**TINY, "rounds": 4, "output_dir": str(tmp_path / "run"), **settings})


@pytest.mark.parametrize("name", sorted(PLANS))
def test_the_plan_round_trips_and_a_client_accepts_the_servers_plan(tmp_path, name):
    cfg = _cfg(tmp_path, **PLANS[name])
    plan = run_privacy(cfg)
    assert RunPrivacy.from_json(plan.to_json()) == plan  # serialisable, floats exact
    assert accept_privacy(plan.to_json(), cfg) == plan
    assert (plan.record is not None) == cfg.privacy.record_level
    assert (plan.secagg is not None) == (cfg.distill.secure_aggregation != "off")


def test_a_client_refuses_weaker_local_noise_than_its_target_allows(tmp_path):
    cfg = _cfg(tmp_path, **PLANS["local"])
    plan = run_privacy(cfg)
    weaker = dataclasses.replace(
        plan,
        upload=dataclasses.replace(
            plan.upload,
            noise_multiplier=plan.upload.noise_multiplier / 2,
            accounted_noise_multiplier=plan.upload.noise_multiplier / 2,
        ),
    )
    with pytest.raises(PlanRefused, match=r"client-level noise multiplier .* > target 4"):
        accept_privacy(weaker.to_json(), cfg)
    # what the server sent is exactly what the accountant says it spends
    event = GaussianEvent(plan.upload.noise_multiplier, 1.0, planned_participations(cfg))
    assert epsilon_pld([event], plan.upload.delta) <= 4.0


def test_a_client_refuses_weaker_dpsgd_noise_than_its_target_allows(tmp_path):
    cfg = _cfg(tmp_path, **PLANS["record"])
    plan = run_privacy(cfg)
    assert plan.record is not None
    weaker = dataclasses.replace(plan, record=dataclasses.replace(plan.record, noise_multiplier=0.5))
    with pytest.raises(PlanRefused, match="record-level noise multiplier"):
        accept_privacy(weaker.to_json(), cfg)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [("mode", "off", "upload.mode"), ("bound", "clipped_logits", "upload.bound"), ("delta", 0.1, "upload.delta")],
)
def test_a_client_refuses_a_plan_its_config_does_not_give(tmp_path, field, value, named):
    cfg = _cfg(tmp_path, **PLANS["local"])
    plan = run_privacy(cfg)
    changed = dataclasses.replace(plan, upload=dataclasses.replace(plan.upload, **{field: value}))
    with pytest.raises(PlanRefused, match=f"differs from this device's config: {named} = "):
        accept_privacy(changed.to_json(), cfg)


@pytest.mark.parametrize("sent", ["", "{}", "not json", '{"upload": 1}'])
def test_a_client_refuses_an_unreadable_plan(tmp_path, sent):
    with pytest.raises(PlanRefused, match="unreadable"):
        accept_privacy(sent, _cfg(tmp_path))


def test_handle_distill_refuses_a_tampered_plan_before_training(tmp_path):
    cfg = _cfg(tmp_path, **PLANS["local"])
    request = _request(cfg)
    config = request.content.config_records[protocol.CONFIG_RECORD]
    plan = RunPrivacy.from_json(str(config[protocol.PRIVACY_PLAN]))
    config[protocol.PRIVACY_PLAN] = dataclasses.replace(
        plan, upload=dataclasses.replace(plan.upload, mode="off")
    ).to_json()
    reply = handle_distill(request, _simulated(), cfg)
    assert reply.has_error() and reply.error.code == protocol.REFUSED
    assert "privacy plan refused" in reply.error.reason and "upload.mode" in reply.error.reason
    assert not any((tmp_path / "run").rglob("client*.pt"))  # refused before any state was written

    del config[protocol.PRIVACY_PLAN]  # a request without a plan: refused, not answered un-noised
    reply = handle_distill(request, _simulated(), cfg)
    assert reply.has_error() and "unreadable" in reply.error.reason


def test_the_server_keeps_the_plan_it_sent(tmp_path):
    from feddistill.runfolder import RunFolder
    from feddistill.server.outputs import save_privacy_plan

    cfg = _cfg(tmp_path, **PLANS["record"])
    plan = run_privacy(cfg)
    save_privacy_plan(RunFolder(tmp_path), plan)
    kept = RunPrivacy.from_json(RunFolder(tmp_path).privacy_plan.read_text())
    assert kept == plan and kept.record is not None
    assert np.isclose(kept.record.event().noise_multiplier, plan.record.noise_multiplier)
