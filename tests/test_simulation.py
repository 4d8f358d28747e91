"""End to end: the ClientApp's protocol, and whole runs on Flower's simulation engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from feddistill import protocol
from feddistill.client.distill import handle_distill
from feddistill.config import load_config
from feddistill.data.fleet import load_fleet
from feddistill.privacy.plan import run_privacy
from feddistill.server.app import round_config
from feddistill.strategies import teacher_arrays

pytestmark = pytest.mark.e2e(seconds=100)

# One client actor per test simulation: the suite's two pytest workers keep both cores busy
# already, and a second actor only adds its start-up (imports, data: about a quarter of a small
# run's CPU time).
ONE_CLIENT_ACTOR = {"simulation.cpus_per_client": 2.0}

SMALL = {
    "rounds": 2,
    "fleet.num_clients": 5,
    "fleet.fraction": 1.0,
    "teacher.epochs": 40,
    "distill.digest_epochs": 3,
    "distill.revisit_epochs": 2,
    "distill.query_size": 200,
    "baselines.local_epochs": 5,
    **ONE_CLIENT_ACTOR,
}


@pytest.fixture()
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _request(cfg, digest: str, rnd: int = 1) -> Message:
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    queries = np.arange(cfg.distill.query_size)
    signal = np.full((len(queries), fleet.num_classes), 1.0 / fleet.num_classes, np.float32)
    config = round_config(cfg, digest, run_privacy(cfg))
    config[protocol.ROUND] = rnd
    content = RecordDict({protocol.TEACHER_RECORD: teacher_arrays(signal, queries), protocol.CONFIG_RECORD: config})
    return Message(content, dst_node_id=1, message_type=protocol.DISTILL)


def _context() -> Context:
    return Context(
        run_id=1, node_id=1, node_config={"partition-id": 2, "num-partitions": 5}, state=RecordDict(), run_config={}
    )


def test_client_answers_with_only_the_answers_matrix_and_scalars(task_identity, tmp_path):
    cfg = load_config(None, {**SMALL, "output_dir": str(tmp_path)})
    digest = load_fleet(cfg.data, cfg.fleet, cfg.seed).splits.reference_digest
    context = _context()
    reply = handle_distill(_request(cfg, digest), context, cfg)
    assert not reply.has_error()
    content = reply.content
    assert set(content.array_records) == {protocol.ANSWERS_RECORD}
    assert list(content.array_records[protocol.ANSWERS_RECORD].keys()) == [protocol.ANSWERS]
    answers = content.array_records[protocol.ANSWERS_RECORD][protocol.ANSWERS].numpy()
    assert answers.shape == (cfg.distill.query_size, 10) and answers.dtype == np.float16
    np.testing.assert_allclose(answers.astype(np.float32).sum(axis=1), 1.0, atol=1e-2)
    metrics = content.metric_records[protocol.METRICS_RECORD]
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # scalars only
    assert content.config_records[protocol.REPLY_META][protocol.ROUND] == 1
    # the student stays on the device, in its state folder
    assert (tmp_path / "clients" / "client2.pt").is_file()


def test_client_refuses_a_wrong_reference_digest(task_identity, tmp_path):
    cfg = load_config(None, {**SMALL, "output_dir": str(tmp_path)})
    reply = handle_distill(_request(cfg, "0" * 64), _context(), cfg)
    assert reply.has_error() and "digest mismatch" in reply.error.reason


def test_cli_simulation_on_flower_engine_completes_and_student_learns(tmp_path):
    """5 clients, 2 rounds, digits, through Flower's simulation engine (Ray), with all baselines,
    every download signed by the server and verified by the clients."""
    from feddistill.deploy.certs import generate_credentials

    generate_credentials(tmp_path / "certs", num_supernodes=1)  # every download signed and verified
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "feddistill.cli",
        "simulate",
        "--out",
        str(out),
        "--set",
        f'security.signing-key="{tmp_path / "certs" / "release-signing.key"}"',
        "--set",
        f'security.release-public-key="{tmp_path / "certs" / "release-signing.pub"}"',
    ]
    for key, value in SMALL.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["replies"] == 5 and r["clients"] == 5 for r in results["rounds"])  # fraction 1.0
    assert all(r["bytes_uploaded"] > 0 for r in results["rounds"])
    # an untrained 10-class student is at ~10 %; the distilled one must be far above
    assert results["final"]["student_accuracy"] > 0.6
    base = results["baselines"]
    assert {"local_only", "centralized", "fedavg", "public_teacher", "public_control"} <= set(base)
    final, control = results["final"], base["public_control"]["accuracy"]
    assert final["private_gain"] == pytest.approx(100 * (final["student_accuracy"] - control))
    centralized = base["centralized"]["accuracy"]
    if centralized > control:
        assert final["gap_closed"] == pytest.approx((final["student_accuracy"] - control) / (centralized - control))
    assert 0 < final["fleet_labelled_rows"] <= 450  # digits: 450 reference rows, 200 queried per round
    assert base["fedavg"]["bytes_per_client_round"] > results["final"]["bytes_per_client_round"]
    assert len(results["label_histograms"]) == 5
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Global student vs baselines" in proc.stdout


def test_cli_rejects_bad_config_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "feddistill.cli", "simulate", "--set", "fleet.alpha=-1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "'fleet.alpha' = -1.0 must be > 0" in proc.stderr


def test_run_survives_hostile_clients_and_dropouts(tmp_path):
    """A Flower run with a NaN-sending client and 30 % dropouts completes; bad replies are counted."""
    out = tmp_path / "faults"
    settings = {
        **SMALL,
        "rounds": 3,
        "scenario.hostile_fraction": 0.2,
        "scenario.attack": '"nan"',
        "scenario.dropout": 0.3,
    }
    args = [sys.executable, "-m", "feddistill.cli", "simulate", "--no-baselines", "--out", str(out)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert len(rounds) == 3
    non_finite = sum(r["dropped"].get("non-finite values (NaN or Inf)", 0) for r in rounds)
    dropped_out = sum(r["dropped"].get("dropped out", 0) for r in rounds)
    assert 1 <= non_finite <= 3  # the one hostile client, whenever it did not drop out
    assert dropped_out >= 1
    assert all(r["replies"] + sum(r["dropped"].values()) == r["clients"] for r in rounds)
    assert all(len(r["dropped_clients"]) == sum(r["dropped"].values()) for r in rounds)  # who, one each
    assert rounds[-1]["student_accuracy"] > 0.6
    assert "replies dropped by validation" in proc.stdout


def test_a_fleet_that_answers_nothing_gains_nothing_over_its_public_control(tmp_path):
    """Every sampled client drops out: the run's student goes through exactly the control's
    pipeline, so the control replays it to the bit and the private gain is 0."""
    out = tmp_path / "silent"
    args = [sys.executable, "-m", "feddistill.cli", "simulate", "--no-baselines", "--out", str(out)]
    for key, value in {**SMALL, "scenario.dropout": 1.0}.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    control = results["baselines"]["public_control"]
    run_curve = [results["public_only_student"]["test_accuracy"]] + [r["student_accuracy"] for r in results["rounds"]]
    assert control["per_round"] == run_curve
    assert results["final"]["private_gain"] == 0.0
    assert results["final"]["fleet_labelled_rows"] == 0
    assert all(r["fleet_labelled_rows"] == 0 for r in results["rounds"])
