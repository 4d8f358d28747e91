"""Membership-inference attack scores from model outputs.

All functions take numpy arrays of model outputs (probabilities, or the
statistic phi derived from them) so they work for any model: the student, a
client's local model, or a mimic distilled from a client's uploads.  Every score
follows one convention: **higher = more likely a member**.

References
----------
* Yeom et al., "Privacy Risk in Machine Learning: Analyzing the Connection to
  Overfitting", CSF 2018 -- loss threshold attack.
* Carlini, Chien, Nasr, Song, Terzis & Tramer, "Membership Inference Attacks
  From First Principles", IEEE S&P 2022 -- LiRA (offline / online, logit-scaled
  confidence, global variance with few shadow models).
* Zarifzadeh, Liu & Shokri, "Low-Cost High-Power Membership Inference
  Attacks", ICML 2024 -- RMIA.
* Shi, Ouyang & Wang, "Unveiling Client Privacy Leakage from Public Dataset
  Usage in Federated Distillation", PoPETs 2025 -- LiRA against FD uploads.

The attacks ``feddistill audit`` runs are registered by name in :data:`ATTACKS` (report order),
each with what it needs of the reference models; :func:`attack_scores` runs every one the
reference models allow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from scipy import stats

from feddistill.registry import Registry

__all__ = [
    "true_class_probability",
    "loss_scores",
    "confidence_scores",
    "logit_scaled_confidence",
    "lira_offline",
    "lira_online",
    "rmia_scores",
    "ATTACKS",
    "AttackInputs",
    "AuditAttack",
    "attack_scores",
    "out_models",
    "register_attack",
]

#: below this many reference models per example (and per side for the online
#: attack) LiRA uses one global variance; Carlini et al. 2022 (Sec. VI-A) find
#: per-example variances only pay off with ~64 or more shadow models.
PER_EXAMPLE_VARIANCE_MIN_REFS = 64

_TINY = 1e-30


def true_class_probability(probs: Any, labels: Any) -> np.ndarray:
    """``probs[..., i, labels[i]]``: the probability given to the true label.

    ``probs`` has shape ``(..., N, C)``; ``labels`` shape ``(N,)``.
    """
    p = np.asarray(probs, dtype=float)
    y = np.asarray(labels).astype(np.int64).ravel()
    if p.ndim < 2 or p.shape[-2] != y.size:
        raise ValueError(f"probs must be (..., N, C) with N = len(labels); got {p.shape}, N={y.size}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[-1]):
        raise ValueError("labels out of range")
    return _gather_nd(p, y)


def _gather_nd(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    idx = np.broadcast_to(y.reshape((1,) * (p.ndim - 2) + (-1, 1)), p.shape[:-1] + (1,))
    return np.take_along_axis(p, idx, axis=-1)[..., 0]


def loss_scores(probs: Any, labels: Any, eps: float = 1e-12) -> np.ndarray:
    """Negative cross-entropy ``log p_y`` (Yeom et al. 2018): low loss -> member."""
    return np.log(np.clip(true_class_probability(probs, labels), eps, 1.0))


def confidence_scores(probs: Any, labels: Any) -> np.ndarray:
    """Probability of the true label ``p_y``."""
    return true_class_probability(probs, labels)


def logit_scaled_confidence(probs: Any, labels: Any, eps: float = 1e-12) -> np.ndarray:
    """LiRA's statistic ``phi = log(p_y / (1 - p_y))`` (Carlini et al. 2022,
    Sec. IV-B), which makes the per-example distributions close to Gaussian.

    Computed stably as ``log p_y - log(sum_{c != y} p_c)`` so that confidences
    near 1 keep their resolution; ``eps`` clips both terms away from 0.
    """
    p = np.asarray(probs, dtype=float)
    py = true_class_probability(p, labels)
    rest = np.clip(p.sum(axis=-1) - py, 0.0, None)
    return np.log(np.clip(py, eps, None)) - np.log(np.clip(rest, eps, None))


# --------------------------------------------------------------------------- #
# LiRA
# --------------------------------------------------------------------------- #
def _check_lira_shapes(target: np.ndarray, refs: np.ndarray) -> None:
    if refs.ndim < 2 or refs.shape[1:] != target.shape:
        raise ValueError(
            f"reference phi must have shape (n_ref, *target.shape) = (n_ref, {target.shape}); got {refs.shape}"
        )


def _reduce_extra(score: np.ndarray, n: int) -> np.ndarray:
    """Average over trailing axes (e.g. augmentations / queries): (N, ...) -> (N,)."""
    return score.reshape(n, -1).mean(axis=1) if score.ndim > 1 else score


def lira_offline(
    target_phi: Any,
    ref_out_phi: Any,
    *,
    fix_variance: bool | None = None,
    one_sided: bool = True,
) -> np.ndarray:
    """Offline LiRA (Carlini et al. 2022, Alg. 1 offline variant).

    ``target_phi``: shape ``(N,)`` (or ``(N, A)`` for A augmentations/queries,
    averaged at the end), phi of the target model on each example.
    ``ref_out_phi``: shape ``(n_ref, *target_phi.shape)``, phi of reference
    (shadow) models **not** trained on any of the examples.

    Fits ``N(mu_out, sigma_out^2)`` per example and scores how far the target's
    phi lies above it.  One-sided (the paper's test, ``1 - P[Z > phi]``) the
    score is ``-log P[Z >= phi] = -logsf((phi - mu)/sigma)`` -- monotone in the
    paper's statistic but without float saturation at low FPR.  With
    ``one_sided=False`` it is ``-log N(phi; mu, sigma)`` (the reference code's
    two-sided variant).

    ``fix_variance``: ``True`` -> one global variance (pooled residuals about
    the per-example means); ``False`` -> per-example variance; ``None``
    (default) -> global when there are fewer than
    :data:`PER_EXAMPLE_VARIANCE_MIN_REFS` reference models.
    """
    t = np.asarray(target_phi, dtype=float)
    r = np.asarray(ref_out_phi, dtype=float)
    _check_lira_shapes(t, r)
    n_ref = r.shape[0]
    if n_ref < 2:
        raise ValueError("need at least two reference models to estimate a variance")
    mu = r.mean(axis=0)
    if fix_variance is None:
        fix_variance = n_ref < PER_EXAMPLE_VARIANCE_MIN_REFS
    if fix_variance:
        sd = np.sqrt(np.sum((r - mu) ** 2) / (r.size - mu.size))
        sd = np.full_like(mu, sd)
    else:
        sd = r.std(axis=0, ddof=1)
    sd = sd + _TINY
    z = (t - mu) / sd
    score = -stats.norm.logsf(z) if one_sided else -stats.norm.logpdf(t, mu, sd)
    return _reduce_extra(score, t.shape[0])


def lira_online(
    target_phi: Any,
    ref_in_phi: Any | None = None,
    ref_out_phi: Any | None = None,
    in_mask: Any | None = None,
    *,
    ref_phi: Any | None = None,
    fix_variance: bool | None = None,
) -> np.ndarray:
    """Online LiRA (Carlini et al. 2022, Alg. 1).

    Reference models are trained on random halves of a pool that contains the
    target examples.  ``in_mask`` (shape ``(n_ref, N)``, bool) says whether
    reference model ``k`` trained on example ``i``; ``ref_phi`` (or, for the
    signature ``lira_online(target_phi, ref_in_phi, ref_out_phi, in_mask)``,
    ``ref_in_phi`` and ``ref_out_phi``) holds phi of every reference model on
    every example, shape ``(n_ref, N)`` (or ``(n_ref, N, A)``).  When
    ``ref_in_phi`` and ``ref_out_phi`` are both given they are merged with
    ``where(in_mask, ref_in_phi, ref_out_phi)``, i.e. they may be the same array.

    Score = ``log N(phi; mu_in, sigma_in) - log N(phi; mu_out, sigma_out)`` per
    example (averaged over trailing axes).  ``fix_variance`` as in
    :func:`lira_offline` (``None`` -> global variance, separately for IN and
    OUT, when some example has fewer than
    :data:`PER_EXAMPLE_VARIANCE_MIN_REFS` models on either side).  Every example
    needs at least one IN and one OUT reference model.
    """
    t = np.asarray(target_phi, dtype=float)
    if in_mask is None:
        raise ValueError("in_mask is required")
    mask = np.asarray(in_mask, dtype=bool)
    if ref_phi is not None:
        r = np.asarray(ref_phi, dtype=float)
    elif ref_in_phi is not None and ref_out_phi is not None:
        ri = np.asarray(ref_in_phi, dtype=float)
        ro = np.asarray(ref_out_phi, dtype=float)
        if ri.shape != ro.shape:
            raise ValueError("ref_in_phi and ref_out_phi must have the same shape (n_ref, N, ...)")
        mk = mask.reshape(mask.shape + (1,) * (ri.ndim - 2))
        r = np.where(mk, ri, ro)
    else:
        raise ValueError("give ref_phi, or both ref_in_phi and ref_out_phi")
    _check_lira_shapes(t, r)
    if mask.shape != r.shape[:2]:
        raise ValueError(f"in_mask must have shape (n_ref, N) = {r.shape[:2]}; got {mask.shape}")
    mk = np.broadcast_to(mask.reshape(mask.shape + (1,) * (r.ndim - 2)), r.shape)
    n_in = mk.sum(axis=0)
    n_out = (~mk).sum(axis=0)
    if (n_in < 1).any() or (n_out < 1).any():
        raise ValueError("every example needs at least one IN and one OUT reference model")

    def fit(sel: np.ndarray, cnt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu = np.where(sel, r, 0.0).sum(axis=0) / cnt
        resid2 = np.where(sel, (r - mu) ** 2, 0.0)
        use_global = fix_variance if fix_variance is not None else bool(cnt.min() < PER_EXAMPLE_VARIANCE_MIN_REFS)
        if use_global or cnt.min() < 2:
            dof = cnt.sum() - cnt.size
            if dof < 1:
                raise ValueError("too few reference models to estimate a variance")
            sd = np.full_like(mu, np.sqrt(resid2.sum() / dof))
        else:
            sd = np.sqrt(resid2.sum(axis=0) / (cnt - 1))
        return mu, sd + _TINY

    mu_in, sd_in = fit(mk, n_in)
    mu_out, sd_out = fit(~mk, n_out)
    score = stats.norm.logpdf(t, mu_in, sd_in) - stats.norm.logpdf(t, mu_out, sd_out)
    return _reduce_extra(score, t.shape[0])


# --------------------------------------------------------------------------- #
# RMIA
# --------------------------------------------------------------------------- #
def rmia_scores(
    target_p_x: Any,
    ref_p_x: Any,
    target_p_z: Any,
    ref_p_z: Any,
    gamma: float = 1.0,
    a: float | None = 0.3,
    eps: float = 1e-12,
) -> np.ndarray:
    """RMIA (Zarifzadeh et al., ICML 2024).

    ``target_p_x`` (N,), ``ref_p_x`` (n_ref, N): probability of the true label of
    each candidate ``x`` under the target / reference models.  ``target_p_z``
    (Z,), ``ref_p_z`` (n_ref, Z): the same for population samples ``z`` (data
    none of the models trained on).

    ``Pr(x) = mean_ref Pr(x | theta')``.  With ``a`` not None the attack is
    *offline* (reference models never saw x) and the paper's linear
    approximation of the unseen IN models is applied,
    ``Pr(x) ~= (1 + a)/2 * Pr_OUT(x) + (1 - a)/2``, to both x and z; with
    ``a=None`` the reference mean is used as is (online setting, half the
    reference models IN).  Then
    ``LR(x, z) = [Pr(x|theta)/Pr(x)] / [Pr(z|theta)/Pr(z)]`` and the score is the
    fraction of population samples with ``LR(x, z) >= gamma``.  Computed by
    sorting, O((N + Z) log Z), so large N x Z is fine.
    """
    tx = np.clip(np.asarray(target_p_x, dtype=float).ravel(), eps, None)
    tz = np.clip(np.asarray(target_p_z, dtype=float).ravel(), eps, None)
    rx = np.asarray(ref_p_x, dtype=float)
    rz = np.asarray(ref_p_z, dtype=float)
    if rx.ndim == 1:
        rx = rx[None, :]
    if rz.ndim == 1:
        rz = rz[None, :]
    if rx.shape[1] != tx.size or rz.shape[1] != tz.size:
        raise ValueError("ref_p_x must be (n_ref, N) and ref_p_z (n_ref, Z)")
    if tz.size == 0:
        raise ValueError("need population samples z")
    if gamma <= 0:
        raise ValueError("gamma must be > 0")
    px = rx.mean(axis=0)
    pz = rz.mean(axis=0)
    if a is not None:
        if not 0.0 <= a <= 1.0:
            raise ValueError("a must be in [0, 1]")
        px = (1 + a) / 2 * px + (1 - a) / 2
        pz = (1 + a) / 2 * pz + (1 - a) / 2
    ratio_x = tx / np.clip(px, eps, None)
    ratio_z = np.sort(tz / np.clip(pz, eps, None))
    # LR(x,z) >= gamma  <=>  ratio_z <= ratio_x / gamma
    counts = np.searchsorted(ratio_z, ratio_x / gamma, side="right")
    return counts / ratio_z.size


# --------------------------------------------------------------------------- #
# The audit's attacks, by name
# --------------------------------------------------------------------------- #
def out_models(arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(K, N, ...) -> (K - K//2, N, ...): the OUT models' values of each column."""
    n_out = mask.shape[0] - int(mask[:, 0].sum()) if mask.shape[1] else 0
    order = np.argsort(mask, axis=0, kind="stable")[:n_out]  # False (OUT) first
    idx = order.reshape(order.shape + (1,) * (arr.ndim - 2))
    return np.take_along_axis(arr, idx, axis=0)


@dataclass(frozen=True, eq=False)
class AttackInputs:
    """What the attacks read. ``target_x`` (N, C) / ``target_z`` (Z, C): the target model's
    probabilities on the candidates and on the population; ``ref_x`` (K, N, C) / ``ref_z``
    (K, Z, C): the reference models'; ``y_*`` the labels; ``mask_*`` (K, .): which reference model
    trained on which point (every point is IN for K // 2 of them)."""

    target_x: np.ndarray
    target_z: np.ndarray
    ref_x: np.ndarray
    ref_z: np.ndarray
    y_x: np.ndarray
    y_z: np.ndarray
    mask_x: np.ndarray
    mask_z: np.ndarray

    @property
    def n_in(self) -> int:
        return self.ref_x.shape[0] // 2

    @property
    def n_out(self) -> int:
        return self.ref_x.shape[0] - self.n_in

    @cached_property
    def phi_target(self) -> np.ndarray:
        return logit_scaled_confidence(self.target_x, self.y_x)

    @cached_property
    def phi_refs(self) -> np.ndarray:
        return logit_scaled_confidence(self.ref_x, self.y_x)

    @cached_property
    def p_target(self) -> tuple[np.ndarray, np.ndarray]:
        """The target's true-class probabilities on x and on z."""
        return true_class_probability(self.target_x, self.y_x), true_class_probability(self.target_z, self.y_z)

    @cached_property
    def p_refs(self) -> tuple[np.ndarray, np.ndarray]:
        """The reference models' true-class probabilities on x and on z."""
        return true_class_probability(self.ref_x, self.y_x), true_class_probability(self.ref_z, self.y_z)


@dataclass(frozen=True)
class AuditAttack:
    """A registered attack: its scores (higher = member) and why the reference models at hand
    cannot run it (``None``: they can)."""

    name: str
    score: Callable[[AttackInputs], np.ndarray]
    unavailable: Callable[[AttackInputs], str | None]


#: The audit's attacks by name, in report order. The loss attack (Yeom et al. 2018) is
#: rank-equivalent to the confidence threshold (``log`` is monotone), so only one of the two is listed.
ATTACKS: Registry[AuditAttack] = Registry("attack")


def register_attack(
    name: str,
    score: Callable[[AttackInputs], np.ndarray],
    unavailable: Callable[[AttackInputs], str | None] = lambda inputs: None,
) -> AuditAttack:
    return ATTACKS.register(name, AuditAttack(name, score, unavailable))


def _needs(count: Callable[[AttackInputs], int], least: int, reason: str) -> Callable[[AttackInputs], str | None]:
    """``unavailable`` for an attack that needs ``count(inputs) >= least`` (``reason`` may name {have})."""
    return lambda inputs: None if count(inputs) >= least else reason.format(have=count(inputs))


def _n_in(inputs: AttackInputs) -> int:
    return inputs.n_in


def _n_out(inputs: AttackInputs) -> int:
    return inputs.n_out


register_attack("loss", lambda a: loss_scores(a.target_x, a.y_x))
register_attack(
    "lira_offline",
    lambda a: lira_offline(a.phi_target, out_models(a.phi_refs, a.mask_x)),
    _needs(_n_out, 2, "needs >= 2 OUT reference models per point (have {have}; use >= 3 reference models)"),
)
register_attack(
    "lira_online",
    lambda a: lira_online(a.phi_target, ref_phi=a.phi_refs, in_mask=a.mask_x),
    _needs(_n_in, 2, "needs >= 2 IN reference models per point (have {have}; use >= 4 reference models)"),
)
register_attack(
    "rmia",
    lambda a: rmia_scores(a.p_target[0], a.p_refs[0], a.p_target[1], a.p_refs[1], a=None),
    _needs(_n_in, 1, "online RMIA needs reference models that trained on each point (use >= 2)"),
)
register_attack(
    "rmia_offline",
    lambda a: rmia_scores(
        a.p_target[0], out_models(a.p_refs[0], a.mask_x), a.p_target[1], out_models(a.p_refs[1], a.mask_z), a=0.3
    ),
    _needs(_n_out, 1, "needs at least one reference model"),
)


def attack_scores(
    target_x: np.ndarray,
    target_z: np.ndarray,
    ref_x: np.ndarray,
    ref_z: np.ndarray,
    y_x: np.ndarray,
    y_z: np.ndarray,
    mask_x: np.ndarray,
    mask_z: np.ndarray,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Scores (higher = member) of every registered attack that the number of reference models
    allows (arguments: :class:`AttackInputs`). Returns ``(scores, skipped)`` where ``skipped`` maps
    an attack to the reason it did not run."""
    inputs = AttackInputs(target_x, target_z, ref_x, ref_z, y_x, y_z, mask_x, mask_z)
    scores: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for name, attack in ATTACKS.items():
        reason = attack.unavailable(inputs)
        if reason is None:
            scores[name] = attack.score(inputs)
        else:
            skipped[name] = reason
    return scores, skipped
