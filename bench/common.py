"""What the benchmark suites share: the JSON header, one simulated run of the core fleet and its
row in a suite's table, the config overrides most suites start from, and the figures' helpers.

Every suite is a module of this package with a function of the suite's name, ``(out, overrides)
-> summary``, registered in :data:`bench.__main__.SUITES`; suites import their helpers from here,
never from ``bench.__main__`` (the CLI).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path


def environment() -> dict:
    """The machine and the versions a suite ran on."""
    import flwr
    import torch

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def settings(base: dict) -> dict:
    """A suite's config overrides without the baseline switches: what its rows depend on."""
    return {k: v for k, v in base.items() if not k.startswith("baselines")}


def header(suite: str, overrides: dict) -> dict:
    """What every suite's JSON starts with: its name, the command that reproduces it, the machine."""
    return {
        "suite": suite,
        "command": f"python -m bench {suite}" + "".join(f" --set {k}={v}" for k, v in overrides.items()),
        "environment": environment(),
    }


def run_variant(
    out: Path, name: str, overrides: dict, baselines: bool = False, config: Path = Path("configs/fashion.toml")
) -> dict:
    """One simulated run of the Fashion fleet (``config``) with ``overrides``; reused if already
    finished. ``baselines`` runs the ones the overrides leave on (local-only, centralized) after it."""
    from feddistill.config import load_config
    from feddistill.simulations.run import simulate

    run_dir = out / "runs" / name
    done = run_dir / "results.json"
    if done.exists():
        logging.info("%s: reusing %s", name, done)
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run: start it again
    cfg = load_config(config, {**overrides, "output_dir": str(run_dir)})
    logging.info("%s: starting", name)
    t0 = time.monotonic()
    results = simulate(cfg, baselines=baselines)
    results["seconds"] = time.monotonic() - t0
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    logging.info("%s: accuracy %.4f in %.0f s", name, results["final"]["student_accuracy"], results["seconds"])
    return results


NO_BASELINES = {"baselines.local_only": False, "baselines.centralized": False, "baselines.fedavg": False}
# client-level DP: GNMax votes on few queries per round (a reply's sensitivity is sqrt(|Q|))
GNMAX = {"privacy.client_level": "gnmax", "privacy.bound": "votes", "privacy.delta": 1e-5, "distill.query_size": 10}


def run_row(results: dict) -> dict:
    """A run's row in a suite's table, from its results.json content."""
    final = results["final"]
    privacy = results.get("privacy") or {}
    return {
        "accuracy": final["student_accuracy"],
        "bytes_per_client_round": final.get("bytes_per_client_round"),
        "rounds_run": len(results["rounds"]),
        "seconds": results.get("seconds"),
        "client_level": privacy.get("client_level"),
        "record_level": privacy.get("record_level"),
        "public_only_student_accuracy": (results.get("public_only_student") or {}).get("test_accuracy"),
        # the private data's gain over the public-only control that went through the same server pipeline
        "public_control_accuracy": final.get("public_control_accuracy"),
        "private_gain": final.get("private_gain"),
        "gap_closed": final.get("gap_closed"),
        "fleet_labelled_rows": final.get("fleet_labelled_rows"),
    }


def panel_pair():
    """A figure with two side-by-side panels (headless), for the suites that plot two views."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(12, 4.5))


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` (PNG, 120 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
