"""ResNet-20 on Fashion-MNIST at CIFAR size, and its shipped fine-tuned weights.

The network is :class:`veil.compare.resnet20.ResNet20` (He et al. 2016, option-B
shortcuts), which takes (3, 32, 32) inputs. There is no CIFAR-10 offline, so the data
is Fashion-MNIST made CIFAR-shaped by :func:`fashion32`: each 28x28 image padded with
2 zero pixels per side and repeated over 3 channels. ``train_resnet20.py`` trains it
with ReLU and fine-tunes it with ``veil.finetune(degree=DEGREE)``; the fine-tuned
weights (PolyAct coefficients and domains included) ship as
``weights/resnet20_fashion.npz`` and the ReLU original as
``weights/resnet20_fashion_relu.npz``: plain float32 arrays, loaded with
``allow_pickle=False``, never a pickle.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from veil.compare.resnet20 import ResNet20  # one definition, shared with veil compare

from veil.finetune import replace_activations

import datasets
from mnist_models import load_npz, weights_path

__all__ = ["DEGREE", "NAME", "ResNet20", "fashion32", "load_resnet20", "load_resnet20_relu",
           "polynomial", "to32"]

NAME = "resnet20_fashion"
DEGREE = 2     # the degree the shipped weights were fine-tuned with
PAD = 2        # 28 + 2 * 2 = 32


def to32(x: np.ndarray) -> np.ndarray:
    """(N, 1, 28, 28) images -> (N, 3, 32, 32): zero-pad 2 pixels per side, 3 channels."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
        raise ValueError(f"expected images of shape (N, 1, 28, 28), got {x.shape}")
    padded = np.pad(x, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)))
    return np.repeat(padded, 3, axis=1)


def fashion32():
    """Fashion-MNIST as (N, 3, 32, 32) float32 in [0, 1]: ``(x_train, y_train, x_test,
    y_test)`` with 60,000 and 10,000 images (see :func:`datasets.fashion_mnist`)."""
    xtr, ytr, xte, yte = datasets.fashion_mnist()
    return to32(xtr), ytr, to32(xte), yte


def polynomial(model: nn.Module, degree: int = DEGREE) -> nn.Module:
    """The fine-tuned structure of ``model``: its activations as PolyAct of ``degree``.

    ResNet-20's blocks apply one ReLU module twice, so each block has one PolyAct
    (shared, as :func:`veil.finetune.replace_activations` keeps shared modules shared).
    """
    return replace_activations(model, degree=degree)


def load_resnet20() -> nn.Module:
    """The shipped fine-tuned ResNet-20 for Fashion-MNIST (degree-``DEGREE`` PolyAct)."""
    return load_npz(polynomial(ResNet20()), weights_path(NAME))


def load_resnet20_relu() -> nn.Module:
    """The ReLU ResNet-20 the shipped model was fine-tuned from (the accuracy reference)."""
    return load_npz(ResNet20(), weights_path(f"{NAME}_relu"))
