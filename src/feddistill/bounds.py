"""What a bounded reply can hold, and how much one client can change the sum of replies.

Pure arithmetic on the names of the bounds (no NumPy, nothing of the project): the layer below
:mod:`feddistill.config`, which checks a run's SecAgg+ clipping range against
:func:`row_norm_bound`, and below :mod:`feddistill.privacy`, whose mechanisms
(:mod:`feddistill.privacy.mechanisms`, which re-exports these names) bound and noise the replies.
"""

from __future__ import annotations

import math

__all__ = ["BOUNDS", "NEIGHBOURING", "reply_sensitivity", "row_norm_bound"]

#: How a client's raw outputs on the reference set are bounded before noising.
BOUNDS = ("probs", "votes", "clipped_logits")

#: Neighbouring relations between fleets (or data sets) that we account for.
NEIGHBOURING = ("add/remove", "replace-one")


def _check_bound(bound: str) -> None:
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")


def _check_neighbouring(neighbouring: str) -> None:
    if neighbouring not in NEIGHBOURING:
        raise ValueError(f"neighbouring must be one of {NEIGHBOURING}, got {neighbouring!r}")


def _check_clip_norm(clip_norm: float) -> None:
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")


def row_norm_bound(bound: str, *, clip_norm: float = 1.0) -> float:
    """L2 bound ``B`` on every row that :func:`feddistill.privacy.mechanisms.bound_answers` returns.

    ``1`` for probabilities (‖p‖₂ ≤ ‖p‖₁ = 1) and one-hot votes, ``clip_norm``
    for clipped logits.
    """
    _check_bound(bound)
    if bound == "clipped_logits":
        _check_clip_norm(clip_norm)
        return float(clip_norm)
    return 1.0


def reply_sensitivity(
    bound: str,
    num_queries: int,
    *,
    neighbouring: str = "add/remove",
    clip_norm: float = 1.0,
) -> float:
    """L2 sensitivity Δ of the SUM of all clients' replies to one client.

    Each reply is a ``(Q, C)`` matrix whose rows satisfy ‖row‖₂ ≤ B, with
    ``B = 1`` for ``"probs"`` and ``"votes"`` and ``B = clip_norm`` for
    ``"clipped_logits"`` (see :func:`feddistill.privacy.mechanisms.bound_answers`).
    The Frobenius norm of the change in the sum is ``sqrt(Σ_rows ‖Δrow‖₂²) ≤ sqrt(Q) · max_row ‖Δrow‖₂``,
    so it suffices to bound one row's change:

    * ``"add/remove"`` (one client's reply is added to or removed from the sum):
      the sum changes by that reply ``r``; ‖r_row‖₂ ≤ B, hence **Δ = B·√Q**.
    * ``"replace-one"`` (one client's reply ``r`` becomes ``r'``): the row change
      is ``r_row − r'_row``.

      - probabilities / one-hot votes: ‖p − p'‖₂² = ‖p‖₂² + ‖p'‖₂² − 2⟨p, p'⟩
        ≤ 1 + 1 − 0 = 2 because both are non-negative with ‖·‖₂ ≤ 1 (equality
        for two different one-hot rows), hence **Δ = √2·√Q** (Papernot et al.
        2018, "Scalable Private Learning with PATE", §4: votes change by √2).
      - clipped logits: ‖a − b‖₂ ≤ ‖a‖₂ + ‖b‖₂ ≤ 2B (equality for b = −a),
        hence **Δ = 2·B·√Q**.

    Parameters
    ----------
    bound: one of :data:`BOUNDS`.
    num_queries: Q ≥ 1, the number of query rows in one reply.
    neighbouring: one of :data:`NEIGHBOURING`.
    clip_norm: B for ``"clipped_logits"``.
    """
    _check_bound(bound)
    _check_neighbouring(neighbouring)
    if int(num_queries) != num_queries or num_queries < 1:
        raise ValueError(f"num_queries must be an integer >= 1, got {num_queries!r}")
    row_bound = row_norm_bound(bound, clip_norm=clip_norm)
    sqrt_q = math.sqrt(int(num_queries))
    if neighbouring == "add/remove":
        return row_bound * sqrt_q
    if bound == "clipped_logits":
        return 2.0 * row_bound * sqrt_q
    return math.sqrt(2.0) * sqrt_q
