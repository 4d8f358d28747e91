"""The base of every answer-aggregation strategy: sample, configure, validate, aggregate.

A Flower :class:`~flwr.serverapp.strategy.Strategy` whose "arrays" are the
teacher signal on the round's queries and whose train replies are the clients'
answers on those queries. Subclasses override only :meth:`aggregate_answers`
(the way Flower's ``FedMedian`` overrides only ``aggregate_train``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from feddistill import protocol
from feddistill.strategies.validation import ReplyCheck, ValidReply, validate_reply

log = logging.getLogger("feddistill")


@dataclass
class RoundReplies:
    """What one round's replies amounted to, after validation.

    Filled only from :class:`~feddistill.strategies.validation.ValidReply` values: every
    field holds typed, validated data, so nothing downstream (aggregation, the device
    ledger, the report) reads a raw reply."""

    answers: list[np.ndarray] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # all 1.0: no reply carries a weight
    senders: list[int] = field(default_factory=list)  # client id of each kept answer, from Flower's node id
    metrics: list[dict[str, float]] = field(default_factory=list)  # {"record-epsilon": eps} or {} per kept answer
    dropped: dict[str, int] = field(default_factory=dict)  # reason (its fixed phrase) -> count
    bytes_uploaded: int = 0

    @property
    def num_replies(self) -> int:
        """Replies the aggregate is made of (SecAgg+: the survivors, whose answers the server never sees)."""
        return len(self.answers)

    def keep(self, reply: ValidReply) -> None:
        self.answers.append(reply.answers)
        self.weights.append(1.0)
        self.senders.append(reply.sender)
        self.metrics.append({} if reply.record_epsilon is None else {protocol.RECORD_EPSILON: reply.record_epsilon})

    def drop(self, reason: str, node: int, rnd: int) -> None:
        """Count a bad reply under its reason's fixed phrase."""
        tally(self.dropped, reason)
        log.warning("round %d: dropped reply from node %d: %s", rnd, node, reason)


def tally(counts: dict[str, int], reason: str) -> None:
    """Count ``reason`` under its fixed phrase, the text before the first ':' (never a value a
    client chose, so a hostile client cannot mint new keys)."""
    key = reason.split(":")[0]
    counts[key] = counts.get(key, 0) + 1


def upload_bytes(msg: Message) -> int:
    """Bytes of array data a reply brought (counted whether or not it is valid)."""
    if msg.has_error():
        return 0
    return sum(
        len(a.data)
        for rec in msg.content.array_records.values()
        for a in rec.values()
        if isinstance(a, Array) and isinstance(a.data, bytes)
    )


class AnswerStrategy(Strategy):
    """Samples clients, sends them the teacher signal, validates and aggregates answers.

    Parameters
    ----------
    sampling_rate : float
        Per-round client sampling rate q.
    sampling : str
        ``"poisson"``: every node is picked independently with probability q
        (what the subsampled-Gaussian accountant assumes); ``"fixed"``: exactly
        ``max(1, round(q * N))`` nodes, uniformly without replacement.
    seed : int
        Seed of the sampling RNG (its state is part of the server checkpoint).
    min_replies : int
        A round whose valid replies are fewer than this is not aggregated.
    """

    name = "base"

    def __init__(self, sampling_rate: float, sampling: str = "poisson", seed: int = 0, min_replies: int = 1) -> None:
        self.sampling_rate = sampling_rate
        self.sampling = sampling
        self.rng = np.random.default_rng(seed)
        self.min_replies = min_replies
        self.node_order: list[int] | None = None  # nodes in partition order, set by the server

    # ---- Flower Strategy interface ----
    def summary(self) -> None:
        log.info("strategy %s: %s sampling, q=%.3f", self.name, self.sampling, self.sampling_rate)

    def sample_nodes(self, node_ids: list[int]) -> list[int]:
        """Sample from `node_ids` in the order given (the server passes partition order)."""
        if self.sampling == "poisson":
            picked = self.rng.random(len(node_ids)) < self.sampling_rate
            return [n for n, p in zip(node_ids, picked) if p]
        k = max(1, round(self.sampling_rate * len(node_ids)))
        chosen = self.rng.choice(len(node_ids), size=k, replace=False)
        return [node_ids[i] for i in sorted(chosen)]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self.sample_nodes(self.node_order or list(grid.get_node_ids()))
        config[protocol.ROUND] = server_round
        content = RecordDict({protocol.TEACHER_RECORD: arrays, protocol.CONFIG_RECORD: config})
        return [Message(content=content, dst_node_id=n, message_type=protocol.DISTILL) for n in nodes]

    def collect(self, replies: Iterable[Message], check: ReplyCheck) -> RoundReplies:
        """Validate every reply; keep the good ones, count the bad ones by reason. A node that
        answers twice in one round keeps its first answer."""
        out = RoundReplies()
        for msg in replies:
            out.bytes_uploaded += upload_bytes(msg)
            reply, reason = validate_reply(msg, check)
            if reply is not None and reply.sender in out.senders:
                reason = f"duplicate reply: client {reply.sender} already answered this round"
                reply = None
            if reply is None:
                assert reason is not None  # validate_reply gives a reason with every rejection
                out.drop(reason, msg.metadata.src_node_id, check.round)
                continue
            out.keep(reply)
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower interface; needs the round's ReplyCheck, so the server calls :meth:`aggregate_round`."""
        raise NotImplementedError("use aggregate_round(replies, check)")

    def aggregate_round(self, replies: Iterable[Message], check: ReplyCheck) -> tuple[np.ndarray | None, RoundReplies]:
        collected = self.collect(replies, check)
        if len(collected.answers) < self.min_replies:
            return None, collected
        # replies arrive in any order: aggregate in sender order so a seeded run is reproducible
        order = np.argsort(collected.senders, kind="stable")
        stacked = np.stack([collected.answers[i] for i in order])
        return self.aggregate_answers(stacked, np.asarray(collected.weights)[order]), collected

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # evaluation is central (server-side, on the test split)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # ---- the one thing subclasses define ----
    def aggregate_answers(self, answers: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """answers: (K clients, |Q|, C) -> teacher signal (|Q|, C), rows summing to 1."""
        raise NotImplementedError

    def signal_from_mean(self, mean: np.ndarray) -> np.ndarray:
        """The teacher signal from the mean of the answers alone, where no single answer reaches
        the server (SecAgg+, ``feddistill.server.secagg``) and any DP noise is in the mean already:
        the strategy's own rule applied to that one (already averaged) matrix."""
        return self.aggregate_answers(mean[None], np.ones(1))


def teacher_arrays(signal: np.ndarray, queries: np.ndarray, student: dict | None = None) -> ArrayRecord:
    """The round's download: the teacher signal on the queries, and optionally the server's
    latest global student's weights (keys prefixed ``student.``) for clients to start from
    (the one distilled last round, whether or not the release gate promoted it: it is
    computed from public data and released signals only)."""
    arrays = {
        protocol.SIGNAL: Array(np.ascontiguousarray(signal, dtype=np.float32)),
        protocol.QUERIES: Array(np.ascontiguousarray(queries, dtype=np.int64)),
    }
    for name, tensor in (student or {}).items():
        arrays[protocol.STUDENT_PREFIX + name] = Array(np.ascontiguousarray(tensor.detach().cpu().numpy()))
    return ArrayRecord(arrays)


def probability_answers(cfg: Any) -> bool:
    """Whether a run's answers are probability-like (``privacy.bound`` probs or votes, not clipped
    logits): aggregators that may break a row's sum renormalise their rows then."""
    return cfg.privacy.bound != "clipped_logits"


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.clip(matrix, 0.0, None)
    sums = matrix.sum(axis=1, keepdims=True)
    uniform = np.full_like(matrix, 1.0 / matrix.shape[1])
    return np.where(sums > 0, matrix / np.where(sums > 0, sums, 1.0), uniform)
