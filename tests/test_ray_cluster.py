"""Issue 18: a simulation scales out on a real multi-node Ray cluster.

Two ``ray start`` nodes on this machine (head and worker, one CPU each, all on 127.0.0.1)
run the README's scale-out recipe: ``feddistill simulate --ray-address`` and ``flwr run``
with ``RAY_ADDRESS``. Each simulated client's round is logged with the Ray node that ran it
(``RUN_DIR/clients/workers.jsonl``): client work must have run on both nodes, and every
round's accuracy and ε must equal those of a single-node run (Ray started by the run alone)
with the same seed.

Isolation from other Ray users of this machine: the cluster's temp dir is private (``ray
start`` records the cluster's address there, and a plain ``ray.init()`` elsewhere looks for it
in /tmp/ray). The nodes are started on 127.0.0.1; Ray itself swaps that for the host's own
address (it refuses multi-node clusters on loopback-only settings), so the traffic stays on
this machine. The nodes and the local SuperLink are stopped (their process groups and
descendants) in a ``finally``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from feddistill.client.placement import read_placements
from feddistill.deploy.local import free_port, stop_processes

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
CLIENTS, ROUNDS = 4, 2
TINY = {
    "rounds": ROUNDS,
    "fleet.num-clients": CLIENTS,
    "fleet.fraction": 1.0,
    "teacher.epochs": 20,
    "distill.digest-epochs": 1,
    "distill.revisit-epochs": 1,
    "distill.query-size": 100,
    "distill.server-epochs": 1,
    "privacy.client-level": '"local"',  # a per-round epsilon to compare
    "privacy.noise-multiplier": 0.1,
    "simulation.cpus-per-client": 1.0,  # one actor per node: 1 CPU each
}
RUN_S = 600  # one tiny run: 40 s on 2 quiet cores, 4 min when 7 users share them

pytestmark = [
    pytest.mark.e2e(seconds=180),
    pytest.mark.skipif(not (VENV_BIN / "ray").exists(), reason="Ray's CLI not installed"),
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a run joins a cluster only when told
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # flwr starts flower-superlink from PATH
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")]),
        RAY_USAGE_STATS_ENABLED="0",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def _start_node(args: list[str], log: Path, attempts: int = 3) -> subprocess.Popen:
    """One `ray start --block` node (its own session: stop_processes signals its group). Ray gives
    a node 30 s to register with the GCS, which a heavily shared machine can miss: retried."""
    for _ in range(attempts):
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", *args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=_env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            if "Ray runtime started" in log.read_text(errors="replace"):
                return proc
            time.sleep(0.5)
        stop_processes([proc])  # what the failed start left in its group
    pytest.fail(f"ray start {' '.join(args)} failed {attempts} times: {log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A two-node Ray cluster (head + one worker node, 1 CPU each); yields the head's address."""
    temp_dir = Path(tempfile.mkdtemp(prefix="fdray", dir="/tmp"))  # short: Ray's socket paths max 107 chars
    port = free_port()
    nodes: list[subprocess.Popen] = []
    try:
        head_args = [
            "--head",
            f"--port={port}",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",  # Ray starts its dashboard head even so: not on the shared 8265
            f"--ray-client-server-port={free_port()}",
            "--disable-usage-stats",
        ]
        nodes.append(_start_node(head_args, temp_dir / "head.log"))
        nodes.append(_start_node([f"--address=127.0.0.1:{port}"], temp_dir / "worker.log"))
        yield f"127.0.0.1:{port}"
    finally:
        stop_processes(nodes[::-1], grace_s=15)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a command from the repository root; a timeout fails with the command's output tail."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=RUN_S, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-2000:] + (exc.stderr or b"")[-2000:]
        pytest.fail(f"{args[:4]} did not finish in {RUN_S} s: {tail.decode(errors='replace')}")


def _simulate(out: Path, ray_address: str | None = None) -> dict:
    args = [sys.executable, "-m", "feddistill.cli", "simulate", "--no-baselines", "--out", str(out)]
    for key, value in TINY.items():
        args += ["--set", f"{key}={value}"]
    if ray_address is not None:
        args += ["--ray-address", ray_address]
    proc = _run(args, _env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def single_node(tmp_path_factory) -> tuple[dict, list[dict]]:
    """The reference: the same run on a Ray instance started by the run alone (the default)."""
    out = tmp_path_factory.mktemp("single") / "run"
    return _simulate(out), read_placements(out)


def _per_round(results: dict) -> list[tuple]:
    return [
        (r["round"], r["replies"], r["teacher_accuracy"], r["student_accuracy"], r["client_epsilon"])
        for r in results["rounds"]
    ]


def _check_placements(rows: list[dict]) -> set[str]:
    """Every client's every round logged once; returns the Ray nodes that ran them."""
    assert sorted((r["round"], r["client"]) for r in rows) == [
        (rnd, c) for rnd in range(1, ROUNDS + 1) for c in range(CLIENTS)
    ]
    assert all(r["ray_node"] for r in rows), rows
    return {r["ray_node"] for r in rows}


def test_feddistill_simulate_runs_clients_on_both_nodes_of_a_ray_cluster(ray_cluster, single_node, tmp_path):
    reference, reference_rows = single_node
    assert len(_check_placements(reference_rows)) == 1  # the control: a local Ray has one node
    out = tmp_path / "cluster"
    results = _simulate(out, ray_address=ray_cluster)
    assert len(_check_placements(read_placements(out))) == 2, read_placements(out)
    assert results["final"]["student_accuracy"] > 0.2  # learnt something: the comparison is not of chance levels
    assert _per_round(results) == _per_round(reference)
    assert results["privacy"]["client_level"]["epsilon"] == reference["privacy"]["client_level"]["epsilon"]


def _start_local_superlink(env: dict[str, str], log: Path) -> subprocess.Popen:
    """The local SuperLink the first `flwr` command starts (Flower's own command line, with the
    caller's environment: RAY_ADDRESS included), started here because Flower gives it 15 s,
    too few on 2 shared cores; `flwr run` then finds it healthy and uses it."""
    http_port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    cmd = [
        str(VENV_BIN / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation=subprocess",
        f"--control-api-address=127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
        "--host=127.0.0.1",
        f"--port={http_port}",
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_processes([proc])
            pytest.fail(f"the local SuperLink did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)


def test_flwr_run_with_ray_address_runs_clients_on_both_nodes(ray_cluster, single_node, tmp_path):
    reference, _ = single_node
    out = tmp_path / "flwr-run"
    env = _env(
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),  # a local SuperLink of this test's own
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        RAY_ADDRESS=ray_cluster,  # the recipe: the local SuperLink's simulations join the cluster
    )
    run_config = " ".join(f"{key}={value}" for key, value in {**TINY, "output-dir": f'"{out}"'}.items())
    federation = f"num-supernodes={CLIENTS} client-resources-num-cpus=1"
    args = [str(VENV_BIN / "flwr"), "run", ".", "--stream", "--run-config", run_config]
    superlink = _start_local_superlink(env, tmp_path / "superlink.log")
    try:
        proc = _run([*args, "--federation-config", federation], env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    finally:
        stop_processes([superlink], grace_s=15)  # with its SuperExec and any simulation process left
    assert (out / "results.json").is_file(), (proc.stdout + proc.stderr)[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert len(_check_placements(read_placements(out))) == 2, read_placements(out)
    assert _per_round(results) == _per_round(reference)


def test_simulate_refuses_a_ray_address_where_no_cluster_answers(tmp_path):
    """Ray itself retries an unreachable address for minutes; the CLI fails in one line first."""
    for address, message in ((f"127.0.0.1:{free_port()}", "no Ray cluster answers"), ("6379", "expected HOST:PORT")):
        out = tmp_path / "run"
        args = [sys.executable, "-m", "feddistill.cli", "simulate", "--out", str(out), "--ray-address", address]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert not out.exists()  # refused before the run folder was prepared


def test_placement_log_outside_ray_names_no_node_and_skips_a_torn_line(tmp_path):
    from feddistill.client.placement import log_placement
    from feddistill.runfolder import RunFolder

    log_placement(tmp_path, 1, 3)
    with open(RunFolder(tmp_path).workers, "a") as fh:
        fh.write('{"round": 2, "cli')  # a kill mid-write
    (row,) = read_placements(tmp_path)
    assert row == {"round": 1, "client": 3, "host": socket.gethostname(), "pid": os.getpid(), "ray_node": None}
    assert read_placements(tmp_path / "elsewhere") == []
