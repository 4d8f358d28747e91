"""The ClientApp: digest, revisit, answer (DESIGN.md, step 2).

The client checks the reference-set digest (refuses on mismatch), distils its
own student toward the teacher signal on the round's public queries (digest),
trains on its private data (revisit), then answers with its student's
probabilities on the queries. Only that matrix, the round id, the digest and a
few scalar metrics leave the device: no weights, no per-example private values.

The student persists across rounds (FedMD: Li & Wang 2019), so each client keeps
learning from the consensus; it is kept with the device's privacy ledger in
``feddistill.client.state``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from feddistill import protocol
from feddistill.client.device import client_data, device_id, is_device
from feddistill.client.state import load_state, save_state, state_dir
from feddistill.config import RunConfig, parse_config
from feddistill.encoding import encode_answers
from feddistill.models import build_model
from feddistill.simulations.attacks import corrupt_answers, hostile_clients
from feddistill.simulations.fleet import load_fleet, private_tensors
from feddistill.privacy.mechanisms import add_gaussian_noise, bound_answers, noise_rng
from feddistill.privacy.plan import UploadPrivacy, record_mechanism, record_noise_multiplier, upload_privacy
from feddistill.training import predict_logits, train_distill, train_revisit, train_supervised

log = logging.getLogger("feddistill")

# Each simulated client runs in a 1-CPU worker: more torch threads only oversubscribe the cores.
torch.set_num_threads(1)



def _student(cfg: RunConfig, image_size: int, num_classes: int, partition_id: int, saved: dict | None,
             arch: str) -> torch.nn.Module:
    model = build_model(arch, image_size, num_classes, seed=cfg.seed * 100_003 + partition_id)
    if saved is not None:
        model.load_state_dict(saved)
    return model


def handle_distill(msg: Message, context: Context, cfg: RunConfig) -> Message:
    config = msg.content.config_records[protocol.CONFIG_RECORD]
    # a device reads its own data dir (node config `data-dir`), a simulated client its partition
    data = client_data(cfg, context)
    partition_id = data.partition_id
    if config[protocol.DIGEST] != data.reference_digest:
        return Message(Error(protocol.REFUSED, "reference-set digest mismatch: refusing to answer"), reply_to=msg)

    rnd = int(config[protocol.ROUND])
    if cfg.scenario.dropout and np.random.default_rng([cfg.seed, rnd, partition_id, 0xD0]).random() < cfg.scenario.dropout:
        return Message(Error(protocol.DROPPED, "dropped out (simulated)"), reply_to=msg)
    teacher = msg.content.array_records[protocol.TEACHER_RECORD]
    pinned = str(context.node_config.get("release-public-key", "") or cfg.security.release_public_key)
    if pinned:  # a device that pins the server's key accepts only signed, fresh downloads
        from feddistill.deploy.signing import ReleaseRejected
        from feddistill.releases import verify_download

        try:
            verify_download(config, teacher, key_path=pinned, rnd=rnd, run_id=msg.metadata.run_id,
                            state=state_dir(cfg, context))
        except ReleaseRejected as exc:
            log.warning("round %d: release rejected: %s", rnd, exc)
            return Message(Error(protocol.REFUSED, f"release rejected: {exc}"), reply_to=msg)
    queries = teacher[protocol.QUERIES].numpy()
    signal = torch.from_numpy(teacher[protocol.SIGNAL].numpy().astype(np.float32))
    num_classes, image_size = signal.shape[1], int(data.reference_x.shape[-1])
    query_x = data.reference_x[torch.from_numpy(queries)]
    private_x, private_y = data.private_x, data.private_y
    seed = cfg.seed * 1_000_003 + rnd * 10_007 + partition_id

    store = state_dir(cfg, context)
    kept = load_state(store, partition_id, rnd)
    arch = cfg.student_for(partition_id)
    start = kept.student
    if arch == config.get("student-model") and any(k.startswith(protocol.STUDENT_PREFIX) for k in teacher.keys()):
        # start from the released global student (public): a client of the same architecture
        # refines it on its private data instead of relearning what the fleet already knows
        start = {k[len(protocol.STUDENT_PREFIX):]: torch.from_numpy(teacher[k].numpy().copy())
                 for k in teacher.keys() if k.startswith(protocol.STUDENT_PREFIX)}
    student = _student(cfg, image_size, num_classes, partition_id, start, arch)
    common = dict(batch_size=int(config["batch-size"]), lr=float(config["lr"]), momentum=float(config["momentum"]))
    temperature = float(config["temperature"])
    metrics: dict[str, float] = {protocol.NUM_EXAMPLES: len(private_y)}

    # Record-level DP: the device checks its OWN budget before touching private data.
    ledger, event = None, None
    if cfg.privacy.record_level:
        # imported here: Opacus and dp-accounting cost seconds in every fresh ClientApp process
        from feddistill.privacy.accounting import GaussianEvent
        from feddistill.privacy.dpsgd import dp_train, dpsgd_schedule

        ledger = _record_ledger(kept.ledger_json, cfg)
        batch = min(int(config["batch-size"]), len(private_y))
        rate, steps = dpsgd_schedule(len(private_y), batch, int(config["revisit-epochs"]))
        event = GaussianEvent(record_noise_multiplier(cfg, rate, steps), rate, steps)
        if not ledger.can_afford(event):
            reason = (f"record-level budget: this round would raise epsilon from {ledger.epsilon():.3f} to "
                      f"{ledger.epsilon_if(event):.3f} > target {ledger.target_epsilon} (delta={ledger.delta})")
            return Message(Error(protocol.REFUSED, reason), reply_to=msg)

    digest_loss = train_distill(
        student, query_x, signal, temperature=temperature, epochs=int(config["digest-epochs"]), seed=seed, **common
    )
    if ledger is not None:
        result = dp_train(
            student, private_x, private_y, epochs=int(config["revisit-epochs"]), batch_size=batch, lr=common["lr"],
            momentum=common["momentum"], noise_multiplier=event.noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm, seed=seed + 1,
        )
        revisit_loss = result.mean_loss
        ledger.record(event, rnd)
        metrics.update({"record-epsilon": ledger.epsilon(), "record-noise-multiplier": event.noise_multiplier,
                        "record-sampling-rate": event.sampling_rate, "record-steps": float(sum(
                            e.event.steps for e in ledger.history))})
    else:
        revisit_loss = train_revisit(
            student, private_x, private_y, query_x, signal, kd_weight=float(config["revisit-kd-weight"]),
            temperature=temperature, epochs=int(config["revisit-epochs"]), seed=seed + 1, **common,
        )
    answers = answer_matrix(predict_logits(student, query_x).numpy(), upload_privacy(cfg), seed + 2)
    encoding = str(config["answer-dtype"])
    hostile = partition_id in hostile_clients(cfg.fleet.num_clients, cfg.scenario.hostile_fraction, cfg.seed)
    # A hostile client corrupts what it sends; with one-byte votes it can only lie about the class,
    # so it corrupts the matrix first and the vote carries the lie.
    if hostile and encoding == "vote":
        answers = corrupt_answers(answers, cfg.scenario.attack, np.random.default_rng(seed + 3), num_classes=num_classes)
    answers = encode_answers(answers, encoding)
    if hostile and encoding != "vote":
        answers = corrupt_answers(answers, cfg.scenario.attack, np.random.default_rng(seed + 3),
                                  num_classes=num_classes)
    save_state(store, partition_id, rnd, student.state_dict(), None if ledger is None else ledger.to_json())
    if cfg.audit.keep_artifacts:  # simulation only: the auditor's target (b), the local student
        save_local_student(student, cfg, partition_id)

    for name, value in (("digest-loss", digest_loss), ("revisit-loss", revisit_loss)):
        if np.isfinite(value):
            metrics[name] = float(value)
    return Message(
        RecordDict(
            {
                protocol.ANSWERS_RECORD: ArrayRecord({protocol.ANSWERS: Array(np.ascontiguousarray(answers))}),
                protocol.METRICS_RECORD: MetricRecord(metrics),
                protocol.REPLY_META: ConfigRecord(
                    {protocol.ROUND: rnd, protocol.DIGEST: data.reference_digest, protocol.PARTITION: partition_id}
                ),
            }
        ),
        reply_to=msg,
    )


def answer_matrix(logits: np.ndarray, plan: UploadPrivacy, seed: int) -> np.ndarray:
    """Bound the answers (probabilities, votes or clipped logits); with local DP, noise them here,
    on the device, before they leave it."""
    answers = bound_answers(logits, plan.bound, clip_norm=plan.clip_norm)
    if plan.mode == "local":
        answers = add_gaussian_noise(answers, noise_multiplier=plan.noise_multiplier, sensitivity=plan.sensitivity,
                                     rng=noise_rng(seed))
    return answers


def _record_ledger(saved: str | None, cfg: RunConfig) -> "PrivacyLedger":
    from feddistill.privacy.ledger import PrivacyLedger

    if saved is not None:
        ledger = PrivacyLedger.from_json(saved)
        # the history is the device's; the budget is whatever the device's config says now
        ledger.target_epsilon = cfg.privacy.record_target_epsilon or None
        return ledger
    return PrivacyLedger(unit="record", delta=cfg.privacy.record_delta,
                         target_epsilon=cfg.privacy.record_target_epsilon or None, mechanism=record_mechanism(cfg))


def save_local_student(student: torch.nn.Module, cfg: RunConfig, partition_id: int) -> None:
    import os
    from pathlib import Path

    path = Path(cfg.output_dir) / "audit" / "clients" / f"client{partition_id}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"model": cfg.student_for(partition_id), "state_dict": student.state_dict()}, tmp)
    os.replace(tmp, path)


def handle_fedavg(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Flower FedAvg baseline: train the received weights on private data, send them back."""
    config = msg.content.config_records["config"]
    partition_id = int(context.node_config["partition-id"])
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    model = build_model(str(config["model"]), fleet.image_size, fleet.num_classes)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    x, y = private_tensors(fleet, partition_id)
    loss = train_supervised(
        model, x, y, epochs=int(config["epochs"]), batch_size=int(config["batch-size"]), lr=float(config["lr"]),
        momentum=float(config["momentum"]), seed=cfg.seed * 1_000_003 + int(config["server-round"]) * 10_007 + partition_id,
    )
    metrics = {"num-examples": len(y)}
    if np.isfinite(loss):
        metrics["train-loss"] = float(loss)
    return Message(
        RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}), reply_to=msg
    )


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp for `cfg`; with None it reads Flower's run config (`flwr run .`)."""
    client_app = ClientApp()

    def resolve(context: Context) -> RunConfig:
        return cfg if cfg is not None else parse_config(dict(context.run_config), "run config")

    @client_app.train("distill")
    def distill(msg: Message, context: Context) -> Message:
        return handle_distill(msg, context, resolve(context))

    @client_app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        # partition-id (simulation) or device-id; DEVICE: 1 when the node reads its own data dir
        meta = ConfigRecord({protocol.PARTITION: device_id(context), protocol.DEVICE: int(is_device(context))})
        return Message(RecordDict({protocol.REPLY_META: meta}), reply_to=msg)

    @client_app.train()
    def fedavg(msg: Message, context: Context) -> Message:
        from feddistill.client.secagg import handle_secagg, is_secagg

        if is_secagg(msg):  # SecAgg+ (distill.secure-aggregation): Flower's workflow speaks the legacy "train"
            return handle_secagg(msg, context, resolve(context), handle_distill)
        return handle_fedavg(msg, context, resolve(context))

    return client_app


app = make_client_app()
