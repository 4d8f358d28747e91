"""The ServerApp: the federated-distillation round loop (DESIGN.md, steps 0-4).

0. public teacher -> round 0's teacher signal on the reference set;
1. the strategy samples clients and sends each the teacher signal on the round's
   queries, the round config and the reference-set digest;
2. clients digest, revisit and answer (see ``feddistill.client.app``);
3. the strategy validates the replies and aggregates them into the new teacher
   signal for those queries;
4. the server distils the global student from the teacher signal on the
   reference set (FedDF: Lin et al. 2020, "Ensemble Distillation for Robust
   Model Fusion in Federated Learning") and evaluates it on the test split;
   the gate (``feddistill.server.gate``) releases it or keeps the last release,
   and the drift of the teacher signal is measured (``feddistill.server.drift``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from feddistill import protocol
from feddistill.atomic import atomic_path
from feddistill.config import RunConfig, abstains, parse_config, validation_size
from feddistill.models import build_model, count_parameters
from feddistill.simulations.fleet import as_tensors, load_fleet
from feddistill.privacy.ledger import PrivacyLedger
from feddistill.privacy.mechanisms import noise_rng
from feddistill.privacy.plan import (
    NOISE_SOURCES,
    UploadPrivacy,
    check_devices_noise_source,
    client_noise_source,
    noise_seed,
    record_mechanism,
    upload_privacy,
)
from feddistill.strategies import (
    AnswerStrategy,
    CentralGaussianAnswers,
    GNMaxVotes,
    ReplyCheck,
    RoundReplies,
    make_strategy,
    teacher_arrays,
)
from feddistill.releases import sign_download
from feddistill.server.drift import drift_alert, per_class_accuracy, signal_kl
from feddistill.server.gate import Predictions, Releaser, ReleaseHistory
from feddistill.server.checkpoint import (
    CHECKPOINT,
    ServerState,
    journal_round,
    journaled_rounds_after,
    load_checkpoint,
    save_checkpoint,
)
from feddistill.server.consensus import FleetLabels, select_queries
from feddistill.server.control import PublicLabels, distil_step, private_gain, public_control, round_seed
from feddistill.training import Evaluation, evaluate_probs, predict_logits

log = logging.getLogger("feddistill")


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """At start-up the grid may list only some nodes: wait until all are connected."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {expected} nodes connected after {timeout:.0f} s")
        time.sleep(0.5)


def round_config(cfg: RunConfig, digest: str) -> ConfigRecord:
    d = cfg.distill
    return ConfigRecord(
        {
            protocol.DIGEST: digest,
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


def write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def run_distillation(grid: Grid, cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    from feddistill.runfolder import prepare_run_folder

    # never into another run's folder (its clients' states and ledgers would mix into this run)
    out = prepare_run_folder(cfg.output_dir, resume=resume)
    if not resume:
        write_json(out / "config.json", cfg.to_dict())  # what `feddistill simulate --resume` reads back
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    splits = fleet.splits
    ref_x, _ = as_tensors(splits.reference)
    test_x, _ = as_tensors(splits.test)
    num_classes = fleet.num_classes

    if cfg.audit.keep_artifacts:
        save_audit_setup(out / "audit", cfg)
    teacher, validation = teacher_and_validation(cfg, splits)
    log.info("public teacher (%s): test accuracy %.3f", cfg.teacher.model, teacher.test.accuracy)
    signal = teacher.reference_probs.copy()

    # Round 0: the global student distilled from the public teacher alone.
    def build_student():
        return build_model(cfg.distill.server_student, fleet.image_size, num_classes, seed=cfg.seed)

    student = build_student()
    d = cfg.distill

    public = public_labels(cfg, splits)
    held = validation_labels(cfg, splits)  # calibrates the consensus gate; never trained on

    def distil_student(rnd: int) -> None:
        # the same step, with the same seeds, as the public-only control (feddistill.server.control)
        distil_step(student, ref_x, signal, cfg, round_seed(cfg, rnd), public=public,
                    fleet_rows=np.flatnonzero(accepted))

    plan = upload_privacy(cfg)
    # the server's own DP noise (central, GNMax): seeded only in a seeded simulation
    noise = noise_rng(noise_seed(cfg, cfg.seed + 2, device=False))
    strategy = build_strategy(cfg, plan, noise)
    ledger = client_ledger(plan)
    participations: dict[int, int] = {}  # local mode: how often each node has answered
    devices: dict[int, dict[str, float]] = {}  # record-level ledgers reported by devices
    query_rng = np.random.default_rng(cfg.seed + 1)
    rounds: list[dict[str, Any]] = []
    start = 1
    fleet_labels = FleetLabels(len(signal), num_classes, d.fleet_labels, d.consensus_precision)
    accepted = np.zeros(len(signal), dtype=bool)  # rows whose training label is the fleet's
    val_x, _ = as_tensors(validation)
    releaser = Releaser(out, cfg, reference_digest=splits.reference_digest, model_name=d.server_student,
                        validation=(val_x, validation.y), reference_x=ref_x, test=(test_x, splits.test.y))
    if resume:
        state = load_checkpoint(out, cfg.digest())
        signal, rounds, devices, participations = state.signal, state.rounds, state.devices, state.participations
        student.load_state_dict(state.student)
        public_only = Evaluation(**state.public_only)
        for name, gen in (("strategy", strategy.rng), ("query", query_rng), ("noise", noise)):
            gen.bit_generator.state = state.rng[name]
        if ledger is not None and state.ledger_json is not None:
            ledger = PrivacyLedger.from_json(state.ledger_json)
        if "releases" in state.extra:
            releaser.history = ReleaseHistory.from_dict(state.extra["releases"])
            releaser.released_state = state.extra["released_state"]
            releaser.released_temperature = state.extra["released_temperature"]
            fleet_labels.restore(state.extra["fleet_labels"])
            accepted = fleet_accepted(fleet_labels, held)
        if ledger is not None and plan.mode == "local":
            for rnd in journaled_rounds_after(out, state.round):  # answers that may have reached us
                ledger.record(plan.event(), rnd, sensitivity=plan.sensitivity)
        start = state.round + 1
        log.info("resumed from %s after round %d", out / CHECKPOINT, state.round)
    else:
        distil_student(0)
        public_only, _, predictions = evaluate_student(student, test_x, splits.test.y, ref_x)
        log.info("round 0 (public teacher only): student accuracy %.3f", public_only.accuracy)
        releaser.consider(0, student, signal, test_metrics=public_only.to_dict(),
                          client_epsilon=None if ledger is None else ledger.epsilon(), record_epsilon=None,
                          build=build_student, predictions=predictions)
    nodes = wait_for_nodes(grid, cfg.fleet.num_clients, cfg.simulation.node_wait_timeout)
    # Node ids are new in every run; partition ids are not. Sampling in partition order makes a
    # seeded run (and a resumed one) pick the same clients.
    devices_seen: set[int] = set()
    node_partition = identify_nodes(grid, nodes, cfg.simulation.round_timeout, devices=devices_seen)
    check_devices_noise_source(cfg, len(devices_seen))  # devices refuse seeded noise: one clear error, now
    strategy.node_order = sorted(nodes, key=lambda n: node_partition[n])
    all_nodes = list(strategy.node_order)
    populations = shift_scenario(cfg, fleet, devices_seen)
    stop_reason = None
    for rnd in range(start, cfg.rounds + 1):
        t0 = time.monotonic()
        if ledger is not None and plan.mode != "local" and not ledger.can_afford(plan.event()):
            stop_reason = (
                f"client-level budget: round {rnd} would raise epsilon from {ledger.epsilon():.3f} to "
                f"{ledger.epsilon_if(plan.event()):.3f} > target {ledger.target_epsilon} (delta={ledger.delta})"
            )
            log.warning("stopping before round %d: %s", rnd, stop_reason)
            break
        if populations is not None:
            from feddistill.simulations.shift import eligible_partitions

            eligible = set(eligible_partitions(rnd, cfg.scenario.shift_round, populations))
            strategy.node_order = [n for n in all_nodes if node_partition[n] in eligible]
        margin = reference_margin(student, ref_x) if d.query_selection == "uncertain" else None
        queries = select_queries(query_rng, d.query_size, d.query_selection, margin, accepted)
        download = teacher_arrays(signal[queries], queries, student.state_dict() if d.client_start == "global" else None)
        config = round_config(cfg, splits.reference_digest)
        if cfg.security.signing_key:
            sign_download(config, download, key_path=cfg.security.signing_key, rnd=rnd, run_id=grid.run.run_id)
        messages = list(strategy.configure_train(rnd, download, config, grid))
        over_budget = 0
        if ledger is not None:  # charge the round when it is sent: a client that drops still counts
            if plan.mode == "local":
                journal_round(out, rnd)
                messages, over_budget = charge_local(messages, participations, node_partition, ledger, plan, rnd)
            else:
                ledger.record(plan.event(), rnd, sensitivity=plan.sensitivity)
        if d.secure_aggregation != "off":  # Flower's SecAgg+: the server receives only the survivors' sum
            from feddistill.server.secagg import secagg_round

            new_signal, collected = secagg_round(grid, messages, cfg, rnd, node_partition)
        else:
            replies = grid.send_and_receive(messages, timeout=cfg.simulation.round_timeout) if messages else []
            # the reply schema of this round, from the privacy plan; senders are Flower node ids
            check = ReplyCheck.from_plan(plan, round=rnd, digest=splits.reference_digest, num_queries=d.query_size,
                                         num_classes=num_classes, votes=d.answer_dtype == "vote",
                                         record_level=cfg.privacy.record_level, nodes=node_partition,
                                         abstain=abstains(cfg))
            new_signal, collected = strategy.aggregate_round(replies, check)
        if cfg.audit.keep_artifacts:
            save_uploads(out / "audit" / "uploads" / f"round{rnd:04d}.npz", queries, collected)
        record_device_epsilons(devices, collected)
        teacher_accuracy = None
        answered_queries = 0
        previous_signal = signal.copy()
        fleet_before = fleet_labels.times > 0
        if new_signal is not None:
            answered = np.isfinite(new_signal).all(axis=1)  # Confident-GNMax leaves some unanswered
            answered_queries = int(answered.sum())
            signal[queries[answered]] = new_signal[answered]
            fleet_labels.add(queries[answered], new_signal[answered])
            if answered.any():
                teacher_accuracy = float(
                    (new_signal[answered].argmax(1) == splits.reference.y[queries[answered]]).mean()
                )
        accepted = fleet_accepted(fleet_labels, held)
        fleet_labels.apply(signal, teacher.reference_probs, accepted)
        distil_student(rnd)
        ev, test_probs, predictions = evaluate_student(student, test_x, splits.test.y, ref_x)
        agreement = float((predictions.reference_labels == signal.argmax(1)).mean())
        # drift: only rows whose previous value was already the fleet's (a row's first answer
        # replaces the public teacher's opinion: a change by design, not drift)
        compared = fleet_before & np.any(signal != previous_signal, axis=1)
        drift_kl = signal_kl(signal[compared], previous_signal[compared]) if compared.any() else None
        alert = drift_alert(drift_kl, cfg.drift.kl_threshold)
        if alert:
            log.warning("round %d: %s", rnd, alert)
        record_epsilon = max((m["record-epsilon"] for m in devices.values()), default=None)
        release = releaser.consider(rnd, student, signal, test_metrics=ev.to_dict(),
                                    client_epsilon=None if ledger is None else ledger.epsilon(),
                                    record_epsilon=record_epsilon, build=build_student, predictions=predictions)
        if not release["promoted"]:
            log.warning("round %d: candidate %s not released: %s", rnd, release["candidate"], release["reason"])
        record = {
            "round": rnd,
            "clients": len(messages),
            "replies": collected.num_replies,
            "dropped": collected.dropped,
            "over_budget_skipped": over_budget,
            "answered_queries": answered_queries,
            "fleet_labelled_rows": int(accepted.sum()),  # reference rows whose training label is the fleet's
            "consensus_threshold": fleet_labels.threshold,
            "teacher_accuracy": teacher_accuracy,
            "student_accuracy": ev.accuracy,
            "student_nll": ev.nll,
            "student_ece": ev.ece,
            "agreement": agreement,
            "per_class_accuracy": per_class_accuracy(test_probs, splits.test.y, num_classes),
            "drift_kl": drift_kl,
            "drift_alert": alert,
            "release": release,
            "released_accuracy": releaser.history.current_release.test["accuracy"],
            "bytes_uploaded": collected.bytes_uploaded,
            "client_epsilon": None if ledger is None else ledger.epsilon(),
            "seconds": time.monotonic() - t0,
        }
        if populations is not None:
            record["population"] = "A" if rnd < cfg.scenario.shift_round else "B"
        rounds.append(record)
        log.info(
            "round %d/%d: %d clients, %d answers, teacher signal acc %s, student acc %.3f, %d bytes up%s, %.1f s",
            rnd,
            cfg.rounds,
            len(messages),
            collected.num_replies,
            "-" if teacher_accuracy is None else f"{teacher_accuracy:.3f}",
            ev.accuracy,
            collected.bytes_uploaded,
            "" if ledger is None else f", client-level eps {ledger.epsilon():.3f}",
            record["seconds"],
        )
        save_checkpoint(
            out,
            cfg.digest(),
            ServerState(
                round=rnd,
                signal=signal,
                student=student.state_dict(),
                rng={"strategy": strategy.rng.bit_generator.state, "query": query_rng.bit_generator.state,
                     "noise": noise.bit_generator.state},
                ledger_json=None if ledger is None else ledger.to_json(),
                participations=participations,
                devices=devices,
                rounds=rounds,
                public_only=public_only.__dict__,
                extra={**releaser.checkpoint_state(), "fleet_labels": fleet_labels.state()},
            ),
        )

    if not rounds:
        raise RuntimeError(f"no round could run: {stop_reason}")
    answered = [r for r in rounds if r["replies"]]
    control = public_control_of(cfg, build_student, teacher.reference_probs, ref_x, test_x, splits.test.y,
                                rounds[-1]["round"], public)
    results = {
        "method": "feddistill",
        "config": cfg.to_dict(),
        "config_digest": cfg.digest(),
        "reference_digest": splits.reference_digest,
        "num_nodes": len(nodes),
        "public_teacher": {"model": cfg.teacher.model, **teacher.test.to_dict("test_")},
        "public_only_student": public_only.to_dict("test_"),
        "student": {"model": cfg.distill.server_student, "parameters": count_parameters(student)},
        "rounds": rounds,
        "final": {
            "student_accuracy": rounds[-1]["student_accuracy"],
            "student_nll": rounds[-1]["student_nll"],
            "student_ece": rounds[-1]["student_ece"],
            "agreement": rounds[-1]["agreement"],
            "released_id": releaser.history.current,
            "released_accuracy": releaser.history.current_release.test["accuracy"],
            "bytes_uploaded_total": sum(r["bytes_uploaded"] for r in rounds),
            "bytes_per_client_round": (
                sum(r["bytes_uploaded"] for r in answered) / max(1, sum(r["replies"] for r in answered))
            ),
            "fleet_labelled_rows": rounds[-1]["fleet_labelled_rows"],
            "public_control_accuracy": control["accuracy"],
            "private_gain": private_gain(rounds[-1]["student_accuracy"], control["accuracy"]),
            "gap_closed": None,  # needs the centralized baseline: filled in by `feddistill simulate`
        },
        "baselines": {"public_control": control},
        "stop_reason": stop_reason,
        "validation": {"split": "held-out part of the labelled public sample (never private, never test)",
                       "size": len(validation)},
        "releases": releaser.history.to_dict(),
        "calibration": releaser.history.current_release.calibration,
        "drift": {"kl_threshold": cfg.drift.kl_threshold,
                  "alerts": [{"round": r["round"], "alert": r["drift_alert"]} for r in rounds if r["drift_alert"]]},
        "privacy": privacy_report(cfg, plan, ledger, devices),
        # simulation only: real devices' private labels are theirs alone (nobody knows the split)
        "label_histograms": None if devices_seen else fleet.label_histograms().tolist(),
    }
    write_json(out / "results.json", results)
    # what devices deploy: the last promoted release (with its calibration temperature)
    save_student(releaser.released_model(build_student), out / "global_student.pt", cfg,
                 release=releaser.history.current, temperature=releaser.released_temperature)
    if results["calibration"] is not None:
        save_reliability(results["calibration"], out / "reliability.png", releaser.history.current)
    return results


def evaluate_student(student, test_x, test_y: np.ndarray, ref_x) -> tuple[Evaluation, np.ndarray, Predictions]:
    """The student's test metrics and test probabilities, plus the outputs the release gate
    reuses: one inference pass over the test and reference sets per round, not three."""
    from feddistill.calibration import softmax

    test_logits = predict_logits(student, test_x).numpy()
    test_probs = softmax(test_logits)
    reference_labels = predict_logits(student, ref_x).numpy().argmax(1)
    return evaluate_probs(test_probs, test_y), test_probs, Predictions(reference_labels, test_logits)


def public_control_of(cfg: RunConfig, build_student, teacher_signal: np.ndarray, ref_x, test_x, test_y: np.ndarray,
                      rounds: int, public: PublicLabels) -> dict[str, Any]:
    """The public-only control of this run (same server pipeline, no fleet answers), cached."""
    from feddistill.server.teacher import cache_dir

    log.info("public-only control: the server pipeline without the fleet, %d rounds", rounds)
    control = public_control(cfg, build_student, teacher_signal, ref_x, test_x, test_y, rounds, cache_dir(), public)
    log.info("public-only control: test accuracy %.3f%s", control["accuracy"], " (cached)" if control["cached"] else "")
    return control


def public_labels(cfg: RunConfig, splits) -> PublicLabels:
    """The reference rows the public teacher trained on, with their (public) labels: the
    labelled public sample minus the release gate's validation split."""
    size = validation_size(cfg) if cfg.release.validation_fraction else 0
    return _reference_rows(splits, _validation_picks(len(splits.public_labelled), size, cfg.seed)[1])


def _reference_rows(splits, picks: np.ndarray) -> PublicLabels:
    """Picked positions of the labelled public sample as reference rows, with their labels."""
    positions = splits.source_indices["public_labelled"][picks]  # in the data set the splits were cut from
    reference = splits.source_indices["reference"]
    rows = np.minimum(np.searchsorted(reference, positions), len(reference) - 1)
    if not np.array_equal(reference[rows], positions):
        raise RuntimeError("the labelled public sample is not part of the reference set")
    return PublicLabels(rows=rows.astype(np.int64), labels=np.asarray(splits.public_labelled.y[picks], dtype=np.int64))


def teacher_and_validation(cfg: RunConfig, splits):
    """The public teacher (trained on the labelled public sample minus the release gate's
    validation split, or loaded from the cache) and that validation split."""
    from feddistill.server.teacher import public_teacher  # keeps `flwr run` imports lean until needed

    size = validation_size(cfg) if cfg.release.validation_fraction else 0
    teacher_splits, validation = split_validation(splits, size, cfg.seed)
    return public_teacher(cfg.teacher, teacher_splits, cfg.seed), validation


def split_validation(splits, size: int, seed: int):
    """Hold `size` examples of the labelled public sample out of the public teacher's training:
    the release gate's and the temperature scaling's validation split. These labels are public
    (the server owns them) and held out from everything that trains, so the gate measures what
    the student learnt rather than what the teacher memorised; private data and the test split
    are never used for release decisions."""
    labelled = splits.public_labelled
    if size == 0:
        return splits, labelled.subset(np.zeros(0, dtype=np.int64))
    val_idx, teacher_idx = _validation_picks(len(labelled), size, seed)
    return dataclasses.replace(splits, public_labelled=labelled.subset(teacher_idx)), labelled.subset(val_idx)


def validation_labels(cfg: RunConfig, splits) -> PublicLabels:
    """The release gate's validation rows in the reference set, with their (public) labels."""
    size = validation_size(cfg) if cfg.release.validation_fraction else 0
    return _reference_rows(splits, _validation_picks(len(splits.public_labelled), size, cfg.seed)[0])


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


def _validation_picks(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the labelled public sample: (validation, the teacher's), both sorted."""
    picked = np.random.default_rng([seed, 0x7A11D]).permutation(n)
    return np.sort(picked[:size]), np.sort(picked[size:])


def shift_scenario(cfg: RunConfig, fleet, devices_seen: set[int]):
    """The label-shift scenario's two client populations (None when off)."""
    if not cfg.scenario.shift_round:
        return None
    if devices_seen:
        raise RuntimeError("scenario.shift-round is a simulation scenario: real devices' label mixes are unknown")
    from feddistill.simulations.shift import check_populations, shift_populations

    populations = shift_populations(fleet.label_histograms())
    check_populations(populations)
    log.info("label-shift scenario: rounds < %d sample %d clients (labels mostly in the lower classes), "
             "later rounds the other %d", cfg.scenario.shift_round, len(populations[0]), len(populations[1]))
    return populations


def save_reliability(calibration: dict[str, Any], path: Path, rid: str | None) -> None:
    from feddistill.calibration import plot_reliability

    rel = calibration["reliability_test"]
    t = calibration["temperature"]
    plot_reliability({"before (T = 1)": rel["before"], f"after (T = {t:.2f})": rel["after"]}, path,
                     title=f"release {rid}: reliability on the test split (T fitted on public validation)")


def build_strategy(cfg: RunConfig, plan: UploadPrivacy, noise: np.random.Generator) -> AnswerStrategy:
    """The configured aggregator, wrapped or replaced by the configured DP mechanism."""
    common = dict(sampling_rate=cfg.fleet.fraction, sampling=cfg.fleet.sampling, seed=cfg.seed)
    if plan.mode == "gnmax":
        return GNMaxVotes(**common, sigma=plan.noise_std, noise_rng=noise)
    if plan.mode == "confident-gnmax":
        return GNMaxVotes(**common, sigma=plan.noise_std, noise_rng=noise, threshold=cfg.privacy.gnmax_threshold,
                          sigma_threshold=plan.threshold_std)
    inner = make_strategy(cfg.distill.aggregator, era_temperature=cfg.distill.era_temperature,
                          trim_beta=cfg.distill.trim_beta, keep_fraction=cfg.distill.keep_fraction,
                          probabilities=cfg.privacy.bound != "clipped_logits", abstain=abstains(cfg), **common)
    if plan.mode == "central":
        expected = cfg.fleet.fraction * cfg.fleet.num_clients
        return CentralGaussianAnswers(inner, noise_std=plan.noise_std, expected_clients=expected, rng=noise)
    return inner


def client_ledger(plan: UploadPrivacy) -> PrivacyLedger | None:
    if plan.mode == "off":
        return None
    return PrivacyLedger(unit="client", delta=plan.delta, target_epsilon=plan.target_epsilon, mechanism=plan.mechanism,
                         neighbouring=plan.neighbouring)


def identify_nodes(grid: Grid, nodes: list[int], timeout: float, devices: set[int] | None = None) -> dict[int, int]:
    """Ask every node once, at start-up, which client it serves (a `query.identify` message):
    its partition id (simulation) or device id. Returns Flower node id -> client id. Nodes that
    say they are devices (reading their own data dir) are added to `devices` when given.

    This table is the only source of a reply's sender for the rest of the run: the server
    attributes every reply by its Flower node id (an authenticated SuperNode in deployment),
    never by anything the reply declares. Start-up fails, naming both node ids, when two
    nodes claim the same client id: keeping the first claimant would let whichever node
    answered first take the other's place (its participations, its device ledger entry),
    and running without either would hide a misconfigured or hostile node."""
    messages = [Message(RecordDict(), dst_node_id=n, message_type=protocol.IDENTIFY) for n in nodes]
    mapping: dict[int, int] = {}
    holder: dict[int, int] = {}  # client id -> the node that claimed it
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        client, is_device = identify_reply(reply)
        if node in mapping:
            raise RuntimeError(f"node {node} identified itself twice")
        if client in holder:
            raise RuntimeError(f"nodes {holder[client]} and {node} both claim client id {client}: each node must "
                               "serve its own partition-id / device-id (node config); fix the node configs and restart")
        mapping[node], holder[client] = client, node
        if devices is not None and is_device:
            devices.add(node)
    missing = set(nodes) - set(mapping)
    if missing:
        raise RuntimeError(f"{len(missing)} nodes did not identify themselves within {timeout:.0f} s")
    return mapping


def identify_reply(reply: Message) -> tuple[int, bool]:
    """(client id, is a device) from an identify reply: a `meta` ConfigRecord holding an int
    partition id >= 0 and optionally a device flag 0/1, nothing else. Raises RuntimeError."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        raise RuntimeError(f"node {node} did not identify itself: {str(reply.error.reason)[:200]}")
    content = reply.content
    meta = content.config_records.get(protocol.REPLY_META)
    fields = {} if meta is None else dict(meta)
    client, device = fields.get(protocol.PARTITION), fields.get(protocol.DEVICE, 0)
    well_formed = (
        set(content) == {protocol.REPLY_META} and meta is not None
        and set(fields) <= {protocol.PARTITION, protocol.DEVICE}
        and type(client) is int and 0 <= client < 2**63 and type(device) is int and device in (0, 1)
    )
    if not well_formed:
        raise RuntimeError(f"node {node} sent a malformed identify reply: expected a '{protocol.REPLY_META}' record "
                           f"with an int '{protocol.PARTITION}' >= 0 and optionally '{protocol.DEVICE}' 0/1, got "
                           f"{repr({k: content[k] for k in list(content)[:4]})[:200]}")
    return client, bool(device)


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
        log.warning("round %d: %d sampled clients skipped: their next answer would exceed the client-level target", rnd, skipped)
    return kept, skipped


def privacy_report(cfg: RunConfig, plan: UploadPrivacy, ledger: PrivacyLedger | None,
                   devices: dict[int, dict[str, float]]) -> dict[str, Any]:
    """results.json's "privacy": every epsilon with its unit, mechanism, accountant and delta."""
    client_level = None
    if ledger is not None:
        client_level = {
            **ledger.summary(),
            "epsilon_rdp": ledger.epsilon_rdp(),
            "protects_against": plan.protects_against,
            "sensitivity": plan.sensitivity,
            "noise_std": plan.noise_std,
            "query_size": cfg.distill.query_size,
            "client_sampling": "each round, once per participation (q=1)" if plan.mode == "local"
            else f"Poisson, q={plan.sampling_rate}",
            "analysis": "data-independent" if "gnmax" in plan.mode else "worst case",
            "noise_source": client_noise_source(cfg, plan),
        }
        if plan.distributed:  # SecAgg+ distributed noise: no amplification claimed, delta shared with clipping
            client_level.update({"client_sampling": "none claimed (q=1): the server sees who takes part; every "
                                 "round charged as if every client answered", "delta_accountant": plan.delta,
                                 "delta_clipping_failure": plan.clip_failure, "delta": cfg.privacy.delta})
    record_level = None
    if cfg.privacy.record_level:
        worst = max(devices.items(), key=lambda kv: kv[1]["record-epsilon"], default=(None, None))
        record_level = {
            "epsilon": None if worst[1] is None else worst[1]["record-epsilon"],
            "epsilon_is": "the largest epsilon of any device (each device accounts its own)",
            "delta": cfg.privacy.record_delta,
            "unit": "record",
            "neighbouring": "add/remove",
            "mechanism": record_mechanism(cfg),
            "accountant": "pld",
            "target_epsilon": cfg.privacy.record_target_epsilon or None,
            "protects_against": "everyone, the server included (noise added on the device during training)",
            "noise_source": NOISE_SOURCES[cfg.privacy.noise_source],
            "sampling_rate": cfg.privacy.record_sampling_rate,
            "worst_device": worst[0],
            # the client id each reply's Flower node id maps to (identify_nodes), never an id a reply declares
            "devices_keyed_by": "client id of the sending Flower node (partition-id / device-id given at start-up)",
            "devices": {str(pid): m for pid, m in sorted(devices.items())},
        }
    report = {"client_level": client_level, "record_level": record_level}
    if cfg.distill.secure_aggregation != "off":
        from feddistill.server.secagg import secagg_report

        report["secure_aggregation"] = secagg_report(cfg)
    return report


def save_uploads(path: Path, queries: np.ndarray, collected) -> None:
    """The uploads as the server received them (after validation), for the auditor."""
    arrays = {"queries": queries}
    for pid, answers in zip(collected.senders, collected.answers):
        arrays[f"client{pid}"] = answers
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


def save_audit_setup(audit_dir: Path, cfg: RunConfig) -> None:
    from feddistill.simulations.fleet import fleet_canaries

    audit_dir.mkdir(parents=True, exist_ok=True)
    canaries = fleet_canaries(cfg)
    if canaries is not None:
        with atomic_path(audit_dir / "canaries.npz") as tmp:
            np.savez_compressed(tmp, x=canaries.x, y=canaries.y, included=canaries.included, client=canaries.client)


def save_student(model, path: Path, cfg: RunConfig, release: str | None = None, temperature: float = 1.0) -> None:
    import torch

    blob = {"model": cfg.distill.server_student, "state_dict": model.state_dict(), "temperature": float(temperature)}
    if release is not None:
        blob["release"] = release
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def run_server(grid: Grid, cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    if cfg.method in ("fedavg", "dp-fedavg"):
        from feddistill.server.fedavg import run_fedavg

        return run_fedavg(grid, cfg)
    return run_distillation(grid, cfg, resume)


def make_server_app(cfg: RunConfig | None = None, resume: bool = False) -> ServerApp:
    """A ServerApp for `cfg`; with None it reads Flower's run config (`flwr run .`)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is None and not log.handlers:  # under `flwr run`, print our per-round lines too
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s feddistill: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        if cfg is not None:  # feddistill simulate: its CLI reports errors (and checked the folder already)
            run_server(grid, cfg, resume)
            return
        from feddistill.config import ConfigError
        from feddistill.runfolder import RunFolderError, prepare_run_folder

        try:
            run_cfg = parse_config(dict(context.run_config), "run config")
            prepare_run_folder(run_cfg.output_dir, ways_out=FLWR_WAYS_OUT)  # fedavg too, before anything runs
        except (ConfigError, RunFolderError) as exc:
            # one line in the log, and the same line as the run's failure details; a fresh exception
            # so that Flower's report does not carry the whole stack under it
            log.error("%s", exc)
            raise type(exc)(str(exc)) from None
        run_server(grid, run_cfg, resume)

    return server_app


FLWR_WAYS_OUT = "choose a fresh output-dir (flwr run neither resumes nor overwrites a run)"


app = make_server_app()
