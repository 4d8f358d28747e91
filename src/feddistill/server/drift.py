"""Drift of the fleet's teacher signal between rounds, and the alert on it.

Per round we record the mean KL(new || previous) between successive teacher signals on
the reference-set rows the round changed and whose previous value already came from the
fleet (a row's first fleet answer replaces the public teacher's opinion: a change by
design, not drift; so round 1 never has anything to compare and records None), the
teacher-student agreement and the student's per-class test accuracy. A shift in the
clients' label distribution moves the ensemble's answers, which shows as a KL spike;
the student then follows the new signal, which shows as agreement and per-class
accuracy recovering over the following rounds.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-8


def signal_kl(new: np.ndarray, old: np.ndarray) -> float:
    """Mean over rows of KL(new_row || old_row), natural log; both (N, C) probability rows."""
    if new.shape != old.shape:
        raise ValueError(f"signal_kl: shapes differ: {new.shape} vs {old.shape}")
    p = np.clip(new.astype(np.float64), EPS, 1.0)
    q = np.clip(old.astype(np.float64), EPS, 1.0)
    p /= p.sum(axis=1, keepdims=True)
    q /= q.sum(axis=1, keepdims=True)
    return float((p * (np.log(p) - np.log(q))).sum(axis=1).mean())


def per_class_accuracy(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Accuracy on the examples of each class (None for a class with no example)."""
    pred = probs.argmax(axis=1)
    out: list[float | None] = []
    for c in range(num_classes):
        mask = labels == c
        out.append(float((pred[mask] == c).mean()) if mask.any() else None)
    return out


def drift_alert(kl: float | None, threshold: float) -> str | None:
    """The alert text when a round's KL exceeds the threshold, else None (also when there was
    nothing to compare: no row answered by the fleet in two rounds yet)."""
    if kl is None or threshold <= 0 or not kl > threshold:
        return None
    return f"teacher-signal drift: KL(new || previous) = {kl:.4f} > threshold {threshold:g}"
