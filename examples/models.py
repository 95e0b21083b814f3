"""Small models trained in seconds on data that ships with scikit-learn.

Used by the demo, the benchmarks and the end-to-end tests. Deterministic: fixed seeds,
stratified split with random_state=0.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from torch import nn


def digits_split():
    """8x8 digits, pixel values / 16, stratified split with 360 test images."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
    return train_test_split(x, y, test_size=360, stratify=y, random_state=0)


def cancer_split():
    """Breast-cancer features standardised on the training split; 30% test.

    Test features are clipped to the training range (a standard preprocessing step):
    an encrypted model's polynomials are only valid on the range it was calibrated on.
    """
    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-9
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    xte = np.clip(xte, xtr.min(0), xtr.max(0))
    return xtr.astype(np.float32), xte.astype(np.float32), ytr, yte


class DigitsCNN(nn.Module):
    """conv 1->8 3x3 pad 1, ReLU, AvgPool 2, Linear 128->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1))


def digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def cancer_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 60,
          lr: float = 1e-2, seed: int = 0) -> nn.Module:
    """Full-batch-ish Adam training; a few seconds on 2 cores."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.tensor(x), torch.tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def trained_digits_cnn():
    xtr, xte, ytr, yte = digits_split()
    return train(DigitsCNN(), xtr, ytr, epochs=200), (xtr, xte, ytr, yte)


def trained_digits_mlp():
    xtr, xte, ytr, yte = digits_split()
    return train(digits_mlp(), xtr, ytr, epochs=60), (xtr, xte, ytr, yte)


def trained_cancer_mlp():
    xtr, xte, ytr, yte = cancer_split()
    return train(cancer_mlp(), xtr, ytr, epochs=60), (xtr, xte, ytr, yte)
