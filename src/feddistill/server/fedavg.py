"""Peer baseline: Flower's own FedAvg on the same fleet, rounds and student.

McMahan et al. (2017). The student starts from public pretraining on the
labelled public set (``baselines.fedavg-init = "public"``) so that a win of the
distillation method over FedAvg is the method's, not the public data's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from feddistill.config import RunConfig
from feddistill.data.fleet import as_tensors, load_fleet
from feddistill.models import build_model, count_parameters
from feddistill.privacy.accounting import GaussianEvent, noise_multiplier_for_epsilon
from feddistill.privacy.ledger import PrivacyLedger
from feddistill.runfolder import FinalBlock, PrivacyReport, RoundRecord, RunFolder
from feddistill.server.nodes import wait_for_nodes
from feddistill.server.outputs import write_json
from feddistill.training import evaluate_model, train_supervised

log = logging.getLogger("feddistill")


def dp_fedavg(strategy: FedAvg, cfg: RunConfig) -> tuple[DifferentialPrivacyServerSideFixedClipping, dict[str, Any]]:
    """Flower's DP-FedAvg (McMahan et al. 2018): server-side fixed clipping of client updates
    plus Gaussian noise, around the same FedAvg, with the same client-level epsilon target."""
    p = cfg.privacy
    q, rounds = cfg.fleet.fraction, cfg.rounds
    z = p.noise_multiplier or noise_multiplier_for_epsilon(p.target_epsilon, p.delta, q, rounds)
    sampled = max(1, int(q * cfg.fleet.num_clients))
    wrapped = DifferentialPrivacyServerSideFixedClipping(
        strategy, noise_multiplier=z, clipping_norm=cfg.baselines.dp_fedavg_clip, num_sampled_clients=sampled
    )
    ledger = PrivacyLedger(
        unit="client",
        delta=p.delta,
        target_epsilon=None,
        mechanism=f"DP-FedAvg (Flower server-side fixed clipping C={cfg.baselines.dp_fedavg_clip}, z={z:.4g})",
    )
    ledger.record(GaussianEvent(z, q, rounds), rounds)
    report = {
        **ledger.summary(),
        "epsilon_rdp": ledger.epsilon_rdp(),
        "client_sampling": (
            f"Flower's FedAvg samples a fixed {sampled} clients per round; the epsilon is computed "
            f"for Poisson sampling with the same rate q={q} (the usual approximation, not a proof "
            "for fixed-size sampling)"
        ),
    }
    return wrapped, report


def run_fedavg(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    splits = fleet.splits
    test_x, _ = as_tensors(splits.test)
    model = build_model(cfg.distill.server_student, fleet.image_size, fleet.num_classes, seed=cfg.seed)
    if cfg.baselines.fedavg_init == "public":
        x, y = as_tensors(splits.public_labelled)
        train_supervised(
            model, x, y, epochs=cfg.baselines.local_epochs, batch_size=cfg.distill.batch_size, lr=cfg.distill.lr
        )
    wait_for_nodes(grid, cfg.fleet.num_clients, cfg.simulation.node_wait_timeout)
    rounds: list[dict[str, Any]] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        ev = evaluate_model(model, test_x, splits.test.y)
        if server_round > 0:
            rounds.append(
                RoundRecord(
                    round=server_round, student_accuracy=ev.accuracy, student_nll=ev.nll, student_ece=ev.ece
                ).to_dict()
            )
            log.info("fedavg round %d/%d: accuracy %.3f", server_round, cfg.rounds, ev.accuracy)
        return MetricRecord(ev.to_dict())

    strategy = FedAvg(
        fraction_train=cfg.fleet.fraction,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=cfg.fleet.num_clients,
    )
    privacy = None
    if cfg.method == "dp-fedavg":
        strategy, privacy = dp_fedavg(strategy, cfg)
    initial = ArrayRecord(model.state_dict())
    model_bytes = sum(len(a.data) for a in initial.values())
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cfg.rounds,
        timeout=cfg.simulation.round_timeout,
        train_config=ConfigRecord(
            {
                "model": cfg.distill.server_student,
                "epochs": cfg.baselines.fedavg_local_epochs,
                "batch-size": cfg.distill.batch_size,
                "lr": cfg.distill.lr,
                "momentum": cfg.distill.momentum,
            }
        ),
        evaluate_fn=evaluate,
    )
    del result
    results = {
        "method": cfg.method,
        "privacy": PrivacyReport(client_level=privacy, record_level=None).to_dict(),
        "config": cfg.to_dict(),
        "init": cfg.baselines.fedavg_init,
        "student": {"model": cfg.distill.server_student, "parameters": count_parameters(model)},
        "rounds": rounds,
        "final": FinalBlock(
            student_accuracy=rounds[-1]["student_accuracy"] if rounds else None, bytes_per_client_round=model_bytes
        ).to_dict(),
    }
    write_json(RunFolder(out).results, results)
    return results
