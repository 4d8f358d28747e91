"""Bounding and noising of what leaves a device, and PATE's noisy aggregators.

Pure functions. Every mechanism here is a Gaussian mechanism (Dwork & Roth 2014,
"The Algorithmic Foundations of Differential Privacy", Thm. A.1; Mironov 2017,
"Rényi Differential Privacy", Prop. 7): a query ``f`` with L2 sensitivity ``Δ``
released as ``f(D) + N(0, (z·Δ)² I)``. The noise multiplier ``z`` is what the
accountants in :mod:`feddistill.privacy.accounting` consume; the sensitivity is
what :func:`reply_sensitivity` derives for the bounded replies of one client.

Security note: noise comes from NumPy's PCG64 generator and floating-point
Gaussian sampling. On a device (and with ``privacy.noise-source =
"os-entropy"``) the generator is seeded from OS entropy (:func:`noise_rng`
with ``None``), so nobody who knows the run's seed can regenerate the noise;
a seeded generator is for reproducible simulation only. PCG64 is not a
cryptographic generator and floating-point sampling does not defend against
the attacks of Mironov 2012 ("On significance of the least significant bits
for differential privacy"): the standard research setting (Opacus with
``secure_mode=False``).
"""

from __future__ import annotations

import math

import numpy as np

from feddistill.bounds import (  # re-exported: they were defined here until issue 17
    BOUNDS,
    NEIGHBOURING,
    _check_bound,
    reply_sensitivity,
    row_norm_bound,
)

__all__ = [
    "BOUNDS",
    "NEIGHBOURING",
    "bound_answers",
    "reply_sensitivity",
    "row_norm_bound",
    "noise_rng",
    "add_gaussian_noise",
    "gnmax",
    "noisy_histogram",
    "confident_gnmax",
]


def _enforce_row_norms(rows: np.ndarray, limit: float) -> np.ndarray:
    """Shrink float32 rows whose norm rounding pushed above ``limit``.

    Casting to float32 can move a row's norm up by a few ulp; the sensitivity we
    claim must hold for the values we actually send, so we check in float64 and
    shrink the (rare) offenders until it does.
    """
    for _ in range(64):
        norms = np.linalg.norm(rows.astype(np.float64), axis=1)
        over = norms > limit
        if not over.any():
            return rows
        rows[over] *= np.float32(1.0 - 2.0**-20)
    raise AssertionError("could not bring row norms under the bound")  # pragma: no cover


def bound_answers(logits: np.ndarray, bound: str, *, clip_norm: float = 1.0) -> np.ndarray:
    """Bound a client's outputs on the queries so that every row has ‖row‖₂ ≤ B.

    Parameters
    ----------
    logits:
        Raw model outputs, shape ``(Q, C)`` (Q queries, C classes), finite.
    bound:
        ``"probs"`` — softmax of each row (non-negative, sums to 1, hence
        ‖row‖₂ ≤ ‖row‖₁ = 1; FedMD / DS-FL style soft labels).
        ``"votes"`` — one-hot of each row's argmax (‖row‖₂ = 1; PATE votes).
        ``"clipped_logits"`` — each row scaled by ``min(1, clip_norm / ‖row‖₂)``
        (‖row‖₂ ≤ clip_norm; per-row clipping as in Abadi et al. 2016).
    clip_norm:
        Row bound for ``"clipped_logits"``; ignored otherwise.

    Returns
    -------
    np.ndarray
        float32, shape ``(Q, C)``; every row's L2 norm (computed in float64) is
        at most :func:`row_norm_bound`.
    """
    _check_bound(bound)
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"logits must have shape (Q, C) with C >= 1, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("logits must be finite")
    limit = row_norm_bound(bound, clip_norm=clip_norm)
    if bound == "probs":
        z = x - x.max(axis=1, keepdims=True)
        e = np.exp(z)
        out = e / e.sum(axis=1, keepdims=True)
    elif bound == "votes":
        out = np.zeros_like(x)
        out[np.arange(x.shape[0]), np.argmax(x, axis=1)] = 1.0
    else:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        scale = np.minimum(1.0, limit / np.maximum(norms, np.finfo(np.float64).tiny))
        out = x * scale
    return _enforce_row_norms(out.astype(np.float32), limit)


def noise_rng(seed: int | None) -> np.random.Generator:
    """The generator all noise is drawn from.

    ``seed=None`` seeds PCG64 with 128 bits of OS entropy (NumPy's
    ``SeedSequence``): what every device uses, for local answer noise and
    SecAgg+ noise shares alike, because a seed known to the server would let it
    regenerate and subtract the noise. An integer seed makes simulations
    reproducible (``privacy.noise-source = "seeded"``, refused on devices).
    """
    return np.random.default_rng(seed)


def add_gaussian_noise(
    values: np.ndarray,
    *,
    noise_multiplier: float,
    sensitivity: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Gaussian mechanism: ``values + N(0, (noise_multiplier·sensitivity)²)`` per entry.

    Dwork & Roth 2014, Thm. A.1; its privacy curve is that of a Gaussian with
    noise multiplier ``z = noise_multiplier`` (Balle & Wang 2018, "Improving the
    Gaussian Mechanism for Differential Privacy"), which is what the
    accountants take. ``noise_multiplier = 0`` adds no noise and gives no
    privacy. Floating dtypes are kept (float32 replies stay float32); other
    dtypes become float64.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise ValueError(f"sensitivity must be finite and > 0, got {sensitivity!r}")
    arr = np.asarray(values)
    dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64
    std = float(noise_multiplier) * float(sensitivity)
    noise = rng.normal(0.0, std, size=arr.shape) if std > 0 else np.zeros(arr.shape)
    return (arr.astype(np.float64) + noise).astype(dtype)


def _check_votes(vote_counts: np.ndarray) -> np.ndarray:
    v = np.asarray(vote_counts, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] < 1:
        raise ValueError(f"vote_counts must have shape (Q, C), got {v.shape}")
    if not np.isfinite(v).all() or (v < 0).any():
        raise ValueError("vote_counts must be finite and non-negative")
    return v


def _check_sigma(name: str, sigma: float) -> None:
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{name} must be finite and > 0, got {sigma!r}")


def gnmax(vote_counts: np.ndarray, *, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """GNMax: ``argmax_c (n_c + N(0, σ²))`` for every query.

    Papernot et al. 2018, "Scalable Private Learning with PATE" (ICLR), §4.1.
    With one-hot votes the count vector changes by at most √2 in L2 when one
    voter is replaced (1 when one is added or removed); the argmax is
    post-processing of that Gaussian mechanism, so per query the
    data-independent RDP is ``α/σ²`` (replace-one); see
    :func:`feddistill.privacy.accounting.gnmax_rdp_epsilon`.

    Returns int64 labels of shape ``(Q,)``.
    """
    v = _check_votes(vote_counts)
    _check_sigma("sigma", sigma)
    noisy = v + rng.normal(0.0, sigma, size=v.shape)
    return np.argmax(noisy, axis=1).astype(np.int64)


def noisy_histogram(vote_counts: np.ndarray, *, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Soft labels from noisy vote counts: ``max(n + N(0, σ²), 0)`` normalised per row.

    The same Gaussian mechanism as :func:`gnmax` (Papernot et al. 2018), so the
    same privacy cost; clipping and normalising are post-processing. A row whose
    noisy counts are all ≤ 0 becomes uniform. Returns float32 ``(Q, C)``.
    """
    v = _check_votes(vote_counts)
    _check_sigma("sigma", sigma)
    noisy = np.maximum(v + rng.normal(0.0, sigma, size=v.shape), 0.0)
    totals = noisy.sum(axis=1, keepdims=True)
    uniform = np.full_like(noisy, 1.0 / v.shape[1])
    out = np.where(totals > 0, noisy / np.where(totals > 0, totals, 1.0), uniform)
    return out.astype(np.float32)


def confident_gnmax(
    vote_counts: np.ndarray,
    *,
    threshold: float,
    sigma_threshold: float,
    sigma_answer: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Confident-GNMax (Papernot et al. 2018, Algorithm 1).

    A query is answered only when ``max_c n_c + N(0, σ₁²) ≥ T``; answered
    queries get the GNMax label with ``σ₂``. Both steps are Gaussian mechanisms
    (the max count moves by at most 1 per voter, the count vector by √2 under
    replace-one); the data-independent accounting in
    :func:`feddistill.privacy.accounting.gnmax_rdp_epsilon` charges every query
    for both, whether or not it was answered.

    Returns
    -------
    (answered, labels):
        ``answered`` bool ``(Q,)``; ``labels`` int64 ``(Q,)`` holding the noisy
        argmax where answered and ``-1`` elsewhere.
    """
    v = _check_votes(vote_counts)
    _check_sigma("sigma_threshold", sigma_threshold)
    _check_sigma("sigma_answer", sigma_answer)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    answered = v.max(axis=1) + rng.normal(0.0, sigma_threshold, size=v.shape[0]) >= threshold
    labels = np.full(v.shape[0], -1, dtype=np.int64)
    if answered.any():
        labels[answered] = gnmax(v[answered], sigma=sigma_answer, rng=rng)
    return answered, labels
