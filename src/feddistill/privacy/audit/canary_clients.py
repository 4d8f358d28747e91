"""One-shot empirical privacy estimation from canary clients (Andrew et al., ICLR 2024).

Input: every round's released teacher signal (``RUN_DIR/released/roundNNNN.npz``) and the
officer's secret; nothing else. The audit SuperNodes answered with canaries
(:mod:`feddistill.client.canary`); the officer regenerates each canary's direction from the
secret and the public query indices and measures how much of it the release carries, with two
statistics per canary j (the cosine of the canary with the released signals of every round, up
to the scale of A; both sum over the rows i canary j owns in round r, class c_i):

- the *test* statistic, for the lower bounds and the plot:
  ``S_j = sum_r <d_{j,r}, A_r> / ||d_j||``, ``d_{j,r}[i] = e_{c_i} - 1/(C-1)`` off row i's top
  class, on rows whose top class is not c_i (:func:`_node_sums`). The top class is where the
  honest clients' consensus sits: leaving it out removes most of what the honest answers add to
  every canary's statistic, inserted or not, and keeps what the canary adds. It separates well
  without noise (a broken run), but which rows it keeps depends on the canary itself: an
  inserted canary raises its own class, so its rows where that class came out on top (the ones
  that carry most of it) are the ones left out. Under noise its separation is 14 to 19 % below
  what the rows' Gaussian mechanism gives (synthetic Gaussian sums, noise std 7 to 51, C = 10;
  tests/test_canary_estimator.py), which the lower bounds may lose (they only need some
  statistic of the release) but an estimate may not.
- the *linear* statistic, for the estimate: the same with the top class taken among the
  classes other than c_i, ``d_{j,r}[i] = e_{c_i} - 1/(C-2)`` off c_i and that class, on every
  released row. Which class it leaves out does not depend on the canary (inserting it moves
  every other class by the same amount), so on a Gaussian release it is a linear statistic of
  the noise and its separation is what the mechanism gives a direction of its norm.

Three groups of canaries: *inserted* (the audit nodes' canaries whose secret coin says in),
*held out* (the audit nodes' other canaries: generated, never answered) and *generated* (the
same draws on node ids no node uses: never sent anywhere).

Estimate (Andrew et al.): fit N(mu_in, s) to the inserted linear statistics and N(mu_out, s) to
the held-out and generated ones (s: theirs); the epsilon at delta of the Gaussian mechanism that
tells them apart, mu = (mu_in - mu_out) / s, is what one canary leaks. A canary owns a share of
its node's rows, and the release is a Gaussian mechanism whose mu grows linearly with the norm
of what changes, so the client-level estimate extrapolates the canaries' mu to a worst-case
client (norm 1 on every row of every released round) and reports that mu's epsilon
(:func:`gdp_epsilon`), with a ``1 - alpha`` t-interval over the inserted canaries that also
carries the uncertainty of the fitted null (its mean and std, from the held-out and generated
canaries: every canary's mu is measured against them). It is an estimate, not a bound, and as
precise as the audit nodes are many: their replies are all the signal there is, so the
interval's width in mu shrinks like ``sqrt(2 / audit nodes)``. Compare it with the claim in mu
(:func:`claimed_mu`: mu is linear in the noise, epsilon is not). What it estimates is the
*release*: the mean aggregator clips the noisy mean at 0 and renormalises each row,
post-processing that can only lose privacy, so on such a release the estimate reads below the
mu of the Gaussian before it: by 6 % at noise std 16 and 17 % at 51 in the calibration bench
(bench/canary.py, 140 answers a row; at 177 the gap is within its precision), more the more of
the sum the clipping cuts off. The statistic is linear in a release that no longer is, so part
of that gap may be its own loss rather than the release's; the estimate does not tell the two apart.

Lower bounds (each at ``alpha / 2``, jointly ``1 - alpha``), on the test statistic:

- the one-run audit of Steinke, Nasr & Jagielski 2023 on the audit nodes' canaries and their
  coins (:func:`feddistill.privacy.audit.one_run.audit_canaries`): rigorous, the coins are fair;
- a Clopper-Pearson threshold test of inserted vs held-out and generated canaries, threshold
  chosen on a fit half (:func:`feddistill.privacy.audit.metrics.empirical_epsilon`); it treats
  the canaries as independent trials, the assumption of Andrew et al.'s one-shot setting (many
  nearly orthogonal canaries), not a theorem.

A canary's inclusion changes its node's reply by a vector of norm at most the reply bound, so
under the claimed Gaussian mechanism no canary can leak more than the claimed client-level
epsilon: a lower bound above it is a DP violation. This holds as stated without client
sampling (q = 1, where the claim is a plain composition of Gaussians; the calibration bench runs
there); with Poisson sampling a canary's in/out is a change inside a client that is sampled as a
whole, which the add/remove amplification analysis does not cover exactly, and the estimate
(which assumes the audit nodes answered every released round) errs low.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from feddistill.client.canary import canary_coins, canary_layout

from .metrics import empirical_epsilon
from .one_run import audit_canaries

__all__ = [
    "CanaryStatistics",
    "canary_statistics",
    "claimed_mu",
    "estimate_from_canaries",
    "gdp_delta",
    "gdp_epsilon",
]

MAX_EPSILON = 100.0  # beyond this an estimate is reported as unbounded (None)


@dataclass
class CanaryStatistics:
    """Every canary's two statistics (module docstring), its group and the norm ratio to a worst-case client."""

    scores: np.ndarray  # (n,) the test statistic S_j (lower bounds, plot)
    scale: float  # ||d_row|| of the test statistic: an inserted row adds scale / n to S_j's numerator per unit norm
    group: np.ndarray  # (n,) "inserted" | "held-out" | "generated"
    node: np.ndarray  # (n,) the node id it was drawn for (negative: generated)
    rows: np.ndarray  # (n,) released rows the test statistic keeps for the canary, over every round
    client_rows: int  # released rows of every round: a worst-case client's norm^2
    rounds: list[int]
    num_classes: int
    linear: np.ndarray  # (n,) the linear statistic (the estimate)
    linear_rows: np.ndarray  # (n,) released rows the canary owns, over every round

    def of(self, group: str) -> np.ndarray:
        return self.scores[self.group == group]

    def linear_of(self, group: str) -> np.ndarray:
        return self.linear[self.group == group]

    @property
    def linear_coefficient(self) -> float:
        """What one inserted row moves the linear statistic's numerator by, over ``||d_row||``:
        <d, e_c - u> = 1 and ||d|| = sqrt((C-1)/(C-2)), per unit of the mechanism's noise std."""
        return math.sqrt((self.num_classes - 2) / (self.num_classes - 1))

    def subset(self, nodes: Sequence[int]) -> CanaryStatistics:
        """The statistics of the canaries of ``nodes`` only (the officer auditing fewer audit nodes)."""
        keep = np.isin(self.node, np.asarray(list(nodes)))
        return CanaryStatistics(
            self.scores[keep],
            self.scale,
            self.group[keep],
            self.node[keep],
            self.rows[keep],
            self.client_rows,
            self.rounds,
            self.num_classes,
            self.linear[keep],
            self.linear_rows[keep],
        )


def _node_sums(
    released: Mapping[int, tuple[np.ndarray, np.ndarray]], secret: bytes, node: int, canaries: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per canary of ``node``: the test statistic's sum of <d_row, A_row> over its rows and its row
    count, then the linear statistic's (module docstring).

    Test: ``d_row = e_c - 1/(C-1)`` on the row's classes other than its top class, 0 on the top
    one; rows whose top class is the canary's are left out. Linear: ``d_row = e_c - 1/(C-2)`` on
    the classes other than c and the top class among them, every row."""
    num, count = np.zeros(canaries), np.zeros(canaries)
    lin, lin_count = np.zeros(canaries), np.zeros(canaries)
    for rnd, (queries, signal) in sorted(released.items()):
        c = signal.shape[1]
        lay = canary_layout(secret, node, rnd, queries, c, canaries)
        finite = np.isfinite(signal).all(axis=1)
        top = np.argmax(np.nan_to_num(signal, nan=-np.inf), axis=1)
        rows = np.flatnonzero(finite & (lay.classes != top))
        rest = (signal[rows].sum(axis=1) - signal[rows, top[rows]]) / (c - 1)
        centred = signal[rows, lay.classes[rows]] - rest
        num += np.bincount(lay.owner[rows], weights=centred, minlength=canaries)
        count += np.bincount(lay.owner[rows], minlength=canaries)
        rows = np.flatnonzero(finite)
        own = signal[rows, lay.classes[rows]]
        others = signal[rows].copy()
        others[np.arange(rows.size), lay.classes[rows]] = -np.inf
        second = others.max(axis=1)  # the top class among the others: its value
        rest = (signal[rows].sum(axis=1) - own - second) / (c - 2)
        lin += np.bincount(lay.owner[rows], weights=own - rest, minlength=canaries)
        lin_count += np.bincount(lay.owner[rows], minlength=canaries)
    return num, count, lin, lin_count


def canary_statistics(
    released: Mapping[int, tuple[np.ndarray, np.ndarray]],
    secret: bytes,
    audit_nodes: Sequence[int],
    canaries: int,
    generated_nodes: int = 16,
) -> CanaryStatistics:
    """The statistics of every canary of ``audit_nodes`` (inserted or held out by its coin) and
    of ``generated_nodes`` x ``canaries`` canaries drawn on node ids -1, -2, ... (never sent)."""
    if not released:
        raise ValueError("no released round: the run folder has no released teacher signal")
    num_classes = int(next(iter(released.values()))[1].shape[1])
    if num_classes < 3:
        raise ValueError(f"{num_classes} classes: the canary statistics need at least 3")
    scale = math.sqrt((num_classes - 2) / (num_classes - 1))  # ||d_row|| of the test statistic
    lin_norm = math.sqrt((num_classes - 1) / (num_classes - 2))  # ||d_row|| of the linear statistic
    parts: list[tuple[tuple[np.ndarray, ...], str | np.ndarray, int]] = []
    for node in audit_nodes:
        coins = canary_coins(secret, node, canaries)
        parts.append((_node_sums(released, secret, node, canaries), np.where(coins, "inserted", "held-out"), node))
    for i in range(generated_nodes):
        parts.append((_node_sums(released, secret, -(i + 1), canaries), "generated", -(i + 1)))
    scores, linear, groups, nodes, rows, linear_rows = [], [], [], [], [], []
    for (num, cnt, lin, lin_cnt), grp, node in parts:
        scores.append(num / np.maximum(np.sqrt(cnt) * scale, 1e-12))
        linear.append(lin / np.maximum(np.sqrt(lin_cnt) * lin_norm, 1e-12))
        groups.append(np.broadcast_to(np.asarray(grp, dtype=object), num.shape))
        nodes.append(np.full(num.shape, node))
        rows.append(cnt)
        linear_rows.append(lin_cnt)
    client_rows = int(sum(int(np.isfinite(s).all(axis=1).sum()) for _, s in released.values()))
    return CanaryStatistics(
        np.concatenate(scores),
        scale,
        np.concatenate(groups).astype(str),
        np.concatenate(nodes),
        np.concatenate(rows).astype(np.int64),
        client_rows,
        sorted(released),
        num_classes,
        np.concatenate(linear),
        np.concatenate(linear_rows).astype(np.int64),
    )


# ---- epsilon of Gaussians ---------------------------------------------------------------


def gdp_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth & Su 2019)."""
    if mu <= 0:
        return 0.0
    a = stats.norm.logcdf(-epsilon / mu + mu / 2)
    b = epsilon + stats.norm.logcdf(-epsilon / mu - mu / 2)
    return float(max(0.0, math.exp(a) - math.exp(b)))


def gdp_epsilon(mu: float, delta: float) -> float | None:
    """The smallest epsilon with delta(epsilon) <= ``delta`` for mu-GDP (None: above :data:`MAX_EPSILON`)."""
    return _smallest_epsilon(lambda e: gdp_delta(mu, e), delta)


def claimed_mu(claim: Mapping[str, Any] | None) -> float | None:
    """The mu of the mu-GDP a client-level claim (results.json's ``privacy.client_level``)
    accounts, where that is exact: every event of its history a Gaussian mechanism without
    client sampling (q = 1), whose composition is mu-GDP with ``mu = sqrt(sum_i steps_i / z_i^2)``
    (Dong, Roth & Su 2019, Corollary 3.3). None without a claim, a history, or with q < 1 (a
    subsampled Gaussian is not exactly Gaussian). The estimate's mu compares with it directly."""
    history = (claim or {}).get("history") or []
    if not history or any(float(h.get("sampling_rate", 0.0)) != 1.0 for h in history):
        return None
    return math.sqrt(sum(int(h["steps"]) / float(h["noise_multiplier"]) ** 2 for h in history))


def _smallest_epsilon(delta_of: Any, delta: float) -> float | None:
    if delta_of(0.0) <= delta:
        return 0.0
    if delta_of(MAX_EPSILON) > delta:
        return None
    lo, hi = 0.0, MAX_EPSILON
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if delta_of(mid) <= delta else (mid, hi)
    return hi


# ---- the estimate and the bounds ----------------------------------------------------------


def _fit(values: np.ndarray) -> dict[str, float]:
    return {"n": int(values.size), "mean": float(values.mean()), "std": float(values.std(ddof=1))}


def estimate_from_canaries(
    st: CanaryStatistics, delta: float, alpha: float = 0.05, seed: int = 0, bound_alpha: float | None = None
) -> dict[str, Any]:
    """The epsilon estimates (a ``1 - alpha`` interval) and the two lower bounds (each at
    ``bound_alpha``, default ``alpha / 2``) as a JSON-ready dict (module docstring)."""
    inserted = st.linear_of("inserted")
    null = np.concatenate([st.linear_of("held-out"), st.linear_of("generated")])
    if inserted.size < 2 or null.size < 2:
        raise ValueError(
            f"{inserted.size} inserted and {null.size} held-out/generated canaries: need at least 2 of each "
            "(more audit nodes or more canaries per node)"
        )
    fit_in, fit_out = _fit(inserted), _fit(null)
    mu_canary = (fit_in["mean"] - fit_out["mean"]) / fit_out["std"]
    # mu of each inserted canary, extrapolated to a worst-case client: mu grows with the norm
    # (in units of the noise std, a worst-case client moves the release by one unit per row, an
    # inserted canary's row moves the linear statistic by `linear_coefficient`)
    rows = st.linear_rows[st.group == "inserted"]
    ratio = np.sqrt(st.client_rows / np.maximum(rows, 1)) / st.linear_coefficient
    mu_each = (inserted - fit_out["mean"]) / fit_out["std"] * ratio
    mu_client = float(mu_each.mean())
    # its standard error: the inserted canaries' spread, and the fitted null's mean and std, which
    # every canary's mu is measured against (delta method; with many audit nodes the null's mean
    # weighs as much as the inserted canaries' spread)
    n_null = null.size
    se = math.sqrt(
        mu_each.var(ddof=1) / mu_each.size + float(ratio.mean()) ** 2 / n_null + mu_client**2 / (2 * (n_null - 1))
    )
    half = float(stats.t.ppf(1 - alpha / 2, mu_each.size - 1) * se)
    return {
        "epsilon_estimate": gdp_epsilon(max(mu_client, 0.0), delta),
        "epsilon_estimate_interval": [
            gdp_epsilon(max(mu_client - half, 0.0), delta),
            gdp_epsilon(max(mu_client + half, 0.0), delta),
        ],
        "epsilon_estimate_per_canary": gdp_epsilon(max(mu_canary, 0.0), delta),
        "mu_client": mu_client,
        "mu_client_interval": [mu_client - half, mu_client + half],
        "mu_client_se": se,
        "mu_canary": mu_canary,
        "statistic": "linear (module docstring of feddistill.privacy.audit.canary_clients)",
        "inserted": fit_in,
        "not_inserted": fit_out,
        "held_out": int(st.of("held-out").size),
        "generated": int(st.of("generated").size),
        "rows_per_inserted_canary": float(np.mean(rows)),
        "released_rows": st.client_rows,
        "lower_bounds": _lower_bounds(st, delta, alpha / 2 if bound_alpha is None else bound_alpha, seed),
        "delta": delta,
    }


def _lower_bounds(st: CanaryStatistics, delta: float, alpha_each: float, seed: int) -> dict[str, Any]:
    """The one-run bound on the audit nodes' coins and the threshold bound, each at ``alpha_each``."""
    own = st.group != "generated"
    one_run = audit_canaries(st.scores[own], st.group[own] == "inserted", delta=delta, beta=alpha_each)
    one_run.pop("guesses", None)
    member = st.group == "inserted"
    rng = np.random.default_rng([seed, 0xCA7A])
    fit = np.zeros(member.size, dtype=bool)
    for side in (member, ~member):  # half of each group chooses the threshold
        idx = np.flatnonzero(side)
        fit[rng.choice(idx, size=idx.size // 2, replace=False)] = True
    threshold: dict[str, Any] | None = None
    if min((member & ~fit).sum(), (~member & ~fit).sum(), (member & fit).sum(), (~member & fit).sum()) >= 1:
        threshold = empirical_epsilon(
            st.scores[fit], member[fit], st.scores[~fit], member[~fit], delta=delta, alpha=alpha_each
        )
    return {"one_run": one_run, "threshold": threshold}
