"""Record-level DP-SGD on a device, through Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"): each step
Poisson-samples records at rate q, clips every per-sample gradient to L2 norm C,
sums, adds N(0, (z·C)²) and divides by the expected batch size q·n. One step is a
Poisson-subsampled Gaussian mechanism with noise multiplier z under add/remove of
one record, so a run is ``GaussianEvent(z, q, steps)``, which the caller records in
its device :class:`~feddistill.privacy.ledger.PrivacyLedger` (unit ``"record"``).
Opacus' own accountant is not used for the reported ε.

The rate q is a public run parameter (``privacy.record-sampling-rate``), not
``batch / n``: the steps, z and hence the device's ε then do not depend on its
number of records n, so the ε a device reports reveals nothing about its data
(only how often it took part, which the server sees anyway). Only the expected
batch q·n, used on the device alone, depends on n.

Opacus does the per-sample gradients (``GradSampleModule``), the clipping and
the noise (``DPOptimizer``) and the Poisson sampling (``DPDataLoader``).

Randomness: with ``seed=None`` (every device) the Poisson sampler's and the
noise's torch generators are seeded from OS entropy (``torch.Generator.seed()``
reads ``/dev/urandom`` on Linux; 64 bits, torch's seed width), so nobody who
knows the run's seed can regenerate the noise. Opacus' ``secure_mode`` (a
CSPRNG from ``torchcsprng`` and noise hardened against the floating-point
attack of Mironov 2012) is off: torchcsprng's last release (0.2.1, 2021) is
built for torch 1.8 and cannot be installed with the torch used here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.validators import ModuleValidator
from torch import nn

if TYPE_CHECKING:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset

from .accounting import noise_multiplier_for_epsilon
from .plan import dpsgd_schedule  # public: the schedule is part of the run's privacy plan

__all__ = ["DPTrainResult", "dp_train", "dpsgd_schedule", "noise_for_record_target"]

# Attributes DPOptimizer leaves on parameters (GradSampleModule cleans up its own).
_OPTIMIZER_PARAM_ATTRS = ("summed_grad", "grad_sample", "_processed")


@dataclass
class DPTrainResult:
    """What a DP-SGD run spent (record it as ``GaussianEvent(noise_multiplier, sampling_rate, steps)``)."""

    steps: int
    sampling_rate: float
    noise_multiplier: float
    max_grad_norm: float
    mean_loss: float


def _check_model(model: nn.Module) -> None:
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        details = "; ".join(str(e) for e in errors)
        raise ValueError(
            "model is not compatible with DP-SGD per-sample gradients (use GroupNorm instead of "
            f"BatchNorm, no stateful or cross-sample layers): {details}"
        )


def dp_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    sampling_rate: float,
    lr: float,
    momentum: float,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> DPTrainResult:
    """Train ``model`` in place with DP-SGD (SGD with momentum) through Opacus.

    Parameters
    ----------
    model:
        Trained in place: Opacus' ``GradSampleModule`` wraps this very module
        (same parameter tensors) and is removed afterwards, so the caller's
        object holds the trained weights and no Opacus hooks or attributes.
    x, y:
        Private records and their targets (first dimension = records).
    epochs, sampling_rate:
        Poisson rate q (expected batch size q·n) and epochs of ``int(1 / q)``
        steps; see :func:`dpsgd_schedule`.
    lr, momentum:
        SGD settings. Momentum is post-processing of the noisy gradients.
    noise_multiplier:
        z ≥ 0 (0 gives no privacy; useful only for tests).
    max_grad_norm:
        Per-sample clipping bound C > 0.
    seed:
        Seeds Poisson sampling and the noise (reproducible simulations only:
        anyone who knows the seed can regenerate the noise); ``None`` seeds
        both generators from OS entropy (devices; see the module docstring
        for why Opacus' ``secure_mode`` is off).
    loss_fn:
        ``loss_fn(outputs, targets)`` with mean reduction; defaults to
        cross-entropy.

    Returns
    -------
    DPTrainResult with the optimizer steps actually taken, the sampling rate,
    z and C: what the caller records in its ledger.
    """
    _check_arguments(x, y, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, lr=lr, momentum=momentum)
    sampling_rate, planned_steps = dpsgd_schedule(sampling_rate, epochs)
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss()

    was_training = model.training
    model.train()  # Opacus validates (and trains) in training mode
    try:
        _check_model(model)
    except ValueError:
        model.train(was_training)
        raise
    device = next(model.parameters()).device

    sample_gen, noise_gen = _generators(seed, device)
    gsm, dp_optimizer, loader = _make_private(
        model,
        x,
        y,
        sampling_rate=sampling_rate,
        lr=lr,
        momentum=momentum,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        sample_gen=sample_gen,
        noise_gen=noise_gen,
    )

    try:
        with warnings.catch_warnings():
            # Opacus' backward hooks fire on module outputs when inputs need no grad: expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            steps, loss_sum, loss_records = _train_epochs(
                gsm, dp_optimizer, loader, loss_fn, device=device, epochs=epochs
            )
    finally:
        dp_optimizer.zero_grad(set_to_none=True)
        gsm.to_standard_module()  # removes Opacus' hooks and grad_sample attributes from `model`
        for p in model.parameters():
            for attr in _OPTIMIZER_PARAM_ATTRS:
                if hasattr(p, attr):
                    delattr(p, attr)
        model.train(was_training)

    if steps != planned_steps:  # pragma: no cover - guards the accounting contract
        raise RuntimeError(f"took {steps} DP-SGD steps, planned {planned_steps}")
    return DPTrainResult(
        steps=steps,
        sampling_rate=sampling_rate,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        mean_loss=loss_sum / loss_records if loss_records else float("nan"),
    )


def _generators(seed: int | None, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """The Poisson sampling generator and the noise generator: seeded (``seed`` and
    ``seed + 1``) in a reproducible simulation, from OS entropy when ``seed`` is None."""
    sample_gen = torch.Generator()
    noise_gen = torch.Generator(device=device)
    if seed is not None:
        sample_gen.manual_seed(int(seed))
        noise_gen.manual_seed(int(seed) + 1)
    else:
        sample_gen.seed()
        noise_gen.seed()
    return sample_gen, noise_gen


def _make_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sampling_rate: float,
    lr: float,
    momentum: float,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_gen: torch.Generator,
    noise_gen: torch.Generator,
) -> tuple[GradSampleModule, DPOptimizer, DataLoader]:
    """Opacus' GradSampleModule, DP optimizer and Poisson loader for ``model`` on (x, y)."""
    # We build the Poisson loader ourselves so that q is exactly the public rate
    # (make_private's own conversion derives q from n and a batch size); hence
    # poisson_sampling=False below, which only means "leave my loader alone".
    loader = DPDataLoader(TensorDataset(x, y), sample_rate=sampling_rate, generator=sample_gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    with warnings.catch_warnings():
        # "Secure RNG turned off": intended, see dp_train's `seed` parameter.
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(secure_mode=False)
    gsm, dp_optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,
        noise_generator=noise_gen,
        grad_sample_mode="hooks",
    )
    gsm.forbid_grad_accumulation()
    # Average over the expected batch size q·n (a float; make_private rounds it down).
    dp_optimizer.expected_batch_size = sampling_rate * int(x.shape[0])
    return gsm, dp_optimizer, loader


def _check_arguments(
    x: torch.Tensor, y: torch.Tensor, *, noise_multiplier: float, max_grad_norm: float, lr: float, momentum: float
) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be finite and > 0, got {lr!r}")
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of records, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 1:
        raise ValueError("x must hold at least one record")


def _train_epochs(
    gsm: GradSampleModule,
    dp_optimizer: DPOptimizer,
    loader: DataLoader,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
    epochs: int,
) -> tuple[int, float, int]:
    steps, loss_sum, loss_records = 0, 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            dp_optimizer.zero_grad(set_to_none=True)
            n = int(xb.shape[0])
            if n > 0:
                loss = loss_fn(gsm(xb), yb)
                loss.backward()
                loss_sum += float(loss.detach()) * n
                loss_records += n
            else:
                # An empty Poisson batch still takes a (pure-noise) step: skipping
                # it would reveal that no record was sampled.
                gsm(xb).sum().backward()
            dp_optimizer.step()
            steps += 1
    return steps, loss_sum, loss_records


def noise_for_record_target(target_epsilon: float, delta: float, sampling_rate: float, steps: int) -> float:
    """Noise multiplier for DP-SGD to stay within ``target_epsilon`` at ``delta`` (PLD, add/remove)."""
    return noise_multiplier_for_epsilon(target_epsilon, delta, sampling_rate, steps)
