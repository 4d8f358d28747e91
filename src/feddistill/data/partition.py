"""Split a private pool over federated clients (IID, Dirichlet label skew, label shards).

These are small numpy-only partitioners on purpose: the equivalent partitioners in
``flwr-datasets`` (``IidPartitioner``, ``DirichletPartitioner``, ``ShardPartitioner``)
operate on Hugging Face ``datasets.Dataset`` objects, which would force the ``datasets``
package (and its heavy import) into every Flower client worker just to compute a list of
indices. Here a partition is a function of the label vector, the scheme parameters and
the seed, so any process can recompute its own client's indices cheaply and identically.

Schemes
-------
``"iid"``
    Seeded shuffle, then ``np.array_split`` into equal (+-1) parts.
``"dirichlet"``
    Label-distribution skew of Hsu, Qi & Brown, "Measuring the Effects of Non-Identical
    Data Distribution for Federated Visual Classification", arXiv:1909.06335 (2019):
    for every class, client proportions are drawn from ``Dir(alpha * 1)`` and that class's
    (shuffled) examples are cut accordingly. Small ``alpha`` -> each client sees few
    classes; large ``alpha`` -> close to IID. The whole draw is repeated (at most
    :data:`MAX_DIRICHLET_TRIES` times) until every client holds at least ``min_size``
    examples.
``"shards"``
    Pathological non-IID split of McMahan et al., "Communication-Efficient Learning of
    Deep Networks from Decentralized Data", AISTATS 2017: sort by label, cut into
    ``num_clients * shards_per_client`` equal shards, give each client
    ``shards_per_client`` random shards. When ``len(labels)`` is not a multiple of the
    number of shards, a seeded random remainder (fewer examples than one shard per shard,
    i.e. ``len(labels) % num_shards``) is dropped, so the union is then not every index.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SCHEMES", "MAX_DIRICHLET_TRIES", "partition", "label_histograms"]

SCHEMES = ("iid", "dirichlet", "shards")
MAX_DIRICHLET_TRIES = 1000


def _validate_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be non-negative, got {labels.min()}")
    return labels.astype(np.int64, copy=False)


def partition(
    labels: np.ndarray,
    num_clients: int,
    *,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_size: int = 1,
    seed: int = 0,
) -> list[np.ndarray]:
    """Partition ``range(len(labels))`` over ``num_clients`` clients.

    Returns one sorted int64 index array per client. Parts are disjoint; their union is
    every index for ``"iid"``/``"dirichlet"`` (``"shards"`` may drop a remainder smaller
    than the number of shards, see the module docstring). Deterministic given ``seed``.
    Raises ``ValueError`` for an unknown scheme or impossible parameters.
    """
    labels = _validate_labels(labels)
    n = len(labels)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(f"num_clients ({num_clients}) exceeds the number of examples ({n})")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if min_size * num_clients > n:
        raise ValueError(f"impossible min_size={min_size}: {num_clients} clients x {min_size} > {n} examples")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _iid(n, num_clients, rng)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, num_clients, alpha, min_size, rng)
    else:
        parts = _shards(labels, num_clients, shards_per_client, min_size, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    # array_split sizes differ by at most one; the min_size check above already ensures
    # n // num_clients >= min_size.
    return np.array_split(rng.permutation(n), num_clients)


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if not alpha > 0:  # also rejects NaN
        raise ValueError(f"alpha must be > 0 for the dirichlet scheme, got {alpha}")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(MAX_DIRICHLET_TRIES):
        parts = _dirichlet_once(by_class, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"dirichlet partition: no draw in {MAX_DIRICHLET_TRIES} tries gave every one of "
        f"{num_clients} clients >= {min_size} examples (alpha={alpha}, {len(labels)} examples); "
        "increase alpha or lower min_size / num_clients"
    )


def _dirichlet_once(
    by_class: list[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for idx in by_class:
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        # Cut points from the cumulative proportions; flooring keeps every example assigned.
        cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
        for client, piece in enumerate(np.split(rng.permutation(idx), cuts)):
            chunks[client].append(piece)
    return [np.concatenate(c) if c else np.empty(0, np.int64) for c in chunks]


def _shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    n = len(labels)
    num_shards = num_clients * shards_per_client
    shard_size = n // num_shards
    if shard_size < 1:
        raise ValueError(
            f"shards: {num_clients} clients x {shards_per_client} shards = {num_shards} shards "
            f"but only {n} examples; lower num_clients or shards_per_client"
        )
    if shard_size * shards_per_client < min_size:
        raise ValueError(
            f"impossible min_size={min_size}: shards give each client {shard_size * shards_per_client} examples"
        )
    # Drop a random remainder (not always the last class), then sort by label; the
    # random pre-order also shuffles examples within each label.
    keep = rng.permutation(n)[: num_shards * shard_size]
    ordered = keep[np.argsort(labels[keep], kind="stable")]
    shards = ordered.reshape(num_shards, shard_size)
    owner = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [shards[row].ravel() for row in owner]


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-client label counts, shape ``(num_clients, num_classes)``, int64."""
    labels = _validate_labels(labels)
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} >= num_classes={num_classes}")
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, part in enumerate(parts):
        hist[i] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return hist
