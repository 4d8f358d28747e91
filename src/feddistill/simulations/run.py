"""Run a fleet on Flower's simulation engine (the same apps `flwr run .` uses)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from feddistill.config import RunConfig
from feddistill.runfolder import Baselines, FinalBlock, RunFolder

log = logging.getLogger("feddistill")


class RayClusterError(RuntimeError):
    """``--ray-address`` names no Ray cluster that answers."""


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail in one line, before anything runs, when nothing answers at ``address``, the head's
    ``HOST:PORT`` (``auto``: Ray finds the cluster itself): ray.init retries an unreachable
    address for minutes."""
    if address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayClusterError(f"--ray-address {address!r}: expected HOST:PORT of the head node, e.g. 10.0.0.5:6379")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayClusterError(
            f"--ray-address {address}: no Ray cluster answers there ({exc}); "
            f"start its head with `ray start --head --port={port}`"
        ) from exc


def simulate_flower(
    cfg: RunConfig, *, verbose: bool = False, resume: bool = False, ray_address: str | None = None
) -> dict[str, Any]:
    """One Flower simulation of `cfg` (feddistill or fedavg); returns its results.json.

    ``ray_address`` (``HOST:PORT`` of a running cluster's head, or ``auto``) runs the clients on
    that Ray cluster's nodes instead of a Ray instance started for this run alone."""
    # Ray workers must not re-resolve the app's dependencies, and must not print per-actor banners.
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    from flwr.simulation import run_simulation

    from feddistill.client.app import make_client_app
    from feddistill.server.app import make_server_app
    from feddistill.simulations.linkstate import indexed_linkstate
    from feddistill.simulations.quiet import silence_simulation_noise
    from feddistill.simulations.scenarios import scenario_mods
    from feddistill.simulations.shift import sampling_hook

    silence_simulation_noise()  # Flower's run_simulation banner and fraction_evaluate warning, Ray's tip

    init_args: dict[str, Any] = {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose}
    if ray_address:  # Flower's RayBackend passes init_args to ray.init: the cluster's CPUs then size its actor pool
        init_args["address"] = ray_address
    elif not os.environ.get("RAY_ADDRESS"):
        # ray.init() with no address joins whatever `ray start` cluster /tmp/ray names: a run
        # asked for no cluster starts Ray of its own, so one machine's runs never share one by accident
        init_args["address"] = "local"
    backend_config = {
        "client_resources": {"num_cpus": cfg.simulation.cpus_per_client, "num_gpus": 0.0},
        "init_args": init_args,
    }
    with indexed_linkstate():  # Flower's own scans every stored message per node poll: N^2 at start-up
        run_simulation(
            # the scenarios (feddistill.simulations.scenarios, .shift) are installed here, never in the production apps
            server_app=make_server_app(cfg, resume=resume, sampling=sampling_hook(cfg)),
            client_app=make_client_app(cfg, mods=scenario_mods(cfg)),
            num_supernodes=cfg.fleet.num_clients,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    path = RunFolder(cfg.output_dir).results
    if not path.is_file():
        raise RuntimeError(f"the {cfg.method} run ended without writing {path}; see the log above")
    return json.loads(path.read_text())


def resume_config(run_dir: Path) -> RunConfig:
    """The config of an interrupted run, read back from its folder."""
    from feddistill.atomic import read_json
    from feddistill.config import ConfigError, parse_config

    path = RunFolder(run_dir).config
    values = read_json(path, ConfigError, f"is {run_dir} the output folder of a feddistill run?")
    return parse_config({**values, "output_dir": str(run_dir)}, str(path))


def simulate(
    cfg: RunConfig,
    *,
    verbose: bool = False,
    baselines: bool = True,
    resume: bool = False,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """The full experiment: feddistill on Flower, plus the configured baselines on the same fleet
    (the Flower runs on the Ray cluster at ``ray_address`` when given)."""
    from feddistill.data.fleet import load_fleet
    from feddistill.server.app import write_json
    from feddistill.server.control import gap_closed
    from feddistill.simulations import baselines as bl

    folder = RunFolder(cfg.output_dir)
    folder.root.mkdir(parents=True, exist_ok=True)
    results = simulate_flower(cfg, verbose=verbose, resume=resume, ray_address=ray_address)
    if cfg.method != "feddistill":  # a peer run on its own (fedavg, dp-fedavg): no baselines of its own
        return results
    base = Baselines.from_dict(results.get("baselines", {}), "baselines")  # the server's own: the public-only control
    base.public_teacher = results["public_teacher"]
    base.public_only_student = results["public_only_student"]
    if baselines:
        fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
        if cfg.baselines.local_only:
            log.info("baseline: local-only (each client alone)")
            base.local_only = bl.local_only(cfg, fleet)
        if cfg.baselines.centralized:
            log.info("baseline: centralized (pooled private data)")
            base.centralized = bl.centralized(cfg, fleet)
        if cfg.baselines.fedavg:
            log.info("baseline: Flower FedAvg on the same fleet")
            fed_cfg = dataclasses.replace(cfg, method="fedavg", output_dir=str(folder.baseline("fedavg")))
            fed = simulate_flower(fed_cfg, verbose=verbose, ray_address=ray_address)
            base.fedavg = {
                "init": fed["init"],
                "accuracy": fed["final"]["student_accuracy"],
                "bytes_per_client_round": fed["final"]["bytes_per_client_round"],
                "rounds": fed["rounds"],
            }
        if cfg.baselines.dp_fedavg:
            log.info("baseline: Flower DP-FedAvg at the same client-level target")
            dp_cfg = dataclasses.replace(cfg, method="dp-fedavg", output_dir=str(folder.baseline("dp-fedavg")))
            dp = simulate_flower(dp_cfg, verbose=verbose, ray_address=ray_address)
            base.dp_fedavg = {
                "accuracy": dp["final"]["student_accuracy"],
                "bytes_per_client_round": dp["final"]["bytes_per_client_round"],
                "privacy": dp["privacy"]["client_level"],
                "rounds": dp["rounds"],
            }
    results["baselines"] = base.to_dict()
    if "centralized" in base and "public_control" in base:
        final = FinalBlock.from_dict(results["final"], "final")
        final.gap_closed = gap_closed(
            final.student_accuracy, base.public_control["accuracy"], base.centralized["accuracy"]
        )
        results["final"] = final.to_dict()
    write_json(folder.results, results)
    return results
