"""`python -m bench core`: Fashion-MNIST, 100 clients, Dirichlet 0.5: feddistill vs Flower FedAvg
on the same fleet and rounds, local-only, centralized, public teacher; accuracy and upload bytes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import header


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
        **header("core", overrides),
        "config": results["config"],
        "seconds": seconds,
        "feddistill": {"accuracy": results["final"]["student_accuracy"], "bytes_per_client_round": fd_bytes},
        "fedavg": {
            "accuracy": base["fedavg"]["accuracy"],
            "bytes_per_client_round": base["fedavg"]["bytes_per_client_round"],
            "init": base["fedavg"]["init"],
        },
        "upload_ratio_fedavg_over_feddistill": base["fedavg"]["bytes_per_client_round"] / fd_bytes,
        "accuracy_gap_points": 100 * (base["fedavg"]["accuracy"] - results["final"]["student_accuracy"]),
        "public_teacher_accuracy": base["public_teacher"]["test_accuracy"],
        "public_only_student_accuracy": base["public_only_student"]["test_accuracy"],
        "local_only_accuracy": base.get("local_only", {}).get("accuracy_mean"),
        "centralized_accuracy": base.get("centralized", {}).get("accuracy"),
    }
    (out / "core.json").write_text(json.dumps(summary, indent=2))
    return summary
