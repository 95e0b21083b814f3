"""ResNet-20 for 32x32 images (He et al. 2016, "Deep Residual Learning for Image
Recognition", Sec. 4.2): a 3x3 convolution with 16 channels, then three stages of
three basic blocks with 16, 32 and 64 channels (the first block of stages 2 and 3
has stride 2), global average pooling and a 10-way linear layer; 6n + 2 = 20 layers
with n = 3.

Where the shape changes, the shortcut is a 1x1 convolution with stride 2 plus batch
norm (the paper's option B) rather than option A's zero-padded identity: option A
slices and pads channels, which veil's IR has no op for, and B costs 2,560 extra
weights (0.27M parameters in all). Imports torch: load it lazily.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:  # option B: projection shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


class ResNet20(nn.Module):
    """ResNet-20 on (3, 32, 32) inputs; ``num_classes`` logits."""

    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He initialization, as in the paper
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
