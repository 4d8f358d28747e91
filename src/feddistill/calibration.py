"""Calibration of a released student: temperature scaling and reliability diagrams.

Temperature scaling (Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern
Neural Networks") divides the logits by one scalar T > 0 fitted by minimising the
negative log-likelihood on held-out labelled data. It never changes a prediction's
argmax, so accuracy is unchanged; only the confidences move. We fit T on the
*public* validation split only (see ``feddistill.server.gate``), never on private
data or the test split.

On the examples it was fitted on, a fitted T always lowers the NLL, however few they are;
on a small validation split (the quick start holds out 20 examples) it can just as well
make new data's NLL and ECE worse. So T is kept only when it lowers the NLL on examples it
was *not* fitted on: K-fold cross-fitting on the validation split (each fold's NLL at the T
fitted on the other folds, against T = 1). Otherwise the release keeps T = 1, and says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feddistill.training import evaluate_probs

MIN_T, MAX_T = 0.05, 20.0

#: Folds of the cross-fitting that decides whether a fitted T is kept (fewer on a split with
#: fewer examples: leave-one-out).
CROSS_FIT_FOLDS = 5


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax over the last axis (classes), in float64."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises NLL(softmax(logits / T), labels).

    In the inverse temperature b = 1/T the mean NLL, mean(logsumexp(b z) - b z_y), is convex,
    with derivative mean(E_softmax(b z)[z] - z_y), increasing in b: bisection on its sign finds
    the minimum exactly, in milliseconds (the cross-fitting in `calibrate` fits K + 1 times).
    The range is clipped so that a tiny validation split cannot produce a degenerate T."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if len(y) == 0:
        raise ValueError("fit_temperature: no validation examples")
    if not np.isfinite(z).all():
        return 1.0
    z_y = z[np.arange(len(y)), y]

    def slope(b: float) -> float:
        return float(((softmax(z, 1.0 / b) * z).sum(axis=-1) - z_y).mean())

    if slope(1.0) == 0:  # flat (e.g. every row's logits equal): no T is better than 1
        return 1.0
    lo, hi = 1.0 / MAX_T, 1.0 / MIN_T
    if slope(lo) >= 0:  # NLL increasing in b over the whole range: its minimum is at T = MAX_T
        return MAX_T
    if slope(hi) <= 0:  # decreasing over the whole range: at T = MIN_T
        return MIN_T
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if slope(mid) > 0 else (mid, hi)
    return float(1.0 / (0.5 * (lo + hi)))


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling of one model, with before/after ECE and NLL on each split named.

    ``temperature`` is the T applied (1.0 when the fitted T was not kept); ``after`` is
    measured at it. ``criterion`` is the held-out NLL that decided: its estimate at T = 1
    ("before") and at the cross-fitted T ("after"), over ``validation_size`` examples."""

    temperature: float
    fitted_on: str
    before: dict[str, dict[str, float]]  # split -> {"ece", "nll", "accuracy"}
    after: dict[str, dict[str, float]]
    fitted_temperature: float = 1.0  # the T fitted on the whole validation split, kept or not
    kept: bool = True  # whether the fitted T improved the held-out criterion (else T = 1)
    validation_size: int = 0
    criterion: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    probs = softmax(logits, temperature)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(probs, 1e-12, None)).mean())


def cross_fitted_nll(logits: np.ndarray, labels: np.ndarray, folds: int = CROSS_FIT_FOLDS) -> dict[str, Any]:
    """The validation NLL at T = 1 ("before") and at a T fitted without the example's own fold
    ("after"), each the mean over all examples; folds interleave (example i is in fold i mod K)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    n = len(labels)
    k = min(folds, n)
    if k < 2:
        raise ValueError(f"cross_fitted_nll: {n} validation example(s), at least 2 needed")
    fold = np.arange(n) % k
    after = 0.0
    for f in range(k):
        held_out = fold == f
        t = fit_temperature(logits[~held_out], labels[~held_out])
        after += _nll(logits[held_out], labels[held_out], t) * held_out.sum()
    return {
        "name": "nll",
        "estimate": f"{k}-fold cross-fitting on the validation split",
        "folds": k,
        "before": _nll(logits, labels, 1.0),
        "after": float(after / n),
    }


def calibrate(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    *,
    fitted_on: str = "public validation split",
    extra: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Calibration:
    """Fit T on the validation logits and keep it only if it lowers the cross-fitted validation
    NLL (else T = 1); report ECE/NLL before and after (at the T kept) on it and on `extra`
    splits (e.g. the test split, for reporting only: it never influences T)."""
    fitted = fit_temperature(val_logits, val_labels)
    n = len(val_labels)
    if n >= 2:
        criterion = cross_fitted_nll(val_logits, val_labels)
        kept = criterion["after"] < criterion["before"]
    else:  # one example: nothing to hold out, no evidence that T helps
        criterion, kept = {"name": "nll", "estimate": "none (fewer than 2 validation examples)"}, False
    t = fitted if kept else 1.0
    splits = {"validation": (val_logits, val_labels), **(extra or {})}
    before, after = {}, {}
    for name, (logits, labels) in splits.items():
        before[name] = evaluate_probs(softmax(logits), labels).to_dict()
        after[name] = evaluate_probs(softmax(logits, t), labels).to_dict()
    return Calibration(
        temperature=t,
        fitted_on=fitted_on,
        before=before,
        after=after,
        fitted_temperature=fitted,
        kept=kept,
        validation_size=int(n),
        criterion=criterion,
    )


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Per equal-width confidence bin: count, mean confidence and accuracy (None-free: empty
    bins have count 0 and NaN-free zeros), the data of a reliability diagram."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts, confidence, accuracy = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        counts.append(int(in_bin.sum()))
        confidence.append(float(conf[in_bin].mean()) if in_bin.any() else 0.0)
        accuracy.append(float(correct[in_bin].mean()) if in_bin.any() else 0.0)
    return {"edges": edges.tolist(), "count": counts, "confidence": confidence, "accuracy": accuracy}


def plot_reliability(diagrams: dict[str, dict[str, list[float]]], path: Path, title: str = "") -> Path:
    """Reliability diagram(s): accuracy per confidence bin against the diagonal, one panel per
    entry of `diagrams` (e.g. {"before (T=1)": ..., "after (T=1.8)": ...})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(diagrams), figsize=(4.2 * len(diagrams), 4), squeeze=False)
    for ax, (label, d) in zip(axes[0], diagrams.items()):
        edges = np.asarray(d["edges"])
        width = np.diff(edges)
        counts = np.asarray(d["count"])
        acc = np.where(counts > 0, d["accuracy"], 0.0)
        ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
        gap = np.where(counts > 0, np.asarray(d["confidence"]) - acc, 0.0)
        ax.bar(
            edges[:-1], gap, bottom=acc, width=width, align="edge", color="red", alpha=0.3, label="gap to confidence"
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from feddistill.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
