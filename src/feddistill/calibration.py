"""Calibration of a released student: temperature scaling and reliability diagrams.

Temperature scaling (Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern
Neural Networks") divides the logits by one scalar T > 0 fitted by minimising the
negative log-likelihood on held-out labelled data. It never changes a prediction's
argmax, so accuracy is unchanged; only the confidences move. We fit T on the
*public* validation split only (see ``feddistill.server.gate``), never on private
data or the test split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from feddistill.training import evaluate_probs

MIN_T, MAX_T = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax over the last axis (classes), in float64."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises NLL(softmax(logits / T), labels).

    Parametrised as T = exp(s) and solved with L-BFGS (a 1-D convex-in-practice problem);
    the result is clipped to a sane range so that a tiny validation split cannot produce
    a degenerate T."""
    if len(labels) == 0:
        raise ValueError("fit_temperature: no validation examples")
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not np.isfinite(t):
        return 1.0
    return float(np.clip(t, MIN_T, MAX_T))


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling of one model, with before/after ECE and NLL on each split named."""

    temperature: float
    fitted_on: str
    before: dict[str, dict[str, float]]  # split -> {"ece", "nll", "accuracy"}
    after: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(val_logits: np.ndarray, val_labels: np.ndarray, *, fitted_on: str = "public validation split",
              extra: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Calibration:
    """Fit T on the validation logits; report ECE/NLL before and after on it and on `extra`
    splits (e.g. the test split, for reporting only: it never influences T)."""
    t = fit_temperature(val_logits, val_labels)
    splits = {"validation": (val_logits, val_labels), **(extra or {})}
    before, after = {}, {}
    for name, (logits, labels) in splits.items():
        before[name] = evaluate_probs(softmax(logits), labels).to_dict()
        after[name] = evaluate_probs(softmax(logits, t), labels).to_dict()
    return Calibration(temperature=t, fitted_on=fitted_on, before=before, after=after)


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
        ax.bar(edges[:-1], gap, bottom=acc, width=width, align="edge", color="red", alpha=0.3, label="gap to confidence")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
