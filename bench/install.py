"""`python -m bench install`: the device install profile vs the full one.

Builds the device profile in a fresh virtual environment, as a device owner would
(``pip install torch==2.13.0``, then ``pip install`` of this checkout without extras), and measures
it against the environment the suite runs in (the full install, ``.[test]``): site-packages size
(total, torch's share, installed distributions), which of the packages the device profile leaves
out are installed, and a ClientApp's cold start: a fresh process that loads the ClientApp the way a
SuperNode does (Flower's ``load_app`` on pyproject's ``clientapp``: what an identify query or a
SecAgg+ bookkeeping stage pays), and one that also imports the training code (what a message that
trains pays before it trains), median of ``runs`` after one warm-up. In the device environment it
then runs ``python -m feddistill.deploy.device_check`` (plain, signed, DP-SGD and SecAgg+
requests through the ClientApp).

Last, one real round on loopback: a SuperLink of the full install (TLS, SuperNode authentication,
signed downloads) and ``supernodes`` (default 2; 0 skips it) ``flower-supernode`` processes of
the device install, whose ClientApp processes run in the device environment.

``--set venv='"/tmp/x"'`` builds the device environment there and keeps it (reused when it already
holds one); by default it lives in a temporary folder removed at the end. ``--set runs=N``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import header, panel_pair, save_figure

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the CPU wheel on local disk: installed first, as scripts/setup.sh does
# what a SuperNode does with pyproject's [tool.flwr.app.components] clientapp, in a fresh process
LOAD_CLIENTAPP = "from flwr.supercore.object_ref import load_app; load_app('feddistill.client.app:app', RuntimeError)"
# the two kinds of ClientApp process: one that trains nothing (identify, SecAgg+'s key and unmask
# stages: the routing alone, no torch) and one that trains (the distill handler, torch and all)
COLD_STARTS = {"routing": LOAD_CLIENTAPP, "training": LOAD_CLIENTAPP + "; import feddistill.client.distill"}
PROBE = """
import json, sysconfig
from feddistill.profiles import DEVICE_EXCLUDED, installed
found = sorted(dist for name, (dist, _) in DEVICE_EXCLUDED.items() if installed(name))
print(json.dumps({"site": sysconfig.get_paths()["purelib"], "excluded_installed": found}))
"""
# the checkout's files a wheel needs; everything else (runs, results, caches, venvs) stays behind
NOT_COPIED = (".git", ".venv", "runs", "results", "__pycache__", "*.egg-info", "build", "devices", "certs")


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _env(device: bool) -> dict[str, str]:
    """The device environment imports its installed copy; the full one this checkout's src/."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if not device:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return env


def _run(cmd: list[str], device: bool, timeout: float = 1800) -> str:
    done = subprocess.run(cmd, env=_env(device), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def build_device_venv(venv: Path) -> float | None:
    """The device profile in ``venv``: a fresh venv with torch first, then this checkout without
    extras; the seconds it took. A venv kept from an earlier run only gets this checkout's code
    reinstalled (None: no build time measured)."""
    python = venv / "bin" / "python"
    fresh = not python.exists()
    start = time.monotonic()
    pip = [str(python), "-m", "pip", "install", "-q"]
    if fresh:
        subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
        _run([*pip, TORCH], device=True)
    with tempfile.TemporaryDirectory(prefix="feddistill-src-") as tmp:
        src = Path(tmp) / "feddistill"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_COPIED))
        _run([*pip, str(src)] if fresh else [*pip, "--force-reinstall", "--no-deps", str(src)], device=True)
    return time.monotonic() - start if fresh else None


def _timed(python: Path, device: bool, code: str) -> tuple[float, float]:
    """One fresh process running ``code``: its wall seconds, and the CPU seconds it used
    (user + system; what a busy machine inflates far less than wall time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    _run([str(python), "-c", code], device)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cold_starts(pythons: dict[str, Path], runs: int) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Wall and CPU seconds of fresh ClientApp processes of each kind (``COLD_STARTS``), ``runs``
    per environment and kind (after one warm-up each: .pyc files written). Environments and kinds
    take turns, so a machine whose load drifts during the measurement biases none of them."""
    for name, python in pythons.items():
        _run([str(python), "-c", COLD_STARTS["training"]], name == "device")
    seconds = {name: {kind: {"wall": [], "cpu": []} for kind in COLD_STARTS} for name in pythons}
    for _ in range(runs):
        for name, python in pythons.items():
            for kind, code in COLD_STARTS.items():
                wall, cpu = _timed(python, name == "device", code)
                seconds[name][kind]["wall"].append(wall)
                seconds[name][kind]["cpu"].append(cpu)
    return seconds


def footprint(python: Path, device: bool) -> dict:
    """One environment's site-packages: size, torch's share, distributions, excluded packages installed."""
    probe = json.loads(_run([str(python), "-c", PROBE], device).strip().splitlines()[-1])
    site = Path(probe["site"])
    return {
        "python": str(python),
        "site_packages_mib": _du(site) / 2**20,
        "torch_mib": _du(site / "torch") / 2**20,
        "distributions": len(list(site.glob("*.dist-info"))),
        "excluded_installed": probe["excluded_installed"],
    }


SUPERNODE_RUN = {  # one light round: what matters is that device-install SuperNodes answer it
    "fleet.fraction": 1.0,
    "teacher.epochs": 5,
    "distill.digest_epochs": 1,
    "distill.revisit_epochs": 1,
    "baselines.local_only": False,
    "baselines.centralized": False,
    "baselines.fedavg": False,
}


def supernode_round(device_bin: Path, supernodes: int) -> dict:
    """One real round: a SuperLink from this environment (TLS, node auth, signed downloads) and
    ``supernodes`` ``flower-supernode`` processes of the device install, whose ClientApp
    processes run there too; how many answered."""
    from feddistill.deploy.local import LocalDeployment

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="feddistill-device-round-") as tmp:  # keys and device data: not kept
        where = Path(tmp) / "deployment"
        settings = dict(num_supernodes=supernodes, config=SUPERNODE_RUN, app_dir=ROOT, supernode_bin=device_bin)
        with LocalDeployment(where, **settings) as dep:
            dep.start()
            results = dep.run(rounds=1, output_dir=where / "run", timeout_s=1200)
            commands = [p.popen.args[0] for p in dep.supernodes.values()]
    first = results["rounds"][0]
    return {
        "supernodes": supernodes,
        "supernode_executables": sorted(set(map(str, commands))),
        "replies": first["replies"],
        "clients": first["clients"],
        "dropped": first["dropped"],
        "wall_seconds": time.monotonic() - start,
    }


def install(out: Path, overrides: dict) -> dict:
    runs = int(overrides.get("runs", 5))
    keep = overrides.get("venv")
    load_before = os.getloadavg()[0]
    venv = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="feddistill-device-venv-")) / "venv"
    try:
        build_seconds = build_device_venv(venv)
        python = venv / "bin" / "python"
        profiles = {"device": footprint(python, True), "full": footprint(Path(sys.executable), False)}
        for name, kinds in cold_starts({"device": python, "full": Path(sys.executable)}, runs).items():
            profiles[name]["cold_start"] = {
                kind: {
                    "wall_seconds": starts["wall"],
                    "wall_median": statistics.median(starts["wall"]),
                    "cpu_seconds": starts["cpu"],
                    "cpu_median": statistics.median(starts["cpu"]),
                }
                for kind, starts in kinds.items()
            }
        check = json.loads(_run([str(python), "-m", "feddistill.deploy.device_check", "--json"], True).splitlines()[-1])
        supernodes = int(overrides.get("supernodes", 2))
        deployed = supernode_round(python.parent, supernodes) if supernodes else None
    finally:
        if not keep:
            shutil.rmtree(venv.parent, ignore_errors=True)
    summary = {
        **header("install", overrides),
        "commands": {
            "device": f"pip install {TORCH} && pip install feddistill",
            # what this suite runs in: scripts/setup.sh's .venv, the full install plus the test tools
            "full": "pip install -e '.[test]'",
        },
        # the 1-minute load average around the measurement: the cold starts depend on it
        "load_average": [load_before, os.getloadavg()[0]],
        "device_build_seconds": build_seconds,
        "runs": runs,
        "profiles": profiles,
        "device_check": check,
        "supernode_round": deployed,
    }
    (out / "install.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "install.png")
    return summary


def plot(summary: dict, path: Path) -> None:
    """Left: site-packages (torch and the rest); right: the ClientApp's cold start, CPU seconds
    (median, range) of each kind of process in each install."""
    fig, (size, start) = panel_pair()
    names = list(summary["profiles"])
    rows = [summary["profiles"][n] for n in names]
    torch = [r["torch_mib"] for r in rows]
    rest = [r["site_packages_mib"] - r["torch_mib"] for r in rows]
    size.bar(names, torch, label="torch", color="#4c72b0")
    size.bar(names, rest, bottom=torch, label="everything else", color="#dd8452")
    size.set_ylabel("site-packages (MiB)")
    size.set_title("install size")
    size.legend()
    width = 0.38
    kinds = (("routing", "trains nothing (identify, SecAgg+ keys)", "#55a868"), ("training", "trains", "#8172b2"))
    for offset, (kind, label, color) in zip((-width / 2, width / 2), kinds):
        medians = [r["cold_start"][kind]["cpu_median"] for r in rows]
        runs = [r["cold_start"][kind]["cpu_seconds"] for r in rows]
        low = [m - min(x) for m, x in zip(medians, runs)]
        high = [max(x) - m for m, x in zip(medians, runs)]
        xs = [i + offset for i in range(len(names))]
        start.bar(xs, medians, width, yerr=[low, high], capsize=5, label=label, color=color)
    start.set_xticks(range(len(names)), names)
    start.set_ylabel("CPU seconds (median, min-max)")
    start.set_title(f"ClientApp process start-up ({summary['runs']} runs)")
    start.legend()
    save_figure(fig, path)
