"""A SecAgg+ run with signed downloads and distributed DP, killed mid-run, resumes.

SecAgg+ keeps nothing from one round to the next (every round has fresh keys, shares and
neighbourhoods), so a resumed run restarts the interrupted round from the last checkpoint like
any other run: every round played, each charged once, every download signed and verified.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from feddistill.config import load_config
from feddistill.privacy.plan import upload_privacy
from feddistill.runfolder import RunFolder
from feddistill.server.loop import client_ledger
from test_resume import _cmd, _kill_after_checkpoint
from test_simulation import ONE_CLIENT_ACTOR

pytestmark = pytest.mark.e2e(seconds=60)


def test_secagg_run_with_signed_downloads_resumes_after_a_sigkill(tmp_path):
    from feddistill.deploy.certs import generate_credentials

    creds = generate_credentials(tmp_path / "certs", num_supernodes=1)
    settings = {
        "rounds": 3,
        "fleet.num_clients": 4,
        "fleet.fraction": 1.0,
        "teacher.epochs": 10,
        "distill.digest_epochs": 1,
        "distill.revisit_epochs": 1,
        "distill.query_size": 60,
        "distill.secure_aggregation": "secagg+",
        "distill.secagg_num_shares": 3,
        "distill.secagg_reconstruction_threshold": 2,
        "privacy.client_level": "central",
        "privacy.noise_multiplier": 2.0,
        "security.signing_key": str(creds.release_signing_key),
        "security.release_public_key": str(creds.release_signing_pub),
        **ONE_CLIENT_ACTOR,
    }
    run = tmp_path / "run"
    args = ["--out", str(run)]
    for key, value in settings.items():
        args += ["--set", f"{key}={json.dumps(value) if isinstance(value, (bool, str)) else value}"]
    _kill_after_checkpoint(_cmd(*args), run, 1)  # kill during round 2
    assert not RunFolder(run).results.exists()

    resumed = subprocess.run(_cmd("--resume", str(run)), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = json.loads(RunFolder(run).results.read_text())
    assert [(r["round"], r["replies"], r["dropped"]) for r in got["rounds"]] == [(1, 4, {}), (2, 4, {}), (3, 4, {})]
    # every client verified round 3's signed download (a refusal would have been a dropout)
    assert json.loads((RunFolder(run).clients / "last-release.json").read_text())["round"] == 3
    for rnd in (1, 2, 3):
        with np.load(RunFolder(run).secagg_sum(rnd)) as saved:
            assert sorted(saved["survivors"].tolist()) == [0, 1, 2, 3]
    # each round charged once, as an uninterrupted run would be
    cfg = load_config(None, {**settings, "output_dir": str(run)})
    plan = upload_privacy(cfg)
    ledger = client_ledger(plan)
    assert ledger is not None
    for rnd in (1, 2, 3):
        ledger.record(plan.event(), rnd, sensitivity=plan.sensitivity)
    claim = got["privacy"]["client_level"]
    assert claim["steps"] == 3
    assert claim["epsilon"] == ledger.epsilon()
