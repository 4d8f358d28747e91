"""Membership-inference metrics and empirical privacy lower bounds.

Everything here is model-agnostic: inputs are 1-D arrays of attack scores
(higher score = "more likely a member") and boolean membership labels.

Conventions
-----------
* ROC / TPR at fixed low FPR on a log-log plot, as argued by Carlini et al.,
  "Membership Inference Attacks From First Principles", IEEE S&P 2022 (LiRA).
  ``tpr_at_fpr`` returns the largest TPR among ROC points whose FPR is at most
  the target (the convention of the LiRA reference code).
* Empirical epsilon: an (epsilon, delta)-DP mechanism bounds every membership
  test by ``TPR <= e^eps * FPR + delta`` and ``TNR <= e^eps * FNR + delta``
  (Kairouz, Oh & Viswanath, "The Composition Theorem for Differential Privacy",
  ICML 2015; used for auditing by Jagielski, Ullman & Oprea, "Auditing
  Differentially Private Machine Learning: How Private is Private SGD?",
  NeurIPS 2020, and Nasr et al., "Adversary Instantiation: Lower Bounds for
  Differentially Private Machine Learning", IEEE S&P 2021).  Replacing TPR
  and FPR by Clopper-Pearson bounds (Clopper & Pearson, Biometrika 1934) gives
  a lower bound on epsilon that holds with confidence ``1 - alpha``.

Confidence convention for the epsilon bounds
--------------------------------------------
The bound uses two one-sided Clopper-Pearson bounds, a lower one on the TPR and
an upper one on the FPR, each at level ``alpha / 2`` (equivalently, the
endpoints of the *two-sided* ``1 - alpha`` exact intervals).  By a union bound
both hold simultaneously with probability ``>= 1 - alpha``.  Because
``TNR_lo = 1 - FPR_hi`` and ``FNR_hi = 1 - TPR_lo``, the symmetric TNR/FNR form
is covered by the same event, so the maximum of both forms is a valid
``1 - alpha`` lower bound.  With this convention a perfect attack on 1,000
members + 1,000 non-members certifies at most ~5.60 at 95 %
(``max_certifiable_epsilon``), the figure quoted in the project's references.

The samples must be independent trials (members and non-members drawn at
random, e.g. canaries included with probability 1/2); the threshold must not be
chosen on the data it is evaluated on (use a held-out split, or the Bonferroni
variant over a threshold grid fixed in advance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "roc",
    "auc",
    "tpr_at_fpr",
    "membership_advantage",
    "clopper_pearson",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "epsilon_from_rates",
    "max_certifiable_epsilon",
    "empirical_epsilon",
    "empirical_epsilon_bonferroni",
    "summarize_attack",
    "slices",
]


# --------------------------------------------------------------------------- #
# input validation
# --------------------------------------------------------------------------- #
def _as_scores_labels(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float).ravel()
    m = np.asarray(is_member).ravel()
    if m.dtype != bool:
        uniq = np.unique(m)
        if not np.all(np.isin(uniq, [0, 1])):
            raise ValueError("is_member must be boolean or 0/1")
        m = m.astype(bool)
    if s.shape != m.shape:
        raise ValueError(f"scores and is_member differ in length: {s.shape} vs {m.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s, m


def _require_both_classes(m: np.ndarray) -> tuple[int, int]:
    n_in = int(m.sum())
    n_out = int(m.size - n_in)
    if n_in == 0 or n_out == 0:
        raise ValueError("need at least one member and one non-member")
    return n_in, n_out


# --------------------------------------------------------------------------- #
# ROC
# --------------------------------------------------------------------------- #
def _roc_counts(s: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (tp, fp) for the rule ``score >= threshold`` at every distinct
    score, preceded by the all-negative point (threshold +inf)."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    m_sorted = m[order]
    # indices of the last element of each run of equal scores
    distinct = np.flatnonzero(np.diff(s_sorted)) if s_sorted.size > 1 else np.array([], int)
    ends = np.r_[distinct, s_sorted.size - 1]
    tp = np.cumsum(m_sorted)[ends]
    fp = (ends + 1) - tp
    thresholds = s_sorted[ends]
    tp = np.r_[0, tp]
    fp = np.r_[0, fp]
    thresholds = np.r_[np.inf, thresholds]
    return tp.astype(np.int64), fp.astype(np.int64), thresholds


def roc(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full ROC curve of the test "member iff score >= threshold".

    Returns ``(fpr, tpr, thresholds)``, thresholds decreasing, starting at
    ``+inf`` (point (0, 0)) and ending at the smallest score (point (1, 1)).
    Every distinct score is a threshold (no intermediate points are dropped),
    which equals ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    s, m = _as_scores_labels(scores, is_member)
    n_in, n_out = _require_both_classes(m)
    tp, fp, thr = _roc_counts(s, m)
    return fp / n_out, tp / n_in, thr


def auc(scores: Any, is_member: Any) -> float:
    """Area under the ROC curve (trapezoidal, ties count 1/2)."""
    fpr, tpr, _ = roc(scores, is_member)
    return float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))  # type: ignore[attr-defined]  # numpy < 2


def tpr_at_fpr(scores: Any, is_member: Any, fpr_target: float) -> float:
    """Largest TPR over ROC points with FPR <= ``fpr_target`` (LiRA convention,
    Carlini et al. 2022).  No interpolation: with ``n`` non-members an FPR below
    ``1/n`` can only be met at 0 false positives."""
    if not 0.0 <= fpr_target <= 1.0:
        raise ValueError("fpr_target must be in [0, 1]")
    fpr, tpr, _ = roc(scores, is_member)
    ok = fpr <= fpr_target + 1e-15
    return float(tpr[ok].max())


def membership_advantage(scores: Any, is_member: Any) -> float:
    """Membership advantage max_t (TPR - FPR) (Yeom et al., "Privacy Risk in
    Machine Learning: Analyzing the Connection to Overfitting", CSF 2018)."""
    fpr, tpr, _ = roc(scores, is_member)
    return float(np.max(tpr - fpr))


# --------------------------------------------------------------------------- #
# Clopper-Pearson
# --------------------------------------------------------------------------- #
def clopper_pearson_lower(k: Any, n: Any, alpha: float) -> np.ndarray | float:
    """One-sided exact lower bound at level ``alpha``: P[p < lo] <= alpha."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k > 0, stats.beta.ppf(alpha, k, n - k + 1), 0.0)
    lo = np.nan_to_num(lo, nan=0.0)
    return float(lo) if lo.ndim == 0 else lo


def clopper_pearson_upper(k: Any, n: Any, alpha: float) -> np.ndarray | float:
    """One-sided exact upper bound at level ``alpha``: P[p > hi] <= alpha."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        hi = np.where(k < n, stats.beta.isf(alpha, k + 1, n - k), 1.0)
    hi = np.nan_to_num(hi, nan=1.0)
    return float(hi) if hi.ndim == 0 else hi


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided exact (Clopper & Pearson 1934) ``1 - alpha`` interval for a
    binomial proportion with ``k`` successes in ``n`` trials.

    Same as ``scipy.stats.binomtest(k, n).proportion_ci(1 - alpha, 'exact')``.
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError("need 0 <= k <= n and n > 0")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    return (
        float(clopper_pearson_lower(k, n, alpha / 2)),
        float(clopper_pearson_upper(k, n, alpha / 2)),
    )


# --------------------------------------------------------------------------- #
# Empirical epsilon
# --------------------------------------------------------------------------- #
def _safe_log_ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.zeros(np.broadcast(num, den).shape)
    ok = (num > 0) & (den > 0)
    out = np.where(ok, np.log(np.where(ok, num, 1.0) / np.where(ok, den, 1.0)), out)
    # num > 0 and den == 0 -> unbounded
    out = np.where((num > 0) & (den <= 0), np.inf, out)
    return out


def epsilon_from_rates(tp: Any, fn: Any, fp: Any, tn: Any, delta: float, alpha: float = 0.05) -> dict[str, np.ndarray]:
    """Clopper-Pearson epsilon lower bound(s) from confusion counts.

    ``eps_lo = max(ln((TPR_lo - delta)/FPR_hi), ln((TNR_lo - delta)/FNR_hi), 0)``
    with one-sided CP bounds at ``alpha/2`` each (see module docstring).  Also
    returns the point estimate (same formula with the raw rates; ``inf`` when a
    denominator is 0).  Vectorised over arrays of counts.
    """
    tp, fn, fp, tn = (np.asarray(x, dtype=float) for x in (tp, fn, fp, tn))
    n_in = tp + fn
    n_out = fp + tn
    a = alpha / 2
    tpr_lo = clopper_pearson_lower(tp, n_in, a)
    fpr_hi = clopper_pearson_upper(fp, n_out, a)
    tnr_lo = 1.0 - np.asarray(fpr_hi)
    fnr_hi = 1.0 - np.asarray(tpr_lo)
    e1 = _safe_log_ratio(np.asarray(tpr_lo) - delta, fpr_hi)
    e2 = _safe_log_ratio(tnr_lo - delta, fnr_hi)
    eps_lo = np.maximum(np.maximum(e1, e2), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / n_in
        fpr = fp / n_out
    p1 = _safe_log_ratio(tpr - delta, fpr)
    p2 = _safe_log_ratio((1 - fpr) - delta, 1 - tpr)
    eps_hat = np.maximum(np.maximum(p1, p2), 0.0)
    return {
        "epsilon_lower_bound": eps_lo,
        "epsilon_point_estimate": eps_hat,
        "tpr_lo": np.asarray(tpr_lo),
        "fpr_hi": np.asarray(fpr_hi),
        "tnr_lo": tnr_lo,
        "fnr_hi": fnr_hi,
    }


def max_certifiable_epsilon(n_members: int, n_nonmembers: int, delta: float, alpha: float = 0.05) -> float:
    """The largest epsilon lower bound *any* attack can certify with this many
    trials: the bound of a perfect attack (TP = n_members, FP = 0).

    With one-sided CP bounds at ``alpha/2``:
    ``TPR_lo = (alpha/2)^(1/n_in)``, ``FPR_hi = 1 - (alpha/2)^(1/n_out)``, so
    ``cap = ln((TPR_lo - delta) / FPR_hi)`` (and the symmetric TNR/FNR form,
    which is equal for n_in = n_out).  1,000 + 1,000 at alpha=0.05 -> ~5.60.
    An audit reporting "eps_lo = cap" means "at least this much; more samples
    needed to say more".
    """
    if n_members <= 0 or n_nonmembers <= 0:
        return 0.0
    r = epsilon_from_rates(n_members, 0, 0, n_nonmembers, delta, alpha)
    return float(r["epsilon_lower_bound"])


def _candidate_thresholds(s: np.ndarray) -> np.ndarray:
    u = np.unique(s)
    mids = (u[:-1] + u[1:]) / 2 if u.size > 1 else np.array([], float)
    return np.r_[u[0] - 1.0, mids, u[-1] + 1.0] if u.size else np.array([0.0])


def _confusion_at(s: np.ndarray, m: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """(tp, fn, fp, tn) for the rule score >= t, vectorised over thresholds."""
    s_in = np.sort(s[m])
    s_out = np.sort(s[~m])
    tp = s_in.size - np.searchsorted(s_in, thresholds, side="left")
    fp = s_out.size - np.searchsorted(s_out, thresholds, side="left")
    return tp, s_in.size - tp, fp, s_out.size - fp


def _json_float(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def empirical_epsilon(
    scores_fit: Any,
    members_fit: Any,
    scores_eval: Any,
    members_eval: Any,
    delta: float,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Empirical (epsilon, delta) lower bound with a held-out threshold.

    1. On the *fit* split, every midpoint between consecutive distinct scores is a
       candidate threshold (rule: member iff ``score >= threshold``); the one with
       the largest epsilon lower bound *computed on the fit split* is chosen.
       (Maximising the raw point estimate is degenerate as soon as some threshold
       has 0 false positives -- it is +inf -- so the Clopper-Pearson bound, a
       smoothed point estimate, is maximised instead; ties go to the lower FPR.)
    2. On the *eval* split the confusion counts at that threshold give
       ``eps_lo = max(ln((TPR_lo - delta)/FPR_hi), ln((TNR_lo - delta)/FNR_hi), 0)``
       with Clopper-Pearson bounds at ``alpha/2`` per side (joint confidence
       ``1 - alpha``; see module docstring).

    References: Jagielski et al. NeurIPS 2020; Nasr et al. S&P 2021.

    Returns a JSON-serialisable dict: ``epsilon_lower_bound``,
    ``epsilon_point_estimate`` (``None`` when unbounded), ``threshold``,
    ``tp, fn, fp, tn``, ``n_members, n_nonmembers``, the CP bounds,
    ``max_certifiable_epsilon`` (perfect attack on the eval split), ``alpha``,
    ``delta`` and a ``confidence`` note.
    """
    sf, mf = _as_scores_labels(scores_fit, members_fit)
    se, me = _as_scores_labels(scores_eval, members_eval)
    _require_both_classes(mf)
    n_in, n_out = _require_both_classes(me)
    if not 0.0 <= delta < 1.0:
        raise ValueError("delta must be in [0, 1)")

    cands = _candidate_thresholds(sf)
    tp, fn, fp, tn = _confusion_at(sf, mf, cands)
    fit = epsilon_from_rates(tp, fn, fp, tn, delta, alpha)
    eps_fit = fit["epsilon_lower_bound"]
    best = np.flatnonzero(eps_fit >= eps_fit.max() - 1e-12)
    # tie-break: fewest false positives on the fit split, then highest TP
    fpr_fit = fp / max(1, fp[0] + tn[0])
    best_i = best[np.lexsort((-tp[best], fpr_fit[best]))[0]]
    thr = float(cands[best_i])

    tp_e, fn_e, fp_e, tn_e = (int(x[0]) for x in _confusion_at(se, me, np.array([thr])))
    ev = epsilon_from_rates(tp_e, fn_e, fp_e, tn_e, delta, alpha)
    return {
        "epsilon_lower_bound": float(ev["epsilon_lower_bound"]),
        "epsilon_point_estimate": _json_float(ev["epsilon_point_estimate"]),
        "threshold": thr,
        "threshold_rule": "member iff score >= threshold (chosen on the fit split)",
        "epsilon_lower_bound_fit": float(eps_fit[best_i]),
        "tp": tp_e,
        "fn": fn_e,
        "fp": fp_e,
        "tn": tn_e,
        "n_members": n_in,
        "n_nonmembers": n_out,
        "tpr": tp_e / n_in,
        "fpr": fp_e / n_out,
        "tpr_lo": float(ev["tpr_lo"]),
        "fpr_hi": float(ev["fpr_hi"]),
        "tnr_lo": float(ev["tnr_lo"]),
        "fnr_hi": float(ev["fnr_hi"]),
        "max_certifiable_epsilon": max_certifiable_epsilon(n_in, n_out, delta, alpha),
        "alpha": float(alpha),
        "delta": float(delta),
        "confidence": "Clopper-Pearson, one-sided at alpha/2 per rate (joint 1 - alpha)",
    }


def empirical_epsilon_bonferroni(
    scores: Any,
    members: Any,
    delta: float,
    thresholds: Sequence[float] | np.ndarray,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Empirical epsilon lower bound without a held-out split.

    Every threshold of the *pre-registered* grid ``thresholds`` (fixed before
    looking at the labels) is tested at level ``alpha / len(thresholds)``
    (Bonferroni), so the maximum over the grid is a valid ``1 - alpha`` lower
    bound.  The per-threshold bound uses the same two-sided CP convention as
    :func:`empirical_epsilon`.  ``max_certifiable_epsilon`` is reported at the
    corrected level.
    """
    s, m = _as_scores_labels(scores, members)
    n_in, n_out = _require_both_classes(m)
    thr = np.asarray(thresholds, dtype=float).ravel()
    if thr.size == 0:
        raise ValueError("need at least one threshold")
    a = alpha / thr.size
    tp, fn, fp, tn = _confusion_at(s, m, thr)
    r = epsilon_from_rates(tp, fn, fp, tn, delta, a)
    eps = r["epsilon_lower_bound"]
    i = int(np.argmax(eps))
    return {
        "epsilon_lower_bound": float(eps[i]),
        "epsilon_point_estimate": _json_float(r["epsilon_point_estimate"][i]),
        "threshold": float(thr[i]),
        "threshold_rule": "member iff score >= threshold",
        "n_thresholds": int(thr.size),
        "alpha_per_threshold": float(a),
        "tp": int(tp[i]),
        "fn": int(fn[i]),
        "fp": int(fp[i]),
        "tn": int(tn[i]),
        "n_members": n_in,
        "n_nonmembers": n_out,
        "tpr_lo": float(r["tpr_lo"][i]),
        "fpr_hi": float(r["fpr_hi"][i]),
        "max_certifiable_epsilon": max_certifiable_epsilon(n_in, n_out, delta, a),
        "alpha": float(alpha),
        "delta": float(delta),
        "confidence": "Clopper-Pearson, one-sided at alpha/(2*n_thresholds) per rate (joint 1 - alpha)",
    }


# --------------------------------------------------------------------------- #
# summaries
# --------------------------------------------------------------------------- #
def _fpr_key(f: float) -> str:
    return f"{f:g}"


def summarize_attack(
    scores: Any,
    is_member: Any,
    *,
    fprs: Sequence[float] = (0.1, 0.01, 0.001),
    alpha: float = 0.05,
) -> dict[str, Any]:
    """JSON-serialisable summary of one attack.

    Keys: ``auc``, ``advantage``, ``n_members``, ``n_nonmembers`` and
    ``tpr_at_fpr`` mapping ``"0.01"`` etc. to ``{"fpr_target", "tpr",
    "tpr_ci": [lo, hi], "fpr_achieved", "resolvable"}``.  ``tpr_ci`` is the
    two-sided ``1 - alpha`` Clopper-Pearson interval on the TPR (it ignores the
    sampling error of the threshold).  ``resolvable`` is False when the target
    FPR is below ``1 / n_nonmembers``: the number then only says what happens at
    zero false positives.
    """
    s, m = _as_scores_labels(scores, is_member)
    n_in, n_out = _require_both_classes(m)
    tp, fp, _ = _roc_counts(s, m)
    fpr = fp / n_out
    tpr = tp / n_in
    auc_v = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))  # type: ignore[attr-defined]  # numpy < 2
    at: dict[str, Any] = {}
    for f in fprs:
        ok = np.flatnonzero(fpr <= f + 1e-15)
        j = ok[np.argmax(tp[ok])]
        lo, hi = clopper_pearson(int(tp[j]), n_in, alpha)
        at[_fpr_key(f)] = {
            "fpr_target": float(f),
            "tpr": float(tpr[j]),
            "tpr_ci": [lo, hi],
            "fpr_achieved": float(fpr[j]),
            "resolvable": bool(f * n_out >= 1.0),
        }
    return {
        "auc": auc_v,
        "advantage": float(np.max(tpr - fpr)),
        "tpr_at_fpr": at,
        "n_members": n_in,
        "n_nonmembers": n_out,
        "alpha": float(alpha),
    }


def _py_key(g: Any) -> Any:
    if isinstance(g, np.generic):
        return g.item()
    return g


def slices(
    scores: Any,
    is_member: Any,
    groups: Any,
    *,
    fprs: Sequence[float] = (0.1, 0.01, 0.001),
    alpha: float = 0.05,
) -> dict[Any, dict[str, Any]]:
    """Per-group summaries (e.g. per class, per client).

    Returns ``{group: summarize_attack(...)}``.  Groups lacking members or
    non-members cannot be scored; they map to ``{"skipped": True, "reason": ...,
    "n_members", "n_nonmembers"}`` so that a report shows them rather than
    silently dropping them.  Keys are plain Python scalars.
    """
    s, m = _as_scores_labels(scores, is_member)
    g = np.asarray(groups).ravel()
    if g.shape != s.shape:
        raise ValueError("groups must have one entry per score")
    out: dict[Any, dict[str, Any]] = {}
    for key in np.unique(g):
        sel = g == key
        n_in = int(m[sel].sum())
        n_out = int(sel.sum() - n_in)
        k = _py_key(key)
        if n_in == 0 or n_out == 0:
            out[k] = {
                "skipped": True,
                "reason": "no members" if n_in == 0 else "no non-members",
                "n_members": n_in,
                "n_nonmembers": n_out,
            }
            continue
        out[k] = summarize_attack(s[sel], m[sel], fprs=fprs, alpha=alpha)
    return out
