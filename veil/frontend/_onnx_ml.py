"""ONNX-ML operators (domain ``ai.onnx.ml``) as scikit-learn's converters emit them.

skl2onnx writes a classifier as its scores plus a label output, for example
``Scaler -> LinearClassifier -> (label, probabilities) -> Normalizer -> ZipMap``, or
``MatMul -> Add -> Sigmoid -> Concat(1 - p, p) -> ArgMax -> ArrayFeatureExtractor(classes)``.
Scores become IR values (the post-transform a softmax or sigmoid that the output head
moves to the client, :mod:`veil.ir.head`); a label becomes a :class:`Label`: the IR
value it is the argmax of and the class labels, which the client applies.

The handlers take the ONNX converter (``onnx_frontend._Converter``) so they share its
tensors, constants and graph builder; nothing here is imported unless a model has one
of these operators.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UnsupportedOperation
from ..ir import Op
from . import _layers as layers
from ._builder import Site, per_channel

ML_DOMAIN = "ai.onnx.ml"
# post_transform -> the IR op applied to the raw scores (the head moves it to the client)
_POST = {"NONE": None, "LOGISTIC": Op.SIGMOID, "SOFTMAX": Op.SOFTMAX}


@dataclass(frozen=True)
class Label:
    """A classifier's label output: ``classes[argmax(scores)]`` (``scores`` an IR value;
    ``classes`` None: the class index)."""

    scores: str
    classes: tuple | None = None

    def relabel(self, table: np.ndarray) -> "Label":
        """``table[label]`` (an ArrayFeatureExtractor over the class constants)."""
        table = np.asarray(table).ravel()
        values = table if self.classes is None else table[np.asarray(self.classes)]
        return Label(self.scores, _labels(values))


def _labels(values) -> tuple:
    out = []
    for v in np.asarray(values).ravel().tolist():
        out.append(v.decode() if isinstance(v, bytes) else v)
    return tuple(out)


def classlabels(attrs: dict) -> tuple | None:
    for key in ("classlabels_ints", "classlabels_int64s", "classlabels_strings"):
        if attrs.get(key):
            return _labels(attrs[key])
    return None


def post_transform(conv, site: Site, x: str, attrs: dict) -> str:
    name = attrs.get("post_transform", "NONE")
    if name not in _POST:
        raise site.error(f"post_transform {name!r} is not supported (NONE, LOGISTIC, "
                         "SOFTMAX are)")
    op = _POST[name]
    return x if op is None else conv.b.add(site.node + "/post", op, [x])


def _vector_input(conv, site: Site, name: str) -> str:
    x = conv._tensor(site, name)
    if len(conv.b.shape(x)) != 1:
        raise site.error(f"expects one feature vector per sample, got {conv.b.shape(x)}")
    return x


def linear_classifier(conv, site: Site, node: Any, attrs: dict) -> dict:
    """Scores ``x W^T + b`` (post-transformed) and the label output."""
    x = _vector_input(conv, site, node.input[0])
    labels = classlabels(attrs)
    intercepts = np.asarray(attrs.get("intercepts", []), dtype=np.float64)
    features = conv.b.shape(x)[0]
    coef = np.asarray(attrs["coefficients"], dtype=np.float64)
    if coef.size % features:
        raise site.error(f"{coef.size} coefficients for {features} features")
    weight = coef.reshape(-1, features)
    n_labels = len(labels) if labels is not None else weight.shape[0]
    if weight.shape[0] != n_labels:
        # ONNX's binary form (one row for two labels) is not what skl2onnx writes
        raise site.error(f"{weight.shape[0]} coefficient rows for {n_labels} class labels; "
                         "only one row per class is supported")
    bias = intercepts if intercepts.size else np.zeros(weight.shape[0])
    raw = layers.linear(conv.b, site, x, weight, bias)
    scores = post_transform(conv, site, raw, attrs)
    return {node.output[0]: Label(scores, labels), node.output[1]: scores}


def linear_regressor(conv, site: Site, node: Any, attrs: dict) -> str:
    x = _vector_input(conv, site, node.input[0])
    if attrs.get("post_transform", "NONE") != "NONE":
        raise site.error(f"post_transform {attrs['post_transform']!r} is not supported")
    features = conv.b.shape(x)[0]
    coef = np.asarray(attrs["coefficients"], dtype=np.float64)
    targets = int(attrs.get("targets", 1))
    if coef.size != targets * features:
        raise site.error(f"{coef.size} coefficients for {targets} targets x {features} "
                         "features")
    intercepts = np.asarray(attrs.get("intercepts", [0.0] * targets), dtype=np.float64)
    return layers.linear(conv.b, site, x, coef.reshape(targets, features), intercepts)


def scaler(conv, site: Site, node: Any, attrs: dict) -> str:
    """``(x - offset) * scale`` per feature (one value broadcasts to all)."""
    x = conv._tensor(site, node.input[0])
    shape = conv.b.shape(x)
    scale = np.asarray(attrs.get("scale", [1.0]), dtype=np.float64)
    offset = np.asarray(attrs.get("offset", [0.0]), dtype=np.float64)
    try:
        pc_scale = per_channel(scale, shape)
        pc_shift = per_channel(-offset * scale, shape)
    except ValueError as exc:
        raise site.error(f"scale/offset of {scale.size}/{offset.size} values for input "
                         f"{shape}") from exc
    return conv.b.affine(site.node, x, pc_scale, pc_shift)


def normalizer(conv, site: Site, node: Any, attrs: dict) -> str:
    x = conv._tensor(site, node.input[0])
    norm = str(attrs.get("norm", "MAX")).lower()
    return conv.b.add(site.node, Op.NORMALIZE, [x], {"norm": norm})


def zipmap(conv, site: Site, node: Any, attrs: dict) -> str:
    """A list of {label: probability} per row: the client builds it from the scores;
    the model's output is the scores, labelled by the head."""
    x = conv._tensor(site, node.input[0])
    conv.classes[x] = classlabels(attrs)
    return x


def argmax(conv, site: Site, node: Any, attrs: dict) -> Label:
    x = conv._tensor(site, node.input[0])
    rank = len(conv.b.shape(x))
    if int(attrs.get("axis", 0)) % (rank + 1) != rank or attrs.get("select_last_index", 0):
        raise site.error("only an argmax over the last axis (first index on ties) of a "
                         "model's scores is supported")
    return Label(x)


def array_feature_extractor(conv, site: Site, node: Any, attrs: dict) -> Any:
    """``X[..., Y]``: class constants indexed by a label (a relabelling), or columns of a
    score vector (a GATHER)."""
    data, index = node.input[0], node.input[1]
    if index in conv.labels:
        return conv.labels[index].relabel(conv._const(site, data, "the classes"))
    x = _vector_input(conv, site, data)
    cols = conv._const(site, index, "the column indices").astype(np.int64).ravel()
    width = conv.b.shape(x)[0]
    if np.any(cols < 0) or np.any(cols >= width):
        raise site.error(f"column indices {cols.tolist()} outside {width} scores")
    return conv.b.add(site.node, Op.GATHER, [x], {"indices": tuple(int(c) for c in cols)})


def tree_ensemble(conv, site: Site, node: Any, attrs: dict) -> Any:
    """A TREE_ENSEMBLE node (``_trees.py``; its tests decide as on float32 inputs), then
    onnxruntime's post transform as IR ops that the output head moves to the client
    (``_trees.tree_head``, the same ops tests/test_trees.py checks against
    onnxruntime)."""
    from ._trees import float32_tests, parse_tree_ensemble, tree_head

    x = conv._tensor(site, node.input[0])
    shape = conv.b.shape(x)
    if len(shape) != 1:
        x = conv.b.add(site.node + "/flat", Op.RESHAPE, [x], {"shape": (int(np.prod(shape)),)})
    parsed = parse_tree_ensemble(node, f"{node.op_type} (ONNX op) at node {site.node!r}")
    # the splits as the float32 runtime decides them (scikit-learn casts X to float32)
    raw = conv.b.add(site.node, Op.TREE_ENSEMBLE, [x], dict(parsed.attrs),
                     float32_tests(parsed.params))
    if not parsed.is_classifier:
        return raw
    try:
        scores = tree_head(conv.b, site.node + "/post", raw, parsed)
    except UnsupportedOperation as exc:
        raise site.error(str(exc)) from None
    return {node.output[0]: Label(scores, parsed.labels), node.output[1]: scores}


HANDLERS = {
    "LinearClassifier": linear_classifier, "LinearRegressor": linear_regressor,
    "Scaler": scaler, "Normalizer": normalizer, "ZipMap": zipmap,
    "ArrayFeatureExtractor": array_feature_extractor,
    "TreeEnsembleClassifier": tree_ensemble, "TreeEnsembleRegressor": tree_ensemble,
    "TreeEnsemble": tree_ensemble,
}
