"""SecAgg+ noise shares, clipping range and quantization: the arithmetic, below the config.

The rule (who adds which share, why the clipping range and the quantization step must be what
they are, what the accountant is told) is :mod:`feddistill.privacy.distributed`'s docstring; this
module only computes it from a run's config and its answer noise multiplier z. It sits below
:mod:`feddistill.config`, which checks a config's shares when z is given (a calibrated z is
checked when the run starts): it reads a :class:`~feddistill.config.RunConfig` but does not
import the config, and imports nothing of :mod:`feddistill.privacy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from feddistill.bounds import reply_sensitivity, row_norm_bound
from feddistill.data.datasets import DATASET_CLASSES
from feddistill.errors import ConfigError

__all__ = [
    "CLIP_FAILURE_SHARE",
    "LOCAL_CLIP_FAILURE",
    "MIN_SHARE_STEPS",
    "MODULUS",
    "SecAggNoise",
    "clip_failure_probability",
    "derived_clipping_range",
    "entries_per_run",
    "run_shares",
    "secagg_noise",
    "share_std",
]

MODULUS = 2**32  # Flower's default SecAgg+ modulus_range
CLIP_FAILURE_SHARE = 0.01  # share of delta the clipping failure event may take
LOCAL_CLIP_FAILURE = 1e-3  # local noise: clipping is post-processing; this only bounds its utility cost
MIN_SHARE_STEPS = 100.0  # a noise share must span at least this many quantization steps


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
        return {
            "min_survivors": self.min_survivors,
            "sum_noise_std": self.sum_std,
            "share_noise_std": self.share_std,
            "answer_bound": self.bound,
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
            "quantization_step": self.step,
            "clip_failure_probability": self.clip_failure,
            "distributed_noise": self.distributed,
        }


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


def entries_per_run(cfg) -> int:
    """Every entry any client could upload over the run (the union bound's count)."""
    return cfg.rounds * cfg.fleet.num_clients * cfg.distill.query_size * DATASET_CLASSES[cfg.data.dataset]


def secagg_noise(cfg, sum_std: float, *, distributed: bool, delta_share: float) -> SecAggNoise:
    """The shares and the quantization of a SecAgg+ run (``cfg``: its RunConfig; ``sum_std``: the DP
    noise of the sum, or in local mode each client's own noise std)."""
    d, p = cfg.distill, cfg.privacy
    t = d.secagg_reconstruction_threshold
    s = share_std(sum_std, t) if distributed else sum_std
    b = row_norm_bound(p.bound, clip_norm=p.clip_norm)
    entries = entries_per_run(cfg)
    c = d.secagg_clipping_range or derived_clipping_range(s, b, entries, delta_share) * (1 + 1e-9)
    failure = clip_failure_probability(s, c, b, entries)
    noise = SecAggNoise(
        min_survivors=t,
        sum_std=sum_std if distributed else 0.0,
        share_std=s,
        bound=b,
        clipping_range=c,
        quantization_range=d.secagg_quantization_range,
        clip_failure=failure,
        distributed=distributed,
    )
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


def run_shares(cfg, noise_multiplier: float) -> SecAggNoise:
    """The run's SecAgg+ shares and quantization when its answer noise multiplier is z =
    ``noise_multiplier`` (configured, or calibrated by :mod:`feddistill.privacy.plan`):

    - ``central`` / ``gnmax``: distributed DP, the sum carries N(0, (z Δ)²) with Δ the replace-one
      sensitivity, the clipping failure takes :data:`CLIP_FAILURE_SHARE` of delta;
    - ``local``: each client's own noise, z times the add/remove sensitivity;
    - otherwise no noise (SecAgg+ alone)."""
    p = cfg.privacy
    if p.client_level in ("central", "gnmax"):
        sensitivity = reply_sensitivity(
            p.bound, cfg.distill.query_size, neighbouring="replace-one", clip_norm=p.clip_norm
        )
        return secagg_noise(
            cfg, noise_multiplier * sensitivity, distributed=True, delta_share=CLIP_FAILURE_SHARE * p.delta
        )
    if p.client_level == "local":
        sensitivity = reply_sensitivity(
            p.bound, cfg.distill.query_size, neighbouring="add/remove", clip_norm=p.clip_norm
        )
        return secagg_noise(cfg, noise_multiplier * sensitivity, distributed=False, delta_share=LOCAL_CLIP_FAILURE)
    return secagg_noise(cfg, 0.0, distributed=False, delta_share=LOCAL_CLIP_FAILURE)
