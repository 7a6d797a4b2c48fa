"""The book's models, and how big they are in parameters and in bytes."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "MLP", "count_parameters", "model_bytes"]


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks and a two-layer classifier head, for 1x28x28 images.

    ``conv(1->c1) -> ReLU -> maxpool -> conv(c1->c2) -> ReLU -> maxpool -> fc(hidden) -> fc(classes)``.
    The head's input size is *computed* from a dummy forward pass, never typed by hand, so it
    cannot disagree with the feature map (a classic bug: see Chapter 1's pitfalls).
    """

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = (8, 16), hidden: int = 64,
                 input_shape: tuple[int, int, int] = (1, 28, 28)) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.classifier = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A fully connected network: flatten -> [Linear -> ReLU] * len(hidden) -> Linear."""

    def __init__(self, num_classes: int = 10, hidden: tuple[int, ...] = (200,), in_features: int = 784) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_bytes(model: nn.Module, bits_per_parameter: float = 32) -> int:
    """Bytes of the raw parameter values at ``bits_per_parameter`` bits each (no header).

    This is the theoretical size; the book's codecs give the *measured* size of a payload.
    """
    return int(-(-count_parameters(model) * bits_per_parameter // 8))
