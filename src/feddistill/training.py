"""Losses, training loops and evaluation shared by clients, server and baselines.

Knowledge distillation follows Hinton, Vinyals & Dean (2015), "Distilling the
Knowledge in a Neural Network": the student matches the teacher's distribution
softened at temperature T, and the KL term is scaled by T^2 so that its gradient
magnitude does not shrink as T grows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def soften(teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Re-temper probability vectors: softmax(log p / T) (= softmax(logits / T))."""
    return torch.softmax(torch.log(teacher_probs.clamp_min(1e-8)) / temperature, dim=1)


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), mean over the batch (Hinton et al. 2015)."""
    target = soften(teacher_probs, temperature)
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    kl = (target * (torch.log(target.clamp_min(1e-8)) - log_student)).sum(dim=1)
    return kl.mean() * temperature**2


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def train_supervised(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    seed: int = 0,
) -> float:
    """Cross-entropy SGD; returns the mean loss of the last epoch (nan if nothing ran)."""
    return _train(model, x, lambda logits, idx: F.cross_entropy(logits, y[idx]), epochs, batch_size, lr, momentum, seed)


def train_distill(
    model: nn.Module,
    x: torch.Tensor,
    teacher_probs: torch.Tensor,
    *,
    temperature: float,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    seed: int = 0,
) -> float:
    """KD toward soft labels at temperature T; returns the mean loss of the last epoch."""

    def loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return kd_loss(logits, teacher_probs[idx], temperature)

    return _train(model, x, loss, epochs, batch_size, lr, momentum, seed)


def train_revisit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    public_x: torch.Tensor,
    public_probs: torch.Tensor,
    *,
    kd_weight: float,
    temperature: float,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    seed: int = 0,
) -> float:
    """Cross-entropy on private data, plus kd_weight x KD toward the teacher signal on a
    public batch drawn alongside every private batch.

    The KD term keeps the student's knowledge of the classes its (non-IID) private
    data lacks, so its answers refine the consensus instead of replacing it with
    the few classes it holds (the forgetting that plain revisit suffers).
    """
    if kd_weight == 0 or len(public_x) == 0:
        return train_supervised(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)

    def loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        pub = torch.randint(len(public_x), (len(idx),), generator=gen)
        return F.cross_entropy(logits, y[idx]) + kd_weight * kd_loss(
            model(public_x[pub]), public_probs[pub], temperature
        )

    return _train(model, x, loss, epochs, batch_size, lr, momentum, seed)


def _train(model, x, loss_fn, epochs, batch_size, lr, momentum, seed) -> float:
    if len(x) == 0 or epochs == 0:
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    last = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in _batches(len(x), batch_size, gen):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), idx)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / count
    return last


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def predict_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(predict_logits(model, x), dim=1)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    nll: float
    ece: float

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}nll": self.nll, f"{prefix}ece": self.ece}


def evaluate_probs(probs: np.ndarray, labels: np.ndarray) -> Evaluation:
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return Evaluation(
        accuracy=float((probs.argmax(axis=1) == labels).mean()),
        nll=float(-np.log(p_true).mean()),
        ece=expected_calibration_error(probs, labels),
    )


def evaluate_model(model: nn.Module, x: torch.Tensor, y: np.ndarray) -> Evaluation:
    return evaluate_probs(predict_probs(model, x).numpy(), y)
