"""Random tree ensembles as TREE_ENSEMBLE parameters, for the op matrix and the tree
tests: every node test, uneven depths, and a one-leaf tree."""
from __future__ import annotations

import numpy as np


def random_ensemble(rng: np.random.Generator, n_features: int, n_trees: int = 3,
                    depth: int = 3, n_targets: int = 2) -> dict[str, np.ndarray]:
    """Parameters of a TREE_ENSEMBLE node: ``n_trees`` random trees (leaves stop early
    at random below the root), then one single-leaf tree; thresholds are float32
    values in [-2, 2] (so onnxruntime's float32 tests agree with the reference)."""
    feature, threshold, mode, paths = [], [], [], []

    def grow(level: int, path: tuple) -> None:
        if level == depth or (level > 0 and rng.random() < 0.25):
            paths.append(path)
            return
        index = len(feature)
        feature.append(int(rng.integers(n_features)))
        threshold.append(float(np.float32(rng.uniform(-2.0, 2.0))))
        mode.append(int(rng.integers(4)))
        grow(level + 1, path + (index + 1,))
        grow(level + 1, path + (-(index + 1),))

    for _ in range(n_trees):
        grow(0, ())
    paths.append(())
    width = max(len(p) for p in paths)
    table = np.zeros((len(paths), width))
    for i, p in enumerate(paths):
        table[i, :len(p)] = p
    weights = rng.normal(size=(len(paths), n_targets)).astype(np.float32)
    return {"feature": np.asarray(feature, np.float64),
            "threshold": np.asarray(threshold, np.float64),
            "mode": np.asarray(mode, np.float64), "paths": table,
            "weights": weights.astype(np.float64),
            "base": rng.normal(size=n_targets)}
