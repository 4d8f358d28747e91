"""Reply validation: one function, called by every aggregator before it aggregates.

A reply is accepted only if it is a well-formed answer to *this* round's request:
right round id, right reference-set digest, an answers matrix of the right
shape and dtype, finite, and inside the range the configured bound allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from feddistill import protocol
from feddistill.encoding import decode_answers, decode_votes

ANSWER_DTYPES = (np.float32, np.float16, np.uint8)


@dataclass(frozen=True)
class ReplyCheck:
    """What a valid reply must look like in this round."""

    round: int
    digest: str
    num_queries: int
    num_classes: int
    low: float = 0.0  # value range allowed by the bound (probabilities: [0, 1])
    high: float = 1.0
    tolerance: float = 1e-3  # fp16 rounding
    max_bytes: int = 64 * 1024 * 1024
    votes: bool = False  # answer-dtype "vote": a (|Q|,) uint8 vector of class indices, not a matrix


def check_reply(msg: Message, check: ReplyCheck) -> tuple[np.ndarray | None, str | None]:
    """Return (answers, None) for a valid reply, or (None, reason) for a bad one."""
    if msg.has_error():
        if msg.error.code == protocol.REFUSED:
            return None, f"refused: {msg.error.reason}"
        if msg.error.code == protocol.DROPPED:
            return None, "dropped out"
        return None, f"error reply: {msg.error.reason}"
    content = msg.content
    meta = content.config_records.get(protocol.REPLY_META)
    if meta is None:
        return None, "missing reply meta record"
    reply_round = meta.get(protocol.ROUND)
    if type(reply_round) is not int or reply_round != check.round:
        return None, f"wrong round: {meta.get(protocol.ROUND)!r} (expected {check.round})"
    if meta.get(protocol.DIGEST) != check.digest:
        return None, "wrong reference-set digest"
    record = content.array_records.get(protocol.ANSWERS_RECORD)
    if record is None or protocol.ANSWERS not in record:
        return None, "missing answers"
    if set(content.array_records) != {protocol.ANSWERS_RECORD} or list(record.keys()) != [protocol.ANSWERS]:
        return None, "unexpected arrays in reply (only the answers matrix may leave a device)"
    array = record[protocol.ANSWERS]
    if len(array.data) > check.max_bytes:
        return None, f"reply too large: {len(array.data)} bytes"
    try:
        answers = array.numpy()
    except Exception as exc:  # malformed bytes
        return None, f"undecodable answers: {exc}"
    if check.votes:
        return _check_votes(answers, check)
    if answers.dtype not in ANSWER_DTYPES:
        return None, f"wrong dtype {answers.dtype} (expected float32, float16 or uint8)"
    if answers.shape != (check.num_queries, check.num_classes):
        return None, f"wrong shape {answers.shape} (expected {(check.num_queries, check.num_classes)})"
    answers = decode_answers(answers)
    if not np.isfinite(answers).all():
        return None, "non-finite values (NaN or Inf)"
    if answers.size and (answers.min() < check.low - check.tolerance or answers.max() > check.high + check.tolerance):
        return None, f"values outside [{check.low}, {check.high}]"
    return answers, None


def _check_votes(votes: np.ndarray, check: ReplyCheck) -> tuple[np.ndarray | None, str | None]:
    if votes.dtype != np.uint8:
        return None, f"wrong dtype {votes.dtype} (expected uint8 votes)"
    if votes.shape != (check.num_queries,):
        return None, f"wrong shape {votes.shape} (expected {(check.num_queries,)} votes)"
    if votes.size and int(votes.max()) >= check.num_classes:
        return None, f"vote for class {int(votes.max())} (classes are 0..{check.num_classes - 1})"
    return decode_votes(votes, check.num_classes), None
