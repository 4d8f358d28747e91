"""Students and teachers, chosen by name.

Every model maps images (N, 1, H, W) to logits (N, num_classes) and works for
any square input size (8x8 digits, 28x28 Fashion-MNIST). No BatchNorm anywhere
(GroupNorm instead), so every model can be trained with Opacus' per-sample
gradients (DP-SGD) without changes.
"""

from __future__ import annotations

import torch
from torch import nn

from feddistill.model_names import MODEL_NAMES


def _conv_block(c_in: int, c_out: int, groups: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU()]


class MLP(nn.Module):
    """Two hidden layers; the smallest student."""

    def __init__(self, image_size: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(image_size * image_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Small CNN student: two conv blocks with pooling, then a linear head.

    With width=32 on 28x28 inputs this is the ~114k-parameter CNN class of our
    FedAvg reference numbers.
    """

    def __init__(self, image_size: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        pool = 2 if image_size >= 16 else 1  # 8x8 digits are too small to pool twice
        self.features = nn.Sequential(
            *_conv_block(1, width // 2, 4),
            nn.MaxPool2d(pool),
            *_conv_block(width // 2, width, 8),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LargeCNN(nn.Module):
    """The public teacher: wider and deeper than any student."""

    def __init__(self, image_size: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        pool = 2 if image_size >= 16 else 1
        self.features = nn.Sequential(
            *_conv_block(1, width // 2, 8),
            *_conv_block(width // 2, width // 2, 8),
            nn.MaxPool2d(pool),
            *_conv_block(width // 2, width, 8),
            *_conv_block(width, width, 8),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(width * 16, 256), nn.ReLU(), nn.Linear(256, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(name: str, image_size: int, num_classes: int, seed: int | None = None) -> nn.Module:
    """Build a model by name; `seed` makes its initial weights reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    if name == "mlp":
        return MLP(image_size, num_classes)
    if name == "cnn":
        return CNN(image_size, num_classes)
    if name == "cnn-large":
        return LargeCNN(image_size, num_classes)
    raise ValueError(f"unknown model {name!r} (known: {', '.join(MODEL_NAMES)})")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
