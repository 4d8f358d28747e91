"""The client-side fault scenarios as a Flower ClientApp mod: dropouts and hostile answers.

:func:`scenario_mods` gives what ``feddistill.simulations.run`` passes to
``make_client_app(cfg, mods=...)``: one mod, ``(msg, context, call_next) -> Message`` like
Flower's ``secaggplus_mod``, around every distill request. The production ClientApp knows
nothing of it, and the mod itself never acts on a real device (node config ``data-dir``):
there it passes the request straight through, whatever the run config asks.

- ``scenario.dropout``: a sampled client drops out of a round with that probability (an Error
  reply, ``protocol.DROPPED``), drawn from ``(seed, round, partition, 0xD0)``.
- ``scenario.hostile-fraction``: the clients of :func:`~feddistill.simulations.attacks.hostile_clients`
  corrupt their answers with ``scenario.attack`` (``numpy.random.default_rng(seed + 3)``, the
  client's answer seed plus 3). The corruption is applied to the wire form; with one-byte votes
  a hostile client can only lie about the class, so it corrupts the matrix first and the vote
  carries the lie: the mod asks the handler for the float32 matrix (what the vote encodes;
  the config refuses local noise with votes) and encodes the vote itself.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from feddistill import protocol
from feddistill.client.node import device_id, is_device
from feddistill.config import RunConfig
from feddistill.encoding import encode_answers
from feddistill.simulations.attacks import corrupt_answers, hostile_clients


def scenario_mods(cfg: RunConfig) -> list[Mod]:
    """The mods a simulation of ``cfg`` installs on its ClientApp (none without a client scenario)."""
    if not cfg.scenario.dropout and not cfg.scenario.hostile_fraction:
        return []
    return [scenario_mod(cfg)]


def scenario_mod(cfg: RunConfig) -> Mod:
    """Dropouts, then hostile answers, for a simulated client of ``cfg``; a device passes through."""
    hostile = hostile_clients(cfg.fleet.num_clients, cfg.scenario.hostile_fraction, cfg.seed)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if is_device(context):  # simulation scenarios never run on a real device, whatever the server asks
            return call_next(msg, context)
        partition_id = device_id(context)
        rnd = int(msg.content.config_records[protocol.CONFIG_RECORD][protocol.ROUND])
        if dropped(cfg, rnd, partition_id):
            return Message(Error(protocol.DROPPED, "dropped out (simulated)"), reply_to=msg)
        if partition_id not in hostile:
            return call_next(msg, context)
        return hostile_reply(msg, context, call_next, cfg, rnd, partition_id)

    return mod


def dropped(cfg: RunConfig, rnd: int, partition_id: int) -> bool:
    """Whether simulated client ``partition_id`` drops out of round ``rnd``."""
    dropout = cfg.scenario.dropout
    return bool(dropout) and np.random.default_rng([cfg.seed, rnd, partition_id, 0xD0]).random() < dropout


def hostile_reply(
    msg: Message, context: Context, call_next: ClientAppCallable, cfg: RunConfig, rnd: int, partition_id: int
) -> Message:
    """The honest reply with its answers corrupted by ``cfg.scenario.attack`` (errors pass through)."""
    config = msg.content.config_records[protocol.CONFIG_RECORD]
    wire = str(config["answer-dtype"])
    if wire == "vote":  # the matrix the vote encodes (the download's signature does not cover this key)
        config["answer-dtype"] = "float32"
    try:
        reply = call_next(msg, context)
    finally:
        config["answer-dtype"] = wire
    if reply.has_error():
        return reply
    num_classes = msg.content.array_records[protocol.TEACHER_RECORD][protocol.SIGNAL].numpy().shape[1]
    record = reply.content.array_records[protocol.ANSWERS_RECORD]
    seed = cfg.seed * 1_000_003 + rnd * 10_007 + partition_id  # the client's own answer seed
    rng = np.random.default_rng(seed + 3)
    answers = corrupt_answers(record[protocol.ANSWERS].numpy(), cfg.scenario.attack, rng, num_classes=num_classes)
    if wire == "vote":
        answers = encode_answers(answers, wire)
    record[protocol.ANSWERS] = Array(np.ascontiguousarray(answers))
    return reply
