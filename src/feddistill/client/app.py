"""The ClientApp: which handler answers which message.

- ``train.distill``: feddistill's round, :func:`feddistill.client.distill.handle_distill`
  (digest, revisit, answer; that module says exactly what a reply carries);
- ``train`` from Flower's SecAgg+ workflow (``distill.secure-aggregation = "secagg+"``):
  :func:`feddistill.client.secagg.handle_secagg`, whose masking stage answers through the same
  distill handler;
- any other ``train``: the FedAvg comparison peer, :func:`feddistill.client.distill.handle_fedavg`;
- ``query.identify``: the node's id and whether it is a device (:mod:`feddistill.client.node`).

A deployed SuperNode starts a fresh ClientApp process for every message, and only the messages
that train need torch. This module, the run config and the SecAgg+ bookkeeping (setup, key
sharing, unmasking) import none of it: :mod:`feddistill.client.distill` is imported when the
first message that trains arrives, so an identify query or a bookkeeping stage starts in a
fraction of the CPU time (``python -m bench install`` measures both kinds; a test keeps it so).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from feddistill import protocol
from feddistill.client.node import device_id, is_device
from feddistill.config import RunConfig, parse_config

__all__ = ["app", "make_client_app"]


def _training() -> ModuleType:
    # torch, the models, the training loops: only for the messages that train (module docstring)
    from feddistill.client import distill

    return distill


def make_client_app(cfg: RunConfig | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp for `cfg`; with None it reads Flower's run config (`flwr run .`).

    ``mods`` are Flower mods, ``(msg, context, call_next) -> Message``, wrapped (the first
    outermost) around every distill request: a ``train.distill`` message, and the distill
    request inside a SecAgg+ masking stage. The production apps install none; a simulation
    installs its scenarios (dropouts, hostile answers: ``feddistill.simulations.scenarios``).
    """
    client_app = ClientApp()

    def resolve(context: Context) -> RunConfig:
        return cfg if cfg is not None else parse_config(dict(context.run_config), "run config")

    def answer(msg: Message, context: Context) -> Message:
        return _training().handle_distill(msg, context, resolve(context))

    for mod in reversed(mods):  # Flower's order: mods[0] sees the request first
        answer = _wrapped(answer, mod)

    @client_app.train("distill")
    def distill(msg: Message, context: Context) -> Message:
        return answer(msg, context)

    @client_app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        # partition-id (simulation) or device-id; DEVICE: 1 when the node reads its own data dir
        meta = ConfigRecord({protocol.PARTITION: device_id(context), protocol.DEVICE: int(is_device(context))})
        return Message(RecordDict({protocol.REPLY_META: meta}), reply_to=msg)

    @client_app.train()
    def fedavg(msg: Message, context: Context) -> Message:
        from feddistill.client.secagg import handle_secagg, is_secagg

        if is_secagg(msg):  # SecAgg+ (distill.secure-aggregation): Flower's workflow speaks the legacy "train"
            return handle_secagg(msg, context, resolve(context), lambda m, c, _cfg: answer(m, c))
        return _training().handle_fedavg(msg, context, resolve(context))

    return client_app


def _wrapped(call_next: ClientAppCallable, mod: Mod) -> ClientAppCallable:
    def wrapped(msg: Message, context: Context) -> Message:
        return mod(msg, context, call_next)

    return wrapped


app = make_client_app()  # `flwr run .`: no scenario mods (its ServerApp refuses a run config that asks for one)
