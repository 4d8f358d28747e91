"""The reply schema (strategies/validation.py), field by field, and what the server does with
what passes it: identity from Flower's node id, the device ledger, the SecAgg+ metrics rule."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from feddistill import protocol
from feddistill.encoding import encode_answers
from feddistill.privacy.mechanisms import bound_answers
from feddistill.strategies import REPLY_SCHEMA, MeanAnswers, ReplyCheck, validate_reply
from feddistill.strategies.validation import row_tolerance

Q, C, ROUND, DIGEST = 6, 10, 3, "ab" * 32
NODES = {101: 0, 102: 1}


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _probs(seed: int = 0, q: int = Q, c: int = C, scale: float = 3.0) -> np.ndarray:
    return bound_answers(np.random.default_rng(seed).normal(0, scale, (q, c)), "probs")


def _reply(
    wire: np.ndarray | Array | None = None,
    *,
    node: int = 101,
    meta: dict | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Message:
    array = (
        wire
        if isinstance(wire, Array)
        else Array(np.ascontiguousarray(encode_answers(_probs(), "float16") if wire is None else wire))
    )
    records = {
        protocol.ANSWERS_RECORD: ArrayRecord({protocol.ANSWERS: array}),
        protocol.REPLY_META: ConfigRecord({protocol.ROUND: ROUND, protocol.DIGEST: DIGEST, **(meta or {})}),
    }
    if metrics is not None:
        records[protocol.METRICS_RECORD] = MetricRecord(metrics)
    records.update(extra or {})
    return Message(
        RecordDict(records), reply_to=Message(RecordDict({}), dst_node_id=node, message_type=protocol.DISTILL)
    )


def _check(**kw) -> ReplyCheck:
    return ReplyCheck(ROUND, DIGEST, kw.pop("num_queries", Q), kw.pop("num_classes", C), nodes=NODES, **kw)


def _why(msg: Message, check: ReplyCheck | None = None) -> str | None:
    return validate_reply(msg, check or _check())[1]


def test_the_declared_schema_is_the_agreed_one():
    assert set(REPLY_SCHEMA) == {"answers.answers", "meta.round", "meta.reference-digest", "metrics.record-epsilon"}
    assert [k for k, f in REPLY_SCHEMA.items() if not f["required"]] == ["metrics.record-epsilon"]


def test_a_valid_reply_gives_typed_values_and_the_sender_from_the_node_id():
    reply, why = validate_reply(_reply(node=102, metrics={protocol.RECORD_EPSILON: 1.5}), _check(record_level=True))
    assert why is None and reply.node == 102 and reply.sender == 1 and reply.record_epsilon == 1.5
    assert reply.answers.dtype == np.float32 and reply.answers.shape == (Q, C)
    assert _why(_reply(metrics={})) is None and _why(_reply()) is None  # metrics: empty or absent


def test_the_real_client_reply_passes_the_schema(tmp_path):
    from flwr.app import Context

    from feddistill.client.distill import handle_distill
    from feddistill.config import load_config
    from feddistill.data.fleet import load_fleet
    from feddistill.privacy.plan import run_privacy, upload_privacy
    from feddistill.server.app import round_config
    from feddistill.strategies import teacher_arrays

    cfg = load_config(
        None,
        {
            "fleet.num_clients": 3,
            "distill.digest_epochs": 1,
            "distill.revisit_epochs": 1,
            "distill.query_size": 20,
            "output_dir": str(tmp_path),
        },
    )
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    config = round_config(cfg, fleet.splits.reference_digest, run_privacy(cfg))
    config[protocol.ROUND] = 1
    signal = np.full((20, fleet.num_classes), 1.0 / fleet.num_classes, np.float32)
    request = Message(
        RecordDict({protocol.TEACHER_RECORD: teacher_arrays(signal, np.arange(20)), protocol.CONFIG_RECORD: config}),
        dst_node_id=55,
        message_type=protocol.DISTILL,
    )
    context = Context(
        run_id=1, node_id=55, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(), run_config={}
    )
    check = ReplyCheck.from_plan(
        upload_privacy(cfg),
        round=1,
        digest=fleet.splits.reference_digest,
        num_queries=20,
        num_classes=fleet.num_classes,
        votes=False,
        record_level=False,
        nodes={55: 1},
    )
    reply, why = validate_reply(handle_distill(request, context, cfg), check)
    assert why is None and reply.sender == 1


@pytest.mark.parametrize("wire", ["float16", "float32", "uint8"])
@pytest.mark.parametrize("classes", [2, 10, 100, 1000])
def test_honest_probability_rows_pass_on_every_wire_dtype(wire, classes):
    for seed, scale in enumerate([0.01, 1.0, 5.0, 50.0, 500.0]):  # flat to one-hot rows
        answers = encode_answers(_probs(seed, q=40, c=classes, scale=scale), wire)
        check = _check(num_queries=40, num_classes=classes)
        assert _why(_reply(answers), check) is None, (wire, classes, scale)


@pytest.mark.parametrize("wire", ["float16", "float32"])
def test_honest_clipped_rows_pass_at_the_clip_norm(wire):
    logits = np.random.default_rng(1).normal(0, 10, (Q, C))  # every row longer than the clip norm
    answers = encode_answers(bound_answers(logits, "clipped_logits", clip_norm=2.0), wire)
    check = _check(bound="clipped_logits", clip_norm=2.0, low=-2.0, high=2.0)
    assert _why(_reply(answers), check) is None
    too_long = np.full((Q, C), 2.0 * 1.01 / math.sqrt(C), dtype=wire)  # 1 % over: beyond any rounding
    assert _why(_reply(too_long), check).startswith("row norm above the clip norm")


@pytest.mark.parametrize("wire", ["float16", "float32", "uint8"])
def test_rows_that_are_not_distributions_are_rejected(wire):
    rel, abs_ = row_tolerance(np.dtype(np.uint8 if wire == "uint8" else wire))
    off = 2 * (rel + C * abs_)  # twice the tolerance
    for rows in (np.zeros((Q, C)), np.ones((Q, C)), np.full((Q, C), (1 + off) / C), np.full((Q, C), (1 - off) / C)):
        answers = encode_answers(rows, wire) if wire == "uint8" else rows.astype(wire)
        assert _why(_reply(answers)).startswith("rows not probability distributions"), rows[0, 0]
    assert _why(_reply(np.zeros((Q, C), np.float16)), _check(local_noise=True, low=-50, high=50)) is None  # noised


def test_vote_rows_must_be_one_hot():
    soft = np.zeros((Q, C), np.float16)
    soft[:, :2] = 0.5
    assert _why(_reply(soft), _check(bound="votes")) == "rows not one-hot votes"
    assert _why(_reply(np.eye(C, dtype=np.float16)[np.arange(Q) % C]), _check(bound="votes")) is None


def _npy(a: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, a, allow_pickle=False)
    return buffer.getvalue()


def _array(data: bytes, dtype: str = "float16", shape: tuple = (Q, C), stype: str = "numpy.ndarray") -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def test_the_array_must_be_exactly_one_npy_of_its_declared_dtype_and_shape():
    wire = encode_answers(_probs(), "float16")
    good = _npy(wire)
    assert _why(_reply(_array(good))) is None
    cases = {
        "trailing bytes after the .npy": _array(good + b"\x00"),
        "truncated answers": _array(good[:-1]),
        "array header disagrees": _array(_npy(wire.astype(np.float32)), dtype="float16"),
        "array header disagrees ": _array(_npy(wire.reshape(-1))),
        "array header disagrees  ": _array(_npy(wire.astype(">f2"))),  # big-endian
        "undecodable answers: Fortran": _array(_npy(np.asfortranarray(wire))),
        "undecodable answers: serialisation": _array(good, stype="torch"),
        "undecodable answers": _array(b"\x93NUMPY\x03\x00" + good[8:]),  # npy version 3
        "wrong dtype": _array(good, dtype="float64"),
        "wrong shape": _array(good, shape=(Q, C + 1)),
    }
    for expected, array in cases.items():
        assert _why(_reply(array)).startswith(expected.strip()), expected


@pytest.mark.parametrize(
    "meta, reason",
    [
        ({protocol.PARTITION: "zero"}, "unexpected meta key"),
        ({protocol.PARTITION: [0, 1]}, "unexpected meta key"),
        ({protocol.PARTITION: math.nan}, "unexpected meta key"),
        ({protocol.PARTITION: 1}, "unexpected meta key"),  # not even a well-formed id may be declared
        ({"blob": b"\x00" * 4096}, "unexpected meta key"),
        ({protocol.ROUND: True}, "wrong round"),
        ({protocol.ROUND: float(ROUND)}, "wrong round"),
        ({protocol.ROUND: str(ROUND)}, "wrong round"),
        ({protocol.DIGEST: DIGEST.encode()}, "wrong reference-set digest"),
    ],
)
def test_meta_holds_exactly_round_and_digest(meta, reason):
    assert _why(_reply(meta=meta)).startswith(reason)


@pytest.mark.parametrize(
    "metrics, record_level, reason",
    [
        ({protocol.RECORD_EPSILON: 0.5}, False, "unexpected metric"),  # only with record-level DP
        ({protocol.NUM_EXAMPLES: [1.0]}, True, "unexpected metric"),
        ({"revisit-loss": [0.5] * 50_000}, True, "unexpected metric"),
        ({protocol.RECORD_EPSILON: [0.0, 0.0]}, True, "bad record-epsilon"),
        ({protocol.RECORD_EPSILON: math.nan}, True, "bad record-epsilon"),
        ({protocol.RECORD_EPSILON: math.inf}, True, "bad record-epsilon"),
        ({protocol.RECORD_EPSILON: -0.1}, True, "bad record-epsilon"),
        ({protocol.RECORD_EPSILON: 1e6 + 1}, True, "bad record-epsilon"),
        ({protocol.RECORD_EPSILON: 10**400}, True, "bad record-epsilon"),
    ],
)
def test_metrics_hold_at_most_a_bounded_record_epsilon(metrics, record_level, reason):
    assert _why(_reply(metrics=metrics), _check(record_level=record_level)).startswith(reason)


@pytest.mark.parametrize(
    "extra, reason",
    [
        ({"meta2": ConfigRecord({protocol.ROUND: ROUND})}, "unexpected config record"),
        ({"losses": MetricRecord({"loss": [0.5] * 50_000})}, "unexpected metric record"),
        ({"weights": ArrayRecord({"w": Array(np.zeros(3, np.float32))})}, "unexpected arrays"),
        ({protocol.REPLY_META: MetricRecord({protocol.ROUND: ROUND})}, "missing reply meta record"),
    ],
)
def test_nothing_but_the_three_records(extra, reason):
    assert _why(_reply(extra=extra)).startswith(reason)


def test_errors_and_unknown_nodes_are_dropped_with_a_fixed_reason():
    request = Message(RecordDict({}), dst_node_id=101, message_type=protocol.DISTILL)
    assert _why(Message(Error(protocol.REFUSED, "x" * 10_000), reply_to=request)).startswith("refused: xxx")
    assert len(_why(Message(Error(protocol.REFUSED, "x" * 10_000), reply_to=request))) < 200
    assert _why(_reply(node=999)).startswith("unknown sender")


def test_collect_keeps_a_node_s_first_reply_and_counts_the_rest():
    strategy = MeanAnswers(sampling_rate=1.0)
    check = _check(record_level=True)
    replies = [
        _reply(node=101, metrics={protocol.RECORD_EPSILON: 3.0}),
        _reply(node=101, metrics={protocol.RECORD_EPSILON: 0.0}),  # a second answer of client 0
        _reply(node=102, meta={protocol.PARTITION: 0}),  # claims client 0
        _reply(node=102, metrics={protocol.RECORD_EPSILON: 1.0}),
    ]
    signal, collected = strategy.aggregate_round(replies, check)
    assert collected.senders == [0, 1] and collected.weights == [1.0, 1.0]
    assert collected.metrics == [{protocol.RECORD_EPSILON: 3.0}, {protocol.RECORD_EPSILON: 1.0}]
    assert collected.dropped == {"duplicate reply": 1, "unexpected meta key": 1}
    assert signal.shape == (Q, C)


def test_device_entries_are_keyed_by_the_sender_and_never_go_down():
    from feddistill.server.app import record_device_epsilons
    from feddistill.strategies import RoundReplies

    devices = {0: {protocol.RECORD_EPSILON: 4.0}}
    round_ = RoundReplies(senders=[0, 1], metrics=[{protocol.RECORD_EPSILON: 0.5}, {protocol.RECORD_EPSILON: 2.0}])
    record_device_epsilons(devices, round_)
    assert devices == {0: {protocol.RECORD_EPSILON: 4.0}, 1: {protocol.RECORD_EPSILON: 2.0}}


def test_identify_replies_must_name_one_int_id():
    from feddistill.server.app import identify_reply

    request = Message(RecordDict({}), dst_node_id=7, message_type=protocol.IDENTIFY)

    def reply(meta: dict) -> Message:
        return Message(RecordDict({protocol.REPLY_META: ConfigRecord(meta)}), reply_to=request)

    assert identify_reply(reply({protocol.PARTITION: 4, protocol.DEVICE: 1})) == (4, True)
    for bad in (
        {protocol.PARTITION: "zero"},
        {protocol.PARTITION: 1.0},
        {protocol.PARTITION: True},
        {protocol.PARTITION: -1},
        {protocol.PARTITION: 1, protocol.DEVICE: 2},
        {protocol.PARTITION: 1, "x": 1},
    ):
        with pytest.raises(RuntimeError, match="node 7 sent a malformed identify reply"):
            identify_reply(reply(bad))


def test_secagg_plain_text_metrics_follow_the_same_rule():
    from flwr.common import Code, FitRes, Parameters, Status
    from flwr.server.compat.grid_client_proxy import GridClientProxy

    from feddistill.config import load_config
    from feddistill.server.secagg import SecAggReplies, survivor_metrics

    cfg = load_config(None, {"privacy.record_level": True, "privacy.record_noise_multiplier": 1.0})
    results = [
        (GridClientProxy(node, None, 1), FitRes(Status(Code.OK, ""), Parameters([], ""), 1, metrics))
        for node, metrics in ((101, {protocol.RECORD_EPSILON: [0.0, 0.0]}), (102, {protocol.RECORD_EPSILON: 1.0}))
    ]
    out = SecAggReplies()
    survivor_metrics(out, results, cfg, ROUND, NODES)
    assert out.senders == [0, 1] and out.metrics == [{}, {protocol.RECORD_EPSILON: 1.0}]
    assert out.bad_metrics == {"bad record-epsilon": 1}
