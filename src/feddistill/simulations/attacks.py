"""Byzantine clients for robustness scenarios: turn an honest answer matrix into a hostile one.

Pure functions (the randomness comes in as a ``numpy.random.Generator``), so a
scenario is reproducible from its seed. The finite attacks (``label-flip``,
``random``, ``scaled``) are what robust aggregators must withstand; the malformed
ones (``scaled`` on probabilities, ``nan``, ``wrong-shape``) are what reply
validation must reject before any aggregator sees them.
"""

from __future__ import annotations

import math

import numpy as np

ATTACKS = ("label-flip", "random", "scaled", "nan", "wrong-shape")


def corrupt_answers(
    answers: np.ndarray, attack: str, rng: np.random.Generator, *, num_classes: int, scale: float = 10.0
) -> np.ndarray:
    """Return a hostile version of ``answers`` (|Q|, C); the input is not modified.

    ``label-flip``: every row's mass moves from class c to class (c + 1) mod C — still a
    valid probability (or vote) row, but a lie on every query with a clear answer.
    ``random``: rows drawn from Dirichlet(1, ..., 1) — valid, uninformative.
    ``scaled``: ``answers * scale`` — out of range for probabilities when ``scale > 1``.
    ``nan``: a copy with at least one NaN and one +/-Inf entry.
    ``wrong-shape``: one extra row, or one column dropped (chosen by ``rng``).
    Float dtypes are kept (float16 stays float16), so validation sees what a device would send.
    """
    answers = np.asarray(answers)
    if answers.ndim != 2 or answers.shape[1] != num_classes or answers.size == 0:
        raise ValueError(f"answers must be a non-empty (|Q|, {num_classes}) matrix, got shape {answers.shape}")
    dtype = answers.dtype if np.issubdtype(answers.dtype, np.floating) else np.float32
    if attack == "label-flip":
        return np.roll(answers, 1, axis=1)
    if attack == "random":
        return rng.dirichlet(np.ones(num_classes), size=len(answers)).astype(dtype)
    if attack == "scaled":
        return (answers * scale).astype(dtype)
    if attack == "nan":
        hostile = answers.astype(dtype)  # a copy
        flat = hostile.reshape(-1)
        count = max(2, flat.size // 10)
        picked = rng.choice(flat.size, size=min(count, flat.size), replace=False)
        flat[picked] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype=dtype), size=len(picked))
        flat[picked[0]] = np.nan  # at least one NaN whatever the draw
        if len(picked) > 1:
            flat[picked[1]] = np.inf
        return hostile
    if attack == "wrong-shape":
        if rng.random() < 0.5:
            return np.concatenate([answers, answers[-1:]], axis=0)
        return answers[:, :-1].copy()
    raise ValueError(f"unknown attack {attack!r} (known: {', '.join(ATTACKS)})")


def hostile_clients(num_clients: int, fraction: float, seed: int) -> set[int]:
    """The partition ids of the ``floor(fraction * num_clients)`` hostile clients, fixed by ``seed``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    count = math.floor(fraction * num_clients + 1e-9)  # 0.29 * 100 is 28.999...: still 29 clients
    picked = np.random.default_rng(seed).choice(num_clients, size=count, replace=False)
    return {int(i) for i in picked}
