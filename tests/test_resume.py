"""A killed server resumes from its last checkpoint: same final metrics, same epsilon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_simulation import SMALL

pytestmark = pytest.mark.e2e(seconds=130)

SETTINGS = {
    **SMALL,
    "rounds": 3,
    "fleet.fraction": 0.6,
    "privacy.client_level": "central",
    "privacy.noise_multiplier": 0.3,
}


def _cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "feddistill.cli", "simulate", "--no-baselines", *extra]


def _settings_args(out: Path) -> list[str]:
    args = ["--out", str(out)]
    for key, value in SETTINGS.items():
        args += ["--set", f"{key}={json.dumps(value) if isinstance(value, (bool, str)) else value}"]
    return args


def _checkpoint_round(out: Path) -> int:
    try:
        return torch.load(out / "checkpoint.pt", weights_only=False)["state"]["round"]
    except Exception:
        return 0


def _comparable(results: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in results["rounds"]]


def test_sigkill_mid_run_then_resume_from_elsewhere_matches_an_uninterrupted_run(tmp_path):
    """Started with a relative --out, killed with SIGKILL during round 2, moved elsewhere and
    resumed by its absolute path: the checkpoint's config hash leaves out where the run lives, so
    it resumes, and it ends exactly as the same run left alone (every round charged once)."""
    clean = tmp_path / "clean"
    proc = subprocess.run(_cmd(*_settings_args(clean)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = json.loads((clean / "results.json").read_text())

    started = tmp_path / "started"
    _kill_after_checkpoint(_cmd(*_settings_args(Path("started"))), started, 1, cwd=tmp_path)  # kill during round 2
    assert not (started / "results.json").exists()
    assert json.loads((started / "config.json").read_text())["output_dir"] == "started"

    moved = tmp_path / "archive" / "moved-run"
    moved.parent.mkdir()
    started.rename(moved)
    resumed = subprocess.run(_cmd("--resume", str(moved.resolve())), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = json.loads((moved / "results.json").read_text())
    assert _comparable(got) == _comparable(expected)
    assert got["final"]["student_accuracy"] == expected["final"]["student_accuracy"]
    assert got["privacy"]["client_level"]["epsilon"] == expected["privacy"]["client_level"]["epsilon"]
    assert got["privacy"]["client_level"]["steps"] == 3  # each round counted once
    assert got["config"]["output_dir"] == str(moved.resolve())
    assert not started.exists()  # nothing was written where the run used to be


def _kill_after_checkpoint(cmd: list[str], run_dir, rounds: int, cwd=None) -> None:
    """Start a run, and SIGKILL it (the server and its simulation workers, mid-run) as soon as
    its checkpoint holds `rounds` rounds."""
    victim = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 400
        while _checkpoint_round(run_dir) < rounds:
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, f"no checkpoint after round {rounds}"
            time.sleep(0.2)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)


def test_resume_without_checkpoint_or_config_is_a_clear_error(tmp_path):
    proc = subprocess.run(_cmd("--resume", str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config.json: not found" in proc.stderr
    (tmp_path / "config.json").write_text("{not json")
    proc = subprocess.run(_cmd("--resume", str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "corrupt" in proc.stderr
