"""Distributed DP under SecAgg+: each client adds a share of the noise, the sum carries all of it.

With ``distill.secure-aggregation = "secagg+"`` the server only learns the sum of the
surviving clients' uploads (Flower's SecAgg+, ``feddistill.server.secagg``). With
``privacy.client-level = "central"`` or ``"gnmax"`` nobody adds noise to that sum on the
server; instead every client adds its share before its upload is quantized and masked.

The rule (what :func:`secagg_privacy` computes and what the ledger is told):

- **Who is protected against what.** The server sees which nodes were sampled and which
  survived (SecAgg+ needs their keys), so no amplification by sampling is claimed:
  every round is charged as a Gaussian mechanism with q = 1, as if every client took
  part in every round (worst case; a client that answers fewer rounds spends less).
  What is protected is the *content* of a participating client's answers: neighbouring
  is **replace-one** (one client's answers replaced by any other bounded answers), L2
  sensitivity Δ = √(2|Q|) for probabilities and votes, 2·B·√|Q| for clipped logits.
  The guarantee holds against the (honest-but-curious) server and everyone downstream.
- **Noise shares and dropouts.** The sum must carry N(0, σ²) per entry with σ = z·Δ.
  SecAgg+ cannot unmask fewer than ``t = distill.secagg-reconstruction-threshold``
  survivors, and the server refuses (releases nothing from) a round with fewer than
  ``t``. Each client adds N(0, σ²/t): with m ≥ t survivors the sum carries m·σ²/t ≥ σ²
  (more noise than planned, never less). Clients that drop out after sampling take
  their share with them; that is what calibrating on ``t`` instead of the expected
  count covers. The noise comes from OS entropy on the device (never a seed the
  server knows). Colluding clients who tell the server their shares reduce the noise
  by that much: the guarantee assumes no survivor colludes with the server.
- **Clipping range.** Flower clips every uploaded entry to [-c, c] *after* the noise
  is added, then quantizes. A bounded answer lies in [-b, b] (b = 1 for
  probabilities and votes, ``privacy.clip-norm`` for clipped logits), so an entry
  is clipped only if its noise share exceeds c - b. Clipping changes the mechanism,
  so it is treated as a failure event: its probability over the whole run is at most
  ``p = rounds · num_clients · |Q| · C · erfc((c - b) / (s√2))`` (union bound; s the
  share std), whatever the data. The accountant is run at δ - p, so the run is
  (ε, δ)-DP in total. ``distill.secagg-clipping-range = 0`` derives the smallest c with
  p ≤ δ/100; an explicit c with p > δ/100 is refused. Out-of-range values never wrap
  around the modulus: they are clipped first.
- **Quantization.** Each client rounds its clipped, noised entries stochastically to
  a grid of step γ = 2c/T (T = ``distill.secagg-quantization-range``); the server's
  mean is off by at most γ per entry (zero in expectation). Stochastic rounding of a
  Gaussian share gives a lattice distribution whose probabilities are the Gaussian
  smoothed by a width-γ triangle; for s ≫ γ (we require s ≥ 100 γ) the sum's privacy
  loss equals the continuous Gaussian's up to aliasing terms of order exp(-2π²s²/γ²),
  far below any δ (cf. Kairouz, Liu & Steinke 2021, "The Distributed Discrete Gaussian
  Mechanism for Federated Learning with Secure Aggregation", who analyse the discrete
  case exactly). The accountant takes the continuous Gaussian; this is the one
  approximation in the rule and it is stated in results.json.
- **Modulus.** The sum of ``num_clients`` uploads of at most T each (plus the weight
  factor) must stay below SecAgg+'s modulus 2**32 (checked in the config).

``privacy.client-level = "local"`` with SecAgg+ needs none of this: each upload is
already DP on the device, and clipping/quantizing it is post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from feddistill.config import ConfigError, RunConfig
from feddistill.privacy.mechanisms import reply_sensitivity, row_norm_bound

MODULUS = 2**32  # Flower's default SecAgg+ modulus_range
CLIP_FAILURE_SHARE = 0.01  # share of delta the clipping failure event may take
LOCAL_CLIP_FAILURE = 1e-3  # local noise: clipping is post-processing; this only bounds its utility cost
MIN_SHARE_STEPS = 100.0  # a noise share must span at least this many quantization steps
DATASET_CLASSES = {"digits": 10, "fashion-mnist": 10}


@dataclass(frozen=True)
class SecAggNoise:
    """What each client adds and how SecAgg+ quantizes it (all per entry of the answers matrix)."""

    min_survivors: int  # t: rounds with fewer survivors release nothing
    sum_std: float  # sigma: std of the noise in a sum over >= t survivors (0 without distributed DP)
    share_std: float  # s = sigma / sqrt(t): each client's share (the local std in local mode)
    bound: float  # b: the largest |entry| of a bounded answer
    clipping_range: float  # c
    quantization_range: int  # T
    clip_failure: float  # probability that any entry of any upload in the run is clipped (union bound)
    distributed: bool  # True when the shares are the DP noise of the sum

    @property
    def step(self) -> float:
        """Quantization step γ = 2c / T: the largest rounding error of one entry."""
        return 2 * self.clipping_range / self.quantization_range

    def to_dict(self) -> dict[str, float | int | bool]:
        return {"min_survivors": self.min_survivors, "sum_noise_std": self.sum_std, "share_noise_std": self.share_std,
                "answer_bound": self.bound, "clipping_range": self.clipping_range,
                "quantization_range": self.quantization_range, "quantization_step": self.step,
                "clip_failure_probability": self.clip_failure, "distributed_noise": self.distributed}


def share_std(sum_std: float, min_survivors: int) -> float:
    """Each client's noise std so that any >= ``min_survivors`` shares sum to at least ``sum_std``²."""
    if min_survivors < 1:
        raise ValueError(f"min_survivors must be >= 1, got {min_survivors}")
    return sum_std / math.sqrt(min_survivors)


def clip_failure_probability(share: float, clipping_range: float, bound: float, entries: int) -> float:
    """Union bound on P(some of ``entries`` noised entries in [-b, b] leaves [-c, c])."""
    if clipping_range < bound:
        return 1.0
    if share == 0:
        return 0.0
    return min(1.0, entries * math.erfc((clipping_range - bound) / (share * math.sqrt(2))))


def derived_clipping_range(share: float, bound: float, entries: int, failure: float) -> float:
    """The smallest c with :func:`clip_failure_probability` <= ``failure``."""
    if share == 0:
        return bound
    from scipy.special import erfcinv

    return bound + share * math.sqrt(2) * float(erfcinv(failure / entries))


def entries_per_run(cfg: RunConfig) -> int:
    """Every entry any client could upload over the run (the union bound's count)."""
    return cfg.rounds * cfg.fleet.num_clients * cfg.distill.query_size * DATASET_CLASSES[cfg.data.dataset]


def secagg_noise(cfg: RunConfig, sum_std: float, *, distributed: bool, delta_share: float) -> SecAggNoise:
    """The shares and the quantization of a SecAgg+ run (``sum_std``: the DP noise of the sum,
    or in local mode each client's own noise std)."""
    d, p = cfg.distill, cfg.privacy
    t = d.secagg_reconstruction_threshold
    s = share_std(sum_std, t) if distributed else sum_std
    b = row_norm_bound(p.bound, clip_norm=p.clip_norm)
    entries = entries_per_run(cfg)
    c = d.secagg_clipping_range or derived_clipping_range(s, b, entries, delta_share) * (1 + 1e-9)
    failure = clip_failure_probability(s, c, b, entries)
    noise = SecAggNoise(min_survivors=t, sum_std=sum_std if distributed else 0.0, share_std=s, bound=b,
                        clipping_range=c, quantization_range=d.secagg_quantization_range, clip_failure=failure,
                        distributed=distributed)
    if distributed and failure > delta_share:
        best = derived_clipping_range(s, b, entries, delta_share)
        raise ConfigError(
            f"'distill.secagg-clipping-range' = {c:g} clips a noise share (std {s:.4g}) with probability up to "
            f"{failure:.3g} over the run, more than {delta_share:.3g} (1% of 'privacy.delta'); use >= {best:.4g}, "
            "or 0 to derive it"
        )
    if s and s < MIN_SHARE_STEPS * noise.step:
        raise ConfigError(
            f"'distill.secagg-quantization-range' = {noise.quantization_range} quantizes with step {noise.step:.3g}, "
            f"too coarse for noise shares of std {s:.3g} (need step <= std/{MIN_SHARE_STEPS:g}); raise it"
        )
    return noise


def secagg_privacy(cfg: RunConfig):
    """The run's :class:`~feddistill.privacy.plan.UploadPrivacy` under SecAgg+ with distributed DP
    (``privacy.client-level`` central or gnmax) and its :class:`SecAggNoise`; see the module docstring."""
    from feddistill.privacy.plan import UploadPrivacy, _calibrate

    p = cfg.privacy
    q = cfg.distill.query_size
    sensitivity = reply_sensitivity(p.bound, q, neighbouring="replace-one", clip_norm=p.clip_norm)
    delta_clip = CLIP_FAILURE_SHARE * p.delta
    delta = p.delta - delta_clip  # the accountant's delta; the clipping failure takes the rest
    z = p.noise_multiplier or _calibrate(p.target_epsilon, delta, 1.0, cfg.rounds)
    noise = secagg_noise(cfg, z * sensitivity, distributed=True, delta_share=delta_clip)
    plan = UploadPrivacy(mode=p.client_level, bound=p.bound, clip_norm=p.clip_norm, sensitivity=sensitivity,
                         noise_multiplier=z, threshold_noise_multiplier=p.threshold_noise_multiplier,
                         accounted_noise_multiplier=z, sampling_rate=1.0, delta=delta,
                         target_epsilon=p.target_epsilon or None, secure_aggregation=cfg.distill.secure_aggregation,
                         clip_failure=noise.clip_failure)
    return plan, noise


def run_secagg_noise(cfg: RunConfig) -> SecAggNoise:
    """The run's SecAgg+ shares and quantization, whatever the privacy mode (server and clients
    both derive it from the config; a device uses its own)."""
    p = cfg.privacy
    if p.client_level in ("central", "gnmax"):
        return secagg_privacy(cfg)[1]
    if p.client_level == "local":
        from feddistill.privacy.plan import upload_privacy

        return secagg_noise(cfg, upload_privacy(cfg).noise_std, distributed=False, delta_share=LOCAL_CLIP_FAILURE)
    return secagg_noise(cfg, 0.0, distributed=False, delta_share=LOCAL_CLIP_FAILURE)
