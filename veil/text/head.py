"""The shipped text classifier: all-MiniLM-L6-v2 plus a logistic head for Reuters grain.

``data/reuters_head.npz`` holds a linear head ``weight`` (2, 384) float32, ``bias`` (2,)
float32 and ``meta``, a JSON string (task, document counts, test accuracy, seq_len, the
regularisation chosen). It was made by ``scripts/train_reuters_head.py``: L2 logistic
regression (scikit-learn, lbfgs, C chosen by stratified 5-fold cross-validation on the
training split only) on the raw mean-pooled MiniLM embeddings of the 1,554 training
stories at seq_len 128, the feature standardisation folded into the weights, the binary
model written as two logits ``(-z/2, +z/2)`` so that the head is ``nn.Linear(384, 2)``
(softmax of the two logits = the sigmoid of ``z``). The task is
:data:`veil.text.datasets.TASK`; see :mod:`veil.text.datasets`.

:func:`load_classifier` builds the :class:`~veil.text.minilm.TextClassifier` (needs torch
and transformers); :func:`load_head` reads the npz alone (numpy only).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import BundleError, InputError

HEAD_PATH = Path(__file__).resolve().parent / "data" / "reuters_head.npz"
DEFAULT_SEQ_LEN = 128


def load_head(path: str | Path = HEAD_PATH) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(weight (n_classes, 384), bias (n_classes,), meta)`` of a saved head.

    Raises:
        BundleError: the file is missing or not a head written by :func:`save_head`.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"no text head at {path} (run scripts/train_reuters_head.py)")
    try:
        with np.load(path, allow_pickle=False) as data:
            weight = np.asarray(data["weight"], dtype=np.float32)
            bias = np.asarray(data["bias"], dtype=np.float32)
            meta = json.loads(str(data["meta"][()]))
    except (KeyError, ValueError, OSError) as exc:
        raise BundleError(f"{path} is not a veil text head: {exc}") from None
    if weight.ndim != 2 or bias.shape != (weight.shape[0],) or weight.shape[0] < 2:
        raise BundleError(f"{path}: head shapes {weight.shape} / {bias.shape} are not "
                          f"(n_classes, dim) / (n_classes,)")
    return weight, bias, meta


def save_head(path: str | Path, weight: np.ndarray, bias: np.ndarray, meta: dict) -> Path:
    """Write a head as :func:`load_head` reads it (float32 arrays, JSON metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, weight=np.asarray(weight, dtype=np.float32),
                        bias=np.asarray(bias, dtype=np.float32),
                        meta=np.asarray(json.dumps(meta, sort_keys=True)))
    return path


def load_classifier(seq_len: int = DEFAULT_SEQ_LEN, path: str | Path = HEAD_PATH):
    """all-MiniLM-L6-v2 with the shipped Reuters grain head, as a
    :class:`~veil.text.minilm.TextClassifier` (eval mode, float32): ``(B, 2, seq_len)``
    ids and mask to ``(B, 2)`` logits, class 1 = grain.

    Raises:
        TextDependencyError: torch, transformers or the model package is missing.
        BundleError: the head file is missing or malformed.
    """
    import torch

    from .minilm import TextClassifier, load_minilm

    weight, bias, _ = load_head(path)
    encoder = load_minilm(seq_len)
    if weight.shape[1] != encoder.dim:
        raise BundleError(f"the head expects {weight.shape[1]} features, the encoder gives "
                          f"{encoder.dim}")
    model = TextClassifier(encoder, n_classes=weight.shape[0])
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(weight))
        model.head.bias.copy_(torch.from_numpy(bias))
    return model.eval()


def embed(encoder, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run ``encoder`` (a :class:`~veil.text.minilm.SentenceEncoder`) over the tokenized
    array ``x`` ``(N, 2, T)`` in batches, without gradients: float32 ``(N, dim)``."""
    import torch

    x = np.asarray(x)
    if x.ndim != 3 or x.shape[1] != 2:
        raise InputError(f"expected tokenized input (N, 2, T), got shape {x.shape}")
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(encoder(torch.as_tensor(x[i:i + batch_size], dtype=torch.float32))
                       .numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)


def fit_logistic(features: np.ndarray, labels: np.ndarray, *,
                 cs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
                 folds: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """L2 logistic regression on standardised ``features``, ``C`` picked from ``cs`` by
    stratified ``folds``-fold cross-validated accuracy (ties: the smaller C), then refit
    on all of them. Deterministic (lbfgs, fixed fold shuffle).

    Returns ``(weight (2, dim), bias (2,), info)``: the standardisation folded in, the
    binary logit ``z`` split as ``(-z/2, +z/2)``; ``info`` holds the C and the CV scores.
    Needs scikit-learn (a dev dependency).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if set(np.unique(labels)) != {0, 1}:
        raise InputError(f"fit_logistic is binary: labels must be 0 and 1, got "
                         f"{np.unique(labels)}")

    def pipeline(c):
        return make_pipeline(StandardScaler(),
                             LogisticRegression(C=c, penalty="l2", solver="lbfgs",
                                                max_iter=5000, tol=1e-8))

    # features that (nearly) never vary: standardising them divides rounding noise by a
    # tiny deviation, and folding that back gives weights of 1e30 (MiniLM's mean-pooled
    # embeddings have such a dimension), which no fixed point holds; they are left out
    std = features.std(axis=0)
    keep = std > 1e-6 * float(np.median(std))
    kept = features[:, keep]
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = {c: float(cross_val_score(pipeline(c), kept, labels, cv=cv,
                                       scoring="accuracy").mean()) for c in cs}
    best = max(cs, key=lambda c: (scores[c], -c))
    model = pipeline(best).fit(kept, labels)
    scaler, logistic = model[0], model[1]
    w = np.zeros(features.shape[1])
    w[keep] = logistic.coef_[0] / scaler.scale_
    b = float(logistic.intercept_[0] - np.dot(w[keep], scaler.mean_))
    weight = np.stack([-w / 2, w / 2])
    bias = np.array([-b / 2, b / 2])
    return weight, bias, {"C": best, "cv_accuracy": {str(c): round(s, 4)
                                                     for c, s in scores.items()},
                          "features_left_out": int((~keep).sum())}
