"""A client's round: digest, revisit, answer (the ClientApp, :mod:`feddistill.client.app`, routes here).

The client checks the reference-set digest (refuses on mismatch), distils its
own student toward the teacher signal on the round's public queries (digest),
trains on its private data (revisit), then answers with its student's outputs
on the queries. The student persists across rounds (FedMD: Li & Wang 2019), so
each client keeps learning from the consensus; it is kept with the device's
privacy ledger in ``feddistill.client.state``.

What leaves a device — a ``train.distill`` reply is exactly:

- ArrayRecord ``answers`` with one Array ``answers``: the (|Q|, C) answer matrix
  on the round's PUBLIC queries, bounded (probabilities, votes or clipped
  logits), noised here on the device when ``privacy.client-level = "local"``,
  in its wire dtype (``distill.answer-dtype``);
- ConfigRecord ``meta`` with exactly ``round`` (int, echoed) and
  ``reference-digest`` (str, SHA-256 of the reference set the device holds);
- MetricRecord ``metrics``: empty, or with record-level DP the one key
  ``record-epsilon``, the device's own ledger ε. DP-SGD runs at the public
  Poisson rate ``privacy.record-sampling-rate``, so that ε depends only on
  public parameters and on how often the device took part, which the server
  sees anyway.

Nothing else: no weights, no private-set size, no losses on private data, no
self-declared sender id (the server knows the sender from Flower's node id).
A refusal is an Error reply (``protocol.REFUSED``; ``protocol.DROPPED`` is a simulated
dropout's) whose reason names a rule, never a private value; the
``query.identify`` reply carries the node-config id and whether the node is a
device. Under SecAgg+ (``feddistill.client.secagg``) the answers travel masked,
with only ``record-epsilon`` in plain text. The FedAvg *baseline*
(:func:`handle_fedavg`) speaks Flower's FedAvg protocol, weights and
``num-examples`` included; it is a comparison peer, not feddistill.

Randomness: every privacy-relevant draw (local answer noise, DP-SGD's Poisson
sampling and noise) is seeded from the run's seed, round and partition only in
a simulation with ``privacy.noise-source = "seeded"`` (reproducible, and
predictable by whoever knows the seed). A device (node config ``data-dir``)
draws them from OS entropy whatever its config says, and refuses a round whose
run config asks for seeded noise. Draws that protect nothing (model
initialisation, shuffling of the public queries and of non-DP training) stay
seeded, so a device without DP answers exactly like its simulated twin.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from feddistill import protocol
from feddistill.client.answers import abstentions, answer_logits, label_counts
from feddistill.client.canary import canary_logits, is_canary_node, node_canaries
from feddistill.client.device import ClientData, client_data
from feddistill.client.node import device_id, is_device
from feddistill.client.placement import log_placement
from feddistill.client.state import load_state, save_state, state_dir
from feddistill.config import RunConfig
from feddistill.data.fleet import load_fleet, private_tensors
from feddistill.encoding import encode_answers
from feddistill.models import build_model
from feddistill.privacy.mechanisms import add_gaussian_noise, bound_answers, noise_rng
from feddistill.privacy.plan import (
    PlanRefused,
    RecordPrivacy,
    UploadPrivacy,
    accept_privacy,
    device_noise_refusal,
    noise_seed,
)
from feddistill.training import predict_logits, train_distill, train_revisit, train_supervised

if TYPE_CHECKING:  # imported lazily below (inside the functions) at run time
    from feddistill.privacy.accounting import GaussianEvent
    from feddistill.privacy.ledger import PrivacyLedger

log = logging.getLogger("feddistill")

# Each simulated client runs in a 1-CPU worker: more torch threads only oversubscribe the cores.
torch.set_num_threads(1)


def _student(
    cfg: RunConfig, image_size: int, num_classes: int, partition_id: int, saved: dict | None, arch: str
) -> torch.nn.Module:
    model = build_model(arch, image_size, num_classes, seed=cfg.seed * 100_003 + partition_id)
    if saved is not None:
        model.load_state_dict(saved)
    return model


def handle_distill(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """One round on a client: digest, revisit, answer; or an Error reply saying why not.

    Refuses (``protocol.REFUSED``) on a device asked for seeded noise, a privacy plan its config
    does not give, a reference-set digest mismatch, a rejected signed download, or a round over
    the device's record-level budget.
    """
    device = is_device(context)
    refusal, cap = _device_refusal(cfg, context, device)
    if refusal is not None:
        return Message(Error(protocol.REFUSED, refusal), reply_to=msg)
    config = msg.content.config_records[protocol.CONFIG_RECORD]
    try:  # the server's calibrated plan, checked against this client's own config and targets
        privacy = accept_privacy(str(config.get(protocol.PRIVACY_PLAN, "")), cfg)
    except PlanRefused as exc:
        return Message(Error(protocol.REFUSED, f"privacy plan refused: {exc}"), reply_to=msg)
    # a device reads its own data dir (node config `data-dir`), a simulated client its partition
    data = client_data(cfg, context)
    partition_id = data.partition_id
    if config[protocol.DIGEST] != data.reference_digest:
        return Message(Error(protocol.REFUSED, "reference-set digest mismatch: refusing to answer"), reply_to=msg)

    rnd = int(config[protocol.ROUND])
    teacher = msg.content.array_records[protocol.TEACHER_RECORD]
    rejected = _release_rejection(msg, context, cfg, config, teacher, rnd)
    if rejected is not None:
        return Message(Error(protocol.REFUSED, rejected), reply_to=msg)
    queries = teacher[protocol.QUERIES].numpy()
    signal = torch.from_numpy(teacher[protocol.SIGNAL].numpy().astype(np.float32))
    num_classes, image_size = signal.shape[1], int(data.reference_x.shape[-1])
    query_x = data.reference_x[torch.from_numpy(queries)]
    # Seeds for what protects nothing (initialisation, shuffling); `private` seeds the privacy
    # draws and is None (OS entropy) on a device or with privacy.noise-source = "os-entropy".
    seed = cfg.seed * 1_000_003 + rnd * 10_007 + partition_id
    private = noise_seed(cfg, seed, device)

    if is_canary_node(context):  # an audit SuperNode (feddistill.client.canary): canary answers, no training
        return canary_reply(msg, context, privacy.upload, queries, num_classes, rnd, data.reference_digest, private)

    store = state_dir(cfg, context)
    kept = load_state(store, partition_id, rnd)
    student = _start_student(cfg, config, teacher, kept.student, partition_id, image_size, num_classes)
    common = dict(batch_size=int(config["batch-size"]), lr=float(config["lr"]), momentum=float(config["momentum"]))
    temperature = float(config["temperature"])

    # Record-level DP: the device checks its OWN budget before touching private data.
    ledger, event = None, None
    if privacy.record is not None:
        ledger, event = _record_plan(kept.ledger_json, cfg, privacy.record, cap)
        if not ledger.can_afford(event):
            reason = (
                f"record-level budget: this round would raise epsilon from {ledger.epsilon():.3f} to "
                f"{ledger.epsilon_if(event):.3f} > target {ledger.target_epsilon} (delta={ledger.delta})"
            )
            return Message(Error(protocol.REFUSED, reason), reply_to=msg)

    train_distill(
        student, query_x, signal, temperature=temperature, epochs=int(config["digest-epochs"]), seed=seed, **common
    )
    _revisit(student, data, query_x, signal, cfg, config, common, ledger, event, seed=seed, private=private, rnd=rnd)
    answers = student_answers(
        student, data, query_x, num_classes, cfg, privacy.upload, str(config["answer-dtype"]), private
    )
    save_state(store, partition_id, rnd, student.state_dict(), None if ledger is None else ledger.to_json())
    if not device:  # a simulated client: which host / Ray node ran its round (feddistill.client.placement)
        log_placement(cfg.output_dir, rnd, partition_id)
    if cfg.audit.keep_artifacts:  # simulation only: the auditor's target (b), the local student
        save_local_student(student, cfg, partition_id)
    return distill_reply(msg, answers, rnd, data.reference_digest, None if ledger is None else ledger.epsilon())


def student_answers(
    student: torch.nn.Module,
    data: ClientData,
    query_x: torch.Tensor,
    num_classes: int,
    cfg: RunConfig,
    plan: UploadPrivacy,
    answer_dtype: str,
    private: int | None,
) -> np.ndarray:
    """What the client answers on the round's queries with its trained ``student``, in its wire
    dtype: bounded, abstentions zeroed, noised under ``local`` DP (``private``: the privacy seed
    of the round, None for OS entropy). Without local noise it depends on the student alone."""
    counts = label_counts(data.private_y.numpy(), num_classes)  # stays on the device
    logits = answer_logits(predict_logits(student, query_x).numpy(), counts, cfg)
    answers = answer_matrix(
        logits, plan, None if private is None else private + 2, abstain=abstentions(logits, counts, cfg)
    )
    return encode_answers(answers, answer_dtype)


def canary_reply(
    msg: Message,
    context: Context,
    plan: UploadPrivacy,
    queries: np.ndarray,
    num_classes: int,
    rnd: int,
    digest: str,
    private: int | None,
) -> Message:
    """An audit node's reply: its canaries' answers through the same bounding, local noise and
    wire encoding as a device's answers, in the same reply schema (no record-level epsilon: it
    trains on nothing)."""
    secret, canaries = node_canaries(context)
    logits = canary_logits(secret, device_id(context), rnd, queries, num_classes, canaries, plan.bound)
    answers = answer_matrix(logits, plan, None if private is None else private + 2)
    dtype = str(msg.content.config_records[protocol.CONFIG_RECORD]["answer-dtype"])
    return distill_reply(msg, encode_answers(answers, dtype), rnd, digest, None)


def _device_refusal(cfg: RunConfig, context: Context, device: bool) -> tuple[str | None, float | None]:
    """Why this client refuses every round of the run (None: it does not), and the record-level
    epsilon its owner allows (None: no cap; only a device has one)."""
    refusal = device_noise_refusal(cfg) if device else None
    if refusal is not None:  # a device never runs seeded noise, whatever the server asks
        return refusal, None
    cap = device_record_cap(context) if device else None
    if cap is not None and not cfg.privacy.record_level:  # the owner's rule, whatever the server asks
        return (
            f"this device requires record-level DP (node config {RECORD_CAP} = "
            f"{cap:g}) and the run config has privacy.record-level = false"
        ), cap
    return None, cap


def _revisit(
    student: torch.nn.Module,
    data: ClientData,
    query_x: torch.Tensor,
    signal: torch.Tensor,
    cfg: RunConfig,
    config: ConfigRecord,
    common: dict[str, Any],
    ledger: PrivacyLedger | None,
    event: GaussianEvent | None,
    *,
    seed: int,
    private: int | None,
    rnd: int,
) -> None:
    """Train ``student`` on the private data: DP-SGD charged to ``ledger`` under record-level DP,
    else the revisit loss (labels plus distillation on the queries)."""
    if ledger is not None and event is not None:
        from feddistill.privacy.dpsgd import dp_train  # Opacus: only where DP-SGD runs (cold start)

        dp_train(
            student,
            data.private_x,
            data.private_y,
            epochs=int(config["revisit-epochs"]),
            sampling_rate=event.sampling_rate,
            lr=common["lr"],
            momentum=common["momentum"],
            noise_multiplier=event.noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm,  # the plan's (accept_privacy checked they agree)
            seed=None if private is None else private + 1,
        )
        ledger.record(event, rnd)
    else:
        train_revisit(
            student,
            data.private_x,
            data.private_y,
            query_x,
            signal,
            kd_weight=float(config["revisit-kd-weight"]),
            temperature=float(config["temperature"]),
            epochs=int(config["revisit-epochs"]),
            seed=seed + 1,
            **common,
        )


def distill_reply(msg: Message, answers: np.ndarray, rnd: int, digest: str, record_epsilon: float | None) -> Message:
    """The reply, and everything in it (the module docstring says what each field reveals)."""
    metrics = MetricRecord({} if record_epsilon is None else {protocol.RECORD_EPSILON: float(record_epsilon)})
    return Message(
        RecordDict(
            {
                protocol.ANSWERS_RECORD: ArrayRecord({protocol.ANSWERS: Array(np.ascontiguousarray(answers))}),
                protocol.METRICS_RECORD: metrics,
                protocol.REPLY_META: ConfigRecord({protocol.ROUND: int(rnd), protocol.DIGEST: digest}),
            }
        ),
        reply_to=msg,
    )


def _release_rejection(
    msg: Message, context: Context, cfg: RunConfig, config: ConfigRecord, teacher: ArrayRecord, rnd: int
) -> str | None:
    """A device that pins the server's key accepts only signed, fresh downloads: why not, or None."""
    pinned = str(context.node_config.get("release-public-key", "") or cfg.security.release_public_key)
    if not pinned:
        return None
    from feddistill.deploy.download_signing import verify_download
    from feddistill.deploy.signing import ReleaseRejected

    try:
        verify_download(
            config, teacher, key_path=pinned, rnd=rnd, run_id=msg.metadata.run_id, state=state_dir(cfg, context)
        )
    except ReleaseRejected as exc:
        log.warning("round %d: release rejected: %s", rnd, exc)
        return f"release rejected: {exc}"
    return None


def _start_student(
    cfg: RunConfig,
    config: ConfigRecord,
    teacher: ArrayRecord,
    own: dict | None,
    partition_id: int,
    image_size: int,
    num_classes: int,
) -> torch.nn.Module:
    arch = cfg.student_for(partition_id)
    start = own
    if arch == config.get("student-model") and any(k.startswith(protocol.STUDENT_PREFIX) for k in teacher.keys()):
        # start from the server's latest global student (public): a client of the same architecture
        # refines it on its private data instead of relearning what the fleet already knows
        start = {
            k[len(protocol.STUDENT_PREFIX) :]: torch.from_numpy(teacher[k].numpy().copy())
            for k in teacher.keys()
            if k.startswith(protocol.STUDENT_PREFIX)
        }
    return _student(cfg, image_size, num_classes, partition_id, start, arch)


def answer_matrix(
    logits: np.ndarray, plan: UploadPrivacy, seed: int | None, abstain: np.ndarray | None = None
) -> np.ndarray:
    """Bound the answers (probabilities, votes or clipped logits), zero the rows the client
    abstains on (``feddistill.client.answers``); with local DP, noise them here, on the device,
    before they leave it (Gaussian mechanism, see ``feddistill.privacy.plan``).

    ``seed`` seeds the noise (a seeded simulation only); ``None`` draws it from OS entropy,
    which is what every device does: a seed the server knows would let it subtract the noise.
    """
    answers = bound_answers(logits, plan.bound, clip_norm=plan.clip_norm)
    if abstain is not None:
        answers[abstain] = 0.0
    if plan.mode == "local":
        answers = add_gaussian_noise(
            answers, noise_multiplier=plan.noise_multiplier, sensitivity=plan.sensitivity, rng=noise_rng(seed)
        )
    return answers


RECORD_CAP = "max-record-epsilon"  # node config: the device owner's own record-level budget


def device_record_cap(context: Context) -> float | None:
    """The record-level ε a device's owner allows (node config ``max-record-epsilon``), or None.

    The run config's ``privacy.record-target-epsilon`` comes from the server's operator; this
    cap comes from the device's own start-up and wins when lower, so a server cannot raise a
    device's budget. A device with a cap also refuses runs without record-level DP.
    """
    raw = context.node_config.get(RECORD_CAP)
    if raw is None or raw == "":
        return None
    try:
        cap = float(raw)
    except (TypeError, ValueError):
        cap = math.nan
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"node config {RECORD_CAP} = {raw!r} must be a number > 0")
    return cap


def _record_plan(
    saved: str | None, cfg: RunConfig, record: RecordPrivacy, cap: float | None = None
) -> tuple[PrivacyLedger, GaussianEvent]:
    """The device's record-level ledger and what this round's DP-SGD would cost.

    The cost, ``record.event()``, depends only on public parameters (the run's privacy plan,
    :class:`~feddistill.privacy.plan.RecordPrivacy`), not on the device's number of records.
    The ledger's budget is the run config's target, lowered to the device's own ``cap`` when
    one is set.
    """
    ledger = _record_ledger(saved, cfg, record)
    if cap is not None:
        ledger.target_epsilon = cap if ledger.target_epsilon is None else min(ledger.target_epsilon, cap)
    return ledger, record.event()


def _record_ledger(saved: str | None, cfg: RunConfig, record: RecordPrivacy) -> PrivacyLedger:
    # imported here: dp-accounting costs seconds in every fresh ClientApp process
    from feddistill.privacy.ledger import PrivacyLedger

    if saved is not None:
        ledger = PrivacyLedger.from_json(saved)
        # the history is the device's; the budget is whatever the device's config says now
        ledger.target_epsilon = record.target_epsilon
        return ledger
    return PrivacyLedger(
        unit="record", delta=record.delta, target_epsilon=record.target_epsilon, mechanism=record.mechanism
    )


def save_local_student(student: torch.nn.Module, cfg: RunConfig, partition_id: int) -> None:
    from feddistill.runfolder import RunFolder, save_model

    save_model(
        RunFolder(cfg.output_dir).local_student(partition_id), cfg.student_for(partition_id), student.state_dict()
    )


def handle_fedavg(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Flower FedAvg baseline: train the received weights on private data, send them back."""
    config = msg.content.config_records["config"]
    partition_id = int(context.node_config["partition-id"])
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    model = build_model(str(config["model"]), fleet.image_size, fleet.num_classes)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    x, y = private_tensors(fleet, partition_id)
    loss = train_supervised(
        model,
        x,
        y,
        epochs=int(config["epochs"]),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        momentum=float(config["momentum"]),
        seed=cfg.seed * 1_000_003 + int(config["server-round"]) * 10_007 + partition_id,
    )
    metrics = {"num-examples": len(y)}
    if np.isfinite(loss):
        metrics["train-loss"] = float(loss)
    return Message(
        RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}), reply_to=msg
    )
