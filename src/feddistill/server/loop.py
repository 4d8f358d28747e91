"""The federated-distillation round loop (docs/design.md, round protocol steps 0-4), owned once by `DistillationRun`.

0. public teacher -> round 0's teacher signal on the reference set;
1. the strategy samples clients and sends each the teacher signal on the round's
   queries, the round config and the reference-set digest;
2. clients digest, revisit and answer (see ``feddistill.client.distill``);
3. the strategy validates the replies and aggregates them into the new teacher
   signal for those queries;
4. the server distils the global student from the teacher signal on the
   reference set (FedDF: Lin et al. 2020, "Ensemble Distillation for Robust
   Model Fusion in Federated Learning") and evaluates it on the test split;
   the gate (``feddistill.server.gate``) releases it or keeps the last release,
   and the drift of the teacher signal is measured (``feddistill.server.drift``).

``feddistill.server.app`` wires this loop into Flower's ServerApp.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from feddistill import protocol
from feddistill.config import RunConfig, abstains
from feddistill.data.fleet import Fleet, as_tensors, load_fleet
from feddistill.deploy.download_signing import sign_download
from feddistill.models import build_model, count_parameters
from feddistill.privacy.ledger import PrivacyLedger
from feddistill.privacy.mechanisms import noise_rng
from feddistill.privacy.plan import RunPrivacy, UploadPrivacy, check_devices_noise_source, noise_seed, run_privacy
from feddistill.runfolder import FinalBlock, RoundRecord, RunFolder, prepare_run_folder
from feddistill.server.checkpoint import (
    ServerState,
    journal_round,
    journaled_rounds_after,
    load_checkpoint,
    save_checkpoint,
)
from feddistill.server.consensus import FleetLabels, select_queries
from feddistill.server.control import PublicLabels, distil_step, private_gain, round_seed
from feddistill.server.drift import drift_alert, per_class_accuracy, signal_kl
from feddistill.server.gate import Predictions, ReleaseHistory, Releaser
from feddistill.server.nodes import identify_nodes, wait_for_nodes
from feddistill.server.outputs import (
    privacy_report,
    save_audit_setup,
    save_privacy_plan,
    save_released_signal,
    save_reliability,
    save_secagg_sum,
    save_student,
    save_uploads,
    write_json,
)
from feddistill.server.public import public_control_of, public_labels, teacher_and_validation, validation_labels
from feddistill.strategies import (
    AnswerStrategy,
    CentralGaussianAnswers,
    GNMaxVotes,
    ReplyCheck,
    RoundReplies,
    make_strategy,
    teacher_arrays,
)
from feddistill.training import Evaluation, evaluate_probs, predict_logits

log = logging.getLogger("feddistill")


class SamplingHook(Protocol):
    """A say in whom each round may sample, installed by a simulation (the label-shift scenario,
    ``feddistill.simulations.shift.LabelShift``); the production ServerApp installs none."""

    def start(self, fleet: Fleet, devices: set[int]) -> None:
        """Once the nodes are known (``devices``: the client ids of real devices); may refuse the run."""

    def eligible(self, rnd: int) -> Collection[int]:
        """The client (partition) ids round ``rnd`` may sample."""
        ...

    def population(self, rnd: int) -> str | None:
        """What results.json records as round ``rnd``'s ``population`` (None: nothing)."""
        ...


@dataclass
class RoundOutcome:
    """What one round has produced so far, phase by phase; its results.json record is made of it."""

    round: int
    started: float  # time.monotonic() at the start of the round
    queries: np.ndarray | None = None
    messages: list[Message] | None = None
    over_budget: int = 0
    new_signal: np.ndarray | None = None  # the aggregated answers on the queries (None: no answer)
    collected: RoundReplies | None = None
    answered_queries: int = 0
    teacher_accuracy: float | None = None
    previous_signal: np.ndarray | None = None  # the teacher signal before this round's answers
    fleet_before: np.ndarray | None = None  # rows whose training signal was already the fleet's before this round
    evaluation: Evaluation | None = None
    test_probs: np.ndarray | None = None
    predictions: Predictions | None = None
    agreement: float | None = None
    drift_kl: float | None = None
    drift_alert: str | None = None
    release: dict[str, Any] | None = None
    dropped_clients: list[int] | None = None  # sent the download, answer not kept (lost, refused or rejected)


class DistillationRun:
    """One federated-distillation run: its state lives in attributes, its loop in phases.

    Like Flower's ``Strategy.start()``, :meth:`run` owns the loop once: :meth:`setup`, then
    :meth:`restore` (resume from the checkpoint) or :meth:`round_zero` (the student of the
    public teacher alone), :meth:`connect` the nodes, and per round :meth:`play_round`
    (sample -> charge the budget -> collect -> update the teacher signal -> distil -> gate ->
    record) followed by :meth:`checkpoint`; :meth:`finish` writes results.json. Every seed and
    every draw of the three generators (strategy, query, noise) comes in the same order as
    the round's steps, so a seeded run, and a resumed one, gives the same numbers.
    """

    def __init__(self, grid: Grid, cfg: RunConfig, resume: bool = False, sampling: SamplingHook | None = None) -> None:
        if cfg.scenario.shift_round and sampling is None:
            raise RuntimeError(
                "scenario.shift-round is a simulation scenario that this ServerApp does not install: "
                "run it with `feddistill simulate`"
            )
        self.grid, self.cfg, self.resume, self.sampling = grid, cfg, resume, sampling
        self.rounds: list[dict[str, Any]] = []
        self.start = 1  # the first round to play
        self.stop_reason: str | None = None

    def run(self) -> dict[str, Any]:
        """Every phase in order; the results.json content."""
        self.setup()
        if self.resume:
            self.restore()
        else:
            self.round_zero()
        self.connect()
        for rnd in range(self.start, self.cfg.rounds + 1):
            if not self.play_round(rnd):
                break
            self.checkpoint(rnd)
        return self.finish()

    # -- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        """The run folder, the data and public teacher, the privacy plan, the loop's state."""
        # never into another run's folder (its clients' states and ledgers would mix into this run)
        self.out = prepare_run_folder(self.cfg.output_dir, resume=self.resume)
        self.folder = RunFolder(self.out)
        if not self.resume:
            write_json(self.folder.config, self.cfg.to_dict())  # what `feddistill simulate --resume` reads back
        self._load_data()
        self._plan_privacy()
        self._init_state()

    def _load_data(self) -> None:
        cfg = self.cfg
        self.fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
        self.splits = self.fleet.splits
        self.ref_x, _ = as_tensors(self.splits.reference)
        self.test_x, _ = as_tensors(self.splits.test)
        self.num_classes = self.fleet.num_classes
        if cfg.audit.keep_artifacts:
            save_audit_setup(self.folder, cfg)
        self.teacher, self.validation = teacher_and_validation(cfg, self.splits)
        log.info("public teacher (%s): test accuracy %.3f", cfg.teacher.model, self.teacher.test.accuracy)
        self.signal = self.teacher.reference_probs.copy()
        # Round 0: the global student distilled from the public teacher alone.
        self.student = self.build_student()
        self.public = public_labels(cfg, self.splits)
        self.held = validation_labels(cfg, self.splits)  # calibrates the consensus gate; never trained on

    def _plan_privacy(self) -> None:
        self.privacy = run_privacy(self.cfg)  # derived once: every noise multiplier calibrated here
        save_privacy_plan(self.folder, self.privacy)
        self.plan = self.privacy.upload
        # the server's own DP noise (central, GNMax): seeded only in a seeded simulation
        self.noise = noise_rng(noise_seed(self.cfg, self.cfg.seed + 2, device=False))
        self.strategy = build_strategy(self.cfg, self.plan, self.noise)
        self.ledger = client_ledger(self.plan)

    def _init_state(self) -> None:
        cfg, d = self.cfg, self.cfg.distill
        self.participations: dict[int, int] = {}  # local mode: how often each node has answered
        self.devices: dict[int, dict[str, float]] = {}  # record-level ledgers reported by devices
        # client -> rounds it was sent since its last kept answer: it may have trained (and charged its
        # ledger) in them without its report reaching us, e.g. killed after training (see note_dropouts)
        self.unconfirmed: dict[int, list[int]] = {}
        self.query_rng = np.random.default_rng(cfg.seed + 1)
        self.fleet_labels = FleetLabels(len(self.signal), self.num_classes, d.fleet_labels, d.consensus_precision)
        self.accepted = np.zeros(len(self.signal), dtype=bool)  # rows whose training label is the fleet's
        val_x, _ = as_tensors(self.validation)
        self.releaser = Releaser(
            self.out,
            cfg,
            reference_digest=self.splits.reference_digest,
            model_name=d.server_student,
            validation=(val_x, self.validation.y),
            reference_x=self.ref_x,
            test=(self.test_x, self.splits.test.y),
        )

    def build_student(self):
        """A fresh global student, with the run's seeded initial weights."""
        return build_model(self.cfg.distill.server_student, self.fleet.image_size, self.num_classes, seed=self.cfg.seed)

    def distil_student(self, rnd: int) -> None:
        # the same step, with the same seeds, as the public-only control (feddistill.server.control)
        distil_step(
            self.student,
            self.ref_x,
            self.signal,
            self.cfg,
            round_seed(self.cfg, rnd),
            public=self.public,
            fleet_rows=np.flatnonzero(self.accepted),
        )

    def client_epsilon(self) -> float | None:
        return None if self.ledger is None else self.ledger.epsilon()

    # -- resume or round 0 ---------------------------------------------------------------

    def restore(self) -> None:
        """Resume: the state of the last checkpointed round, each generator where it stopped."""
        state = load_checkpoint(self.out, self.cfg.digest())
        self.signal, self.rounds, self.devices, self.participations = (
            state.signal,
            state.rounds,
            state.devices,
            state.participations,
        )
        self.student.load_state_dict(state.student)
        self.public_only = Evaluation(**state.public_only)
        for name, gen in (("strategy", self.strategy.rng), ("query", self.query_rng), ("noise", self.noise)):
            gen.bit_generator.state = state.rng[name]
        if self.ledger is not None and state.ledger_json is not None:
            self.ledger = PrivacyLedger.from_json(state.ledger_json)
        if "releases" in state.extra:
            self.releaser.history = ReleaseHistory.from_dict(state.extra["releases"])
            self.releaser.released_state = state.extra["released_state"]
            self.releaser.released_temperature = state.extra["released_temperature"]
            self.fleet_labels.restore(state.extra["fleet_labels"])
            self.accepted = fleet_accepted(self.fleet_labels, self.held)
        self.unconfirmed = state.extra.get("unconfirmed", {})
        if self.ledger is not None and self.plan.mode == "local":
            for rnd in journaled_rounds_after(self.out, state.round):  # answers that may have reached us
                self.ledger.record(self.plan.event(), rnd, sensitivity=self.plan.sensitivity)
        self.start = state.round + 1
        log.info("resumed from %s after round %d", self.folder.checkpoint, state.round)

    def round_zero(self) -> None:
        """The student of the public teacher alone: the public-only student and release r0000."""
        self.distil_student(0)
        self.public_only, _, predictions = evaluate_student(self.student, self.test_x, self.splits.test.y, self.ref_x)
        log.info("round 0 (public teacher only): student accuracy %.3f", self.public_only.accuracy)
        self.releaser.consider(
            0,
            self.student,
            self.signal,
            test_metrics=self.public_only.to_dict(),
            client_epsilon=self.client_epsilon(),
            record_epsilon=None,
            build=self.build_student,
            predictions=predictions,
        )

    def connect(self) -> None:
        """Wait for the nodes, learn which client each serves, fix the sampling order."""
        cfg = self.cfg
        self.nodes = wait_for_nodes(self.grid, cfg.fleet.num_clients, cfg.simulation.node_wait_timeout)
        # Node ids are new in every run; partition ids are not. Sampling in partition order makes a
        # seeded run (and a resumed one) pick the same clients.
        self.devices_seen: set[int] = set()
        self.node_partition = identify_nodes(
            self.grid, self.nodes, cfg.simulation.round_timeout, devices=self.devices_seen
        )
        check_devices_noise_source(cfg, len(self.devices_seen))  # devices refuse seeded noise: one clear error, now
        self.strategy.node_order = sorted(self.nodes, key=lambda n: self.node_partition[n])
        self.all_nodes = list(self.strategy.node_order)
        if self.sampling is not None:
            self.sampling.start(self.fleet, self.devices_seen)

    # -- one round -----------------------------------------------------------------------

    def play_round(self, rnd: int) -> bool:
        """One round, phase by phase; False, and nothing played, when the client-level budget is spent."""
        r = RoundOutcome(round=rnd, started=time.monotonic())
        if self.budget_spent(rnd):
            return False
        self.sample(r)
        self.charge_budget(r)
        self.collect(r)
        self.update_signal(r)
        self.distil(r)
        self.watch_drift(r)
        self.gate(r)
        self.record(r)
        return True

    def budget_spent(self, rnd: int) -> bool:
        """Central noise: would this round raise the client-level epsilon above the target?"""
        ledger, plan = self.ledger, self.plan
        if ledger is None or plan.mode == "local" or ledger.can_afford(plan.event()):
            return False
        self.stop_reason = (
            f"client-level budget: round {rnd} would raise epsilon from {ledger.epsilon():.3f} to "
            f"{ledger.epsilon_if(plan.event()):.3f} > target {ledger.target_epsilon} (delta={ledger.delta})"
        )
        log.warning("stopping before round %d: %s", rnd, self.stop_reason)
        return True

    def sample(self, r: RoundOutcome) -> None:
        """The round's queries, and a download message to each client the strategy samples."""
        cfg, d = self.cfg, self.cfg.distill
        if self.sampling is not None:
            eligible = set(self.sampling.eligible(r.round))
            self.strategy.node_order = [n for n in self.all_nodes if self.node_partition[n] in eligible]
        margin = reference_margin(self.student, self.ref_x) if d.query_selection == "uncertain" else None
        r.queries = select_queries(self.query_rng, d.query_size, d.query_selection, margin, self.accepted)
        download = teacher_arrays(
            self.signal[r.queries], r.queries, self.student.state_dict() if d.client_start == "global" else None
        )
        config = round_config(cfg, self.splits.reference_digest, self.privacy)
        if cfg.security.signing_key:
            sign_download(config, download, key_path=cfg.security.signing_key, rnd=r.round, run_id=self.grid.run.run_id)
        r.messages = list(self.strategy.configure_train(r.round, download, config, self.grid))

    def charge_budget(self, r: RoundOutcome) -> None:
        """Charge the round when it is sent: a client that drops still counts."""
        if self.ledger is None:
            return
        if self.plan.mode == "local":
            journal_round(self.out, r.round)
            r.messages, r.over_budget = charge_local(
                r.messages, self.participations, self.node_partition, self.ledger, self.plan, r.round
            )
        else:
            self.ledger.record(self.plan.event(), r.round, sensitivity=self.plan.sensitivity)

    def collect(self, r: RoundOutcome) -> None:
        """Send, receive and aggregate the answers (kept for the auditor when asked)."""
        cfg = self.cfg
        if cfg.distill.secure_aggregation != "off":  # Flower's SecAgg+: the server receives only the survivors' sum
            from feddistill.server.secagg import secagg_round

            r.new_signal, r.collected = secagg_round(
                self.grid, r.messages, cfg, r.round, self.node_partition, strategy=self.strategy
            )
            if r.collected.aggregate is not None:  # the server's own view, kept like its checkpoint
                save_secagg_sum(self.folder.secagg_sum(r.round), r.queries, r.collected)
        else:
            replies = (
                list(self.grid.send_and_receive(r.messages, timeout=cfg.simulation.round_timeout)) if r.messages else []
            )
            r.new_signal, r.collected = self.strategy.aggregate_round(replies, self.reply_check(r.round))
            count_silent(r.collected, r.messages, replies, r.round)
        if cfg.audit.keep_artifacts:
            save_uploads(self.folder.upload(r.round), r.queries, r.collected)
        if r.new_signal is not None:  # what this round releases: the deployment audit's input
            save_released_signal(self.folder.released_signal(r.round), r.queries, r.new_signal)
        record_device_epsilons(self.devices, r.collected)
        self.note_dropouts(r)

    def note_dropouts(self, r: RoundOutcome) -> None:
        """Who was sent the round's download and whose answer was not kept, by client id; and, for
        the record-level report, the rounds since each client's last kept answer."""
        assert r.messages is not None and r.collected is not None
        sent = {self.node_partition[m.metadata.dst_node_id] for m in r.messages}
        kept = set(r.collected.senders)
        r.dropped_clients = sorted(sent - kept)
        for client in kept:  # its report covers every round it trained in before this one
            self.unconfirmed.pop(client, None)
        for client in r.dropped_clients:
            self.unconfirmed.setdefault(client, []).append(r.round)

    def reply_check(self, rnd: int) -> ReplyCheck:
        """The reply schema of this round, from the privacy plan; senders are Flower node ids."""
        cfg, d = self.cfg, self.cfg.distill
        return ReplyCheck.from_plan(
            self.plan,
            round=rnd,
            digest=self.splits.reference_digest,
            num_queries=d.query_size,
            num_classes=self.num_classes,
            votes=d.answer_dtype == "vote",
            record_level=cfg.privacy.record_level,
            nodes=self.node_partition,
            abstain=abstains(cfg),
        )

    def update_signal(self, r: RoundOutcome) -> None:
        """The answered queries into the teacher signal; the rows whose training label is the fleet's."""
        new_signal, queries = r.new_signal, r.queries
        r.previous_signal = self.signal.copy()
        # "answered": every answered row; "consensus": the accepted rows (a row entering the
        # consensus swaps the teacher's soft label for the fleet's hard one: by design, not drift)
        r.fleet_before = self.accepted.copy()
        if new_signal is not None:
            answered = np.isfinite(new_signal).all(axis=1)  # Confident-GNMax leaves some unanswered
            r.answered_queries = int(answered.sum())
            self.signal[queries[answered]] = new_signal[answered]
            self.fleet_labels.add(queries[answered], new_signal[answered])
            if answered.any():
                r.teacher_accuracy = float(
                    (new_signal[answered].argmax(1) == self.splits.reference.y[queries[answered]]).mean()
                )
        self.accepted = fleet_accepted(self.fleet_labels, self.held)
        self.fleet_labels.apply(self.signal, self.teacher.reference_probs, self.accepted)

    def distil(self, r: RoundOutcome) -> None:
        """Distil the global student from the teacher signal and evaluate it."""
        self.distil_student(r.round)
        r.evaluation, r.test_probs, r.predictions = evaluate_student(
            self.student, self.test_x, self.splits.test.y, self.ref_x
        )
        r.agreement = float((r.predictions.reference_labels == self.signal.argmax(1)).mean())

    def watch_drift(self, r: RoundOutcome) -> None:
        """KL of the teacher signal against the previous round's; an alert above the threshold."""
        # drift: only rows whose previous value was already the fleet's (a row's first answer
        # replaces the public teacher's opinion: a change by design, not drift)
        compared = r.fleet_before & self.accepted & np.any(self.signal != r.previous_signal, axis=1)
        r.drift_kl = signal_kl(self.signal[compared], r.previous_signal[compared]) if compared.any() else None
        r.drift_alert = drift_alert(r.drift_kl, self.cfg.drift.kl_threshold)
        if r.drift_alert:
            log.warning("round %d: %s", r.round, r.drift_alert)

    def gate(self, r: RoundOutcome) -> None:
        """The release gate: release the round's student, or keep the last release."""
        record_epsilon = max((m["record-epsilon"] for m in self.devices.values()), default=None)
        r.release = self.releaser.consider(
            r.round,
            self.student,
            self.signal,
            test_metrics=r.evaluation.to_dict(),
            client_epsilon=self.client_epsilon(),
            record_epsilon=record_epsilon,
            build=self.build_student,
            predictions=r.predictions,
        )
        if not r.release["promoted"]:
            log.warning("round %d: candidate %s not released: %s", r.round, r.release["candidate"], r.release["reason"])

    def record(self, r: RoundOutcome) -> None:
        """The round's results.json record, and its log line."""
        record = self.round_record(r)
        self.rounds.append(record)
        log.info(
            "round %d/%d: %d clients, %d answers, teacher signal acc %s, student acc %.3f, %d bytes up%s, %.1f s",
            r.round,
            self.cfg.rounds,
            len(r.messages),
            r.collected.num_replies,
            "-" if r.teacher_accuracy is None else f"{r.teacher_accuracy:.3f}",
            r.evaluation.accuracy,
            r.collected.bytes_uploaded,
            "" if self.ledger is None else f", client-level eps {self.ledger.epsilon():.3f}",
            record["seconds"],
        )

    def round_record(self, r: RoundOutcome) -> dict[str, Any]:
        ev, collected = r.evaluation, r.collected
        return RoundRecord(
            round=r.round,
            clients=len(r.messages),
            replies=collected.num_replies,
            dropped=collected.dropped,
            dropped_clients=r.dropped_clients,
            over_budget_skipped=r.over_budget,
            answered_queries=r.answered_queries,
            fleet_labelled_rows=int(self.accepted.sum()),  # reference rows whose training label is the fleet's
            consensus_threshold=self.fleet_labels.threshold,
            teacher_accuracy=r.teacher_accuracy,
            student_accuracy=ev.accuracy,
            student_nll=ev.nll,
            student_ece=ev.ece,
            agreement=r.agreement,
            per_class_accuracy=per_class_accuracy(r.test_probs, self.splits.test.y, self.num_classes),
            drift_kl=r.drift_kl,
            drift_alert=r.drift_alert,
            release=r.release,
            released_accuracy=self.releaser.history.current_release.test["accuracy"],
            bytes_uploaded=collected.bytes_uploaded,
            client_epsilon=self.client_epsilon(),
            seconds=time.monotonic() - r.started,
            population=None if self.sampling is None else self.sampling.population(r.round),
        ).to_dict()

    # -- checkpoint ----------------------------------------------------------------------

    def checkpoint(self, rnd: int) -> None:
        """Everything a killed server needs to resume after round `rnd` (feddistill.server.checkpoint)."""
        save_checkpoint(
            self.out,
            self.cfg.digest(),
            ServerState(
                round=rnd,
                signal=self.signal,
                student=self.student.state_dict(),
                rng={
                    "strategy": self.strategy.rng.bit_generator.state,
                    "query": self.query_rng.bit_generator.state,
                    "noise": self.noise.bit_generator.state,
                },
                ledger_json=None if self.ledger is None else self.ledger.to_json(),
                participations=self.participations,
                devices=self.devices,
                rounds=self.rounds,
                public_only=self.public_only.__dict__,
                extra={
                    **self.releaser.checkpoint_state(),
                    "fleet_labels": self.fleet_labels.state(),
                    "unconfirmed": self.unconfirmed,
                },
            ),
        )

    # -- finish --------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """The public-only control, results.json, the deployed student and its reliability diagram."""
        if not self.rounds:
            raise RuntimeError(f"no round could run: {self.stop_reason}")
        control = public_control_of(
            self.cfg,
            self.build_student,
            self.teacher.reference_probs,
            self.ref_x,
            self.test_x,
            self.splits.test.y,
            self.rounds[-1]["round"],
            self.public,
        )
        results = self.results(control)
        write_json(self.folder.results, results)
        # what devices deploy: the last promoted release (with its calibration temperature)
        history = self.releaser.history
        save_student(
            self.releaser.released_model(self.build_student),
            self.folder.global_student,
            self.cfg,
            release=history.current,
            temperature=self.releaser.released_temperature,
        )
        if results["calibration"] is not None:
            save_reliability(results["calibration"], self.folder.reliability_plot, history.current)
        return results

    def results(self, control: dict[str, Any]) -> dict[str, Any]:
        """results.json: the config, the public baselines, every round, the final block, privacy."""
        cfg, rounds = self.cfg, self.rounds
        return {
            "method": "feddistill",
            "config": cfg.to_dict(),
            "config_digest": cfg.digest(),
            "reference_digest": self.splits.reference_digest,
            "num_nodes": len(self.nodes),
            "public_teacher": {"model": cfg.teacher.model, **self.teacher.test.to_dict("test_")},
            "public_only_student": self.public_only.to_dict("test_"),
            "student": {"model": cfg.distill.server_student, "parameters": count_parameters(self.student)},
            "rounds": rounds,
            "final": self.final(control),
            "baselines": {"public_control": control},
            "stop_reason": self.stop_reason,
            "validation": {
                "split": "held-out part of the labelled public sample (never private, never test)",
                "size": len(self.validation),
            },
            "releases": self.releaser.history.to_dict(),
            "calibration": self.releaser.history.current_release.calibration,
            "drift": {
                "kl_threshold": cfg.drift.kl_threshold,
                "alerts": [{"round": r["round"], "alert": r["drift_alert"]} for r in rounds if r["drift_alert"]],
            },
            "privacy": privacy_report(cfg, self.privacy, self.ledger, self.devices, self.unconfirmed),
            # simulation only: real devices' private labels are theirs alone (nobody knows the split)
            "label_histograms": None if self.devices_seen else self.fleet.label_histograms().tolist(),
        }

    def final(self, control: dict[str, Any]) -> dict[str, Any]:
        """results.json's "final" block: the last round's student, the release, the bytes, the gain."""
        rounds, last = self.rounds, self.rounds[-1]
        answered = [r for r in rounds if r["replies"]]
        return FinalBlock(
            student_accuracy=last["student_accuracy"],
            student_nll=last["student_nll"],
            student_ece=last["student_ece"],
            agreement=last["agreement"],
            released_id=self.releaser.history.current,
            released_accuracy=self.releaser.history.current_release.test["accuracy"],
            bytes_uploaded_total=sum(r["bytes_uploaded"] for r in rounds),
            bytes_per_client_round=(
                sum(r["bytes_uploaded"] for r in answered) / max(1, sum(r["replies"] for r in answered))
            ),
            fleet_labelled_rows=last["fleet_labelled_rows"],
            public_control_accuracy=control["accuracy"],
            private_gain=private_gain(last["student_accuracy"], control["accuracy"]),
            gap_closed=None,  # needs the centralized baseline: filled in by `feddistill simulate`
        ).to_dict()


def round_config(cfg: RunConfig, digest: str, privacy: RunPrivacy) -> ConfigRecord:
    """What every client of a round is told: the reference digest, the privacy plan, training settings."""
    d = cfg.distill
    return ConfigRecord(
        {
            protocol.DIGEST: digest,
            protocol.PRIVACY_PLAN: privacy.to_json(),
            "student-model": d.server_student,
            "temperature": d.temperature,
            "digest-epochs": d.digest_epochs,
            "revisit-epochs": d.revisit_epochs,
            "revisit-kd-weight": d.revisit_kd_weight,
            "batch-size": d.batch_size,
            "lr": d.lr,
            "momentum": d.momentum,
            "answer-dtype": d.answer_dtype,
        }
    )


def build_strategy(cfg: RunConfig, plan: UploadPrivacy, noise: np.random.Generator) -> AnswerStrategy:
    """The configured aggregator, wrapped or replaced by the configured DP mechanism."""
    common = dict(sampling_rate=cfg.fleet.fraction, sampling=cfg.fleet.sampling, seed=cfg.seed)
    if plan.mode == "gnmax":
        return GNMaxVotes(**common, sigma=plan.noise_std, noise_rng=noise)
    if plan.mode == "confident-gnmax":
        return GNMaxVotes(
            **common,
            sigma=plan.noise_std,
            noise_rng=noise,
            threshold=cfg.privacy.gnmax_threshold,
            sigma_threshold=plan.threshold_std,
        )
    inner = make_strategy(
        cfg.distill.aggregator,
        era_temperature=cfg.distill.era_temperature,
        trim_beta=cfg.distill.trim_beta,
        keep_fraction=cfg.distill.keep_fraction,
        probabilities=cfg.privacy.bound != "clipped_logits",
        abstain=abstains(cfg),
        **common,
    )
    if plan.mode == "central":
        expected = cfg.fleet.fraction * cfg.fleet.num_clients
        return CentralGaussianAnswers(inner, noise_std=plan.noise_std, expected_clients=expected, rng=noise)
    return inner


def client_ledger(plan: UploadPrivacy) -> PrivacyLedger | None:
    if plan.mode == "off":
        return None
    return PrivacyLedger(
        unit="client",
        delta=plan.delta,
        target_epsilon=plan.target_epsilon,
        mechanism=plan.mechanism,
        neighbouring=plan.neighbouring,
    )


def charge_local(messages, participations, node_partition, ledger, plan, rnd):
    """Local noise: a client's epsilon composes its own answers (q = 1 each). Clients whose next
    answer would exceed the target are not asked; the ledger tracks the most-used client."""
    kept, skipped = [], 0
    worst = max(participations.values(), default=0)
    for msg in messages:
        pid = node_partition[msg.metadata.dst_node_id]
        count = participations.get(pid, 0) + 1
        if ledger.target_epsilon is not None and count > worst and not ledger.can_afford(plan.event()):
            skipped += 1
            continue
        participations[pid] = count
        if count > worst:
            ledger.record(plan.event(), rnd, sensitivity=plan.sensitivity)
            worst = count
        kept.append(msg)
    if skipped:
        log.warning(
            "round %d: %d sampled clients skipped: their next answer would exceed the client-level target", rnd, skipped
        )
    return kept, skipped


def count_silent(collected: RoundReplies, messages: list[Message], replies: list[Message], rnd: int) -> None:
    """Count, under "no reply", the clients sent the download that sent nothing back before the
    round timed out (a device killed mid-round: Flower reports no error while its node is still
    counted online), so that replies plus dropped always add up to the clients sent the round."""
    # by message id: Flower's own error replies ("node unavailable") come from the SuperLink's node id
    answered_ids = {reply.metadata.reply_to_message_id for reply in replies}
    answered_nodes = {reply.metadata.src_node_id for reply in replies}
    for msg in messages:
        sent_id = msg.metadata.message_id
        if not (sent_id in answered_ids if sent_id else msg.metadata.dst_node_id in answered_nodes):
            collected.drop("no reply: nothing came back before the round timeout", msg.metadata.dst_node_id, rnd)


def record_device_epsilons(devices: dict[int, dict[str, float]], collected: RoundReplies) -> None:
    """Update the per-device record-level ledger values (results.json `privacy.record_level.devices`)
    from this round's validated replies. Keyed by the client id the sender's Flower node id maps
    to, so no node can write another's entry; a device's epsilon only grows, so its entry keeps
    the largest it ever reported (a later, lower report cannot lower the worst-device epsilon)."""
    for client, metrics in zip(collected.senders, collected.metrics):
        epsilon = metrics.get(protocol.RECORD_EPSILON)
        if epsilon is None:
            continue
        previous = devices.get(client, {}).get(protocol.RECORD_EPSILON)
        devices[client] = {protocol.RECORD_EPSILON: epsilon if previous is None else max(previous, epsilon)}


def evaluate_student(student, test_x, test_y: np.ndarray, ref_x) -> tuple[Evaluation, np.ndarray, Predictions]:
    """The student's test metrics and test probabilities, plus the outputs the release gate
    reuses: one inference pass over the test and reference sets per round, not three."""
    from feddistill.calibration import softmax

    test_logits = predict_logits(student, test_x).numpy()
    test_probs = softmax(test_logits)
    reference_labels = predict_logits(student, ref_x).numpy().argmax(1)
    return evaluate_probs(test_probs, test_y), test_probs, Predictions(reference_labels, test_logits)


def fleet_accepted(fleet_labels: FleetLabels, held: PublicLabels) -> np.ndarray:
    """Rows whose fleet label the student trains on; the validation rows never (they judge it)."""
    accepted = fleet_labels.accepted(held.rows, held.labels)
    accepted[held.rows] = False
    return accepted


def reference_margin(student, ref_x) -> np.ndarray:
    """The student's top-1 minus top-2 probability on every reference row (public)."""
    from feddistill.calibration import softmax

    probs = np.sort(softmax(predict_logits(student, ref_x).numpy()), axis=1)
    return probs[:, -1] - probs[:, -2]
