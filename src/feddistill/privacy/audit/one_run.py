"""Privacy auditing with one training run.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023 (arXiv:2305.08846).  ``m`` canaries are each included in the
training data independently with probability 1/2; after training, the auditor
guesses "in" (+1) or "out" (-1) on ``r`` of them and abstains (0) on the rest;
``v`` guesses are correct.  Under (epsilon, delta)-DP the number of correct
guesses is stochastically dominated as in their Theorem 5.2: with
``q = e^eps / (1 + e^eps)``

    p(eps) = P[Bin(r, q) >= v] + 2 m delta * max_{i=1..v} P[v - i <= Bin(r, q) < v] / i

is a p-value for the hypothesis "the mechanism is (eps, delta)-DP", and

    eps_hat = sup{eps : p(eps) < beta}

is a ``1 - beta`` lower bound on epsilon.  The implementation follows the
paper's Appendix D code (bisection on epsilon).

The bound is capped by the sample size: with ``r`` guesses all correct and
``delta = 0`` it is ``ln(q*/(1-q*))`` with ``q* = beta^(1/r)`` (about 5.8 for
1,000 canaries at 95 %).  :func:`audit_canaries` reports that cap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import stats
from scipy.special import expit

__all__ = [
    "one_run_p_value",
    "one_run_epsilon_lower_bound",
    "guesses_from_scores",
    "default_k_grid",
    "audit_canaries",
]


def _check_mrv(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m; got m={m}, r={r}, v={v}")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """``p(eps)`` of Steinke et al. 2023 (Appendix D, ``p_value_DP_audit``):
    the probability, under (epsilon, delta)-DP, of at least ``v`` correct
    guesses out of ``r`` with ``m`` randomised canaries."""
    m, r, v = int(m), int(r), int(v)
    _check_mrv(m, r, v)
    if epsilon < 0:
        raise ValueError("epsilon must be >= 0")
    if not 0.0 <= delta <= 1.0:
        raise ValueError("delta must be in [0, 1]")
    q = float(expit(epsilon))
    p = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if v > 0 and delta > 0:
        # S_i = P[v - i <= Bin < v] = sum_{j=v-i}^{v-1} pmf(j), i = 1..v
        pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
        s = np.cumsum(pmf)
        alpha = float(np.max(s / np.arange(1, v + 1)))
        p += 2.0 * m * delta * alpha
    return min(p, 1.0)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05, *, iters: int = 60) -> float:
    """``sup{eps : p(eps) < beta}`` by bisection (Steinke et al. 2023,
    ``get_eps_audit``); ``0.0`` if nothing can be certified (``p(0) >= beta``)."""
    m, r, v = int(m), int(r), int(v)
    _check_mrv(m, r, v)
    if not 0.0 < beta < 1.0:
        raise ValueError("beta must be in (0, 1)")
    if v == 0 or one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi + 1.0
        if hi > 200.0:  # q == 1 in floating point long before this
            return lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        if one_run_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def guesses_from_scores(scores: Any, k_plus: int, k_minus: int) -> np.ndarray:
    """Guess +1 ("included") for the ``k_plus`` highest scores, -1 ("excluded")
    for the ``k_minus`` lowest, 0 (abstain) otherwise.  Ties are broken by
    position (stable sort), so the result is deterministic."""
    s = np.asarray(scores, dtype=float).ravel()
    k_plus, k_minus = int(k_plus), int(k_minus)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > s.size:
        raise ValueError(f"need k_plus, k_minus >= 0 and k_plus + k_minus <= {s.size}")
    order = np.argsort(-s, kind="stable")
    g = np.zeros(s.size, dtype=np.int64)
    g[order[:k_plus]] = 1
    if k_minus:
        g[order[s.size - k_minus :]] = -1
    return g


def default_k_grid(m: int) -> list[tuple[int, int]]:
    """Symmetric guess counts ``k_plus = k_minus = k`` for ``2k/m`` in
    {1 %, 2 %, 5 %, 10 %, 20 %, 50 %, 100 %} (deduplicated)."""
    ks: list[int] = []
    for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        k = max(1, int(math.floor(f * m / 2)))
        if 2 * k <= m and k not in ks:
            ks.append(k)
    return [(k, k) for k in ks]


def _normalise_grid(k_grid: Iterable[Any] | None, m: int) -> list[tuple[int, int]]:
    if k_grid is None:
        grid = default_k_grid(m)
    else:
        grid = []
        for item in k_grid:
            if isinstance(item, (int, np.integer)):
                kp = km = int(item)
            else:
                kp, km = (int(x) for x in item)
            if (kp, km) not in grid:
                grid.append((kp, km))
    if not grid:
        raise ValueError("empty k_grid")
    for kp, km in grid:
        if kp < 0 or km < 0 or kp + km > m or kp + km == 0:
            raise ValueError(f"invalid (k_plus, k_minus) = {(kp, km)} for m = {m}")
    return grid


def audit_canaries(
    scores: Any,
    truly_included: Any,
    delta: float,
    beta: float = 0.05,
    k_grid: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """One-run audit of ``m`` canaries (Steinke, Nasr & Jagielski 2023).

    ``scores`` (m,): higher = more likely included; ``truly_included`` (m,)
    bool: the coin flips (each canary included w.p. 1/2 -- the bound is only
    valid if they really were).  For every ``(k_plus, k_minus)`` in ``k_grid``
    (ints mean ``k_plus = k_minus``; default :func:`default_k_grid`) the guesses
    of :func:`guesses_from_scores` are scored and turned into a bound.  Taking
    the best of ``G`` guess counts is a multiple test, so each is run at
    ``beta / G`` (union bound); the reported bound holds with confidence
    ``1 - beta``.

    Returns a JSON-serialisable dict with ``epsilon_lower_bound``, ``k_plus``,
    ``k_minus``, ``n_guesses`` (r), ``n_correct`` (v), ``m``, ``guesses`` (list
    of +1/-1/0), ``cap`` (the bound had every one of those r guesses been
    right), ``max_cap`` (best cap over the grid), ``beta``, ``beta_per_test``,
    ``grid`` (per-entry results) and ``delta``.
    """
    s = np.asarray(scores, dtype=float).ravel()
    inc = np.asarray(truly_included).ravel().astype(bool)
    if s.shape != inc.shape:
        raise ValueError("scores and truly_included differ in length")
    m = int(s.size)
    if m == 0:
        raise ValueError("no canaries")
    grid = _normalise_grid(k_grid, m)
    beta_t = beta / len(grid)
    truth = np.where(inc, 1, -1)

    rows = []
    best = None
    for kp, km in grid:
        g = guesses_from_scores(s, kp, km)
        r = int(np.count_nonzero(g))
        v = int(np.sum(g == truth))
        eps = one_run_epsilon_lower_bound(m, r, v, delta, beta_t)
        cap = one_run_epsilon_lower_bound(m, r, r, delta, beta_t)
        row = {"k_plus": kp, "k_minus": km, "n_guesses": r, "n_correct": v, "epsilon_lower_bound": eps, "cap": cap}
        rows.append(row)
        if best is None or eps > best[0]["epsilon_lower_bound"]:
            best = (row, g)
    assert best is not None
    row, g = best
    return {
        "epsilon_lower_bound": float(row["epsilon_lower_bound"]),
        "k_plus": row["k_plus"],
        "k_minus": row["k_minus"],
        "n_guesses": row["n_guesses"],
        "n_correct": row["n_correct"],
        "m": m,
        "n_included": int(inc.sum()),
        "guesses": [int(x) for x in g],
        "cap": float(row["cap"]),
        "max_cap": float(max(x["cap"] for x in rows)),
        "delta": float(delta),
        "beta": float(beta),
        "beta_per_test": float(beta_t),
        "grid": rows,
        "method": "Steinke, Nasr & Jagielski 2023 one-run audit; union bound over the k grid",
    }
