"""Label-distribution inference from a client's answers on public data.

In federated distillation a client uploads its model's outputs on a shared
public/reference set.  Averaged over many public queries those outputs track
the client's private label mix: a model trained on a skewed local set predicts
its frequent classes more often.  Shi, Ouyang & Wang, "Unveiling Client Privacy
Leakage from Public Dataset Usage in Federated Distillation", PoPETs 2025,
exploit this (label-distribution inference); the audit uses the same estimator
to measure how much of a client's label histogram its (noisy) uploads betray.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["estimate_label_histogram", "tv_distance", "kl_divergence"]


def _as_prob(p: Any, name: str) -> np.ndarray:
    a = np.asarray(p, dtype=float).ravel()
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be a non-empty finite vector")
    if (a < 0).any():
        raise ValueError(f"{name} has negative entries")
    s = a.sum()
    if s <= 0:
        raise ValueError(f"{name} sums to 0")
    return a / s


def estimate_label_histogram(answers: Any) -> np.ndarray:
    """Estimate a client's label distribution from its answers.

    ``answers``: (Q, C) -- one row per public query (soft labels, one-hot votes,
    or noisy versions of either, as uploaded).  Returns the column mean, clipped
    at 0 (DP noise can make entries negative) and normalised to sum to 1; a
    uniform vector if nothing positive remains.
    """
    a = np.asarray(answers, dtype=float)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError("answers must be a non-empty (Q, C) array")
    h = np.clip(np.nanmean(a, axis=0), 0.0, None)
    h = np.nan_to_num(h, nan=0.0)
    s = h.sum()
    if s <= 0:
        return np.full(a.shape[1], 1.0 / a.shape[1])
    return h / s


def tv_distance(p: Any, q: Any) -> float:
    """Total variation distance ``0.5 * sum |p - q|`` (inputs are normalised)."""
    p_, q_ = _as_prob(p, "p"), _as_prob(q, "q")
    if p_.shape != q_.shape:
        raise ValueError("p and q differ in length")
    return float(0.5 * np.abs(p_ - q_).sum())


def kl_divergence(p: Any, q: Any, eps: float = 1e-12) -> float:
    """``KL(p || q) = sum p log(p / q)`` in nats; ``q`` is floored at ``eps``
    (and renormalised) so that a zero in the estimate gives a large finite value."""
    p_, q_ = _as_prob(p, "p"), _as_prob(q, "q")
    if p_.shape != q_.shape:
        raise ValueError("p and q differ in length")
    q_ = np.clip(q_, eps, None)
    q_ = q_ / q_.sum()
    nz = p_ > 0
    return float(max(0.0, np.sum(p_[nz] * np.log(p_[nz] / q_[nz]))))
