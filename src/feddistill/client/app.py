"""The ClientApp: digest, revisit, answer (DESIGN.md, step 2).

The client checks the reference-set digest (refuses on mismatch), distils its
own student toward the teacher signal on the round's public queries (digest),
trains on its private data (revisit), then answers with its student's
probabilities on the queries. Only that matrix, the round id, the digest and a
few scalar metrics leave the device: no weights, no per-example private values.

The student persists across rounds in the node's context state (FedMD:
Li & Wang 2019), so each client keeps learning from the consensus.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from feddistill import protocol
from feddistill.config import RunConfig, parse_config
from feddistill.models import build_model
from feddistill.simulations.fleet import Fleet, as_tensors, fleet_canaries, load_fleet, private_tensors, training_data
from feddistill.training import predict_probs, train_distill, train_revisit, train_supervised

# Each simulated client runs in a 1-CPU worker: more torch threads only oversubscribe the cores.
torch.set_num_threads(1)

STUDENT_STATE = "student"
REFUSED = 1  # Error code of a refusal (digest mismatch, over budget, ...)


def _student(cfg: RunConfig, fleet: Fleet, partition_id: int, context: Context, arch: str) -> torch.nn.Module:
    model = build_model(arch, fleet.image_size, fleet.num_classes, seed=cfg.seed * 100_003 + partition_id)
    saved = context.state.array_records.get(STUDENT_STATE)
    if saved is not None:
        model.load_state_dict(saved.to_torch_state_dict())
    return model


def handle_distill(msg: Message, context: Context, cfg: RunConfig) -> Message:
    config = msg.content.config_records[protocol.CONFIG_RECORD]
    partition_id = int(context.node_config["partition-id"])
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    if config[protocol.DIGEST] != fleet.splits.reference_digest:
        return Message(Error(REFUSED, "reference-set digest mismatch: refusing to answer"), reply_to=msg)

    rnd = int(config[protocol.ROUND])
    teacher = msg.content.array_records[protocol.TEACHER_RECORD]
    queries = teacher[protocol.QUERIES].numpy()
    signal = torch.from_numpy(teacher[protocol.SIGNAL].numpy().astype(np.float32))
    ref_x, _ = as_tensors(fleet.splits.reference)
    query_x = ref_x[torch.from_numpy(queries)]
    private_x, private_y = training_data(fleet, partition_id, fleet_canaries(cfg))
    seed = cfg.seed * 1_000_003 + rnd * 10_007 + partition_id

    student = _student(cfg, fleet, partition_id, context, cfg.student_for(partition_id))
    common = dict(batch_size=int(config["batch-size"]), lr=float(config["lr"]), momentum=float(config["momentum"]))
    digest_loss = train_distill(
        student, query_x, signal, temperature=float(config["temperature"]),
        epochs=int(config["digest-epochs"]), seed=seed, **common,
    )
    revisit_loss = train_revisit(
        student, private_x, private_y, query_x, signal, kd_weight=float(config["revisit-kd-weight"]),
        temperature=float(config["temperature"]), epochs=int(config["revisit-epochs"]), seed=seed + 1, **common,
    )
    answers = predict_probs(student, query_x).numpy().astype(str(config["answer-dtype"]))
    context.state[STUDENT_STATE] = ArrayRecord(student.state_dict())
    if cfg.audit.keep_artifacts:  # simulation only: the auditor's target (b), the local student
        save_local_student(student, cfg, partition_id)

    metrics = {protocol.NUM_EXAMPLES: len(private_y)}
    for name, value in (("digest-loss", digest_loss), ("revisit-loss", revisit_loss)):
        if np.isfinite(value):
            metrics[name] = float(value)
    return Message(
        RecordDict(
            {
                protocol.ANSWERS_RECORD: ArrayRecord({protocol.ANSWERS: Array(np.ascontiguousarray(answers))}),
                protocol.METRICS_RECORD: MetricRecord(metrics),
                protocol.REPLY_META: ConfigRecord(
                    {protocol.ROUND: rnd, protocol.DIGEST: fleet.splits.reference_digest, protocol.PARTITION: partition_id}
                ),
            }
        ),
        reply_to=msg,
    )


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

    @client_app.train()
    def fedavg(msg: Message, context: Context) -> Message:
        return handle_fedavg(msg, context, resolve(context))

    return client_app


app = make_client_app()
