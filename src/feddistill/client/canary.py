"""Canary answers of an audit SuperNode (one-shot empirical privacy estimation).

Andrew, Kairouz, Oh, Oprea, McMahan & Suriyakumar, "One-shot Empirical Privacy Estimation
for Federated Learning", ICLR 2024: a few clients of the live run are *canary clients* whose
uploads are random directions drawn from a secret; after the run, the auditor measures how
much of each direction the released output carries, for canaries that were inserted and for
canaries that were only generated, and turns the gap into an epsilon estimate.

An audit SuperNode is a normal SuperNode started by the privacy officer with the node config
``audit-canary-secret="/path/officer.secret"`` (and optionally ``audit-canaries=K``, default
:data:`DEFAULT_CANARIES`). It takes part exactly like a device (same download, same checks,
same reply schema, same DP mechanism: with ``privacy.client-level = "local"`` its answers are
noised on the node like any device's), but it trains nothing and reads no private data: it
holds ``K`` canaries, and every row of a round's answer matrix belongs to one of them:

- which canary owns the row, and the canary's class on it, are drawn from
  HMAC-SHA256(secret, node id, round, query index) (:func:`canary_layout`);
- each canary is *inserted* or *held out* by a secret fair coin, HMAC(secret, node id, canary)
  (:func:`canary_coins`); an inserted canary's rows answer its class with full confidence, a
  held-out canary's rows answer the uniform distribution (probabilities; for one-byte votes a
  decoy class drawn from the secret; for clipped logits a zero row).

The answers go through the node's ordinary bounding and noise (:func:`feddistill.client.distill.answer_matrix`),
so they pass the server's reply validation unchanged. The officer, holding the same secret,
regenerates every canary's direction from the public query indices alone
(:mod:`feddistill.privacy.audit.canary_clients`); the server learns nothing that tells a canary
node from a device, except that its answers look like noise.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import NamedTuple

import numpy as np
from flwr.app import Context

__all__ = [
    "CANARIES_KEY",
    "DEFAULT_CANARIES",
    "SECRET_KEY",
    "CanaryError",
    "CanaryLayout",
    "canary_coins",
    "canary_count",
    "canary_layout",
    "canary_logits",
    "is_canary_node",
    "node_canaries",
    "read_secret",
]

SECRET_KEY = "audit-canary-secret"  # node config: path of the officer's secret file
CANARIES_KEY = "audit-canaries"  # node config: canaries this node holds
DEFAULT_CANARIES = 16
LOGIT_GAP = 30.0  # an inserted row's logit margin: softmax is one-hot to float32 precision
MIN_SECRET_BYTES = 16


class CanaryError(ValueError):
    """An audit node's or the officer's canary setup is unusable; the message says which and where."""


class CanaryLayout(NamedTuple):
    owner: np.ndarray  # (Q,) int64: the canary (0..K-1) each row belongs to
    classes: np.ndarray  # (Q,) int64: that canary's class on the row
    decoys: np.ndarray  # (Q,) int64: the vote a held-out canary's row casts (votes only)


def read_secret(path: str | Path) -> bytes:
    """The officer's secret: a file of hex digits (e.g. ``openssl rand -hex 32``), or raw bytes."""
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise CanaryError(f"{p}: cannot read the canary secret ({exc.strerror or exc})") from exc
    text = raw.strip()
    try:
        secret = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        secret = raw
    if len(secret) < MIN_SECRET_BYTES:
        raise CanaryError(
            f"{p}: the canary secret has {len(secret)} bytes, need at least {MIN_SECRET_BYTES} "
            "(create one with `openssl rand -hex 32 > officer.secret`)"
        )
    return secret


def is_canary_node(context: Context) -> bool:
    """An audit SuperNode: its node config names the officer's secret."""
    return bool(context.node_config.get(SECRET_KEY))


def canary_count(value: object) -> int:
    """The ``audit-canaries`` value as a count >= 1 (None or "": the default)."""
    if value is None or value == "":
        return DEFAULT_CANARIES
    try:
        k = int(str(value))
    except ValueError:
        k = 0
    if k < 1:
        raise CanaryError(f"node config {CANARIES_KEY} = {value!r} must be an integer >= 1")
    return k


def _draws(secret: bytes, label: str, node: int, keys: np.ndarray, rnd: int) -> np.ndarray:
    """Two uint64 per key from HMAC-SHA256(secret, label:node:round:key)."""
    out = np.empty((len(keys), 2), dtype=np.uint64)
    for i, key in enumerate(keys):
        digest = hmac.new(secret, f"{label}:{node}:{rnd}:{int(key)}".encode(), hashlib.sha256).digest()
        out[i] = np.frombuffer(digest[:16], dtype="<u8")
    return out


def canary_layout(
    secret: bytes, node: int, rnd: int, queries: np.ndarray, num_classes: int, canaries: int
) -> CanaryLayout:
    """Who owns each of round ``rnd``'s query rows, and with which class, on audit node ``node``.

    Depends only on the secret, the node's id, the round and the (public) query indices, so the
    officer regenerates exactly what the node answered. ``node`` may be any integer: the officer
    draws its never-inserted canaries on a node id no audit node uses."""
    q = np.asarray(queries, dtype=np.int64)
    first = _draws(secret, "row", node, q, rnd)
    second = _draws(secret, "decoy", node, q, rnd)
    owner = (first[:, 0] % np.uint64(canaries)).astype(np.int64)
    classes = (first[:, 1] % np.uint64(num_classes)).astype(np.int64)
    decoys = (second[:, 0] % np.uint64(num_classes)).astype(np.int64)
    return CanaryLayout(owner, classes, decoys)


def canary_coins(secret: bytes, node: int, canaries: int) -> np.ndarray:
    """(K,) bool: which of node ``node``'s canaries are inserted (a secret fair coin each)."""
    draws = _draws(secret, "coin", node, np.arange(canaries), 0)
    return (draws[:, 0] & np.uint64(1)).astype(bool)


def canary_logits(
    secret: bytes, node: int, rnd: int, queries: np.ndarray, num_classes: int, canaries: int, bound: str
) -> np.ndarray:
    """(Q, C) logits the node bounds and sends instead of a model's: an inserted canary's row
    names its class by :data:`LOGIT_GAP`; a held-out canary's row is flat (uniform probabilities,
    a zero clipped-logit row) or, for one-byte votes, names the secret decoy class."""
    layout = canary_layout(secret, node, rnd, queries, num_classes, canaries)
    inserted = canary_coins(secret, node, canaries)[layout.owner]
    rows = np.arange(len(layout.owner))
    logits = np.zeros((len(rows), num_classes), dtype=np.float64)
    logits[rows[inserted], layout.classes[inserted]] = LOGIT_GAP
    if bound == "votes":
        logits[rows[~inserted], layout.decoys[~inserted]] = 1.0
    return logits


def node_canaries(context: Context) -> tuple[bytes, int]:
    """The audit node's secret and canary count, from its node config."""
    secret = read_secret(str(context.node_config[SECRET_KEY]))
    return secret, canary_count(context.node_config.get(CANARIES_KEY))
