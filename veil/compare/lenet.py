"""LeNet-5 (LeCun et al., 1998) with average pooling, as the Fashion-MNIST workload of
``veil compare`` and the examples train it. Imports torch: load it lazily."""
from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """Conv 1->6 5x5 pad 2, act, avgpool 2, conv 6->16 5x5, act, avgpool 2,
    Linear 400->120, act, Linear 120->84, act, Linear 84->10."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AvgPool2d(2))
        self.classifier = nn.Sequential(
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
