"""The client's side of SecAgg+ answer collection (``distill.secure-aggregation = "secagg+"``).

Flower's :func:`~flwr.client.mod.secaggplus_mod` runs the protocol (keys, shares, masking)
unchanged; this module only adapts feddistill's round to its legacy ``fit`` layout:

1. at the setup stage the device checks the server's SecAgg+ parameters against its own
   config: the clipping range and quantization its noise calibration assumes, weight 1,
   and a reconstruction threshold no lower than the survivors its noise share was
   calibrated for (a server that lowered it could unmask a sum with too little noise);
2. at the masking stage the FitIns is turned back into a ``train.distill`` request and
   answered by the ordinary handler (digest, revisit, answer: every device-side check,
   the record-level budget included, still applies);
3. the answers (decoded from their wire dtype), plus under distributed DP a noise share
   N(0, s²) drawn from OS entropy (``feddistill.privacy.distributed``), become the
   FitRes ``parameters`` with weight 1; the mod clips, quantizes and masks them. The
   only plain-text value beside the masked vector is the distill reply's own metric,
   ``record-epsilon`` (record-level DP only; see ``feddistill.client.distill``), and
   ``num_examples`` is always 1: nothing that depends on the private data.

A refusal or a simulated dropout raises: the node sends an error and SecAgg+ treats it
as dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from feddistill import protocol
from feddistill.config import RunConfig
from feddistill.encoding import decode_answers, decode_votes
from feddistill.privacy.distributed import run_secagg_noise
from feddistill.privacy.mechanisms import noise_rng
from feddistill.privacy.plan import accept_privacy

ARRAY_NAMES = protocol.SECAGG_ARRAY_NAMES

Handler = Callable[[Message, Context, RunConfig], Message]


class SecAggRefused(RuntimeError):
    """The device refuses the server's SecAgg+ parameters or the round."""


def is_secagg(msg: Message) -> bool:
    """Whether a ``train`` message is one of SecAggPlusWorkflow's."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def check_setup(configs: ConfigRecord, cfg: RunConfig) -> None:
    """Refuse SecAgg+ parameters that differ from what this device's noise share assumes."""
    noise = run_secagg_noise(cfg)
    problems = []
    if not math.isclose(float(configs[Key.CLIPPING_RANGE]), noise.clipping_range, rel_tol=1e-9):
        problems.append(f"clipping range {configs[Key.CLIPPING_RANGE]} != {noise.clipping_range}")
    if int(configs[Key.TARGET_RANGE]) != noise.quantization_range:
        problems.append(f"quantization range {configs[Key.TARGET_RANGE]} != {noise.quantization_range}")
    if float(configs.get(Key.MAX_WEIGHT, 0.0)) != 1.0:
        problems.append(f"max weight {configs.get(Key.MAX_WEIGHT)} != 1")
    if int(configs[Key.THRESHOLD]) < noise.min_survivors:
        problems.append(
            f"reconstruction threshold {configs[Key.THRESHOLD]} < {noise.min_survivors}, the survivors "
            "this device's noise share is calibrated for"
        )
    if problems:
        raise SecAggRefused("SecAgg+ setup refused: " + "; ".join(problems))


def answers_as_fitres(msg: Message, context: Context, cfg: RunConfig, handler: Handler) -> Message:
    """The masking stage's inner call: answer the FitIns as a ``train.distill`` request."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    names = json.loads(str(config.pop(ARRAY_NAMES)))
    arrays = parameters_to_ndarrays(fitins.parameters)
    teacher = ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in zip(names, arrays, strict=True)})
    # The handler answers the workflow's own message with a distill request's content (a ClientApp
    # cannot make new messages); the legacy content is put back afterwards.
    legacy = msg.content
    msg.content = RecordDict({protocol.TEACHER_RECORD: teacher, protocol.CONFIG_RECORD: ConfigRecord(config)})
    try:
        reply = handler(msg, context, cfg)
    finally:
        msg.content = legacy
    if reply.has_error():
        raise SecAggRefused(f"round {config.get(protocol.ROUND)}: no answer ({reply.error.reason})")
    wire = reply.content.array_records[protocol.ANSWERS_RECORD][protocol.ANSWERS].numpy()
    num_classes = teacher[protocol.SIGNAL].numpy().shape[1]
    answers = decode_votes(wire, num_classes) if config.get("answer-dtype") == "vote" else decode_answers(wire)
    answers = answers.astype(np.float64)
    # the run's plan, which the handler has just accepted (cached): no calibration per message
    noise = accept_privacy(str(config[protocol.PRIVACY_PLAN]), cfg).secagg
    # this device's share of the sum's noise; OS entropy, never a seed the server knows
    if noise is not None and noise.distributed:
        answers = answers + noise_rng(None).normal(0.0, noise.share_std, size=answers.shape)
    # the same rule as a plain reply: record-epsilon (public parameters, participations) and nothing else
    sent = reply.content.metric_records[protocol.METRICS_RECORD]
    metrics = {k: v for k, v in sent.items() if k == protocol.RECORD_EPSILON}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([answers]), num_examples=1, metrics=metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def handle_secagg(msg: Message, context: Context, cfg: RunConfig, handler: Handler) -> Message:
    """One SecAgg+ stage through Flower's ``secaggplus_mod``; ``handler`` answers a distill request."""
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) == Stage.SETUP:
        check_setup(configs, cfg)
    return secaggplus_mod(msg, context, lambda m, c: answers_as_fitres(m, c, cfg, handler))
