"""The ServerApp: Flower's entry point into the federated-distillation round loop.

The loop itself, its phases and its state, is ``feddistill.server.loop.DistillationRun``
(docs/design.md, round protocol steps 0-4); this module wires it (or FedAvg) into a ``ServerApp``, for
``feddistill simulate`` and for ``flwr run``.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from feddistill.config import RunConfig, parse_config
from feddistill.server.loop import (
    DistillationRun,
    SamplingHook,
    build_strategy,
    charge_local,
    client_ledger,
    evaluate_student,
    fleet_accepted,
    record_device_epsilons,
    reference_margin,
    round_config,
)
from feddistill.server.nodes import identify_nodes, identify_reply, wait_for_nodes
from feddistill.server.outputs import (
    privacy_report,
    save_audit_setup,
    save_reliability,
    save_student,
    save_uploads,
    write_json,
)
from feddistill.server.public import (
    public_control_of,
    public_labels,
    split_validation,
    teacher_and_validation,
    validation_labels,
)

# The loop's building blocks stay importable from here, where they were defined until issue 17.
__all__ = [
    "DistillationRun",
    "FLWR_WAYS_OUT",
    "app",
    "make_server_app",
    "run_distillation",
    "run_server",
    "build_strategy",
    "charge_local",
    "client_ledger",
    "evaluate_student",
    "fleet_accepted",
    "record_device_epsilons",
    "reference_margin",
    "round_config",
    "identify_nodes",
    "identify_reply",
    "wait_for_nodes",
    "privacy_report",
    "save_audit_setup",
    "save_reliability",
    "save_student",
    "save_uploads",
    "write_json",
    "public_control_of",
    "public_labels",
    "split_validation",
    "teacher_and_validation",
    "validation_labels",
]

log = logging.getLogger("feddistill")


def run_distillation(
    grid: Grid, cfg: RunConfig, resume: bool = False, sampling: SamplingHook | None = None
) -> dict[str, Any]:
    """Run (or resume) a federated-distillation run on `grid`; its results.json content."""
    return DistillationRun(grid, cfg, resume, sampling).run()


def run_server(
    grid: Grid, cfg: RunConfig, resume: bool = False, sampling: SamplingHook | None = None
) -> dict[str, Any]:
    if cfg.method in ("fedavg", "dp-fedavg"):
        from feddistill.server.fedavg import run_fedavg

        return run_fedavg(grid, cfg)
    return run_distillation(grid, cfg, resume, sampling)


def make_server_app(
    cfg: RunConfig | None = None, resume: bool = False, sampling: SamplingHook | None = None
) -> ServerApp:
    """A ServerApp for `cfg`; with None it reads Flower's run config (`flwr run .`).

    ``sampling`` is a simulation's say in whom each round samples (``feddistill.simulations.shift``);
    under `flwr run` there is none, and a run config that asks for a simulation scenario is refused.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is None and not log.handlers:  # under `flwr run`, print our per-round lines too
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s feddistill: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        if cfg is not None:  # feddistill simulate: its CLI reports errors (and checked the folder already)
            run_server(grid, cfg, resume, sampling)
            return
        from feddistill.config import ConfigError
        from feddistill.runfolder import RunFolderError, prepare_run_folder

        try:
            run_cfg = parse_config(dict(context.run_config), "run config")
            refuse_scenarios(run_cfg)
            # fedavg too, before anything runs; `resume = true` continues the run the folder holds
            prepare_run_folder(run_cfg.output_dir, resume=run_cfg.resume, ways_out=FLWR_WAYS_OUT)
        except (ConfigError, RunFolderError) as exc:
            # one line in the log, and the same line as the run's failure details; a fresh exception
            # so that Flower's report does not carry the whole stack under it
            log.error("%s", exc)
            raise type(exc)(str(exc)) from None
        run_server(grid, run_cfg, resume or run_cfg.resume)

    return server_app


def refuse_scenarios(cfg: RunConfig) -> None:
    """`flwr run .` installs no simulation scenario (feddistill.client.app:app is the production
    ClientApp): a feddistill run config that asks for one is refused, not silently run without it."""
    from feddistill.config import ConfigError

    s = cfg.scenario
    asked = [
        key
        for key, value in (
            ("scenario.dropout", s.dropout),
            ("scenario.hostile-fraction", s.hostile_fraction),
            ("scenario.shift-round", s.shift_round),
        )
        if value
    ]
    if cfg.resume and cfg.method != "feddistill":
        raise ConfigError(f"run config: resume = true: a {cfg.method} run has no checkpoint to resume from")
    if asked and cfg.method == "feddistill":
        raise ConfigError(
            f"run config: {', '.join(asked)} asks for a simulation scenario, which `flwr run` does not install "
            "(its ClientApp and ServerApp are the production ones): run it with `feddistill simulate`"
        )


FLWR_WAYS_OUT = (
    "choose a fresh output-dir (flwr run never overwrites a run), or continue an interrupted one from its "
    "checkpoint with --run-config 'resume=true'"
)


app = make_server_app()
