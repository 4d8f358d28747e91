"""Benchmarks: `python -m bench SUITE [--out DIR]`. Each writes JSON (config, environment,
figures) and PNG plots under bench/results/SUITE/. Not part of the test run.

Suites:
  core   Fashion-MNIST, 100 clients, Dirichlet 0.5: feddistill vs Flower FedAvg on the same
         fleet and rounds, local-only, centralized, public teacher; accuracy and upload bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path


def environment() -> dict:
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


def core(out: Path, overrides: dict) -> dict:
    from feddistill.config import load_config
    from feddistill.report import plot_accuracy
    from feddistill.simulations.run import simulate

    cfg = load_config(Path("configs/fashion.toml"), {"output_dir": str(out / "run"), **overrides})
    t0 = time.monotonic()
    results = simulate(cfg)
    seconds = time.monotonic() - t0
    plot_accuracy(results, out / "accuracy.png")
    base = results["baselines"]
    fd_bytes = results["final"]["bytes_per_client_round"]
    summary = {
        "suite": "core",
        "command": "python -m bench core",
        "environment": environment(),
        "config": results["config"],
        "seconds": seconds,
        "feddistill": {"accuracy": results["final"]["student_accuracy"], "bytes_per_client_round": fd_bytes},
        "fedavg": {"accuracy": base["fedavg"]["accuracy"], "bytes_per_client_round": base["fedavg"]["bytes_per_client_round"],
                   "init": base["fedavg"]["init"]},
        "upload_ratio_fedavg_over_feddistill": base["fedavg"]["bytes_per_client_round"] / fd_bytes,
        "accuracy_gap_points": 100 * (base["fedavg"]["accuracy"] - results["final"]["student_accuracy"]),
        "public_teacher_accuracy": base["public_teacher"]["test_accuracy"],
        "public_only_student_accuracy": base["public_only_student"]["test_accuracy"],
        "local_only_accuracy": base.get("local_only", {}).get("accuracy_mean"),
        "centralized_accuracy": base.get("centralized", {}).get("accuracy"),
    }
    (out / "core.json").write_text(json.dumps(summary, indent=2))
    return summary


SUITES = {"core": core}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (TOML value)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from flwr.supercore.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)
    FLOWER_LOGGER.propagate = False
    from feddistill.cli import _parse_override

    overrides = dict(_parse_override(s) for s in args.set)
    out = args.out or Path("bench/results") / args.suite
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    print(json.dumps(SUITES[args.suite](out, overrides), indent=2))


if __name__ == "__main__":
    main()
