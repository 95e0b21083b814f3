"""Synthetic ECG-like beats and a small 1-D CNN that classifies them: a signal workload
for every mode.

The beats are not clinical data. Each is a sum of Gaussian bumps standing for the P
wave, the Q, R and S deflections and the T wave (the usual textbook synthesis of a
heartbeat), sampled at :data:`LENGTH` points, with per-beat jitter of timing, width
and amplitude, a slow baseline wander and white noise, all drawn from a seeded numpy
generator, so ``beats(n, seed)`` is the same everywhere. The five classes change the
shape the way common beat types do (:data:`CLASSES`): a normal beat, an early beat
with a small P wave, a wide QRS without P wave and with an inverted T, an elevated ST
segment, and an inverted T wave.

The network (:func:`ecg_cnn`) uses the 1-D layers and the leaky rectifiers: Conv1d,
BatchNorm1d, LeakyReLU, MaxPool1d, Conv1d, BatchNorm1d, PReLU (a slope per channel),
AvgPool1d, Linear, BatchNorm1d over features, ELU and Linear; 1,325 parameters. Its
trained weights ship in ``data/ecg_cnn.npz`` (read with ``allow_pickle=False``);
``python -m veil.compare.ecg`` trains it again (fixed seeds, under 30 s on one core)
and rewrites them. torch is imported only by the functions that build the network.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
WEIGHTS = DATA / "ecg_cnn.npz"
LENGTH = 64
CLASSES = ("normal", "early", "wide-qrs", "raised-st", "inverted-t")
TRAIN_SEED, TEST_SEED = 0, 1

# (centre, width, amplitude) of each wave on [0, 1) for a normal beat
_WAVES = {"p": (0.20, 0.030, 0.15), "q": (0.37, 0.010, -0.12), "r": (0.40, 0.012, 1.0),
          "s": (0.43, 0.012, -0.25), "t": (0.66, 0.050, 0.30)}


def _waves(label: int) -> dict[str, tuple[float, float, float]]:
    """The class's wave shapes (before jitter)."""
    w = dict(_WAVES)
    if label == 1:                      # early beat: everything earlier, small P
        w = {k: (c - 0.08, s, a) for k, (c, s, a) in w.items()}
        w["p"] = (0.14, 0.02, 0.05)
    elif label == 2:                    # wide QRS, no P wave, T opposite to the QRS
        w["p"] = (0.20, 0.03, 0.0)
        w["q"], w["s"] = (0.35, 0.03, -0.2), (0.47, 0.035, -0.35)
        w["r"] = (0.41, 0.035, 1.1)
        w["t"] = (0.70, 0.06, -0.35)
    elif label == 3:                    # elevated ST segment
        w["st"] = (0.53, 0.05, 0.25)
    elif label == 4:                    # inverted T wave
        w["t"] = (0.66, 0.05, -0.30)
    return w


def beats(n: int, seed: int = TRAIN_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``n`` beats (n, 1, LENGTH) float64 and their labels (n,) int64, balanced over the
    classes; the same for the same ``n`` and ``seed``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    t = np.arange(LENGTH) / LENGTH
    x = np.empty((n, 1, LENGTH))
    for i, label in enumerate(labels):
        shift = rng.normal(0.0, 0.015)
        sig = np.zeros(LENGTH)
        for centre, width, amp in _waves(int(label)).values():
            c = centre + shift + rng.normal(0.0, 0.005)
            s = width * rng.uniform(0.85, 1.15)
            sig += amp * rng.uniform(0.8, 1.2) * np.exp(-0.5 * ((t - c) / s) ** 2)
        wander = rng.uniform(0.0, 0.08) * np.sin(2 * np.pi * (rng.uniform(0.2, 0.8) * t
                                                              + rng.uniform()))
        x[i, 0] = sig * rng.uniform(0.8, 1.25) + wander + rng.normal(0.0, 0.03, LENGTH)
    return x, labels.astype(np.int64)


def ecg_cnn() -> Any:
    """The untrained network (eval mode), input (1, LENGTH), one logit per class."""
    from torch import nn

    n = LENGTH // 4
    return nn.Sequential(
        nn.Conv1d(1, 4, 7, padding=3), nn.BatchNorm1d(4), nn.LeakyReLU(0.1),
        nn.MaxPool1d(2),
        nn.Conv1d(4, 8, 5, padding=2), nn.BatchNorm1d(8), nn.PReLU(8), nn.AvgPool1d(2),
        nn.Flatten(), nn.Linear(8 * n, 8), nn.BatchNorm1d(8), nn.ELU(),
        nn.Linear(8, len(CLASSES))).eval()


def trained_ecg_cnn(path: Path = WEIGHTS) -> Any:
    """:func:`ecg_cnn` with the shipped weights (eval mode)."""
    import torch

    model = ecg_cnn()
    with np.load(path, allow_pickle=False) as z:
        state = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    model.load_state_dict(state, strict=True)
    return model.eval()


def train(n: int = 2000, epochs: int = 12, seed: int = 0) -> Any:
    """Train :func:`ecg_cnn` on ``beats(n, TRAIN_SEED)`` (Adam, cross-entropy, fixed
    seeds, one thread); returns it in eval mode."""
    import torch

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = ecg_cnn().train()
        x, y = beats(n, TRAIN_SEED)
        xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        order = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=order).split(64):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(logits).argmax(axis=1) == labels))


def main() -> None:
    """Train the network and rewrite ``data/ecg_cnn.npz``."""
    import torch

    model = train()
    x, y = beats(500, TEST_SEED)
    with torch.no_grad():
        acc = accuracy(model(torch.tensor(x, dtype=torch.float32)).numpy(), y)
    np.savez_compressed(WEIGHTS, **{k: v.detach().numpy() for k, v in
                                    model.state_dict().items()})
    print(f"wrote {WEIGHTS} (test accuracy {acc:.3f} on 500 beats of seed {TEST_SEED})")


if __name__ == "__main__":
    main()
