"""Semi-supervised training on the public reference set: FixMatch.

FixMatch (Sohn et al. 2020, "FixMatch: Simplifying Semi-Supervised Learning with
Consistency and Confidence", NeurIPS): for every unlabelled image the model's prediction
on a weakly augmented view becomes a hard pseudo-label when its confidence is at least
``threshold``, and the model is trained to predict that label on a strongly augmented
view of the same image (RandAugment + Cutout). Labelled images are trained with
cross-entropy on weak views. Only public images are used here, so this costs no privacy.

Targets of the labelled part are probability vectors: one-hot for true labels, or the
soft labels a teacher signal gives. Augmentations come from kornia (a maintained library
that runs on the installed torch; torchvision's wheels do not match the pinned torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FixMatchStats", "strong_view", "train_fixmatch", "weak_view"]


@dataclass(frozen=True)
class FixMatchStats:
    steps: int
    supervised_loss: float  # mean over the last 10 % of steps
    unsupervised_loss: float
    mask_rate: float  # share of unlabelled images whose pseudo-label cleared the threshold


class _WeakView(nn.Module):
    """Random translation by up to ``shift`` pixels (reflect padding, then a random crop)
    and, when ``flip``, a random horizontal flip: FixMatch's weak augmentation."""

    def __init__(self, size: tuple[int, int], flip: bool, shift: int = 2) -> None:
        super().__init__()
        from kornia.augmentation import RandomCrop, RandomHorizontalFlip

        self.crop = RandomCrop(size, padding=shift, padding_mode="reflect")
        self.flip = RandomHorizontalFlip(p=0.5) if flip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flip(self.crop(x))


_WEAK: dict[tuple[int, int, bool], _WeakView] = {}


def weak_view(x: torch.Tensor, *, flip: bool) -> torch.Tensor:
    """FixMatch's weak augmentation (shift by up to 2 pixels, optional horizontal flip)."""
    key = (int(x.shape[-2]), int(x.shape[-1]), flip)
    if key not in _WEAK:
        _WEAK[key] = _WeakView(key[:2], flip)
    return _WEAK[key](x)


class _StrongView(nn.Module):
    """RandAugment (2 ops, magnitude drawn per batch) followed by Cutout (random erasing of
    one square up to half the side), on single-channel images."""

    def __init__(self) -> None:
        super().__init__()
        from kornia.augmentation import RandomErasing
        from kornia.augmentation.auto import RandAugment

        self.rand_augment = RandAugment(n=2, m=10)
        self.cutout = RandomErasing(p=1.0, scale=(0.02, 0.25), ratio=(1.0, 1.0), value=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = self.rand_augment(x.expand(-1, 3, -1, -1).contiguous())
        return self.cutout(rgb.mean(1, keepdim=True)).clamp(0.0, 1.0)


_STRONG: _StrongView | None = None


def strong_view(x: torch.Tensor) -> torch.Tensor:
    """FixMatch's strong augmentation (RandAugment + Cutout)."""
    global _STRONG
    if _STRONG is None:
        _STRONG = _StrongView()
    return _STRONG(x)


def train_fixmatch(
    model: nn.Module,
    labelled_x: torch.Tensor,
    labelled_targets: torch.Tensor,
    unlabelled_x: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    mu: int = 3,
    threshold: float = 0.95,
    unlabelled_weight: float = 1.0,
    lr: float = 0.03,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    flip: bool = True,
    seed: int = 0,
) -> FixMatchStats:
    """Train ``model`` in place with FixMatch for ``steps`` SGD steps (cosine learning rate).

    Parameters
    ----------
    labelled_x, labelled_targets:
        Images ``(L, 1, H, W)`` and probability targets ``(L, C)`` (one-hot or soft).
    unlabelled_x:
        Images ``(U, 1, H, W)`` without labels.
    batch_size, mu:
        ``batch_size`` labelled and ``mu * batch_size`` unlabelled images per step.
    threshold, unlabelled_weight:
        FixMatch's confidence threshold τ and weight λ_u of the consistency loss.
    flip:
        Horizontal flips in the weak view (right for garments, wrong for digits).
    """
    if len(labelled_x) == 0 or steps <= 0:
        raise ValueError("train_fixmatch needs labelled examples and steps > 0")
    torch.manual_seed(seed)  # kornia draws its augmentation parameters from torch's global generator
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    # FixMatch's schedule: lr · cos(7πk / 16K)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: math.cos(7 * math.pi * k / (16 * steps)))
    model.train()
    tail = max(1, steps // 10)
    sup_sum = unsup_sum = mask_sum = 0.0
    for step in range(steps):
        li = torch.randint(len(labelled_x), (batch_size,))
        xl = weak_view(labelled_x[li], flip=flip)
        sup = -(labelled_targets[li] * F.log_softmax(model(xl), dim=1)).sum(1).mean()
        loss, unsup, mask_rate = sup, torch.zeros(()), 0.0
        if len(unlabelled_x):
            ui = torch.randint(len(unlabelled_x), (mu * batch_size,))
            xu = unlabelled_x[ui]
            with torch.no_grad():
                probs = torch.softmax(model(weak_view(xu, flip=flip)), dim=1)
            confidence, pseudo = probs.max(1)
            mask = (confidence >= threshold).float()
            unsup = (F.cross_entropy(model(strong_view(xu)), pseudo, reduction="none") * mask).mean()
            loss = sup + unlabelled_weight * unsup
            mask_rate = float(mask.mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - tail:
            sup_sum += float(sup.detach())
            unsup_sum += float(unsup.detach())
            mask_sum += mask_rate
    return FixMatchStats(
        steps=steps, supervised_loss=sup_sum / tail, unsupervised_loss=unsup_sum / tail, mask_rate=mask_sum / tail
    )
