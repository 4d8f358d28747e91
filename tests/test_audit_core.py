"""Tests for the model-agnostic membership-inference audit core."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from feddistill.privacy.audit import (
    auc,
    audit_canaries,
    clopper_pearson,
    confidence_scores,
    dp_tradeoff_curve,
    empirical_epsilon,
    empirical_epsilon_bonferroni,
    estimate_label_histogram,
    guesses_from_scores,
    kl_divergence,
    lira_offline,
    lira_online,
    logit_scaled_confidence,
    loss_scores,
    max_certifiable_epsilon,
    membership_advantage,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    plot_roc_loglog,
    rmia_scores,
    roc,
    slices,
    summarize_attack,
    tpr_at_fpr,
    tv_distance,
)

# --------------------------------------------------------------------------- #
# metrics
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_and_auc_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 500
    y = rng.random(n) < 0.4
    s = rng.normal(size=n) + 0.7 * y
    if seed == 2:  # heavy ties
        s = np.round(s, 1)
    fpr, tpr, thr = roc(s, y)
    f2, t2, th2 = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_allclose(thr[1:], th2[1:])
    assert thr[0] == np.inf
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_tpr_at_fpr_hand_case():
    # members: 0.9, 0.8, 0.3, 0.2 ; non-members: 0.85, 0.5, 0.1, 0.05
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.85, 0.5, 0.1, 0.05])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    assert tpr_at_fpr(s, y, 0.0) == pytest.approx(0.25)  # threshold 0.9
    assert tpr_at_fpr(s, y, 0.2) == pytest.approx(0.25)  # 0.2 < 1/4: still 0 FP
    assert tpr_at_fpr(s, y, 0.25) == pytest.approx(0.5)  # 0.8: 1 FP
    assert tpr_at_fpr(s, y, 0.5) == pytest.approx(1.0)  # 0.2: 2 FP
    assert tpr_at_fpr(s, y, 1.0) == 1.0
    assert membership_advantage(s, y) == pytest.approx(0.5)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (0, 1), (57, 1000), (999, 1000)])
@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_clopper_pearson_matches_scipy(k, n, alpha):
    lo, hi = clopper_pearson(k, n, alpha)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact")
    assert lo == pytest.approx(ci.low, abs=1e-9)
    assert hi == pytest.approx(ci.high, abs=1e-9)


def test_max_certifiable_epsilon_matches_reference():
    cap = max_certifiable_epsilon(1000, 1000, delta=1e-5, alpha=0.05)
    assert cap == pytest.approx(5.6, abs=0.3)
    # closed form for a perfect attack: ln(((a/2)^(1/n) - delta) / (1 - (a/2)^(1/n)))
    a = 0.025 ** (1 / 1000)
    assert cap == pytest.approx(math.log((a - 1e-5) / (1 - a)), rel=1e-9)
    # more trials -> a higher cap
    assert max_certifiable_epsilon(10000, 10000, 1e-5) > cap


def test_empirical_epsilon_separable_reaches_cap():
    rng = np.random.default_rng(0)
    n = 1000
    y_fit = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    y_ev = y_fit.copy()
    s_fit = np.where(y_fit, 10.0, 0.0) + rng.random(2 * n)
    s_ev = np.where(y_ev, 10.0, 0.0) + rng.random(2 * n)
    res = empirical_epsilon(s_fit, y_fit, s_ev, y_ev, delta=1e-5)
    assert res["tp"] == n and res["fp"] == 0
    assert res["epsilon_lower_bound"] == pytest.approx(res["max_certifiable_epsilon"], rel=1e-9)
    assert res["epsilon_lower_bound"] == pytest.approx(5.6, abs=0.3)
    assert res["epsilon_point_estimate"] is None  # unbounded
    json.dumps(res)


def test_empirical_epsilon_random_is_about_zero():
    rng = np.random.default_rng(1)
    n = 2000
    y = rng.random(n) < 0.5
    y2 = rng.random(n) < 0.5
    res = empirical_epsilon(rng.normal(size=n), y, rng.normal(size=n), y2, delta=1e-5)
    assert res["epsilon_lower_bound"] < 0.1
    assert res["max_certifiable_epsilon"] > 5


def test_empirical_epsilon_shifted_gives_positive_bound_below_truth():
    # Gaussian shift mu=2 ~ mu-GDP; any valid lower bound must stay below the
    # true epsilon at delta=1e-5 (about 8.6 for mu=2; the test is far below it).
    rng = np.random.default_rng(2)
    n = 5000

    def draw():
        y = rng.random(n) < 0.5
        return rng.normal(size=n) + 2.0 * y, y

    (sf, yf), (se, ye) = draw(), draw()
    res = empirical_epsilon(sf, yf, se, ye, delta=1e-5)
    assert 0.5 < res["epsilon_lower_bound"] < res["max_certifiable_epsilon"]


def test_empirical_epsilon_bonferroni():
    rng = np.random.default_rng(3)
    n = 1000
    y = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    s = np.where(y, 10.0, 0.0) + rng.random(2 * n)
    thr = [2.0, 5.0, 8.0]
    res = empirical_epsilon_bonferroni(s, y, 1e-5, thr, alpha=0.05)
    assert res["epsilon_lower_bound"] == pytest.approx(res["max_certifiable_epsilon"], rel=1e-9)
    # the correction costs something relative to a single pre-chosen threshold
    single = empirical_epsilon_bonferroni(s, y, 1e-5, [5.0], alpha=0.05)
    assert res["epsilon_lower_bound"] < single["epsilon_lower_bound"]
    rnd = empirical_epsilon_bonferroni(rng.normal(size=2 * n), y, 1e-5, np.linspace(-2, 2, 9))
    assert rnd["epsilon_lower_bound"] < 0.15


def test_summarize_attack_and_slices_are_json():
    rng = np.random.default_rng(4)
    n = 2000
    y = rng.random(n) < 0.5
    s = rng.normal(size=n) + 1.5 * y
    summ = summarize_attack(s, y)
    json.dumps(summ)
    assert summ["auc"] == pytest.approx(roc_auc_score(y, s))
    assert set(summ["tpr_at_fpr"]) == {"0.1", "0.01", "0.001"}
    for v in summ["tpr_at_fpr"].values():
        lo, hi = v["tpr_ci"]
        assert lo <= v["tpr"] <= hi
        assert v["fpr_achieved"] <= v["fpr_target"]
    assert summ["tpr_at_fpr"]["0.1"]["tpr"] == pytest.approx(tpr_at_fpr(s, y, 0.1))
    for v in summ["tpr_at_fpr"].values():
        assert v["resolvable"] == (v["fpr_target"] * summ["n_nonmembers"] >= 1)
    tiny = summarize_attack(s, y, fprs=(1e-4,))
    assert not tiny["tpr_at_fpr"]["0.0001"]["resolvable"]

    groups = rng.integers(0, 3, size=n)
    y2 = y.copy()
    y2[groups == 2] = True  # group 2 has no non-members
    sl = slices(s, y2, groups)
    json.dumps(sl)
    assert set(sl) == {0, 1, 2}
    assert sl[2]["skipped"] and sl[2]["reason"] == "no non-members"
    assert sl[0]["n_members"] + sl[0]["n_nonmembers"] == int((groups == 0).sum())


# --------------------------------------------------------------------------- #
# one-run audit
# --------------------------------------------------------------------------- #


def _p_direct(m, r, v, eps, delta):
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    tail = sum(pmf[v:])
    best = max((sum(pmf[v - i : v]) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, tail + 2 * m * delta * best)


@pytest.mark.parametrize("m,r,v,delta", [(40, 20, 19, 0.0), (40, 20, 19, 1e-3), (60, 30, 28, 1e-4), (10, 10, 10, 0.0)])
def test_one_run_bound_hand_computed(m, r, v, delta):
    beta = 0.05
    for eps in (0.0, 0.5, 1.7, 3.0):
        assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
            _p_direct(m, r, v, eps, delta), rel=1e-9, abs=1e-15
        )
    e = one_run_epsilon_lower_bound(m, r, v, delta, beta)
    assert e > 0
    assert _p_direct(m, r, v, e, delta) < beta + 1e-12
    assert _p_direct(m, r, v, e + 1e-6, delta) >= beta - 1e-9
    assert _p_direct(m, r, v, e, delta) == pytest.approx(beta, abs=1e-4)
    if v == r and delta == 0.0:  # closed form q* = beta^(1/r)
        qs = beta ** (1 / r)
        assert e == pytest.approx(math.log(qs / (1 - qs)), abs=1e-9)


def test_one_run_monotone_and_zero():
    m, r, delta = 1000, 200, 1e-5
    bounds = [one_run_epsilon_lower_bound(m, r, v, delta) for v in (100, 120, 150, 180, 200)]
    assert bounds[0] == 0.0
    assert all(b2 > b1 for b1, b2 in zip(bounds[1:], bounds[2:]))
    assert bounds[1] >= 0.0
    assert one_run_epsilon_lower_bound(m, r, 0, delta) == 0.0
    assert one_run_epsilon_lower_bound(m, r, r // 2, delta) == 0.0
    # docs/references.md ("Test vectors"): ~5.8 with 1,000 canaries all guessed right
    assert one_run_epsilon_lower_bound(1000, 1000, 1000, 0.0) == pytest.approx(5.8, abs=0.1)


def test_guesses_from_scores():
    s = np.array([0.1, 0.9, 0.5, 0.3, 0.7])
    g = guesses_from_scores(s, 2, 1)
    np.testing.assert_array_equal(g, [-1, 1, 0, 0, 1])
    np.testing.assert_array_equal(guesses_from_scores(s, 0, 0), np.zeros(5))
    with pytest.raises(ValueError):
        guesses_from_scores(s, 3, 3)


def test_audit_canaries():
    rng = np.random.default_rng(5)
    m = 1000
    inc = rng.random(m) < 0.5
    perfect = audit_canaries(inc.astype(float) + 0.01 * rng.random(m), inc, delta=1e-5)
    json.dumps(perfect)
    assert perfect["n_correct"] == perfect["n_guesses"]
    assert perfect["epsilon_lower_bound"] == pytest.approx(perfect["cap"])
    assert perfect["epsilon_lower_bound"] <= perfect["max_cap"] + 1e-12
    assert max(row["epsilon_lower_bound"] for row in perfect["grid"]) == perfect["epsilon_lower_bound"]
    assert perfect["beta_per_test"] == pytest.approx(0.05 / len(perfect["grid"]))
    # the union bound over the grid lowers the cap below the single-test one
    assert perfect["epsilon_lower_bound"] < one_run_epsilon_lower_bound(
        m, perfect["n_guesses"], perfect["n_guesses"], 1e-5
    )
    noise = audit_canaries(rng.normal(size=m), inc, delta=1e-5)
    assert noise["epsilon_lower_bound"] < 0.5
    weak = audit_canaries(rng.normal(size=m) + 1.5 * inc, inc, delta=1e-5)
    assert noise["epsilon_lower_bound"] < weak["epsilon_lower_bound"] < perfect["epsilon_lower_bound"]
    g = np.array(weak["guesses"])
    assert int((g != 0).sum()) == weak["n_guesses"]
    assert int((g == np.where(inc, 1, -1)).sum()) == weak["n_correct"]
    custom = audit_canaries(rng.normal(size=m) + 1.5 * inc, inc, delta=1e-5, k_grid=[50, (100, 0)])
    assert len(custom["grid"]) == 2


# --------------------------------------------------------------------------- #
# attacks
# --------------------------------------------------------------------------- #


def test_simple_scores():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    y = np.array([0, 1])
    np.testing.assert_allclose(confidence_scores(p, y), [0.7, 0.1])
    np.testing.assert_allclose(loss_scores(p, y), np.log([0.7, 0.1]))
    np.testing.assert_allclose(logit_scaled_confidence(p, y), np.log([0.7 / 0.3, 0.1 / 0.9]))
    # batched over reference models: (n_ref, N, C)
    pp = np.stack([p, p[:, ::-1]])
    assert confidence_scores(pp, y).shape == (2, 2)
    # stable near 1
    assert np.isfinite(logit_scaled_confidence(np.array([[1.0, 0.0]]), [0])).all()


def _synthetic_phi(rng, n=1000, n_ref=16, shift=2.0):
    """Per-example difficulty mu_i; OUT phi ~ N(mu_i, 1); IN phi ~ N(mu_i + shift, 1)."""
    mu = rng.normal(0, 3, size=n)
    member = rng.random(n) < 0.5
    target = mu + shift * member + rng.normal(size=n)
    ref_out = mu + rng.normal(size=(n_ref, n))
    in_mask = rng.random((n_ref, n)) < 0.5
    in_mask[0] = True
    in_mask[1] = False
    ref_all = mu + shift * in_mask + rng.normal(size=(n_ref, n))
    return target, ref_out, ref_all, in_mask, member


@pytest.mark.parametrize("shift,expect_signal", [(2.0, True), (0.0, False)])
def test_lira(shift, expect_signal):
    rng = np.random.default_rng(6)
    t, ref_out, ref_all, in_mask, member = _synthetic_phi(rng, shift=shift)
    off = lira_offline(t, ref_out)
    on = lira_online(t, ref_all, ref_all, in_mask)
    on2 = lira_online(t, in_mask=in_mask, ref_phi=ref_all, fix_variance=False)
    two = lira_offline(t, ref_out, one_sided=False, fix_variance=False)
    for s in (off, on, on2):
        a = auc(s, member)
        if expect_signal:
            assert a > 0.8
        else:
            assert abs(a - 0.5) < 0.06
    if expect_signal:
        # calibrating per example beats the raw statistic (difficulty varies)
        assert auc(off, member) > auc(t, member) + 0.1
        assert auc(two, member) > 0.6
    # augmentations axis
    off_a = lira_offline(np.stack([t, t], 1), np.stack([ref_out, ref_out], 2))
    np.testing.assert_allclose(off_a, off)


def test_lira_online_needs_in_and_out():
    rng = np.random.default_rng(7)
    t, _, ref_all, in_mask, _ = _synthetic_phi(rng, n=20, n_ref=4)
    in_mask[:, 0] = True
    with pytest.raises(ValueError):
        lira_online(t, ref_all, ref_all, in_mask)


@pytest.mark.parametrize("shift,expect_signal", [(1.5, True), (0.0, False)])
def test_rmia(shift, expect_signal):
    rng = np.random.default_rng(8)
    n, nz, n_ref = 1000, 2000, 4
    from scipy.special import expit

    def probs(logit_mu, size_ref=None, boost=0.0):
        shape = (logit_mu.size,) if size_ref is None else (size_ref, logit_mu.size)
        return expit(logit_mu + boost + 0.5 * rng.normal(size=shape))

    mu_x = rng.normal(0, 2, size=n)
    mu_z = rng.normal(0, 2, size=nz)
    member = rng.random(n) < 0.5
    tx = probs(mu_x, boost=shift * member)
    rx = probs(mu_x, n_ref)
    tz = probs(mu_z)
    rz = probs(mu_z, n_ref)
    s = rmia_scores(tx, rx, tz, rz)
    assert s.shape == (n,) and s.min() >= 0 and s.max() <= 1
    # brute-force check of the pairwise definition on a few x
    a = 0.3
    px = (1 + a) / 2 * rx.mean(0) + (1 - a) / 2
    pz = (1 + a) / 2 * rz.mean(0) + (1 - a) / 2
    for i in range(5):
        lr = (tx[i] / px[i]) / (tz / pz)
        assert s[i] == pytest.approx(np.mean(lr >= 1.0))
    a_ = auc(s, member)
    if expect_signal:
        assert a_ > 0.75
    else:
        assert abs(a_ - 0.5) < 0.06
    s_online = rmia_scores(tx, rx, tz, rz, gamma=2.0, a=None)
    assert s_online.shape == (n,)


# --------------------------------------------------------------------------- #
# label inference
# --------------------------------------------------------------------------- #


def test_label_histogram_estimate():
    rng = np.random.default_rng(9)
    c = 10
    truth = rng.dirichlet(np.full(c, 0.5))
    q = 2000
    # a client's soft answers: mostly its own label mix, plus noise (DP-style)
    answers = rng.dirichlet(truth * 50 + 0.01, size=q) + rng.normal(0, 0.3, size=(q, c))
    est = estimate_label_histogram(answers)
    assert est.shape == (c,) and est.min() >= 0 and est.sum() == pytest.approx(1.0)
    assert tv_distance(est, truth) < 0.05
    assert kl_divergence(truth, est) < 0.05
    uniform = np.full(c, 1 / c)
    assert tv_distance(est, truth) < tv_distance(uniform, truth)
    assert tv_distance(truth, truth) == 0.0
    assert kl_divergence(truth, truth) == pytest.approx(0.0, abs=1e-12)
    assert tv_distance([1, 0], [0, 1]) == 1.0
    np.testing.assert_allclose(estimate_label_histogram(-np.ones((3, 4))), np.full(4, 0.25))


# --------------------------------------------------------------------------- #
# plots
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("eps,delta", [(0.0, 0.0), (0.5, 1e-5), (2.0, 1e-3), (8.0, 1e-5)])
def test_dp_tradeoff_curve_bounds(eps, delta):
    f = np.r_[0.0, np.logspace(-6, 0, 200)]
    t = dp_tradeoff_curve(f, eps, delta)
    assert np.all(t >= f - 1e-12)
    assert np.all(t <= 1.0)
    assert t[0] == pytest.approx(delta)
    assert t[-1] == pytest.approx(1.0)
    assert np.all(np.diff(t) >= -1e-12)


def test_plot_roc_loglog_writes_png(tmp_path):
    rng = np.random.default_rng(10)
    y = rng.random(500) < 0.5
    s = rng.normal(size=500) + y
    fpr, tpr, _ = roc(s, y)
    out = plot_roc_loglog({"loss": (fpr, tpr)}, tmp_path / "sub" / "roc.png", dp_epsilon=2.0, dp_delta=1e-5, title="t")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    out2 = plot_roc_loglog({"a": (fpr, tpr)}, tmp_path / "roc2.png")
    assert open(out2, "rb").read()[:4] == b"\x89PNG"
