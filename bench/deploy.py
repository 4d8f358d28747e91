"""`python -m bench deploy`: 3 SuperNodes on loopback (TLS, node auth, signed downloads) vs the
simulation engine on the same digits run, each with and without SecAgg+: seconds per round and
bytes per client-round; the client footprint (install size, ClientApp import time, peak RSS of a
SuperNode with the ClientApp processes it starts). With ``--keep`` the rows an interrupted suite
finished (``parts/*.json``) are read back, not measured again."""

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


SECAGG = {  # the answers summed by Flower's SecAgg+ (3 shares, any 2 reconstruct)
    "distill.secure_aggregation": "secagg+",
    "distill.secagg_num_shares": 3,
    "distill.secagg_reconstruction_threshold": 2,
}


def _round_seconds(results: dict) -> dict:
    seconds = [r["seconds"] for r in results["rounds"]]
    return {"round_seconds": seconds, "round_seconds_mean": sum(seconds) / len(seconds)}


def _simulated(out: Path, run: dict) -> tuple[dict, dict]:
    """The run on Flower's simulation engine: (summary, results.json)."""
    from feddistill.config import load_config
    from feddistill.simulations.run import simulate_flower

    cfg = load_config(Path("configs/digits.toml"), {**run, "output_dir": str(out)})
    t0 = time.monotonic()
    results = simulate_flower(cfg)
    return {"wall_seconds": time.monotonic() - t0, **_round_seconds(results)}, results


def _deployed(out: Path, run: dict) -> tuple[dict, dict[int, int]]:
    """The run on 3 SuperNodes (TLS, node auth, signed downloads) on loopback: (summary, the peak
    RSS of each SuperNode with the ClientApp processes it starts)."""
    import threading

    from bench.inprocess import tree_rss
    from feddistill.deploy.local import LocalDeployment

    peaks: dict[int, int] = {}
    stop = threading.Event()
    with LocalDeployment(out, num_supernodes=3, config={k: v for k, v in run.items() if k != "rounds"}) as dep:
        dep.start()

        def sample() -> None:
            while not stop.is_set():
                for i, proc in dep.supernodes.items():
                    peaks[i] = max(peaks.get(i, 0), tree_rss(proc.popen.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        try:
            deployed = dep.run(rounds=run["rounds"], output_dir=out / "run", timeout_s=1800)
        finally:
            stop.set()
            sampler.join()
    summary = {
        "wall_seconds": time.monotonic() - t0,
        **_round_seconds(deployed),
        "bytes_per_client_round": deployed["final"]["bytes_per_client_round"],
        "accuracy": deployed["final"]["student_accuracy"],
        "transport": "gRPC over TLS on 127.0.0.1, SuperNode authentication on, signed downloads",
    }
    return summary, peaks


def _part(out: Path, name: str, measure) -> dict:
    """One row of the table, measured now or (``--keep``) read back from an interrupted suite."""
    saved = out / "parts" / f"{name}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    value = measure()
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(value, indent=2))
    return value


def _footprint(peaks: dict[int, int]) -> dict:
    import subprocess
    import sys

    imports = []
    for _ in range(3):  # a SuperNode starts a fresh ClientApp process per message: the import cost of one that trains
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "import feddistill.client.app, feddistill.client.distill"], check=True)
        imports.append(time.monotonic() - t0)
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    sizes = {
        d.name: _du(d) for d in site.iterdir() if d.is_dir() and not d.name.endswith((".dist-info", "__pycache__"))
    }
    biggest = dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:8])
    return {
        "supernode_peak_rss_mib": {str(i): v / 2**20 for i, v in sorted(peaks.items())},
        "clientapp_import_seconds": imports,
        "venv_site_packages_mib": _du(site) / 2**20,
        "largest_packages_mib": {k: v / 2**20 for k, v in biggest.items()},
    }


def deploy(out: Path, overrides: dict) -> dict:
    run = {**DEPLOY_RUN, **overrides}

    def simulated(name: str, extra: dict) -> dict:
        summary, results = _simulated(out / name, {**run, **extra})
        return {
            **summary,
            "bytes_per_client_round": results["final"]["bytes_per_client_round"],
            "accuracy": results["final"]["student_accuracy"],
        }

    def deployed(name: str, extra: dict) -> dict:
        summary, peaks = _deployed(out / name, {**run, **extra})
        return {**summary, "supernode_peak_rss": {str(i): v for i, v in peaks.items()}}

    sim = _part(out, "simulation", lambda: simulated("simulation", {}))
    secagg = _part(out, "simulation-secagg", lambda: simulated("simulation-secagg", SECAGG))
    deployment = _part(out, "deployment", lambda: deployed("deployment", {}))
    deployment_secagg = _part(out, "deployment-secagg", lambda: deployed("deployment-secagg", SECAGG))
    peaks = {int(i): v for i, v in deployment.pop("supernode_peak_rss").items()}
    deployment_secagg.pop("supernode_peak_rss")
    summary = {
        **header("deploy", overrides),
        "run": run,
        "secagg": SECAGG,
        "simulation": sim,
        "simulation_secagg": secagg,
        "simulation_bytes_per_client_round": sim["bytes_per_client_round"],
        "deployment": deployment,
        "deployment_secagg": deployment_secagg,
        "client_footprint": _footprint(peaks),
    }
    (out / "deploy.json").write_text(json.dumps(summary, indent=2))
    from bench.soak import soak  # the restart soak, next to it: soak.json, soak.png

    summary["soak_passed"] = soak(out, {})["passed"]
    return summary
