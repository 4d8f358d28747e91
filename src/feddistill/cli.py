"""The one `feddistill` command: simulate, audit, certs, report, ..."""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from feddistill.config import ConfigError, load_config, parse_override
from feddistill.console import make_console
from feddistill.profiles import missing_message

cli = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Federated, privacy-preserving knowledge distillation on Flower."
)
console = make_console()  # tables and results: plain and complete when stdout is not a terminal
# log lines and one-line errors: rich's own console (its log layout pads every line to the width)
err_console = Console(stderr=True)


@cli.callback()
def _root() -> None:
    """Federated, privacy-preserving knowledge distillation on Flower."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=err_console, show_path=False, markup=False)],
        force=True,
    )
    # Flower logs every message exchange at INFO through its own handler; keep our
    # per-round lines readable (and printed once: no propagation to our handler).
    from flwr.supercore.logger import FLOWER_LOGGER

    FLOWER_LOGGER.propagate = False
    FLOWER_LOGGER.setLevel(logging.DEBUG if verbose else logging.WARNING)
    # libraries' INFO chatter (absl: dp-accounting's logger) stays out of the per-round lines
    for name in ("alembic", "ray", "filelock", "matplotlib", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _require(command: str, *extras: str) -> None:
    """Fail in one line, naming the missing packages, when ``command`` needs more than a device install."""
    problem = missing_message(command, *extras)
    if problem is not None:
        _fail(problem)


def _fail(message: str, code: int = 2) -> None:
    """One line on stderr, whatever the terminal's width and whatever the message holds:
    never wrapped (soft_wrap), never read as rich markup (paths may hold brackets)."""
    one_line = re.sub(r"\s*\n\s*", " ", str(message)).strip()
    err_console.print(Text.assemble(("error:", "bold red"), " ", one_line), soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@cli.command()
def simulate(
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML run config (defaults: digits, 10 clients)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Results folder (overrides output-dir)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set fleet.num-clients=20."),
    no_baselines: bool = typer.Option(False, "--no-baselines", help="Skip local-only, centralized and FedAvg."),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue an interrupted run from its folder's checkpoint."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the run already in the results folder (deletes what it wrote)."
    ),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        help="Run the clients on a running Ray cluster (HEAD:PORT of its `ray start --head`) instead of a local Ray.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's and Ray's own logs."),
) -> None:
    """Run a simulated fleet on Flower's simulation engine and write results.json + accuracy.png."""
    _require("feddistill simulate", "simulation", "plots")  # before importing the simulation engine
    from feddistill.runfolder import RunFolder, RunFolderError, prepare_run_folder
    from feddistill.simulations.run import RayClusterError, check_ray_address

    _setup_logging(verbose)
    try:
        overrides = dict(parse_override(s) for s in set_)
        if resume is not None:
            if config is not None or overrides or out is not None:
                raise ConfigError("--resume takes the run's own config: drop --config/--set/--out")
            from feddistill.simulations.run import resume_config

            cfg = resume_config(resume)
        else:
            cfg = load_config(config, overrides)
            if cfg.resume:  # the run-config key is `flwr run`'s way; here the folder says which run
                raise ConfigError("resume = true: resume a simulation with --resume RUN_DIR")
            if out is not None:
                cfg = dataclasses.replace(cfg, output_dir=str(out))
        if ray_address is not None:  # an unreachable cluster fails here, not after minutes of Ray's retries
            check_ray_address(ray_address)
        # before anything runs: a folder that is a file, unwritable, or holds another run fails here
        prepare_run_folder(cfg.output_dir, resume=resume is not None, overwrite=overwrite)
    except (ConfigError, RunFolderError, RayClusterError) as exc:
        _fail(str(exc))
    from feddistill.data import DataError
    from feddistill.report import plot_accuracy, print_summary
    from feddistill.server.checkpoint import CheckpointError
    from feddistill.simulations.run import simulate as run

    try:
        results = run(
            cfg, verbose=verbose, baselines=not no_baselines, resume=resume is not None, ray_address=ray_address
        )
    except (DataError, CheckpointError, RunFolderError) as exc:
        _fail(str(exc))
    folder = RunFolder(Path(cfg.output_dir))
    if results["method"] != "feddistill":
        console.print(f"{results['method']}: final test accuracy {results['final']['student_accuracy']:.3f}")
        if results.get("privacy", {}).get("client_level"):
            p = results["privacy"]["client_level"]
            console.print(f"client-level epsilon = {p['epsilon']:.3f} at delta = {p['delta']:g} ({p['accountant']})")
        console.print(f"results: {folder.results}")
        return
    plot_accuracy(results, folder.accuracy_plot)
    print_summary(results, console)
    console.print(f"\nresults: {folder.results}  plot: {folder.accuracy_plot}")


@cli.command()
def audit(
    run_dir: Path = typer.Argument(
        ..., help="A finished run's folder (simulate with --set audit.keep-artifacts=true)."
    ),
    policy: Path | None = typer.Option(
        None,
        "--policy",
        "-p",
        help="TOML policy: max_auc, max_tpr_at_0_1pct_fpr, max_tpr_at_1pct_fpr, max_empirical_epsilon, "
        "fail_on_dp_violation (default true), min_label_tv.",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Report folder (default RUN_DIR/audit-report)."),
    reference_models: int = typer.Option(
        4, "--reference-models", help="Reference (shadow) models per target for LiRA/RMIA."
    ),
    target_clients: int = typer.Option(
        2,
        "--target-clients",
        help="Clients audited as targets (a) uploads and (b) local student; the canary client first.",
    ),
) -> None:
    """Membership-inference and DP-claim audit of a finished run: audit.json, report.md, roc_*.png.

    Exit code 0: policy passed; 1: policy failed (a DP violation always fails); 2: unreadable run or policy."""
    _require("feddistill audit", "simulation", "plots")
    _setup_logging(False)
    from feddistill.privacy.audit.runner import main as audit_main

    raise typer.Exit(
        audit_main(
            str(run_dir),
            None if policy is None else str(policy),
            None if out is None else str(out),
            reference_models,
            target_clients,
        )
    )


@cli.command(name="audit-deployment")
def audit_deployment(
    run_dir: Path = typer.Argument(..., help="The server's run folder of a deployed run (flwr run / deploy-local)."),
    secret: Path = typer.Option(
        ..., "--secret", "-s", help="The officer's canary secret (hex), as the audit nodes hold it."
    ),
    audit_node: list[int] = typer.Option(
        [], "--audit-node", help="Node id (device-id / partition-id) of an audit SuperNode (repeatable)."
    ),
    canaries: int = typer.Option(16, "--canaries", help="Canaries per audit node (their node config audit-canaries)."),
    generated: int = typer.Option(16, "--generated", help="Never-sent canary sets generated as held-out controls."),
    device_canaries: list[Path] = typer.Option(
        [], "--device-canaries", help="A device's exported canary records (`feddistill device-canaries`; repeatable)."
    ),
    policy: Path | None = typer.Option(None, "--policy", "-p", help="TOML policy (as for `feddistill audit`)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Report folder (default RUN_DIR/audit-deployment)."),
) -> None:
    """The privacy officer's audit of a deployed run: claimed vs estimated client-level epsilon from canary
    clients, from the released signals only; audit.json, report.md, canaries.png.

    Exit code 0: policy passed; 1: policy failed (a DP violation always fails); 2: unreadable input."""
    _setup_logging(False)
    if canaries < 1 or generated < 1:
        _fail(f"--canaries {canaries} and --generated {generated} must be >= 1")
    from feddistill.privacy.audit.deployment import main as deployment_main

    raise typer.Exit(
        deployment_main(
            str(run_dir),
            str(secret),
            audit_node,
            canaries,
            None if policy is None else str(policy),
            None if out is None else str(out),
            generated,
            [str(p) for p in device_canaries],
        )
    )


@cli.command(name="device-canaries")
def device_canaries_export(
    data_dir: Path = typer.Argument(..., help="The device's data dir (node config data-dir)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the export for the privacy officer."),
) -> None:
    """On a device started with node config canary-records=M: export its canary records and their coins
    (noise images, nothing private) for `feddistill audit-deployment --device-canaries`."""
    from feddistill.client.record_canaries import export_record_canaries

    try:
        path = export_record_canaries(data_dir, out)
    except ValueError as exc:
        _fail(str(exc))
    console.print(f"canary records: {path}")


@cli.command()
def certs(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for the CA, server certificate, signing and SuperNode keys."
    ),
    host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host", help="Server host name or IP (repeatable)."),
    supernodes: int = typer.Option(3, "--supernodes", help="SuperNode authentication key pairs to create."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
) -> None:
    """Create TLS certificates, the release-signing key and SuperNode auth keys (private keys 0600)."""
    from feddistill.deploy.certs import generate_credentials
    from feddistill.runfolder import RunFolderError, check_output_folder

    if supernodes < 0:  # checked here, not by typer: its usage errors are a multi-line box
        _fail(f"--supernodes {supernodes}: must be >= 0 (the SuperNode key pairs to create)")
    try:
        check_output_folder(out)
        paths = generate_credentials(out, hosts=list(host), num_supernodes=supernodes, force=force)
    except (FileExistsError, ValueError, RunFolderError) as exc:  # ValueError: a bad --host
        _fail(str(exc))
    for path in paths.all_files:
        console.print(str(path))


@cli.command(name="deploy-local", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def deploy_local(ctx: typer.Context) -> None:
    """A secure deployment on this machine: TLS SuperLink, authenticated SuperNodes, `flwr run`.

    Arguments: OUT [--supernodes N] [--rounds R] [--config F] [--set K=V] [--timeout S]."""
    _setup_logging(False)
    from feddistill.deploy.local import main as deploy_main

    raise typer.Exit(deploy_main(list(ctx.args)))


@cli.command()
def releases(
    run_dir: Path = typer.Argument(..., help="A finished (or running) feddistill run's folder."),
) -> None:
    """List a run's release candidates: id, parent, status, validation metrics, epsilon and the gate's reason."""
    from rich import box
    from rich.table import Table

    from feddistill.server.gate import PROMOTED, ReleaseError, load_index

    try:
        history = load_index(run_dir)
    except ReleaseError as exc:
        _fail(str(exc))
    table = Table(
        title=f"Releases of {run_dir} (* = released now: {history.current})",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 0, 0, 1),
    )
    for col in ("id", "rnd", "parent", "status", "val acc", "val ECE", "agree", "test acc", "T", "eps"):
        table.add_column(col, justify="left" if col in ("id", "parent", "status") else "right", no_wrap=True)

    def num(x: object, fmt: str = "{:.3f}") -> str:
        return "-" if x is None or x != x else fmt.format(x)

    for r in history.releases:
        mark = "*" if r.id == history.current else ""
        style = "green" if r.status == PROMOTED else "yellow"
        table.add_row(
            r.id + mark,
            str(r.round),
            r.parent or "-",
            f"[{style}]{r.status}[/]",
            num(r.validation.get("accuracy")),
            num(r.validation.get("ece")),
            num(r.validation.get("agreement")),
            num(r.test.get("accuracy")),
            num((r.calibration or {}).get("temperature"), "{:.2f}"),
            num(r.client_epsilon),
        )
    console.print(table)
    console.print(
        "val = held-out labelled public data; T = calibration temperature; eps = client-level epsilon "
        "when the candidate was made (delta, accountant: results.json); the gate's reasons:"
    )
    for r in history.releases:
        console.print(f"  {r.id}: {r.reason}", soft_wrap=True, markup=False)


@cli.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished feddistill run's folder."),
    release: str = typer.Option(
        ..., "--release", "-r", help="Release id (see `feddistill releases RUN_DIR`), e.g. r0003."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Export folder (default RUN_DIR/exports/ID)."),
    latency_runs: int = typer.Option(200, "--latency-runs", min=1, help="Timed batch-1 forward passes per form."),
) -> None:
    """Export a released student for devices: TorchScript fp32 and int8 (dynamic quantization) + export.json."""
    from feddistill.data import DataError
    from feddistill.export import META_FILE, export_release
    from feddistill.runfolder import RunFolder, RunFolderError
    from feddistill.server.gate import ReleaseError

    try:
        meta = export_release(run_dir, release, out, latency_runs=latency_runs)
    except (ReleaseError, ConfigError, DataError, RunFolderError) as exc:
        _fail(str(exc))
    target = out if out is not None else RunFolder(run_dir).export(release)
    for name, form in meta["forms"].items():
        lat = form["latency"]
        console.print(
            f"{name}: {target / form['file']}  {form['bytes'] / 1000:.1f} KB, test acc "
            f"{form['test_accuracy']:.3f} (delta vs fp32 {form['accuracy_delta_vs_fp32']:+.3f}), "
            f"latency p50 {lat['p50_ms']:.3f} ms / p95 {lat['p95_ms']:.3f} ms (batch 1, CPU)"
        )
    console.print(f"metadata: {target / META_FILE}")


@cli.command()
def report(
    run_dir: Path = typer.Argument(..., help="A finished feddistill run's folder (with results.json)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="HTML file (default RUN_DIR/report.html)."),
) -> None:
    """A self-contained HTML run report: accuracy, epsilon, bytes, drops, releases, drift, calibration, audit."""
    _require("feddistill report", "plots")
    from feddistill.report import ReportError, write_html_report

    try:
        path = write_html_report(run_dir, out)
    except ReportError as exc:
        _fail(str(exc))
    console.print(f"report: {path}")


def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
