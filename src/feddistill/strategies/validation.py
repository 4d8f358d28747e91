"""The reply schema: what a ``train.distill`` reply may carry, enforced in one place.

Every reply passes through :func:`validate_reply` before any of its values is used (like
Flower's ``FedAvg._check_and_log_replies``: one function every path calls). A reply is
exactly (see :data:`REPLY_SCHEMA`):

- ArrayRecord ``answers`` holding one Array ``answers``: a (|Q|, C) float16 / float32 /
  uint8 matrix, or with answer-dtype ``vote`` a (|Q|,) uint8 vector of class indices. Its
  bytes must be exactly one ``.npy`` header plus the payload its declared dtype and shape
  call for (no trailing bytes, no second array), C order, little-endian;
- ConfigRecord ``meta`` holding exactly ``round`` (int, this round) and
  ``reference-digest`` (str, the server's reference-set digest);
- optionally MetricRecord ``metrics`` holding at most ``record-epsilon`` (a finite float in
  [0, 1e6]; only with record-level DP, where it is the device's own ledger epsilon).

Nothing else: no other record of any kind, no other key. The values must also lie where
the configured bound puts them: every entry finite and inside the bound's range, and,
without local noise, every probability row summing to 1 (within what the wire dtype's
rounding allows), every vote row one-hot, every clipped-logit row inside the clip norm.
When the run lets clients abstain (``distill.abstain-*``), an exactly all-zero row (a vote
of ``protocol.ABSTAIN_VOTE``) is also legal: "no answer on this row".

The sender is never a value the reply declares: it is Flower's node id
(``msg.metadata.src_node_id``, an authenticated SuperNode in deployment), mapped to a
client id by the table the server builds once at start-up (``ReplyCheck.nodes``).

What comes out is a :class:`ValidReply`, the only thing aggregation, the device ledger
and the report ever read; a bad reply gives a reason whose text before the first ``:``
is a fixed phrase (the server counts drops by it), never a value the client chose.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from feddistill import protocol
from feddistill.encoding import decode_answers, decode_votes

log = logging.getLogger("feddistill")

ANSWER_DTYPES = (np.float32, np.float16, np.uint8)
WIRE_DTYPES = {np.dtype(t).name: np.dtype(t) for t in ANSWER_DTYPES}  # "float32" -> dtype('float32')
NPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY: the only serialisation np.load reads back
MAX_RECORD_EPSILON = 1e6  # far above any budget anyone would run with, far below float overflow
MAX_NPY_HEADER = 4096  # an honest header is ~128 bytes; numpy's own limit is 10,000
BOUNDS = ("probs", "votes", "clipped_logits")

#: The declared schema, field by field (README's privacy section mirrors it).
REPLY_SCHEMA: dict[str, dict[str, Any]] = {
    f"{protocol.ANSWERS_RECORD}.{protocol.ANSWERS}": {
        "record": "ArrayRecord",
        "type": "Array (.npy, C order)",
        "dtype": ("float16", "float32", "uint8"),
        "shape": "(|Q|, C); answer-dtype vote: (|Q|,) uint8 class indices < C",
        "required": True,
    },
    f"{protocol.REPLY_META}.{protocol.ROUND}": {
        "record": "ConfigRecord",
        "type": "int",
        "range": "== this round",
        "required": True,
    },
    f"{protocol.REPLY_META}.{protocol.DIGEST}": {
        "record": "ConfigRecord",
        "type": "str",
        "range": "== the reference-set digest",
        "required": True,
    },
    f"{protocol.METRICS_RECORD}.{protocol.RECORD_EPSILON}": {
        "record": "MetricRecord",
        "type": "float",
        "range": f"finite, [0, {MAX_RECORD_EPSILON:g}]",
        "required": False,
        "only_with": "record-level DP",
    },
}


@dataclass(frozen=True)
class ReplyCheck:
    """What a valid reply must look like in this round.

    ``low``/``high`` bound every entry (widened by ``tolerance``); ``bound`` and
    ``local_noise`` select the row checks; ``nodes`` maps Flower node ids to client ids
    (None: the node id is the client id, for callers without an identify step).
    """

    round: int
    digest: str
    num_queries: int
    num_classes: int
    low: float = 0.0  # value range allowed by the bound (probabilities: [0, 1])
    high: float = 1.0
    tolerance: float = 1e-3  # per-entry slack for fp16 rounding
    max_bytes: int = 64 * 1024 * 1024
    votes: bool = False  # answer-dtype "vote": a (|Q|,) uint8 vector of class indices, not a matrix
    bound: str = "probs"  # privacy.bound: which row check applies
    clip_norm: float = 1.0  # clipped_logits: the row L2 bound
    local_noise: bool = False  # privacy.client-level = local: rows are noised, only finiteness and range apply
    record_level: bool = False  # record-level DP: `record-epsilon` may be sent
    nodes: Mapping[int, int] | None = None  # Flower node id -> client id (identify_nodes)
    abstain: bool = False  # distill.abstain-*: an all-zero row (a vote of ABSTAIN_VOTE) is a legal "no answer"

    def __post_init__(self) -> None:
        if self.bound not in BOUNDS:  # a server misconfiguration, not a client's fault
            raise ValueError(f"bound must be one of {BOUNDS}, got {self.bound!r}")

    @classmethod
    def from_plan(
        cls,
        plan: Any,
        *,
        round: int,
        digest: str,
        num_queries: int,
        num_classes: int,
        votes: bool,
        record_level: bool,
        nodes: Mapping[int, int] | None,
        abstain: bool = False,
    ) -> ReplyCheck:
        """The round's check from the run's privacy plan (:class:`feddistill.privacy.plan.UploadPrivacy`)."""
        low, high = plan.value_range()
        return cls(
            round,
            digest,
            num_queries,
            num_classes,
            low=low,
            high=high,
            votes=votes,
            bound=plan.bound,
            clip_norm=plan.clip_norm,
            local_noise=plan.mode == "local",
            record_level=record_level,
            nodes=nodes,
            abstain=abstain,
        )


@dataclass(frozen=True)
class ValidReply:
    """A reply that passed :func:`validate_reply`: typed values only."""

    node: int  # Flower node id (transport)
    sender: int  # client id the node id maps to
    answers: np.ndarray  # (|Q|, C) float32, decoded from the wire dtype
    record_epsilon: float | None  # the device's reported record-level epsilon (record-level DP only)


class Rejected(Exception):
    """A reply outside the schema; the message is the reason."""


def validate_reply(msg: Message, check: ReplyCheck) -> tuple[ValidReply | None, str | None]:
    """(ValidReply, None) for a valid reply, (None, reason) for any other. Never raises."""
    try:
        return _validate(msg, check), None
    except Rejected as exc:
        return None, str(exc)
    except Exception as exc:  # a hole in the checks: drop the reply, keep the round (the fuzz bench counts these)
        log.exception("round %d: validation failed unexpectedly", check.round)
        return None, f"validation failed unexpectedly: {type(exc).__name__}"


def check_reply(msg: Message, check: ReplyCheck) -> tuple[np.ndarray | None, str | None]:
    """(answers, None) for a valid reply, or (None, reason): :func:`validate_reply`'s answers only."""
    reply, reason = validate_reply(msg, check)
    return (None, reason) if reply is None else (reply.answers, None)


def _validate(msg: Message, check: ReplyCheck) -> ValidReply:
    if msg.has_error():
        _reject_error(msg)
    node = msg.metadata.src_node_id
    if check.nodes is not None and node not in check.nodes:
        raise Rejected(f"unknown sender: node {node} did not identify itself at start-up")
    sender = node if check.nodes is None else check.nodes[node]
    content = msg.content
    _check_record_names(content)
    _check_meta(content.config_records[protocol.REPLY_META], check)
    metrics = content.metric_records.get(protocol.METRICS_RECORD)
    record_epsilon = None if metrics is None else check_metrics(metrics, check)
    answers = _answers(content.array_records[protocol.ANSWERS_RECORD], check)
    return ValidReply(node=node, sender=sender, answers=answers, record_epsilon=record_epsilon)


def _reject_error(msg: Message) -> None:
    why = _short(msg.error.reason)
    if msg.error.code == protocol.REFUSED:
        raise Rejected(f"refused: {why}")
    if msg.error.code == protocol.DROPPED:
        raise Rejected("dropped out")
    raise Rejected(f"error reply: {why}")


def _short(value: Any, limit: int = 120) -> str:
    """A client-chosen value for a log line: repr'd, cut to `limit` characters."""
    try:
        text = value if isinstance(value, str) else repr(value)
    except ValueError:  # an int too long for str() (Python's 4300-digit limit)
        text = f"<{type(value).__name__} too long to print>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _check_record_names(content: Any) -> None:
    arrays, configs, metrics = content.array_records, content.config_records, content.metric_records
    if protocol.REPLY_META not in configs:
        raise Rejected("missing reply meta record")
    if protocol.ANSWERS_RECORD not in arrays:
        raise Rejected("missing answers")
    if set(arrays) != {protocol.ANSWERS_RECORD}:
        raise Rejected(
            f"unexpected arrays in reply (only the answers matrix may leave a device): {_short(sorted(arrays))}"
        )
    if set(configs) != {protocol.REPLY_META}:
        raise Rejected(f"unexpected config record: {_short(sorted(configs))}")
    if set(metrics) - {protocol.METRICS_RECORD}:
        raise Rejected(f"unexpected metric record: {_short(sorted(metrics))}")
    if len(content) != len(arrays) + len(configs) + len(metrics):  # a record type Flower may add later
        raise Rejected("unexpected record type")


def _check_meta(meta: ConfigRecord, check: ReplyCheck) -> None:
    extra = set(meta) - {protocol.ROUND, protocol.DIGEST}
    if extra:
        raise Rejected(f"unexpected meta key: {_short(sorted(extra))}")
    reply_round = meta.get(protocol.ROUND)
    if type(reply_round) is not int or reply_round != check.round:  # not bool, not 3.0, not "3"
        raise Rejected(f"wrong round: {_short(reply_round)} (expected {check.round})")
    digest = meta.get(protocol.DIGEST)
    if type(digest) is not str or digest != check.digest:
        raise Rejected("wrong reference-set digest")


def check_metrics(metrics: Mapping[str, Any] | MetricRecord, check: ReplyCheck) -> float | None:
    """The reply's metrics: at most `record-epsilon`, a finite float in [0, MAX_RECORD_EPSILON],
    and only under record-level DP. Returns it (or None); raises :class:`Rejected`.

    Shared with the SecAgg+ path, whose FitRes metrics travel in plain text."""
    extra = set(metrics) - {protocol.RECORD_EPSILON}
    if extra:
        raise Rejected(f"unexpected metric: {_short(sorted(extra))}")
    if protocol.RECORD_EPSILON not in metrics:
        return None
    if not check.record_level:
        raise Rejected("unexpected metric: record-epsilon without record-level DP")
    value = metrics[protocol.RECORD_EPSILON]
    # bool is an int; numpy scalars are accepted only as what they are (np.float64 subclasses float)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(f"bad record-epsilon: {type(value).__name__}, not a number")
    if isinstance(value, int) and not 0 <= value <= MAX_RECORD_EPSILON:  # before float(): 10**400 overflows it
        raise Rejected(f"bad record-epsilon: {_short(value)} outside [0, {MAX_RECORD_EPSILON:g}]")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= MAX_RECORD_EPSILON):
        raise Rejected(f"bad record-epsilon: {_short(value)} outside [0, {MAX_RECORD_EPSILON:g}]")
    return value


def _answers(record: ArrayRecord, check: ReplyCheck) -> np.ndarray:
    if list(record.keys()) != [protocol.ANSWERS]:
        raise Rejected(
            f"unexpected arrays in reply (only the answers matrix may leave a device): {_short(sorted(record.keys()))}"
        )
    array = record[protocol.ANSWERS]
    if not isinstance(array, Array) or not isinstance(array.data, bytes):
        raise Rejected("undecodable answers: not an Array")
    if len(array.data) > check.max_bytes:
        raise Rejected(f"reply too large: {len(array.data)} bytes")
    allowed = ("uint8",) if check.votes else tuple(WIRE_DTYPES)
    if array.dtype not in allowed:
        raise Rejected(
            f"wrong dtype: {_short(array.dtype)} (expected {', '.join(allowed)}{' votes' if check.votes else ''})"
        )
    expected = (check.num_queries,) if check.votes else (check.num_queries, check.num_classes)
    if tuple(array.shape) != expected:
        raise Rejected(
            f"wrong shape: {_short(tuple(array.shape))} (expected {expected}{' votes' if check.votes else ''})"
        )
    wire = parse_npy(array, WIRE_DTYPES[array.dtype], expected)
    if check.votes:
        cast = wire[wire != protocol.ABSTAIN_VOTE] if check.abstain else wire
        if cast.size and int(cast.max()) >= check.num_classes:
            raise Rejected(
                f"vote out of range: vote for class {int(cast.max())} (classes are 0..{check.num_classes - 1})"
            )
        return decode_votes(wire, check.num_classes)
    answers = decode_answers(wire)
    if not np.isfinite(answers).all():
        raise Rejected("non-finite values (NaN or Inf)")
    if answers.size and (answers.min() < check.low - check.tolerance or answers.max() > check.high + check.tolerance):
        raise Rejected(f"values outside the range of the bound: [{check.low:.6g}, {check.high:.6g}]")
    if not check.local_noise and answers.size:
        _check_rows(wire, answers, check)
    return answers


def parse_npy(array: Array, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The Array's bytes as exactly one ``.npy`` of `dtype` and `shape`: a version 1.0/2.0
    header that agrees with the Array's declared dtype and shape, C order, then exactly
    ``prod(shape) * itemsize`` bytes and nothing after them. Raises :class:`Rejected`."""
    from numpy.lib import format as npy

    if array.stype != NPY_STYPE:
        raise Rejected(f"undecodable answers: serialisation {_short(array.stype)}, not {NPY_STYPE}")
    stream = io.BytesIO(array.data)
    try:  # numpy's own header parser (a literal dict, never pickle); anything it dislikes is undecodable
        version = npy.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"npy version {version}")
        reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        header_shape, fortran, header_dtype = reader(stream, max_header_size=MAX_NPY_HEADER)
    except Exception as exc:
        raise Rejected(f"undecodable answers: {_short(str(exc), 80)}") from None
    if header_dtype != dtype or tuple(header_shape) != shape:
        raise Rejected(
            f"array header disagrees with the declared dtype/shape: {_short(header_dtype.str)} "
            f"{_short(tuple(header_shape))}"
        )
    if fortran:
        raise Rejected("undecodable answers: Fortran order (C order expected)")
    payload = len(array.data) - stream.tell()
    expected = math.prod(shape) * dtype.itemsize
    if payload > expected:
        raise Rejected(f"trailing bytes after the .npy: {payload - expected}")
    if payload < expected:
        raise Rejected(f"truncated answers: {payload} of {expected} bytes")
    return np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=stream.tell()).reshape(shape)


def row_tolerance(wire: np.dtype) -> tuple[float, float]:
    """(rel, abs): an honest entry x arrives as x (1 + d) + e with |d| <= rel, |e| <= abs, so an
    honest probability row sums to 1 within ``rel + C abs`` and an honest clipped row has norm
    at most ``B (1 + rel) + sqrt(C) abs``.

    The client casts its float64 bound to float32 (relative 2^-24) and shrinks a row whose
    float32 norm rounded above the bound by 2^-20 (``privacy.mechanisms._enforce_row_norms``;
    a few ulp over, so one step, four allowed), then casts to the wire: float16/float32 round
    to nearest (relative eps/2 for a normal number, half a subnormal step below that); uint8
    sends round(255 x), off by at most 1/510, decoded in float32."""
    client = 2 * float(np.finfo(np.float32).eps) / 2 + 4 * 2.0**-20
    if wire == np.uint8:
        return client, 1 / 510
    info = np.finfo(wire)
    return float(info.eps) / 2 + client, float(info.smallest_subnormal) / 2


def _check_rows(wire: np.ndarray, answers: np.ndarray, check: ReplyCheck) -> None:
    """Rows an honest client's bound produces: probability rows sum to 1, vote rows are one-hot,
    clipped rows stay within the clip norm (each with the wire dtype's rounding)."""
    rel, abs_ = row_tolerance(wire.dtype)
    rows = answers.astype(np.float64)
    if check.bound in ("probs", "votes"):
        index = np.arange(len(rows))
        if check.abstain:  # an abstention is an exactly all-zero row
            index = np.flatnonzero((rows != 0).any(axis=1))
            rows = rows[index]
            if not len(rows):
                return
        sums = rows.sum(axis=1)
        worst = int(np.argmax(np.abs(sums - 1.0)))
        slack = rel + check.num_classes * abs_
        if abs(sums[worst] - 1.0) > slack:
            raise Rejected(
                f"rows not probability distributions: row {int(index[worst])} sums to {sums[worst]:.6g} "
                f"(1 +- {slack:.3g})"
            )
        if check.bound == "votes" and not np.isin(rows, (0.0, 1.0)).all():
            raise Rejected("rows not one-hot votes")
    elif check.bound == "clipped_logits":
        norms = np.sqrt(np.square(rows).sum(axis=1))
        limit = check.clip_norm * (1.0 + rel) + math.sqrt(check.num_classes) * abs_
        if norms.max() > limit:
            raise Rejected(f"row norm above the clip norm: {norms.max():.6g} > {check.clip_norm}")
