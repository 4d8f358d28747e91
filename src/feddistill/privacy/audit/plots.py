"""Log-log ROC plots for membership-inference audits.

Following Carlini et al., "Membership Inference Attacks From First Principles"
(IEEE S&P 2022), ROC curves are drawn on log-log axes so the low-FPR regime is
visible.  When the mechanism's (epsilon, delta) is given, the hypothesis-testing
bound of (epsilon, delta)-DP (Kairouz, Oh & Viswanath, ICML 2015; Dong, Roth &
Su, "Gaussian Differential Privacy", JRSS-B 2022):

    TPR <= min(1, e^eps * FPR + delta, 1 - e^-eps * (1 - delta - FPR))

is drawn as a dashed line: no attack can lie above it if the guarantee holds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from feddistill.atomic import atomic_path  # noqa: E402

__all__ = ["dp_tradeoff_curve", "plot_canary_statistics", "plot_roc_loglog"]


def dp_tradeoff_curve(fpr: Any, epsilon: float, delta: float) -> np.ndarray:
    """Largest TPR an (epsilon, delta)-DP mechanism allows at each FPR:
    ``min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR))``, clipped to
    [0, 1].  Always >= FPR (the chance diagonal)."""
    if epsilon < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError("need epsilon >= 0 and delta in [0, 1]")
    f = np.clip(np.asarray(fpr, dtype=float), 0.0, 1.0)
    e = math.exp(min(epsilon, 700.0))
    t = np.minimum.reduce([np.ones_like(f), e * f + delta, 1.0 - (1.0 - delta - f) / e])
    return np.clip(t, 0.0, 1.0)


def plot_roc_loglog(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike[str],
    *,
    dp_epsilon: float | None = None,
    dp_delta: float | None = None,
    title: str = "",
    extra_bounds: Mapping[str, tuple[Any, Any]] | None = None,
    min_fpr: float | None = None,
) -> str:
    """Write a log-log ROC plot (PNG, or whatever ``path``'s suffix says).

    ``curves``: ``{name: (fpr, tpr)}`` (e.g. from :func:`metrics.roc`).  Zero
    rates cannot be drawn on log axes; they are shown at the lower axis limit
    ``min_fpr`` (default: half the smallest positive FPR over all curves, at
    most 1e-3).  ``dp_epsilon`` / ``dp_delta``: draw the (epsilon, delta)-DP
    bound; ``extra_bounds``: further dashed curves (e.g. the bound implied by
    the accountant's full privacy profile).  Returns the path written.
    """
    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=120)
    try:
        pos = [np.asarray(f, float)[np.asarray(f, float) > 0] for f, _ in curves.values()]
        pos = [p for p in pos if p.size]
        lo = min_fpr if min_fpr is not None else min([1e-3] + [float(p.min()) / 2 for p in pos])
        lo = max(lo, 1e-9)
        grid = np.logspace(math.log10(lo), 0, 400)
        ax.plot(grid, grid, color="grey", lw=0.8, ls=":", label="chance")
        for name, (fpr, tpr) in curves.items():
            f = np.clip(np.asarray(fpr, float), lo, 1.0)
            t = np.clip(np.asarray(tpr, float), lo, 1.0)
            ax.plot(f, t, lw=1.4, label=str(name), drawstyle="steps-post")
        if dp_epsilon is not None:
            d = 0.0 if dp_delta is None else float(dp_delta)
            b = np.clip(dp_tradeoff_curve(grid, float(dp_epsilon), d), lo, 1.0)
            lbl = f"({dp_epsilon:g}, {d:g})-DP bound" if d else f"ε={dp_epsilon:g} DP bound"
            ax.plot(grid, b, color="black", ls="--", lw=1.2, label=lbl)
        for name, (f, t) in (extra_bounds or {}).items():
            ax.plot(
                np.clip(np.asarray(f, float), lo, 1),
                np.clip(np.asarray(t, float), lo, 1),
                ls="--",
                lw=1.0,
                label=str(name),
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, 1.0)
        ax.set_ylim(lo, 1.05)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        if title:
            ax.set_title(title)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        p = os.fspath(path)
        with atomic_path(p) as tmp:  # same suffix: the format is still the file's
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return p


def plot_canary_statistics(scores: Any, groups: Any, path: str | os.PathLike[str], *, title: str = "") -> str:
    """Histograms of the canary statistics per group (inserted, held-out, generated): the gap
    between inserted and the rest is what the deployment audit's epsilon estimate measures."""
    s, g = np.asarray(scores, float), np.asarray(groups).astype(str)
    fig, ax = plt.subplots(figsize=(6.0, 3.8), dpi=120)
    try:
        finite = s[np.isfinite(s)]
        edges = np.linspace(float(finite.min()), float(finite.max()) + 1e-9, 40) if finite.size else np.arange(11.0)
        for name in ("generated", "held-out", "inserted"):
            values = s[(g == name) & np.isfinite(s)]
            if values.size:
                ax.hist(values, bins=list(edges), density=True, alpha=0.5, label=f"{name} ({values.size})")
        ax.set_xlabel("canary statistic: cosine with the released signals")
        ax.set_ylabel("density")
        if title:
            ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.fspath(path)
        with atomic_path(p) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return p
