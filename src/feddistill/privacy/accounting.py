"""Privacy accounting: mechanisms described as events, ε computed by maintained accountants.

Events are plain data (the dp-accounting style): a :class:`GaussianEvent` says
"a Gaussian mechanism with noise multiplier z, Poisson-subsampled at rate q,
ran ``steps`` times". The functions here turn a list of events into ε at a
given δ with

* ``"pld"`` — Google dp-accounting's privacy-loss-distribution accountant
  (Meiser & Mohammadi 2018; Koskela et al. 2020; Doroshenko et al. 2022),
  pessimistic discretisation so it never under-reports. The default.
* ``"rdp"`` — dp-accounting's Rényi-DP accountant (Mironov 2017; Mironov, Talwar
  & Zhang 2019 for the subsampled Gaussian; conversion of Balle et al. 2020).
* ``"prv"`` — Opacus' PRV accountant (Gopi, Lee & Wutschitz 2021), its upper bound.
* :func:`epsilon_rdp_opacus` — Opacus' own RDP analysis, as a cross-check.

The Gaussian-DP (GDP / CLT) accountant is deliberately not offered: it is an
asymptotic approximation and under-reports (Opacus' GDP accountant gives 5.065
where PLD/PRV give 5.19/5.20 for z=1.1, q=0.01, 10,000 steps, δ=1e-5).

Neighbouring relations: the sensitivity for the stated relation is folded into
the noise multiplier. Without subsampling the privacy curve then depends on z
alone, so ``"replace-one"`` (PATE's relation) is accepted for unsubsampled
events; Poisson-subsampled events are accounted under ``"add/remove"`` only
(the relation Opacus and the subsampled-Gaussian analyses use).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp import compute_epsilon as _rdp_to_epsilon

from feddistill.registry import Registry

from .mechanisms import NEIGHBOURING

__all__ = [
    "ACCOUNTANTS",
    "VALUE_DISCRETIZATION_INTERVAL",
    "GaussianEvent",
    "check_neighbouring",
    "epsilon",
    "epsilon_pld",
    "epsilon_rdp",
    "epsilon_rdp_opacus",
    "epsilon_prv",
    "gnmax_events",
    "gnmax_rdp_epsilon",
    "noise_multiplier_for_epsilon",
]

_MAX_NOISE_MULTIPLIER = 1e6

#: The accountants a ledger may name, by name; each is ``(groups, delta, value_discretization_interval) -> ε``
#: (registered below). No "gdp": it under-reports (see module docstring).
ACCOUNTANTS: Registry[Callable[[Groups, float, float], float]] = Registry(
    "accountant", unknown="accountant must be one of {names}, got {name!r}"
)
#: Opacus' RDP analysis: a cross-check (:func:`epsilon_rdp_opacus`), not an accountant a ledger names.
RDP_OPACUS = "rdp-opacus"

#: PLD grid step. 1e-4 keeps PLD within ~0.1 % of the PRV upper bound on the
#: reference vectors while taking < 1 s for 10,000 subsampled steps.
VALUE_DISCRETIZATION_INTERVAL = 1e-4

#: The start of dp-accounting's warning (through absl) about an RDP order whose series did not converge.
SKIPPED_ORDER_WARNING = "_compute_log_a_frac failed to converge"


class _SkippedOrderFilter(logging.Filter):
    """Drops exactly dp-accounting's "failed to converge" warnings. The RDP accountant leaves
    such an order out of the minimum over orders, so ε stays a valid bound; the warning is
    about the library's internals, and with the RDP cross-check in every ledger summary it
    came ~80 times per DP run, burying the warnings that matter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(SKIPPED_ORDER_WARNING)


def _silence_skipped_order_warnings() -> None:
    absl = logging.getLogger("absl")  # dp-accounting logs through absl, whose logger is this one
    if not any(isinstance(f, _SkippedOrderFilter) for f in absl.filters):
        absl.addFilter(_SkippedOrderFilter())


_silence_skipped_order_warnings()  # here: every process that accounts (CLI, ServerApp, ClientApps) imports this


@dataclass(frozen=True)
class GaussianEvent:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism.

    Parameters
    ----------
    noise_multiplier:
        Noise standard deviation divided by the L2 sensitivity (already folded
        in: for a reply with sensitivity Δ and noise std σ, ``σ / Δ``). > 0.
    sampling_rate:
        Poisson inclusion probability of each unit (record or client) per step;
        1 means no subsampling. In (0, 1].
    steps:
        Number of compositions, >= 1.
    """

    noise_multiplier: float
    sampling_rate: float
    steps: int

    def __post_init__(self) -> None:
        z, q, n = self.noise_multiplier, self.sampling_rate, self.steps
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not (math.isfinite(z) and z > 0):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {z!r}")
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not (0 < q <= 1):
            raise ValueError(f"sampling_rate must be in (0, 1], got {q!r}")
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"steps must be an integer >= 1, got {n!r}")
        object.__setattr__(self, "noise_multiplier", float(z))
        object.__setattr__(self, "sampling_rate", float(q))
        object.__setattr__(self, "steps", int(n))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GaussianEvent:
        return cls(
            noise_multiplier=d["noise_multiplier"],
            sampling_rate=d["sampling_rate"],
            steps=d["steps"],
        )

    def to_dp_event(self) -> dp_accounting.DpEvent:
        """The equivalent dp-accounting event."""
        single: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate < 1:
            single = dp_accounting.PoissonSampledDpEvent(self.sampling_rate, single)
        return dp_accounting.SelfComposedDpEvent(single, self.steps)


Groups = tuple[tuple[float, float, int], ...]


def _group(events: Iterable[GaussianEvent]) -> Groups:
    """Merge events with equal (z, q); composition is commutative, so order is irrelevant.

    Merging turns e.g. 30 identical rounds into one 30-fold self-composition,
    which the PLD/PRV accountants do in one FFT power instead of 30 convolutions.
    """
    steps: dict[tuple[float, float], int] = {}
    for e in events:
        if not isinstance(e, GaussianEvent):
            raise TypeError(f"expected GaussianEvent, got {type(e).__name__}")
        key = (e.noise_multiplier, e.sampling_rate)
        steps[key] = steps.get(key, 0) + e.steps
    groups = [(z, q, n) for (z, q), n in steps.items() if q < 1]
    # Unsubsampled Gaussians compose exactly into one Gaussian with
    # 1/z² = Σ steps/z² (a Gaussian mechanism is exactly (1/z)-GDP and μ-GDP
    # composes to sqrt(Σμ²)-GDP: Dong, Roth & Su 2022, Cor. 3.3). This is exact,
    # unlike the CLT approximation behind Opacus' GDP accountant for subsampled
    # steps; it saves PLD convolutions and their rounding.
    inv_sq = sum(n / z**2 for (z, q), n in steps.items() if q == 1)
    if inv_sq > 0:
        groups.append((1.0 / math.sqrt(inv_sq), 1.0, 1))
    return tuple(sorted(groups))


def _check_delta(delta: float) -> None:
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def check_neighbouring(events: Iterable[GaussianEvent], neighbouring: str) -> None:
    """Raise ValueError unless ``events`` can be accounted under ``neighbouring``."""
    _check_neighbouring(neighbouring, _group(events))


def _check_neighbouring(neighbouring: str, groups: Groups) -> None:
    if neighbouring not in NEIGHBOURING:
        raise ValueError(f"neighbouring must be one of {NEIGHBOURING}, got {neighbouring!r}")
    # Our events fold the sensitivity *for the stated relation* into z. Without
    # subsampling the privacy curve then depends on z alone, whatever the
    # relation. With Poisson subsampling under replace-one it also depends on
    # each unit's own norm bound (dp-accounting's REPLACE_ONE takes that bound,
    # not the replace distance), which z does not carry: refuse rather than guess.
    if neighbouring == "replace-one" and any(q < 1 for _, q, _ in groups):
        raise ValueError(
            "Poisson-subsampled events (sampling_rate < 1) are accounted under 'add/remove' only; "
            "fold the add/remove sensitivity into the noise multiplier and use neighbouring='add/remove'"
        )


def _events_of(groups: Groups) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent([GaussianEvent(z, q, n).to_dp_event() for z, q, n in groups])


@ACCOUNTANTS.register("pld")
def _pld(groups: Groups, delta: float, vdi: float) -> float:
    # ADD_OR_REMOVE_ONE for both relations: see _check_neighbouring.
    acc = PLDAccountant(value_discretization_interval=vdi)
    acc.compose(_events_of(groups))
    return float(acc.get_epsilon(delta))


@ACCOUNTANTS.register("rdp")
def _rdp(groups: Groups, delta: float, vdi: float) -> float:
    acc = RdpAccountant()
    acc.compose(_events_of(groups))
    return float(acc.get_epsilon(delta))


@ACCOUNTANTS.register("prv")
def _prv(groups: Groups, delta: float, vdi: float) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(z, q, n) for z, q, n in groups]
    return float(acc.get_epsilon(delta))


def _rdp_opacus(groups: Groups, delta: float, vdi: float) -> float:
    from opacus.accountants.analysis import rdp as opacus_rdp
    from opacus.accountants.rdp import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=n, orders=orders)) for z, q, n in groups)
    eps, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def _analysis(accountant: str) -> Callable[[Groups, float, float], float]:
    """The named accountant's ε function, or the Opacus RDP cross-check; ValueError for any other name."""
    return _rdp_opacus if accountant == RDP_OPACUS else ACCOUNTANTS.lookup(accountant)


@functools.lru_cache(maxsize=1024)
def _epsilon_cached(accountant: str, groups: Groups, delta: float, vdi: float) -> float:
    return _analysis(accountant)(groups, delta, vdi) if groups else 0.0


def epsilon(
    events: Iterable[GaussianEvent],
    delta: float,
    *,
    accountant: str = "pld",
    neighbouring: str = "add/remove",
    value_discretization_interval: float = VALUE_DISCRETIZATION_INTERVAL,
) -> float:
    """ε at ``delta`` of the composition of ``events`` with the named accountant.

    ``neighbouring`` is the relation the sensitivities folded into the events
    were derived for; "replace-one" is accepted for unsubsampled events only.
    Results are cached on the (order-free) event multiset, so repeated calls
    on an append-only history are cheap. 0.0 for no events.
    """
    _analysis(accountant)  # an unknown name fails before any work
    _check_delta(delta)
    groups = _group(events)
    _check_neighbouring(neighbouring, groups)
    return _epsilon_cached(accountant, groups, float(delta), float(value_discretization_interval))


def epsilon_pld(
    events: Iterable[GaussianEvent],
    delta: float,
    *,
    neighbouring: str = "add/remove",
    value_discretization_interval: float = VALUE_DISCRETIZATION_INTERVAL,
) -> float:
    """ε by dp-accounting's ``PLDAccountant`` (pessimistic estimate: an upper bound)."""
    return epsilon(
        events,
        delta,
        accountant="pld",
        neighbouring=neighbouring,
        value_discretization_interval=value_discretization_interval,
    )


def epsilon_rdp(events: Iterable[GaussianEvent], delta: float, *, neighbouring: str = "add/remove") -> float:
    """ε by dp-accounting's ``RdpAccountant`` (default orders, improved conversion)."""
    return epsilon(events, delta, accountant="rdp", neighbouring=neighbouring)


def epsilon_rdp_opacus(events: Iterable[GaussianEvent], delta: float, *, neighbouring: str = "add/remove") -> float:
    """ε by Opacus' RDP analysis (``compute_rdp`` + ``get_privacy_spent``, Opacus' default orders)."""
    return epsilon(events, delta, accountant=RDP_OPACUS, neighbouring=neighbouring)


def epsilon_prv(events: Iterable[GaussianEvent], delta: float, *, neighbouring: str = "add/remove") -> float:
    """ε by Opacus' ``PRVAccountant`` (its upper estimate, ``eps_error=0.01``)."""
    return epsilon(events, delta, accountant="prv", neighbouring=neighbouring)


# Dense RDP orders for the (linear) RDP curves of GNMax: evaluating them is free,
# and a dense grid keeps the conversion within a fraction of a percent of optimal.
_GNMAX_ORDERS = np.concatenate([np.linspace(1.01, 20.0, 1900), np.linspace(20.1, 20000.0, 20000)])


def _gnmax_sq_sensitivity(neighbouring: str) -> float:
    if neighbouring not in NEIGHBOURING:
        raise ValueError(f"neighbouring must be one of {NEIGHBOURING}, got {neighbouring!r}")
    # One voter's one-hot vote moves the count vector by √2 (replace) or 1 (add/remove).
    return 2.0 if neighbouring == "replace-one" else 1.0


def gnmax_rdp_epsilon(
    num_queries: int,
    sigma: float,
    delta: float,
    *,
    sigma_threshold: float | None = None,
    neighbouring: str = "replace-one",
) -> float:
    """Data-independent (ε, δ) of ``num_queries`` GNMax answers.

    Papernot et al. 2018, "Scalable Private Learning with PATE", §4 and App. B:
    GNMax is a Gaussian mechanism on the vote histogram; under replace-one
    (PATE's relation: one teacher's votes change) the histogram moves by √2 in
    L2, so each query is ``(α, α/σ²)``-RDP (under add/remove, ``α/(2σ²)``).

    With ``sigma_threshold`` (Confident-GNMax) every query is charged both the
    threshold check, ``α/σ₁²``, and the answer, ``α/σ₂²``, whether or not it
    was answered. The threshold statistic (the max count) actually moves by at
    most 1, so ``α/(2σ₁²)`` would do; charging the histogram's sensitivity is
    conservative.

    This bound is **data-independent**: it ignores the consensus among voters
    that PATE's data-dependent analysis exploits, so it is larger than the
    published PATE numbers, and may be released without further privacy cost.
    RDP is converted to (ε, δ) with dp-accounting's ``compute_epsilon``
    (Balle et al. 2020, "Hypothesis Testing Interpretations and Rényi DP").
    """
    if int(num_queries) != num_queries or num_queries < 0:
        raise ValueError(f"num_queries must be an integer >= 0, got {num_queries!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be finite and > 0, got {sigma!r}")
    if sigma_threshold is not None and not (math.isfinite(sigma_threshold) and sigma_threshold > 0):
        raise ValueError(f"sigma_threshold must be finite and > 0, got {sigma_threshold!r}")
    _check_delta(delta)
    if num_queries == 0:
        return 0.0
    d2 = _gnmax_sq_sensitivity(neighbouring)
    per_order = d2 / (2.0 * sigma**2)
    if sigma_threshold is not None:
        per_order += d2 / (2.0 * sigma_threshold**2)
    rdp = _GNMAX_ORDERS * per_order * int(num_queries)
    eps, _ = _rdp_to_epsilon(_GNMAX_ORDERS, rdp, delta)
    return float(eps)


def gnmax_events(
    num_queries: int,
    sigma: float,
    *,
    sigma_threshold: float | None = None,
    neighbouring: str = "replace-one",
) -> list[GaussianEvent]:
    """GNMax / Confident-GNMax as :class:`GaussianEvent` s for a ledger.

    The same data-independent charge as :func:`gnmax_rdp_epsilon`, expressed as
    unsubsampled Gaussian events with the vote sensitivity folded in
    (``z = σ / Δ``), so a :class:`~feddistill.privacy.ledger.PrivacyLedger`
    (whose ``neighbouring`` should match) composes it exactly with PLD.
    """
    if int(num_queries) != num_queries or num_queries < 1:
        raise ValueError(f"num_queries must be an integer >= 1, got {num_queries!r}")
    d = math.sqrt(_gnmax_sq_sensitivity(neighbouring))
    events = [GaussianEvent(sigma / d, 1.0, int(num_queries))]
    if sigma_threshold is not None:
        events.insert(0, GaussianEvent(sigma_threshold / d, 1.0, int(num_queries)))
    return events


def noise_multiplier_for_epsilon(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    *,
    neighbouring: str = "add/remove",
    rtol: float = 1e-3,
) -> float:
    """Smallest noise multiplier z (to relative tolerance ``rtol``) whose PLD ε ≤ target.

    Root finding on z with the same PLD accountant the ledger uses, keeping a
    bracket ``lo < z ≤ hi`` with ``ε(hi) ≤ target < ε(lo)`` and returning
    ``hi``: recorded as ``GaussianEvent(z, sampling_rate, steps)``, the result
    never exceeds ``target_epsilon``. The bracket starts from cheap estimates
    (the exact Gaussian calibration of Balle & Wang 2018 when unsubsampled,
    the RDP accountant's answer moved by one PLD-based secant step otherwise)
    and shrinks by Illinois regula falsi on ``log ε``: about five PLD
    evaluations instead of ~15 bisections.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    GaussianEvent(1.0, sampling_rate, steps)  # validates sampling_rate and steps
    _check_delta(delta)
    if not (0 < rtol < 1):
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    q, n = float(sampling_rate), int(steps)
    _check_neighbouring(neighbouring, ((1.0, q, n),))

    def pld(z: float) -> float:
        return epsilon_pld([GaussianEvent(z, q, n)], delta, neighbouring=neighbouring)

    def too_large(z: float) -> None:
        if z > _MAX_NOISE_MULTIPLIER:
            raise ValueError(f"target_epsilon={target_epsilon} needs a noise multiplier > {_MAX_NOISE_MULTIPLIER:g}")

    # 1. A cheap guess z0 and the local slope of log ε against log z.
    z0, slope = _noise_multiplier_guess(target_epsilon, delta, q, n, too_large)

    # 2. Correct the guess with one PLD evaluation (RDP over-reports, so PLD's z is
    #    smaller), then grow a bracket eps(hi) <= target < eps(lo) around it.
    e0 = pld(z0)
    if slope is not None and e0 > 0:
        z0 *= (target_epsilon / e0) ** (1.0 / slope)
    margin = max(2 * rtol, 0.002)
    hi = z0 * (1 + margin)
    while (e_hi := pld(hi)) > target_epsilon:
        margin *= 2
        hi = z0 * (1 + margin)
        too_large(hi)
    margin = max(2 * rtol, 0.002)
    lo = min(z0, hi) * (1 - margin)
    while (e_lo := pld(lo)) <= target_epsilon:
        hi, e_hi = lo, e_lo
        margin = min(2 * margin, 0.5)
        lo = hi * (1 - margin)
        if lo < 1e-4:
            return hi

    # 3. Illinois regula falsi on f(z) = log ε(z) − log target (decreasing in z).
    return _illinois_noise_multiplier(pld, target_epsilon, lo, e_lo, hi, e_hi, rtol)


def _noise_multiplier_guess(
    target_epsilon: float, delta: float, q: float, n: int, too_large: Callable[[float], None]
) -> tuple[float, float | None]:
    """A cheap first z for :func:`noise_multiplier_for_epsilon`, and the local slope of
    log ε against log z (None when unsubsampled: the guess is then exact)."""
    if q == 1:
        # n compositions of N(0, z²) are one Gaussian with z / sqrt(n); exact calibration.
        return dp_accounting.get_sigma_gaussian(target_epsilon, delta) * math.sqrt(n), None

    def rdp(z: float) -> float:
        return _epsilon_cached("rdp", ((z, q, n),), float(delta), 0.0)

    z0 = 1.0
    while rdp(z0) > target_epsilon:
        z0 *= 2.0
        too_large(z0)
    lo_r = z0 / 2.0
    while z0 - lo_r > 1e-2 * z0:
        mid = 0.5 * (lo_r + z0)
        lo_r, z0 = (mid, z0) if rdp(mid) > target_epsilon else (lo_r, mid)
    e_a, e_b = rdp(z0), rdp(z0 * 0.99)
    slope = math.log(e_a / e_b) / math.log(1 / 0.99) if e_a > 0 and e_b > e_a else None
    return z0, slope


def _illinois_noise_multiplier(
    pld: Callable[[float], float], target_epsilon: float, lo: float, e_lo: float, hi: float, e_hi: float, rtol: float
) -> float:
    """Shrink the bracket ``ε(hi) <= target < ε(lo)`` by Illinois regula falsi on
    f(z) = log ε(z) − log target (decreasing in z) until ``hi - lo <= rtol * hi``; returns hi."""
    f_lo, f_hi = math.log(e_lo / target_epsilon), math.log(max(e_hi, 1e-300) / target_epsilon)
    side = 0
    while hi - lo > rtol * hi:
        width = hi - lo
        mid = hi - f_hi * width / (f_hi - f_lo) if f_hi != f_lo else 0.5 * (lo + hi)
        mid = min(max(mid, lo + 0.05 * width), hi - 0.05 * width)  # stay strictly inside
        e_mid = pld(mid)
        f_mid = math.log(max(e_mid, 1e-300) / target_epsilon)
        if e_mid <= target_epsilon:
            hi, f_hi = mid, f_mid
            if side == 1:
                f_lo *= 0.5
            side = 1
        else:
            lo, f_lo = mid, f_mid
            if side == -1:
                f_hi *= 0.5
            side = -1
    return hi
