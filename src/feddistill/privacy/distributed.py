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

The arithmetic lives below the config, in :mod:`feddistill.secagg_shares` (the config checks
the shares of a configured z when it is parsed); the plan of a distributed run is
:func:`feddistill.privacy.plan.secagg_privacy`. Both are re-exported here.
"""

from __future__ import annotations

from feddistill.config import RunConfig
from feddistill.privacy.plan import secagg_privacy, secagg_shares, upload_privacy
from feddistill.secagg_shares import (
    CLIP_FAILURE_SHARE,
    LOCAL_CLIP_FAILURE,
    MIN_SHARE_STEPS,
    MODULUS,
    SecAggNoise,
    clip_failure_probability,
    derived_clipping_range,
    entries_per_run,
    secagg_noise,
    share_std,
)

__all__ = [
    "CLIP_FAILURE_SHARE",
    "LOCAL_CLIP_FAILURE",
    "MIN_SHARE_STEPS",
    "MODULUS",
    "SecAggNoise",
    "clip_failure_probability",
    "derived_clipping_range",
    "entries_per_run",
    "run_secagg_noise",
    "secagg_noise",
    "secagg_privacy",
    "share_std",
]


def run_secagg_noise(cfg: RunConfig) -> SecAggNoise:
    """The run's SecAgg+ shares and quantization, whatever the privacy mode (calibrates the answer
    noise: the server derives it once per run, :func:`feddistill.privacy.plan.run_privacy`)."""
    return secagg_shares(cfg, upload_privacy(cfg))
