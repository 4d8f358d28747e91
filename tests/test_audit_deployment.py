"""The privacy officer's audit of a deployment: canary clients (issue 19).

Unit tests of the canary answers (they pass the server's reply validation; the officer
regenerates them from the secret alone), of the estimator (known Gaussian noise, no noise),
and one loopback deployment (TLS, authenticated SuperNodes, one audit SuperNode) audited end
to end with `feddistill audit-deployment`. Set FEDDISTILL_SKIP_DEPLOY=1 to skip the latter.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from feddistill import protocol
from feddistill.client.canary import (
    CANARIES_KEY,
    SECRET_KEY,
    CanaryError,
    canary_coins,
    canary_layout,
    canary_logits,
    read_secret,
)
from feddistill.client.distill import handle_distill
from feddistill.config import load_config
from feddistill.data.fleet import load_fleet
from feddistill.privacy.accounting import GaussianEvent, epsilon_pld
from feddistill.privacy.audit.canary_clients import (
    canary_statistics,
    estimate_from_canaries,
    gdp_delta,
    gdp_epsilon,
)
from feddistill.privacy.mechanisms import bound_answers
from feddistill.privacy.plan import upload_privacy
from feddistill.strategies import ReplyCheck, check_reply

pytestmark = pytest.mark.e2e(seconds=65)

VENV_BIN = Path(sys.executable).parent
SECRET = bytes(range(32))
TINY = {"rounds": 1, "fleet.num_clients": 3, "distill.query_size": 60, "privacy.noise_source": "os-entropy"}


@pytest.fixture()
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "officer.secret"
    path.write_text(SECRET.hex() + "\n")
    return path


def _request(cfg, digest: str, rnd: int = 1) -> Message:
    from feddistill.privacy.plan import run_privacy
    from feddistill.server.app import round_config
    from feddistill.strategies import teacher_arrays

    queries = np.arange(100, 100 + cfg.distill.query_size)
    signal = np.full((len(queries), 10), 0.1, np.float32)
    config = round_config(cfg, digest, run_privacy(cfg))
    config[protocol.ROUND] = rnd
    content = RecordDict({protocol.TEACHER_RECORD: teacher_arrays(signal, queries), protocol.CONFIG_RECORD: config})
    return Message(content, dst_node_id=1, message_type=protocol.DISTILL)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"distill.answer_dtype": "vote", "privacy.bound": "votes"},
        {"privacy.bound": "clipped_logits", "privacy.clip_norm": 2.0, "distill.answer_dtype": "float32"},
        {"privacy.client_level": "local", "privacy.noise_multiplier": 0.5, "distill.answer_dtype": "float32"},
    ],
)
def test_canary_reply_passes_validation_and_is_what_the_officer_regenerates(task_identity, tmp_path, overrides):
    cfg = load_config(None, {**TINY, **overrides, "output_dir": str(tmp_path / "run")})
    digest = load_fleet(cfg.data, cfg.fleet, cfg.seed).splits.reference_digest
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 2, SECRET_KEY: str(_secret_file(tmp_path)), CANARIES_KEY: 4},
        state=RecordDict(),
        run_config={},
    )
    request = _request(cfg, digest)
    reply = handle_distill(request, context, cfg)
    assert not reply.has_error()
    check = ReplyCheck.from_plan(
        upload_privacy(cfg),
        round=1,
        digest=digest,
        num_queries=cfg.distill.query_size,
        num_classes=10,
        votes=cfg.distill.answer_dtype == "vote",
        record_level=False,
        nodes=None,
    )
    answers, reason = check_reply(reply, check)
    assert reason is None and answers is not None
    assert not (tmp_path / "run" / "clients").exists()  # an audit node trains and keeps nothing
    queries = request.content.array_records[protocol.TEACHER_RECORD][protocol.QUERIES].numpy()
    logits = canary_logits(SECRET, 2, 1, queries, 10, 4, cfg.privacy.bound)
    expected = bound_answers(logits, cfg.privacy.bound, clip_norm=cfg.privacy.clip_norm)
    if cfg.privacy.client_level == "local":  # noised on the node with the device's noise std
        assert np.std(answers - expected) == pytest.approx(upload_privacy(cfg).noise_std, rel=0.1)
    else:
        np.testing.assert_allclose(answers, expected, atol=1e-3)
    lay = canary_layout(SECRET, 2, 1, queries, 10, 4)
    inserted = canary_coins(SECRET, 2, 4)[lay.owner]
    assert 0 < inserted.sum() < len(inserted)  # this secret inserts some canaries and holds others out
    if cfg.privacy.bound == "probs" and cfg.privacy.client_level == "off":
        assert (expected[inserted].argmax(1) == lay.classes[inserted]).all()
        np.testing.assert_allclose(expected[~inserted], 0.1, atol=1e-6)  # held out: uniform, no direction


def test_canary_draws_depend_on_secret_node_and_round():
    q = np.arange(200)
    base = canary_layout(SECRET, 0, 1, q, 10, 8)
    for other in (canary_layout(SECRET[::-1], 0, 1, q, 10, 8), canary_layout(SECRET, 1, 1, q, 10, 8)):
        assert (other.classes != base.classes).mean() > 0.5
    assert (canary_layout(SECRET, 0, 2, q, 10, 8).owner != base.owner).mean() > 0.5
    np.testing.assert_array_equal(canary_layout(SECRET, 0, 1, q, 10, 8).classes, base.classes)  # deterministic
    assert set(np.unique(base.owner)) == set(range(8)) and set(np.unique(base.classes)) == set(range(10))


def test_secret_file_errors_name_the_file(tmp_path):
    short = tmp_path / "short.secret"
    short.write_text("abcd")
    with pytest.raises(CanaryError, match=f"{short}.*2 bytes.*openssl rand"):
        read_secret(short)
    with pytest.raises(CanaryError, match="cannot read"):
        read_secret(tmp_path / "missing")
    assert read_secret(_secret_file(tmp_path)) == SECRET


def test_gdp_epsilon_matches_the_project_accountant():
    for z, rounds in ((1.0, 4), (0.5, 2), (3.0, 10)):
        mu = math.sqrt(rounds) / z
        eps = gdp_epsilon(mu, 1e-5)
        assert eps is not None and gdp_delta(mu, eps) == pytest.approx(1e-5, rel=1e-3)
        accounted = epsilon_pld([GaussianEvent(z, 1.0, rounds)], 1e-5)
        assert eps == pytest.approx(accounted, rel=0.02)  # PLD is a pessimistic estimate of the same curve


def _released(z: float, rounds: int = 5, honest: int = 10, seed: int = 0) -> dict:
    """A release like the central mean: honest answers that mostly agree on each row's label, two
    audit nodes, and N(0, (z sqrt(Q))^2) on the sum."""
    rng = np.random.default_rng(seed)
    q_size, c = 450, 10
    labels = rng.integers(0, c, 1000)
    released = {}
    for rnd in range(1, rounds + 1):
        q = rng.choice(1000, q_size, replace=False)
        wrong = rng.random((honest, q_size)) < 0.2
        answered = np.where(wrong, rng.integers(0, c, (honest, q_size)), labels[q][None, :])
        total = np.eye(c)[answered].sum(0)
        for node in (7, 8):
            total += bound_answers(canary_logits(SECRET, node, rnd, q, c, 16, "probs"), "probs")
        total += rng.normal(0.0, z * math.sqrt(q_size), total.shape)
        mean = np.clip(total / (honest + 2), 0, None)
        released[rnd] = (q, mean / np.maximum(mean.sum(1, keepdims=True), 1e-12))
    return released


def test_estimate_tracks_known_gaussian_noise_and_bounds_stay_below_the_claim():
    for z in (0.7, 1.5):
        claimed = gdp_epsilon(math.sqrt(5) / z, 1e-5)
        est = estimate_from_canaries(canary_statistics(_released(z), SECRET, [7, 8], 16), 1e-5)
        low, high = est["epsilon_estimate_interval"]
        assert low is not None and high is not None and low <= claimed <= high
        assert est["lower_bounds"]["one_run"]["epsilon_lower_bound"] <= claimed
        assert est["lower_bounds"]["threshold"]["epsilon_lower_bound"] <= claimed


def test_no_noise_is_caught_above_a_claim_of_one():
    est = estimate_from_canaries(canary_statistics(_released(0.0), SECRET, [7, 8], 16), 1e-5)
    assert est["epsilon_estimate"] is None or est["epsilon_estimate"] > 16  # no measurable noise
    assert est["lower_bounds"]["threshold"]["epsilon_lower_bound"] > 1.0  # a claim of 1 would be a violation
    other = estimate_from_canaries(canary_statistics(_released(0.0), SECRET[::-1], [7, 8], 16), 1e-5)
    assert other["lower_bounds"]["threshold"]["epsilon_lower_bound"] == 0.0  # without the secret: nothing


def _run_folder(tmp_path: Path, released: dict, claimed: float | None) -> Path:
    """A run folder as a deployed server leaves it: results.json's claim and the released signals."""
    from feddistill.runfolder import RunFolder
    from feddistill.server.outputs import save_released_signal

    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir(parents=True)
    claim = None
    if claimed is not None:
        claim = {"epsilon": claimed, "delta": 1e-5, "unit": "client", "neighbouring": "add/remove"}
        claim |= {"mechanism": "central Gaussian", "accountant": "pld"}
    results = {
        "method": "feddistill",
        "config": {},
        "rounds": [],
        "privacy": {"client_level": claim, "record_level": None},
    }
    folder.results.write_text(json.dumps(results))
    for rnd, (queries, signal) in released.items():
        save_released_signal(folder.released_signal(rnd), queries, signal)
    return folder.root


def test_audit_deployment_flags_a_release_without_its_claimed_noise(tmp_path, capsys):
    from feddistill.privacy.audit.deployment import main

    secret = _secret_file(tmp_path)
    run = _run_folder(tmp_path, _released(0.0), claimed=1.0)  # the ledger says 1, no noise was added
    assert main(str(run), str(secret), [7, 8], 16) == 1
    printed = capsys.readouterr().out
    assert "claimed client-level epsilon: 1" in printed and "DP VIOLATION" in printed
    report = (run / "audit-deployment" / "report.md").read_text()
    assert "**FAILED**" in report and "**DP VIOLATION**" in report
    audit = json.loads((run / "audit-deployment" / "audit.json").read_text())
    assert audit["claimed_epsilon"] == 1.0 and audit["dp_violations"]
    from feddistill.report import _audit_section
    from feddistill.runfolder import RunFolder, read_results

    html = _audit_section(read_results(run / "results.json"), RunFolder(run))  # report.html links it
    assert "claimed client-level ε 1, estimated ε unbounded" in html and "FAILED" in html
    assert 'href="audit-deployment/report.md"' in html
    # the same folder with the noise the claim needs passes
    honest = _run_folder(tmp_path / "honest", _released(1.5), claimed=gdp_epsilon(math.sqrt(5) / 1.5, 1e-5))
    assert main(str(honest), str(secret), [7, 8], 16) == 0
    # unreadable input: exit code 2 and a message naming what is missing
    assert main(str(tmp_path / "nowhere"), str(secret), [7], 16) == 2
    assert "results.json" in capsys.readouterr().err


def test_device_canary_records_join_the_training_set_and_export(tmp_path):
    from feddistill.client.device import client_data, write_device_data
    from feddistill.client.record_canaries import CANARY_FILE, RECORDS_KEY, export_record_canaries

    cfg = load_config(None, TINY)
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    device = write_device_data(tmp_path / "device-1", fleet.private_data(1), fleet.splits.reference)

    def context(config: dict) -> Context:
        return Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})

    plain = client_data(cfg, context({"device-id": 1, "data-dir": str(device)}))
    with_canaries = client_data(cfg, context({"device-id": 1, "data-dir": str(device), RECORDS_KEY: 30}))
    saved = np.load(device / CANARY_FILE)
    included = int(saved["included"].sum())
    assert 0 < included < 30 and len(with_canaries.private_y) == len(plain.private_y) + included
    assert with_canaries.private_x.shape[1:] == plain.private_x.shape[1:]
    again = client_data(cfg, context({"device-id": 1, "data-dir": str(device), RECORDS_KEY: 30}))
    assert len(again.private_y) == len(with_canaries.private_y)  # made once: the same coins every round
    with pytest.raises(ValueError, match="holds 30 canary records but node config canary-records = 10"):
        client_data(cfg, context({"device-id": 1, "data-dir": str(device), RECORDS_KEY: 10}))
    out = export_record_canaries(device, tmp_path / "export.npz")
    with np.load(out) as exported:
        assert sorted(exported.files) == ["device", "included", "x", "y"] and int(exported["device"]) == 1
    with pytest.raises(ValueError, match="no canary records"):
        export_record_canaries(tmp_path, tmp_path / "none.npz")


# --------------------------------------------------------------------------- #
# real processes: TLS SuperLink, 2 devices + 1 audit SuperNode, flwr run, audit
# --------------------------------------------------------------------------- #
deploy = pytest.mark.skipif(
    not (VENV_BIN / "flower-superlink").exists() or os.environ.get("FEDDISTILL_SKIP_DEPLOY") == "1",
    reason="flower-superlink not available (or FEDDISTILL_SKIP_DEPLOY=1)",
)

AUDITED_DEPLOY = {
    "teacher.epochs": 5,
    "distill.digest-epochs": 1,
    "distill.revisit-epochs": 1,
    "distill.server-epochs": 1,
    "distill.query-size": 150,
    "fleet.fraction": 1.0,
    "privacy.client-level": "central",
    "privacy.target-epsilon": 4.0,
}


@deploy
def test_deployment_audit_end_to_end(tmp_path):
    from feddistill.deploy.local import AuditNodes, deploy_local

    info = deploy_local(
        tmp_path / "deploy",
        num_supernodes=3,
        rounds=1,  # one round is a full audit: canaries, device canary records, the claim
        config_overrides=AUDITED_DEPLOY,
        timeout_s=400,
        audit=AuditNodes(count=1, canaries=16, record_canaries=40),
    )
    results = info["results"]
    assert info["audit_nodes"] == [2]
    assert all(r["replies"] == 3 for r in results["rounds"])  # the audit node's canaries passed validation
    claimed = results["privacy"]["client_level"]["epsilon"]
    run_dir = Path(info["results_path"]).parent
    supernode_log = Path(info["logs"]["supernode-2"]).read_text()
    assert "audit-canary-secret=" in supernode_log.splitlines()[0]
    exports = []
    for i in (0, 1):  # each device exports its canary records for the officer
        exports.append(str(tmp_path / f"device-{i}-canaries.npz"))
        cli = [str(VENV_BIN / "feddistill"), "device-canaries", info["device_dirs"][i], "--out", exports[-1]]
        assert subprocess.run(cli, capture_output=True, text=True, timeout=120).returncode == 0
    done = subprocess.run(
        [str(VENV_BIN / "feddistill"), "audit-deployment", str(run_dir), "--secret", info["officer_secret"]]
        + ["--audit-node", "2", "--canaries", "16", "--device-canaries", exports[0], "--device-canaries", exports[1]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"claimed client-level epsilon: {claimed:.3g}" in done.stdout
    assert "estimated epsilon: " in done.stdout
    audit = json.loads((run_dir / "audit-deployment" / "audit.json").read_text())
    assert audit["claimed_epsilon"] == pytest.approx(claimed) and "estimated_epsilon" in audit
    assert audit["rounds"] == [1] and not audit["dp_violations"]
    assert sorted(audit["device_canaries"]) == ["0", "1"] and audit["confidence"]["n_bounds"] == 4
    assert all(d["m"] == 40 for d in audit["device_canaries"].values())
    report = (run_dir / "audit-deployment" / "report.md").read_text()
    assert "**Claimed ε**" in report and "**Estimated ε**" in report and "Not measured in a deployment" in report
    assert (run_dir / "audit-deployment" / "canaries.png").stat().st_size > 0
