"""SecAgg+ in the secure deployment: TLS, SuperNode authentication, signed downloads.

The loopback tests start a real ``flower-superlink`` (TLS, ``--enable-supernode-auth``), three
``flower-supernode`` processes and ``flwr run`` on 127.0.0.1 (``feddistill.deploy.local``), and
collect the answers through Flower's SecAgg+. What the server unmasked each round is in its run
folder (``RunFolder.secagg_sum``); what each device would have answered is recomputed here from
the student the device kept in its own data dir (without local DP the answers depend on it
alone), so the test compares the server's mean with the plain mean of the devices' answers.
SecAgg+ with distributed DP (the noise added on the devices) is test_deploy's second run, on the
restarted deployment there: one deployment fewer to start.
Set FEDDISTILL_SKIP_DEPLOY=1 to skip the loopback tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from feddistill import protocol
from feddistill.client.distill import handle_distill
from feddistill.config import load_config
from feddistill.privacy.distributed import run_secagg_noise
from feddistill.privacy.plan import run_privacy
from test_deploy import NUM_SUPERNODES, TINY_SECAGG, _plain_answers, _processes_mentioning, _snapshot_states

pytestmark = pytest.mark.e2e(seconds=120)

VENV_BIN = Path(sys.executable).parent

deploy = pytest.mark.skipif(
    not (VENV_BIN / "flower-superlink").exists() or os.environ.get("FEDDISTILL_SKIP_DEPLOY") == "1",
    reason="flower-superlink not available (or FEDDISTILL_SKIP_DEPLOY=1)",
)


@pytest.fixture()
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """One secure deployment (3 SuperNodes) serving a one-round SecAgg+ run without DP, while a
    SuperNode with an unregistered key tries to join. (The run with distributed DP is
    test_deploy's second run, on a restarted deployment.)"""
    from feddistill.deploy.certs import generate_credentials
    from feddistill.deploy.local import LocalDeployment

    out = tmp_path_factory.mktemp("deploy-secagg")
    dep = LocalDeployment(out / "deployment", num_supernodes=NUM_SUPERNODES, config=TINY_SECAGG)
    info: dict = {"dep": dep}
    try:
        dep.start()
        stranger = generate_credentials(out / "stranger", num_supernodes=1)
        intruder = dep.start_supernode(0, private_key=stranger.supernode_private_keys[0], name="stranger")
        info["plain"] = dep.run(rounds=1, output_dir=out / "plain", timeout_s=420)
        info["plain_run_id"] = dep.last_run["run_id"]
        info["plain_last_release"] = [
            json.loads((dep.device_dir(i) / "state" / "last-release.json").read_text()) for i in range(NUM_SUPERNODES)
        ]
        info["plain_states"] = _snapshot_states(dep, out / "states-plain")
        try:
            info["intruder_rc"] = intruder.popen.wait(timeout=90)
        except subprocess.TimeoutExpired:
            info["intruder_rc"] = None
        info["intruder_log"] = intruder.tail()
        info["logs"] = {name: Path(path).read_text(errors="replace") for name, path in dep.log_paths().items()}
    finally:
        dep.stop()
    info["leftover"] = _processes_mentioning(str(out))
    info["out"] = out
    return info


@deploy
def test_secagg_deployment_unmasks_the_plain_mean_of_the_devices_answers(deployment):
    results = deployment["plain"]
    dep = deployment["dep"]
    assert [(r["round"], r["clients"], r["replies"], r["dropped"]) for r in results["rounds"]] == [(1, 3, 3, {})]
    assert results["privacy"]["secure_aggregation"]["reconstruction_threshold"] == 2
    devices = [dep.device_dir(i) for i in range(NUM_SUPERNODES)]
    cfg, server, answers = _plain_answers(Path(dep.out).parent / "plain", deployment["plain_states"], devices, 1)
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
def test_secagg_deployment_is_tls_authenticated_and_signed(deployment):
    logs = deployment["logs"]
    assert all("--insecure" not in text for text in logs.values())
    assert "Uvicorn running on https://127.0.0.1:" in logs["superlink"]
    assert logs["flwr-run-plain"].count("Secure aggregation completed") == 1
    for i in range(NUM_SUPERNODES):
        assert "release-public-key=" in logs[f"supernode-{i}"].splitlines()[0]  # the pinned release key
        assert "release rejected" not in logs[f"supernode-{i}"]
        # every device verified the signed download inside SecAgg+'s masking stage
        assert deployment["plain_last_release"][i] == {"run_id": deployment["plain_run_id"], "round": 1}
    run_config = Path(deployment["dep"].out, "run-config-plain.toml").read_text()
    assert '"security.signing-key"' in run_config and '"privacy.noise-source" = "os-entropy"' in run_config
    assert deployment["leftover"] == []  # every process stopped


@deploy
def test_unregistered_supernode_is_refused_by_the_secagg_deployment(deployment):
    assert deployment["intruder_rc"] not in (None, 0), deployment["intruder_log"]
    assert "Failed to activate SuperNode" in deployment["intruder_log"]
    assert deployment["plain"]["num_nodes"] == NUM_SUPERNODES  # the intruder never took part


# --------------------------------------------------------------------------- #
# in-process: the signature covers what a device receives in SecAgg+'s FitIns
# --------------------------------------------------------------------------- #
def test_a_device_refuses_a_tampered_signed_download_inside_secagg(task_identity, tmp_path, one_torch_thread):
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from feddistill.client.secagg import SecAggRefused, answers_as_fitres
    from feddistill.data.fleet import load_fleet
    from feddistill.deploy.certs import generate_credentials
    from feddistill.deploy.download_signing import sign_download
    from feddistill.server.loop import round_config
    from feddistill.server.secagg import download_fitins
    from feddistill.strategies import teacher_arrays

    creds = generate_credentials(tmp_path / "certs", num_supernodes=1)
    cfg = load_config(
        None,
        {
            "fleet.num_clients": 3,
            "distill.query_size": 30,
            "distill.digest_epochs": 1,
            "distill.revisit_epochs": 1,
            "distill.secure_aggregation": "secagg+",
            "distill.secagg_num_shares": 3,
            "distill.secagg_reconstruction_threshold": 2,
            "security.release_public_key": str(creds.release_signing_pub),
            "output_dir": str(tmp_path / "run"),
        },
    )
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    queries = np.arange(cfg.distill.query_size)
    download = teacher_arrays(np.full((len(queries), 10), 0.1, np.float32), queries)
    config = round_config(cfg, fleet.splits.reference_digest, run_privacy(cfg))
    config[protocol.ROUND] = 1
    sign_download(config, download, key_path=str(creds.release_signing_key), rnd=1, run_id=1)
    request = Message(
        RecordDict({protocol.TEACHER_RECORD: download, protocol.CONFIG_RECORD: config}),
        dst_node_id=1,
        message_type=protocol.DISTILL,
    )
    fitins = download_fitins(request)
    context = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(), run_config={}
    )

    def masking_stage(parameters) -> Message:  # what secaggplus_mod hands its inner app
        fitins.parameters = parameters
        return Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=1, message_type="train")

    genuine = fitins.parameters
    reply = answers_as_fitres(masking_stage(genuine), context, cfg, handle_distill)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
    assert parameters_to_ndarrays(fitres.parameters)[0].shape == (cfg.distill.query_size, 10)
    arrays = parameters_to_ndarrays(genuine)
    arrays[0] = arrays[0].copy()
    arrays[0][0, 0] += 0.5  # the teacher signal (first array) changed on its way
    with pytest.raises(SecAggRefused, match="release rejected: tampered"):
        answers_as_fitres(masking_stage(ndarrays_to_parameters(arrays)), context, cfg, handle_distill)
