"""`python -m bench deploy`: 3 SuperNodes on loopback (TLS, node auth) vs the simulation engine on
the same digits run: seconds per round; the client footprint (install size, ClientApp import time,
peak RSS of a SuperNode with the ClientApp processes it starts)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import header

DEPLOY_RUN = {
    "rounds": 5,
    "fleet.num_clients": 3,
    "fleet.fraction": 1.0,
    "baselines.local_only": False,
    "baselines.centralized": False,
    "baselines.fedavg": False,
    "teacher.epochs": 60,
    "audit.keep_artifacts": False,
    "audit.canaries": 0,
}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def deploy(out: Path, overrides: dict) -> dict:
    import subprocess
    import sys
    import threading

    from bench.inprocess import tree_rss
    from feddistill.config import load_config
    from feddistill.deploy.local import LocalDeployment
    from feddistill.simulations.run import simulate_flower

    run = {**DEPLOY_RUN, **overrides}
    cfg = load_config(Path("configs/digits.toml"), {**run, "output_dir": str(out / "simulation")})
    t0 = time.monotonic()
    sim = simulate_flower(cfg)
    sim_seconds = time.monotonic() - t0
    # the same run with the answers summed by Flower's SecAgg+ (3 shares, any 2 reconstruct)
    secagg_cfg = load_config(
        Path("configs/digits.toml"),
        {
            **run,
            "distill.secure_aggregation": "secagg+",
            "distill.secagg_num_shares": 3,
            "distill.secagg_reconstruction_threshold": 2,
            "output_dir": str(out / "simulation-secagg"),
        },
    )
    t0 = time.monotonic()
    secagg = simulate_flower(secagg_cfg)
    secagg_seconds = time.monotonic() - t0

    peaks: dict[int, int] = {}
    stop = threading.Event()
    with LocalDeployment(
        out / "deployment", num_supernodes=3, config={k: v for k, v in run.items() if k != "rounds"}
    ) as dep:
        dep.start()

        def sample() -> None:
            while not stop.is_set():
                for i, proc in dep.supernodes.items():
                    peaks[i] = max(peaks.get(i, 0), tree_rss(proc.popen.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        deployed = dep.run(rounds=run["rounds"], output_dir=out / "deployment" / "run", timeout_s=900)
        dep_seconds = time.monotonic() - t0
        stop.set()
        sampler.join()

    def per_round(results: dict) -> list[float]:
        return [r["seconds"] for r in results["rounds"]]

    imports = []
    for _ in range(3):  # a SuperNode starts a fresh ClientApp process per message: this is its import cost
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "import feddistill.client.app"], check=True)
        imports.append(time.monotonic() - t0)
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    sizes = {
        d.name: _du(d) for d in site.iterdir() if d.is_dir() and not d.name.endswith((".dist-info", "__pycache__"))
    }
    biggest = dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:8])
    summary = {
        **header("deploy", overrides),
        "run": run,
        "simulation": {
            "wall_seconds": sim_seconds,
            "round_seconds": per_round(sim),
            "round_seconds_mean": sum(per_round(sim)) / len(per_round(sim)),
        },
        "simulation_secagg": {
            "wall_seconds": secagg_seconds,
            "round_seconds": per_round(secagg),
            "round_seconds_mean": sum(per_round(secagg)) / len(per_round(secagg)),
            "bytes_per_client_round": secagg["final"]["bytes_per_client_round"],
            "accuracy": secagg["final"]["student_accuracy"],
        },
        "simulation_bytes_per_client_round": sim["final"]["bytes_per_client_round"],
        "deployment": {
            "wall_seconds": dep_seconds,
            "round_seconds": per_round(deployed),
            "round_seconds_mean": sum(per_round(deployed)) / len(per_round(deployed)),
            "transport": "gRPC over TLS on 127.0.0.1, SuperNode authentication on",
        },
        "client_footprint": {
            "supernode_peak_rss_mib": {str(i): v / 2**20 for i, v in sorted(peaks.items())},
            "clientapp_import_seconds": imports,
            "venv_site_packages_mib": _du(site) / 2**20,
            "largest_packages_mib": {k: v / 2**20 for k, v in biggest.items()},
        },
    }
    (out / "deploy.json").write_text(json.dumps(summary, indent=2))
    from bench.soak import soak  # the restart soak, next to it: soak.json, soak.png

    summary["soak_passed"] = soak(out, {})["passed"]
    return summary
