"""Devices over a real network: TLS, SuperNode authentication, each device's own data dir.

The deployment tests start real ``flower-superlink`` / ``flower-supernode`` / ``flwr``
processes on 127.0.0.1 (never ``--insecure``), bounded in time and always stopped by
process group. One deployment of 3 devices serves them all: a plain 2-round run with
record-level DP (``deploy_local``, as an operator runs it); the same folder started again
(registrations in the SuperLink's database, ledgers in the devices' data dirs), where a
SuperNode with an unregistered key is refused; then two one-round runs through Flower's SecAgg+
(issue 18): without client-level DP (the server's unmasked mean must equal the plain mean of
what the devices answered, within one quantization step) and with distributed DP (the noise
comes from the devices and is accounted as in simulation).
Set FEDDISTILL_SKIP_DEPLOY=1 to skip them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from feddistill import protocol
from feddistill.client.app import make_client_app
from feddistill.client.device import (
    PRIVATE_FILE,
    REFERENCE_FILE,
    client_data,
    read_device_data,
    write_device_data,
)
from feddistill.client.distill import handle_distill, student_answers
from feddistill.client.state import load_state
from feddistill.config import load_config, parse_config
from feddistill.data import ArrayDataset, DataError, reference_digest
from feddistill.data.fleet import load_fleet
from feddistill.encoding import decode_answers
from feddistill.models import build_model
from feddistill.privacy.distributed import run_secagg_noise
from feddistill.privacy.ledger import PrivacyLedger
from feddistill.privacy.plan import run_privacy, upload_privacy
from feddistill.runfolder import RunFolder
from feddistill.server.loop import client_ledger

pytestmark = pytest.mark.e2e(seconds=240)

VENV_BIN = Path(sys.executable).parent

TINY = {
    "rounds": 1,
    "fleet.num_clients": 3,
    "fleet.fraction": 1.0,
    "distill.digest_epochs": 1,
    "distill.revisit_epochs": 1,
    "distill.query_size": 50,
}


@pytest.fixture()
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _request(cfg, digest: str, num_classes: int = 10, rnd: int = 1) -> Message:
    from feddistill.privacy.plan import run_privacy
    from feddistill.server.app import round_config
    from feddistill.strategies import teacher_arrays

    queries = np.arange(cfg.distill.query_size)
    signal = np.full((len(queries), num_classes), 1.0 / num_classes, np.float32)
    config = round_config(cfg, digest, run_privacy(cfg))
    config[protocol.ROUND] = rnd
    content = RecordDict({protocol.TEACHER_RECORD: teacher_arrays(signal, queries), protocol.CONFIG_RECORD: config})
    return Message(content, dst_node_id=1, message_type=protocol.DISTILL)


def _device(tmp_path: Path, cfg, pid: int) -> Path:
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    return write_device_data(tmp_path / f"device-{pid}", fleet.private_data(pid), fleet.splits.reference)


# --------------------------------------------------------------------------- #
# client_data: a device reads only its own data dir
# --------------------------------------------------------------------------- #
def test_device_data_round_trip_and_digest(tmp_path):
    cfg = load_config(None, TINY)
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    _device(tmp_path, cfg, 1)
    data = client_data(cfg, _context({"device-id": 7, "data-dir": str(tmp_path / "device-1")}))
    assert data.partition_id == 7
    assert data.reference_digest == fleet.splits.reference_digest
    sim = client_data(cfg, _context({"partition-id": 1, "num-partitions": 3}))  # simulation: the fleet
    assert sim.partition_id == 1 and sim.reference_digest == data.reference_digest
    assert torch.equal(data.reference_x, sim.reference_x)
    assert torch.equal(data.private_x, sim.private_x) and torch.equal(data.private_y, sim.private_y)
    assert data.private_y.dtype == torch.int64 and data.private_x.dtype == torch.float32
    with np.load(tmp_path / "device-1" / REFERENCE_FILE) as ref:
        assert ref.files == ["x"]  # the public reference set travels without labels


def test_client_data_errors_name_the_file(tmp_path):
    cfg = load_config(None, TINY)
    device = _device(tmp_path, cfg, 0)
    context = _context({"partition-id": 0, "data-dir": str(device)})
    (device / PRIVATE_FILE).unlink()
    with pytest.raises(DataError, match=re.escape(str(device / PRIVATE_FILE)) + ".*not found"):
        client_data(cfg, context)
    (device / PRIVATE_FILE).write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=re.escape(str(device / PRIVATE_FILE)) + ".*corrupt"):
        client_data(cfg, context)
    np.savez(device / PRIVATE_FILE, x=np.zeros((3, 1, 8, 8), np.float32))  # no labels
    with pytest.raises(DataError, match=re.escape(PRIVATE_FILE) + ".*missing array.*'y'"):
        client_data(cfg, context)
    np.savez(device / PRIVATE_FILE, x=np.zeros((3, 1, 8, 8), np.float32), y=np.zeros(3, np.int64))
    (device / REFERENCE_FILE).unlink()
    with pytest.raises(DataError, match=re.escape(str(device / REFERENCE_FILE)) + ".*not found"):
        client_data(cfg, context)
    with pytest.raises(DataError, match="data dir not found"):
        read_device_data(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="neither 'partition-id' nor 'device-id'"):
        client_data(cfg, _context({"data-dir": str(device)}))


def test_device_data_cache_follows_file_changes(tmp_path):
    private = ArrayDataset(np.zeros((4, 1, 8, 8), np.float32), np.arange(4) % 2, 2)
    ref = np.ones((5, 1, 8, 8), np.float32)
    write_device_data(tmp_path, private, ref)
    first = read_device_data(tmp_path, 0)
    assert first.reference_digest == reference_digest(ref) and len(first.private_y) == 4
    assert read_device_data(tmp_path, 0).reference_x is first.reference_x  # cached
    write_device_data(tmp_path, private, ref * 0.5)
    os.utime(tmp_path / REFERENCE_FILE, ns=(1, 1))  # a different mtime even on coarse clocks
    assert read_device_data(tmp_path, 0).reference_digest == reference_digest(ref * 0.5)


def test_device_answers_like_its_simulated_partition_and_refuses_other_reference(task_identity, tmp_path):
    # a device refuses seeded noise; without DP nothing else differs from its simulated twin
    cfg = load_config(None, {**TINY, "output_dir": str(tmp_path / "run"), "privacy.noise_source": "os-entropy"})
    digest = load_fleet(cfg.data, cfg.fleet, cfg.seed).splits.reference_digest
    device = _device(tmp_path, cfg, 2)
    on_device = handle_distill(_request(cfg, digest), _context({"partition-id": 2, "data-dir": str(device)}), cfg)
    simulated = handle_distill(_request(cfg, digest), _context({"partition-id": 2, "num-partitions": 3}), cfg)
    assert not on_device.has_error() and not simulated.has_error()
    answers = [
        m.content.array_records[protocol.ANSWERS_RECORD][protocol.ANSWERS].numpy() for m in (on_device, simulated)
    ]
    np.testing.assert_array_equal(answers[0], answers[1])  # same data, same seeds: same answers
    assert (device / "state" / "client2.pt").is_file()  # the device's state lives in its data dir
    assert (tmp_path / "run" / "clients" / "client2.pt").is_file()  # a simulated client's: under the run
    # a device holding another reference set computes another digest and refuses
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    other = write_device_data(tmp_path / "other", fleet.private_data(2), fleet.splits.reference.x[::-1].copy())
    refused = handle_distill(_request(cfg, digest), _context({"partition-id": 2, "data-dir": str(other)}), cfg)
    assert refused.has_error() and refused.error.code == protocol.REFUSED
    assert "digest mismatch" in refused.error.reason


def test_identify_reports_device_id_and_device_flag(task_identity, tmp_path):
    app = make_client_app(load_config(None, TINY))
    request = Message(RecordDict(), dst_node_id=1, message_type=protocol.IDENTIFY)
    device = app(request, _context({"device-id": 42, "data-dir": str(tmp_path)}))
    meta = device.content.config_records[protocol.REPLY_META]
    assert meta[protocol.PARTITION] == 42 and meta[protocol.DEVICE] == 1
    request = Message(RecordDict(), dst_node_id=1, message_type=protocol.IDENTIFY)
    simulated = app(request, _context({"partition-id": 3, "num-partitions": 5}))
    meta = simulated.content.config_records[protocol.REPLY_META]
    assert meta[protocol.PARTITION] == 3 and meta[protocol.DEVICE] == 0


def test_ledger_is_the_last_written_even_when_a_new_run_restarts_round_numbers(tmp_path):
    from feddistill.client.state import save_state

    for rnd, ledger in ((1, "run1-r1"), (2, "run1-r2"), (1, "run2-r1")):  # a device serving two runs
        save_state(tmp_path, 0, rnd, {}, ledger)
    assert load_state(tmp_path, 0, 2).ledger_json == "run2-r1"  # not run 1's round-2 ledger
    save_state(tmp_path, 0, 2, {"w": 1}, "run2-r2")
    kept = load_state(tmp_path, 0, 2)  # round 2 re-run after a server crash: the student from before it
    assert kept.ledger_json == "run2-r2" and kept.student == {}


# --------------------------------------------------------------------------- #
# real processes: SuperLink (TLS, SuperNode auth) + 3 SuperNodes + flwr run
# --------------------------------------------------------------------------- #
deploy = pytest.mark.skipif(
    not (VENV_BIN / "flower-superlink").exists() or os.environ.get("FEDDISTILL_SKIP_DEPLOY") == "1",
    reason="flower-superlink not available (or FEDDISTILL_SKIP_DEPLOY=1)",
)

SMALL_DEPLOY = {
    "teacher.epochs": 5,  # the teacher's quality is not what these tests are about; its training time is
    "distill.digest-epochs": 2,
    "distill.revisit-epochs": 1,
    "distill.server-epochs": 2,
    "distill.query-size": 100,
    "fleet.fraction": 1.0,
    # record-level DP on the devices: each keeps its own ledger in its data dir
    "privacy.record-level": True,
    "privacy.record-noise-multiplier": 1.0,
}

NUM_SUPERNODES = 3
# The runs on the restarted deployment go through SecAgg+ (record-level DP, SMALL_DEPLOY, still on)
TINY_SECAGG = {
    "distill.secure-aggregation": "secagg+",
    "distill.secagg-num-shares": 3,  # every device holds shares of the other two
    "distill.secagg-reconstruction-threshold": 2,  # any two survivors unmask
    "teacher.epochs": 5,  # what these tests are about is the aggregation, not the teacher
    "distill.digest-epochs": 1,
    "distill.revisit-epochs": 1,
    "distill.server-epochs": 2,
    "distill.query-size": 60,
    "fleet.fraction": 1.0,
}
DISTRIBUTED_DP = {"privacy.client-level": "central", "privacy.noise-multiplier": 0.5}
# The restarted deployment's second run: SecAgg+ with the DP noise added on the devices
SECAGG_DP_RUN = {**TINY_SECAGG, **DISTRIBUTED_DP}


def _snapshot_states(deployment, dest: Path) -> list[Path]:
    """Copy each device's state dir now: the next run on the same devices writes over it."""
    copies = []
    for i in range(NUM_SUPERNODES):
        copy = dest / f"device-{i}"
        shutil.copytree(deployment.device_dir(i) / "state", copy)
        copies.append(copy)
    return copies


def _plain_answers(run_dir: Path, states: list[Path], device_dirs: list[Path], rnd: int):
    """The server's unmasked mean of round ``rnd``, and the answers each device gave, recomputed
    from the student it kept after that round (no local noise: the answers depend on it alone)."""
    cfg = parse_config(json.loads(RunFolder(run_dir).config.read_text()), "the run's config.json")
    with np.load(RunFolder(run_dir).secagg_sum(rnd)) as saved:
        server = {k: saved[k] for k in saved.files}
    answers = []
    for pid, (state, data_dir) in enumerate(zip(states, device_dirs)):
        data = read_device_data(data_dir, pid)
        kept = load_state(state, pid, rnd + 1)  # the newest student written up to round rnd
        assert kept.student is not None
        num_classes = server["mean"].shape[1]
        student = build_model(cfg.student_for(pid), int(data.reference_x.shape[-1]), num_classes)
        student.load_state_dict(kept.student)
        query_x = data.reference_x[torch.from_numpy(server["queries"])]
        wire = student_answers(
            student, data, query_x, num_classes, cfg, run_privacy(cfg).upload, cfg.distill.answer_dtype, None
        )
        answers.append(decode_answers(wire).astype(np.float64))
    return cfg, server, np.array(answers)


def _processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line mentions `text` (our temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                status = (entry / "status").read_text()
            except OSError:
                continue
            if text in cmdline and "State:\tZ" not in status:
                pids.append(int(entry.name))
    return pids


def _ledger(device_dir: Path, pid: int) -> PrivacyLedger:
    saved = load_state(device_dir / "state", pid, 10**6).ledger_json
    assert saved is not None
    return PrivacyLedger.from_json(saved)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from feddistill.deploy.local import deploy_local

    out = tmp_path_factory.mktemp("deploy")
    info = deploy_local(out, num_supernodes=NUM_SUPERNODES, rounds=2, config_overrides=SMALL_DEPLOY, timeout_s=300)
    info["leftover"] = _processes_mentioning(str(out))
    return info


@deploy
def test_deploy_local_three_devices_tls_auth_two_rounds(first_run):
    results = first_run["results"]
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["clients"] == 3 and r["replies"] == 3 and not r["dropped"] for r in results["rounds"])
    assert results["num_nodes"] == 3 and len(set(first_run["node_ids"].values())) == 3
    assert results["label_histograms"] is None  # devices' private labels are nobody else's business
    record = results["privacy"]["record_level"]
    assert sorted(record["devices"]) == ["0", "1", "2"] and record["epsilon"] > 0
    logs = {name: Path(path).read_text(errors="replace") for name, path in first_run["logs"].items()}
    assert all("--insecure" not in text for text in logs.values())
    assert "Uvicorn running on https://127.0.0.1:" in logs["superlink"]
    for i, device in enumerate(first_run["device_dirs"]):
        assert f"SuperNode ID: {first_run['node_ids'][i]}" in logs[f"supernode-{i}"]
        assert len(_ledger(Path(device), i).history) == 2  # both rounds, accounted on the device
        # signed by default: each SuperNode pinned the deployment's key and accepted round 2's download
        assert "release-public-key=" in logs[f"supernode-{i}"].splitlines()[0]
        last = json.loads((Path(device) / "state" / "last-release.json").read_text())
        assert last == {"run_id": first_run["run_id"], "round": 2}
    run_config = tomllib.loads(Path(first_run["out_dir"], "run-config-run.toml").read_text())
    assert run_config["security.signing-key"] == str(Path(first_run["certs"]) / "release-signing.key")
    assert run_config["privacy.noise-source"] == "os-entropy"
    assert first_run["leftover"] == []  # every process stopped


@pytest.fixture(scope="module")
def restarted(first_run):
    """The same deployment folder started again: SuperLink database (registrations), credentials
    and device data dirs (state, ledgers) are kept; nothing is registered again."""
    from feddistill.deploy.local import LocalDeployment

    deployment = LocalDeployment(first_run["out_dir"], num_supernodes=NUM_SUPERNODES, config=SMALL_DEPLOY)
    try:
        deployment.start(register=False)  # registrations survived in the SuperLink's --database
        yield deployment
    finally:
        deployment.stop()
        assert _processes_mentioning(first_run["out_dir"]) == []


@deploy
def test_unregistered_supernode_is_rejected(restarted, tmp_path):
    from feddistill.deploy.certs import generate_credentials

    stranger = generate_credentials(tmp_path / "stranger", num_supernodes=1)
    proc = restarted.start_supernode(0, private_key=stranger.supernode_private_keys[0], name="stranger")
    try:
        rc = proc.popen.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a SuperNode with an unregistered key was not rejected within 90 s:\n{proc.tail()}")
    assert rc != 0
    assert "Failed to activate SuperNode" in proc.tail(), proc.tail()


@pytest.fixture(scope="module")
def secagg_runs(first_run, restarted):
    """Two one-round SecAgg+ runs on the restarted deployment (record-level DP still on): without
    client-level DP, then with distributed DP. Each device's state is copied after each run."""
    devices = [Path(d) for d in first_run["device_dirs"]]
    info: dict = {"devices": devices, "before": [_ledger(d, i) for i, d in enumerate(devices)]}
    out = Path(first_run["out_dir"])
    for name, overrides in (("secagg-plain", TINY_SECAGG), ("secagg-dp", SECAGG_DP_RUN)):
        info[name] = restarted.run(rounds=1, output_dir=out / name, overrides=overrides, timeout_s=300)
        info[f"{name}-run-id"] = restarted.last_run["run_id"]
        info[f"{name}-states"] = _snapshot_states(restarted, out / f"states-{name}")
        info[f"{name}-last-release"] = [json.loads((d / "state" / "last-release.json").read_text()) for d in devices]
    info["logs"] = {name: Path(path).read_text(errors="replace") for name, path in restarted.log_paths().items()}
    return info


@deploy
def test_device_ledger_survives_a_restart(first_run, restarted, secagg_runs):
    results = secagg_runs["secagg-dp"]
    assert results["rounds"][0]["replies"] == 3
    record = results["privacy"]["record_level"]["devices"]
    for i, d in enumerate(secagg_runs["devices"]):
        before, after = secagg_runs["before"][i], _ledger(d, i)
        assert len(after.history) == len(before.history) + 2  # the first run's spend is kept, + one per run
        assert record[str(i)]["record-epsilon"] == pytest.approx(after.epsilon())
        assert after.epsilon() > before.epsilon()
        log = restarted.supernodes[i].tail(1_000_000)  # both starts' lines: the log file is appended to
        assert log.count(f"SuperNode ID: {first_run['node_ids'][i]}") == 2  # same identity after the restart


@deploy
def test_secagg_deployment_unmasks_the_plain_mean_of_the_devices_answers(first_run, secagg_runs):
    results = secagg_runs["secagg-plain"]
    assert [(r["round"], r["clients"], r["replies"], r["dropped"]) for r in results["rounds"]] == [(1, 3, 3, {})]
    assert results["num_nodes"] == NUM_SUPERNODES  # the stranger of test_unregistered_... never took part
    assert results["privacy"]["secure_aggregation"]["reconstruction_threshold"] == 2
    run_dir = Path(first_run["out_dir"]) / "secagg-plain"
    cfg, server, answers = _plain_answers(run_dir, secagg_runs["secagg-plain-states"], secagg_runs["devices"], 1)
    step = run_secagg_noise(cfg).step
    assert sorted(server["survivors"].tolist()) == [0, 1, 2]
    assert server["mean"].shape == answers.shape[1:] == (cfg.distill.query_size, 10)
    plain_mean = answers.mean(axis=0)
    # stochastic rounding puts each device's entry within one step, so their mean too
    np.testing.assert_allclose(server["mean"], plain_mean, rtol=0, atol=step + 1e-9)
    assert np.abs(server["mean"] - plain_mean).max() > 0  # it did go through SecAgg+'s quantization
    assert not any(np.allclose(server["mean"], a, rtol=0, atol=step) for a in answers)  # no single answer
    # 8 bytes per masked entry (and the weight) per survivor
    assert results["rounds"][0]["bytes_uploaded"] == 3 * (server["mean"].size + 1) * 8


@deploy
def test_secagg_deployment_is_tls_authenticated_and_signed(first_run, secagg_runs):
    logs = secagg_runs["logs"]
    assert all("--insecure" not in text for text in logs.values())
    assert "Uvicorn running on https://127.0.0.1:" in logs["superlink"]
    for name in ("secagg-plain", "secagg-dp"):
        assert logs[f"flwr-run-{name}"].count("Secure aggregation completed") == 1
        # every device verified the signed download inside SecAgg+'s masking stage
        assert secagg_runs[f"{name}-last-release"] == [{"run_id": secagg_runs[f"{name}-run-id"], "round": 1}] * 3
    for i in range(NUM_SUPERNODES):
        assert "release-public-key=" in logs[f"supernode-{i}"].splitlines()[0]  # the pinned release key
        assert "release rejected" not in logs[f"supernode-{i}"]
    run_config = Path(first_run["out_dir"], "run-config-secagg-plain.toml").read_text()
    assert '"security.signing-key"' in run_config and '"privacy.noise-source" = "os-entropy"' in run_config


@deploy
def test_distributed_dp_noise_comes_from_the_devices_and_is_accounted_as_in_simulation(first_run, secagg_runs):
    results = secagg_runs["secagg-dp"]
    run_dir = Path(first_run["out_dir"]) / "secagg-dp"
    cfg, server, answers = _plain_answers(run_dir, secagg_runs["secagg-dp-states"], secagg_runs["devices"], 1)
    noise = run_secagg_noise(cfg)
    assert noise.distributed and results["privacy"]["secure_aggregation"]["distributed_noise"] is True
    # the server adds nothing: the noise in its mean is the three devices' shares, N(0, 3 s^2) / 3
    error = (server["mean"] - answers.mean(axis=0)).ravel()
    expected = noise.share_std / math.sqrt(3)
    assert 0.85 * expected < error.std() < 1.15 * expected
    assert abs(error.mean()) < 5 * expected / math.sqrt(error.size)
    # epsilon as in simulation: the same plan (replace-one, q = 1) charged once
    plan = upload_privacy(cfg)
    ledger = client_ledger(plan)
    assert ledger is not None and plan.sampling_rate == 1.0 and plan.neighbouring == "replace-one"
    ledger.record(plan.event(), 1, sensitivity=plan.sensitivity)
    reported = results["privacy"]["client_level"]
    assert reported["epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-9)
    assert results["rounds"][0]["client_epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-9)


def test_stop_processes_also_stops_descendants_that_left_the_group():
    """The SuperLink starts its SuperExec in a session of its own: stopping the SuperLink's
    group alone left it (and a ServerApp under it) running for a moment after stop()."""
    from feddistill.deploy.local import _alive, _descendants, stop_processes

    leader = subprocess.Popen(["bash", "-c", "setsid sleep 300 & sleep 300"], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(_descendants(leader.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    below = _descendants(leader.pid)
    assert len(below) == 2 and any(os.getsid(pid) != os.getsid(leader.pid) for pid in below)
    stop_processes([leader], grace_s=5)
    assert leader.poll() is not None and not any(_alive(pid) for pid in below)
