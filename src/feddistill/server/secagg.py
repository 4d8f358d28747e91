"""Answer collection through Flower's SecAgg+ (``distill.secure-aggregation = "secagg+"``).

One round of answer collection runs through :class:`flwr.server.workflow.SecAggPlusWorkflow`
(Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead"),
unchanged, in its legacy ``fit`` layout:

- the server's download (teacher signal, queries, optionally the global student) travels
  as the FitIns ``parameters`` (array names in the config key :data:`ARRAY_NAMES`), the
  round config as the FitIns ``config``;
- each client runs ``secaggplus_mod`` (``feddistill.client.secagg``): its answers matrix,
  plus its noise share under distributed DP, is its FitRes ``parameters`` with weight
  ``num_examples = 1`` (and ``max_weight = 1``), so the unmasked result is the plain mean
  of the survivors' answers;
- four message rounds (setup, share keys, collect masked vectors, unmask) replace the
  one ``train.distill`` exchange; SecAgg+ recovers from clients that drop out after
  sharing their keys, as long as every survivor keeps ``reconstruction_threshold``
  live neighbours.

What the server learns: which sampled nodes survived and the mean of their answers,
quantized (each entry off by at most one step 2c/T). No single answer, so nothing
per reply can be validated (shape, range, finiteness) and no robust aggregator can
run: the config refuses aggregators other than ``mean``. The only per-client bound is
the one honest client code applies: every entry clipped to [-c, c] before
quantization; a client that deviates from the protocol can corrupt the sum undetected.
Plain-text metrics pass the same schema check as a plain reply's (at most a finite
``record-epsilon``, the device's record-level ledger value), and the sender is the client id
its Flower node id maps to, never a value the device declares.

The teacher signal is made from the mean by the round's strategy
(:meth:`~feddistill.strategies.AnswerStrategy.signal_from_mean`): :class:`~feddistill.strategies.MeanAnswers`'
rule for its one (already averaged) matrix; under ``gnmax`` the one-hot argmax of the noisy vote
counts, whose noise the clients added. The noise accounting is in :mod:`feddistill.privacy.distributed`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from feddistill import protocol
from feddistill.config import RunConfig
from feddistill.privacy.distributed import SecAggNoise, run_secagg_noise
from feddistill.strategies.base import AnswerStrategy, RoundReplies, tally
from feddistill.strategies.validation import Rejected, ReplyCheck, check_metrics

log = logging.getLogger("feddistill")

ARRAY_NAMES = protocol.SECAGG_ARRAY_NAMES
MASKED_ENTRY_BYTES = 8  # SecAgg+ masked vectors travel as int64


@dataclass
class SecAggReplies(RoundReplies):
    """A SecAgg+ round: the survivors (senders) but no single answer."""

    survivors: int = 0
    aggregate: np.ndarray | None = None  # the mean the server received (before the teacher-signal rule)
    halted: str | None = None
    bad_metrics: dict[str, int] = field(default_factory=dict)  # reason -> survivors whose plain-text metrics
    # were ignored (their masked answers are in the sum all the same)

    @property
    def num_replies(self) -> int:
        return self.survivors


class _CollectSum(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow drives: it hands out the round's FitIns to the nodes
    our strategy sampled and keeps the unmasked aggregate (every FitRes carries it)."""

    def __init__(self, proxies: list[GridClientProxy], fitins: FitIns) -> None:
        self.proxies = proxies
        self.fitins = fitins
        self.results: list[tuple[Any, FitRes]] | None = None
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return [(proxy, self.fitins) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = list(results), list(failures)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def download_fitins(message: Message) -> FitIns:
    """The legacy FitIns carrying a ``train.distill`` request's download and config."""
    teacher = message.content.array_records[protocol.TEACHER_RECORD]
    names = list(teacher.keys())
    config = dict(message.content.config_records[protocol.CONFIG_RECORD])
    config[ARRAY_NAMES] = json.dumps(names)
    return FitIns(ndarrays_to_parameters([teacher[n].numpy() for n in names]), config)


def make_workflow(cfg: RunConfig, noise: SecAggNoise) -> SecAggPlusWorkflow:
    d = cfg.distill
    return SecAggPlusWorkflow(
        num_shares=d.secagg_num_shares,
        reconstruction_threshold=d.secagg_reconstruction_threshold,
        max_weight=1.0,  # every client uploads with weight 1: the unmasked result is the plain mean
        clipping_range=float(noise.clipping_range),
        quantization_range=d.secagg_quantization_range,
        timeout=cfg.simulation.round_timeout,
    )


def secagg_round(
    grid: Grid,
    messages: list[Message],
    cfg: RunConfig,
    rnd: int,
    node_partition: dict[int, int],
    *,
    strategy: AnswerStrategy,
) -> tuple[np.ndarray | None, SecAggReplies]:
    """Collect one round's answers through SecAgg+; returns (teacher signal or None, what arrived).
    The signal is ``strategy``'s, made from the survivors' (noisy) mean alone."""
    out = SecAggReplies()
    if not messages:
        return None, out
    noise = run_secagg_noise(cfg)
    fitins = download_fitins(messages[0])  # every sampled node gets the same download
    run_id = grid.run.run_id
    proxies = [GridClientProxy(m.metadata.dst_node_id, grid, run_id) for m in messages]
    collector = _CollectSum(proxies, fitins)
    state = RecordDict(
        {MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd}), MAIN_PARAMS_RECORD: ArrayRecord()}
    )  # the workflow reads (and ignores) it
    context = LegacyContext(
        Context(run_id=run_id, node_id=0, node_config={}, state=state, run_config={}), strategy=collector
    )
    make_workflow(cfg, noise)(grid, context)
    sampled = len(messages)
    if collector.results is None:
        out.halted = (
            f"SecAgg+ halted: fewer than {cfg.distill.secagg_reconstruction_threshold} "
            "live clients (or fewer than 2 sampled)"
        )
        out.dropped = {"secagg halted": sampled}
        log.warning("round %d: %s; no teacher signal this round", rnd, out.halted)
        return None, out
    results = collector.results
    out.survivors = len(results)
    lost = sampled - out.survivors
    if lost:
        out.dropped["dropped out"] = lost
    survivor_metrics(out, results, cfg, rnd, node_partition)
    mean = parameters_to_ndarrays(results[0][1].parameters)[0]
    out.bytes_uploaded = out.survivors * (mean.size + 1) * MASKED_ENTRY_BYTES
    if out.survivors < noise.min_survivors:  # SecAgg+ enforces this too; the noise calibration relies on it
        out.halted = (
            f"{out.survivors} survivors < {noise.min_survivors} "
            "('distill.secagg-reconstruction-threshold'): the sum carries too little noise; not released"
        )
        log.warning("round %d: %s", rnd, out.halted)
        return None, out
    out.aggregate = mean
    return strategy.signal_from_mean(mean), out


def survivor_metrics(
    out: SecAggReplies, results: list[tuple[Any, FitRes]], cfg: RunConfig, rnd: int, node_partition: dict[int, int]
) -> None:
    """Senders and plain-text metrics of the survivors, by the same rule as a plain reply: the
    sender is the client id its Flower node id maps to (the proxy SecAgg+ talked to), and the
    metrics pass :func:`~feddistill.strategies.validation.check_metrics` (at most a finite
    `record-epsilon`). Bad metrics are ignored and logged; the masked answer is already in the
    sum and cannot be taken out."""
    check = ReplyCheck(rnd, "", cfg.distill.query_size, 1, record_level=cfg.privacy.record_level)
    for proxy, res in results:
        sender = node_partition[proxy.node_id]  # every proxy was made from a sampled, identified node
        try:
            epsilon = check_metrics(res.metrics, check)
        except Rejected as exc:
            epsilon, reason = None, str(exc)
            tally(out.bad_metrics, reason)
            log.warning("round %d: ignored the plain-text metrics of node %d: %s", rnd, proxy.node_id, reason)
        out.senders.append(sender)
        out.metrics.append({} if epsilon is None else {protocol.RECORD_EPSILON: epsilon})
        out.weights.append(1.0)


def secagg_report(cfg: RunConfig) -> dict[str, Any]:
    """results.json's account of the SecAgg+ settings and what they imply."""
    d = cfg.distill
    noise = run_secagg_noise(cfg)
    return {
        "protocol": "SecAgg+ (Flower SecAggPlusWorkflow / secaggplus_mod)",
        "num_shares": d.secagg_num_shares,
        "reconstruction_threshold": d.secagg_reconstruction_threshold,
        **noise.to_dict(),
        "server_sees": "which sampled nodes survived, and the quantized mean of their answers (no single answer)",
        "quantization": "stochastic rounding to step 2c/T after clipping to [-c, c]; the accountant treats the "
        "noise as the continuous Gaussian (shares span >= 100 steps)",
    }
