"""Drift: KL between successive teacher signals, the alert, and a label-shift scenario on digits in
which the alert fires at the shift and the student adapts to the new population."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from feddistill.server.drift import drift_alert, per_class_accuracy, signal_kl
from feddistill.simulations.shift import check_populations, eligible_partitions, shift_populations
from test_simulation import ONE_CLIENT_ACTOR

pytestmark = pytest.mark.e2e(seconds=25)


def test_signal_kl_is_the_mean_row_kl():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=50)
    q = rng.dirichlet(np.ones(4), size=50)
    assert signal_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    expected = np.mean([(pi * np.log(pi / qi)).sum() for pi, qi in zip(p, q)])
    assert signal_kl(p, q) == pytest.approx(expected, rel=1e-6)
    assert signal_kl(p, q) > 0
    with pytest.raises(ValueError, match="shapes differ"):
        signal_kl(p, q[:10])


def test_alert_fires_only_above_the_threshold():
    assert drift_alert(0.3, 0.2) == "teacher-signal drift: KL(new || previous) = 0.3000 > threshold 0.2"
    assert drift_alert(0.2, 0.2) is None
    assert drift_alert(None, 0.2) is None  # nothing to compare yet (round 1)
    assert drift_alert(5.0, 0.0) is None  # alerts off


def test_per_class_accuracy_and_shift_populations():
    probs = np.eye(3)[[0, 0, 1, 2, 2]]
    assert per_class_accuracy(probs, np.array([0, 1, 1, 2, 0]), 4) == [0.5, 0.5, 1.0, None]
    hist = np.array([[10, 5, 0, 0], [0, 0, 3, 9], [4, 4, 4, 4], [0, 1, 8, 0]])
    populations = shift_populations(hist)
    assert populations == ([0], [1, 2, 3])  # ties go to B: "mostly in the lower half" means > half
    assert eligible_partitions(2, 3, populations) == [0] and eligible_partitions(3, 3, populations) == [1, 2, 3]
    with pytest.raises(ValueError, match="both must be non-empty"):
        check_populations(([], [0, 1]))


SHIFT = {
    "rounds": 5,
    "fleet.num_clients": 6,
    "fleet.partition": '"shards"',
    "fleet.shards_per_client": 1,  # each client holds one contiguous block of labels
    "fleet.fraction": 1.0,
    "teacher.epochs": 40,
    "distill.digest_epochs": 3,
    "distill.revisit_epochs": 2,
    "distill.revisit_kd_weight": 0,  # plain FedMD revisit: answers follow the clients' own labels
    "scenario.shift_round": 4,
    "drift.kl_threshold": 1.0,
    **ONE_CLIENT_ACTOR,
}


def test_label_shift_fires_the_alert_and_the_student_adapts(tmp_path):
    out = tmp_path / "shift"
    args = [sys.executable, "-m", "feddistill.cli", "simulate", "--no-baselines", "--out", str(out)]
    for key, value in SHIFT.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["population"] for r in rounds] == ["A", "A", "A", "B", "B"]
    assert rounds[0]["drift_kl"] is None  # round 1 has no earlier fleet signal to compare with
    # the alert fires exactly at the shift, is logged and recorded
    assert [r["round"] for r in rounds if r["drift_alert"]] == [4]
    assert results["drift"]["alerts"] == [{"round": 4, "alert": rounds[3]["drift_alert"]}]
    assert "teacher-signal drift" in proc.stderr
    assert rounds[3]["drift_kl"] > 1.0 > max(r["drift_kl"] for r in rounds[1:3])

    # the student adapts: accuracy on the classes only population B holds rises after the shift
    hist = np.asarray(results["label_histograms"])
    a, b = shift_populations(hist)
    b_only = [c for c in range(hist.shape[1]) if hist[b, c].sum() > 0 and hist[a, c].sum() == 0]
    assert b_only
    before = np.mean([rounds[2]["per_class_accuracy"][c] for c in b_only])
    after = np.mean([rounds[-1]["per_class_accuracy"][c] for c in b_only])
    assert after > before + 0.2

    # releases: every round has a candidate; the deployed student is the last promoted release
    history = results["releases"]
    assert [r["id"] for r in history["releases"]] == [f"r{i:04d}" for i in range(6)]
    current = next(r for r in history["releases"] if r["id"] == history["current"])
    assert current["status"] == "promoted" and (out / current["path"]).is_file()
    deployed = torch.load(out / "global_student.pt", weights_only=True)
    assert (
        deployed["release"] == history["current"] and deployed["temperature"] == current["calibration"]["temperature"]
    )
    released = torch.load(out / current["path"], weights_only=True)["state_dict"]
    assert all(torch.equal(deployed["state_dict"][k], v) for k, v in released.items())
    assert results["final"]["released_id"] == history["current"]
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cal = results["calibration"]
    assert (
        cal["fitted_on"] == "public validation split"
        and cal["after"]["validation"]["nll"] <= cal["before"]["validation"]["nll"] + 1e-9
    )

    # the run report renders from the real results
    from feddistill.cli import cli

    result = CliRunner().invoke(cli, ["report", str(out)])
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    assert 'id="drift"' in html and 'id="releases"' in html and "teacher-signal drift" in html
