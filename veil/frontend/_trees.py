"""ONNX tree ensembles -> one TREE_ENSEMBLE node, and the client's post transform.

scikit-learn's random forests and gradient boosting (and XGBoost / LightGBM through
onnxmltools) export as ``TreeEnsembleClassifier`` / ``TreeEnsembleRegressor`` (domain
``ai.onnx.ml``, opsets 1 and 3) or, from ai.onnx.ml opset 5, the unified
``TreeEnsemble``. :func:`parse_tree_ensemble` turns one such node into the arrays of a
TREE_ENSEMBLE node (``veil.ir.kernels.tree_ensemble``: every leaf with its whole path,
so each backend evaluates the ensemble without walking a tree) and records what the
IR op leaves out: the post transform, the class labels and ONNX's *binary case*.
:func:`finish_scores` applies that post transform to the raw scores exactly as
onnxruntime does (checked against it in ``tests/test_trees.py``), so it can run on the
client after a private evaluation.

Supported: node tests BRANCH_LEQ, BRANCH_LT, BRANCH_GTE, BRANCH_GT; aggregation SUM
and AVERAGE (folded into the leaf weights); post transforms NONE, LOGISTIC, SOFTMAX and
SOFTMAX_ZERO. Refused with :class:`UnsupportedOperation`: BRANCH_EQ / BRANCH_NEQ /
set membership, MIN / MAX aggregation, PROBIT (onnxruntime's approximate inverse
error function), a binary classifier whose single weighted class is class 1 or that
has two base values (onnxruntime's outputs are then not a function of both).
Missing-value tracking is accepted and never applies: veil's inputs are checked to be
finite before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..errors import GraphError, UnsupportedOperation

_MODES = {"BRANCH_LEQ": 0, "BRANCH_LT": 1, "BRANCH_GTE": 2, "BRANCH_GT": 3}
# ai.onnx.ml opset 5's TreeEnsemble enumerations
_V5_MODES = {0: 0, 1: 1, 2: 2, 3: 3}               # LEQ, LT, GTE, GT (4+: EQ, NEQ, MEMBER)
_V5_TRANSFORMS = ("NONE", "SOFTMAX", "LOGISTIC", "SOFTMAX_ZERO", "PROBIT")
_V5_AGGREGATES = ("AVERAGE", "SUM", "MIN", "MAX")
TRANSFORMS = ("NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO")
TREE_OPS = ("TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble")


@dataclass(frozen=True)
class ParsedTrees:
    """One ONNX tree ensemble as a TREE_ENSEMBLE node and what its outputs need after it.

    ``params`` (and ``attrs``) are the TREE_ENSEMBLE node's; ``n_outputs`` its raw
    scores per sample; ``post_transform`` onnxruntime's transform of them
    (:func:`finish_scores`); ``labels`` the class labels (None for a regressor);
    ``binary`` ONNX's binary case (two classes, leaf weights for class 0 only: one raw
    score s, from which onnxruntime derives both columns); ``all_positive`` whether every
    class weight is >= 0 (which of onnxruntime's binary rules applies)."""

    params: Mapping[str, np.ndarray]
    n_outputs: int
    post_transform: str
    labels: tuple | None
    binary: bool = False
    all_positive: bool = True
    n_trees: int = 0
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_classifier(self) -> bool:
        return self.labels is not None


def _attributes(node) -> dict[str, Any]:
    from onnx import helper, numpy_helper

    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if a.type == a.TENSOR:
            value = numpy_helper.to_array(value)
        out[a.name] = value
    return out


def _floats(attrs: dict, name: str) -> np.ndarray:
    """A float attribute or its ``*_as_tensor`` twin (opset 3), as float64."""
    if attrs.get(f"{name}_as_tensor") is not None:
        return np.asarray(attrs[f"{name}_as_tensor"], dtype=np.float64).ravel()
    return np.asarray(attrs.get(name, ()), dtype=np.float32).astype(np.float64)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ints(attrs: dict, name: str) -> np.ndarray:
    return np.asarray(attrs.get(name, ()), dtype=np.int64)


@dataclass
class _Forest:
    """Branch nodes and leaves collected from an ONNX node, before the paths."""

    feature: list = field(default_factory=list)
    threshold: list = field(default_factory=list)
    mode: list = field(default_factory=list)
    # per tree: the root's key; per key: ("branch", index, true key, false key) or
    # ("leaf", leaf index)
    roots: list = field(default_factory=list)
    table: dict = field(default_factory=dict)
    n_leaves: int = 0

    def branch(self, key, feature: int, threshold: float, mode: int, true, false) -> None:
        self.table[key] = ("branch", len(self.feature), true, false)
        self.feature.append(feature)
        self.threshold.append(threshold)
        self.mode.append(mode)

    def leaf(self, key) -> int:
        self.table[key] = ("leaf", self.n_leaves)
        self.n_leaves += 1
        return self.n_leaves - 1

    def paths(self, where: str) -> np.ndarray:
        """(L, D) signed path entries (``kernels.tree_leaves``), from each root."""
        rows: list = [None] * self.n_leaves
        for root in self.roots:
            stack = [(root, ())]
            while stack:
                key, path = stack.pop()
                entry = self.table.get(key)
                if entry is None:
                    raise GraphError(f"{where}: node {key} is referenced but not defined")
                if entry[0] == "leaf":
                    if rows[entry[1]] is not None:
                        raise GraphError(f"{where}: leaf {key} is reached twice")
                    rows[entry[1]] = path
                    continue
                if len(path) > self.n_leaves + len(self.feature):
                    raise GraphError(f"{where}: the trees have a cycle")
                _, index, true, false = entry
                stack.append((true, path + (index + 1,)))
                stack.append((false, path + (-(index + 1),)))
        if any(r is None for r in rows):
            raise GraphError(f"{where}: a leaf is not reachable from any root")
        depth = max((len(r) for r in rows), default=0)
        out = np.zeros((self.n_leaves, depth), np.float64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out


def _mode_code(mode: str, where: str) -> int | None:
    if mode == "LEAF":
        return None
    if mode not in _MODES:
        raise UnsupportedOperation(
            f"{where}: node test {mode} is not supported (only BRANCH_LEQ, BRANCH_LT, "
            "BRANCH_GTE and BRANCH_GT; an equality split has no exact private form here)")
    return _MODES[mode]


def _forest_v1(attrs: dict, where: str) -> _Forest:
    """Branches and leaves of a TreeEnsembleClassifier / Regressor (opsets 1 and 3)."""
    trees, ids = _ints(attrs, "nodes_treeids"), _ints(attrs, "nodes_nodeids")
    features = _ints(attrs, "nodes_featureids")
    values = _floats(attrs, "nodes_values")
    true, false = _ints(attrs, "nodes_truenodeids"), _ints(attrs, "nodes_falsenodeids")
    modes = [_text(m) for m in attrs.get("nodes_modes", ())]
    n = len(ids)
    if not (len(trees) == len(features) == len(modes) == len(true) == len(false) == n) \
            or len(values) not in (0, n):
        raise GraphError(f"{where}: the nodes_* attributes have different lengths")
    forest = _Forest()
    children = set()
    for i in range(n):
        key, code = (int(trees[i]), int(ids[i])), _mode_code(modes[i], where)
        if key in forest.table:
            raise GraphError(f"{where}: node {key} is defined twice")
        if code is None:
            forest.leaf(key)
            continue
        t, f = (int(trees[i]), int(true[i])), (int(trees[i]), int(false[i]))
        forest.branch(key, int(features[i]), float(values[i]), code, t, f)
        children.update((t, f))
    forest.roots = sorted(k for k in forest.table if k not in children)
    if len({k[0] for k in forest.roots}) != len(forest.roots):
        raise GraphError(f"{where}: a tree has more than one root")
    return forest


def _leaf_weights(forest: _Forest, attrs: dict, prefix: str, columns: int,
                  where: str) -> np.ndarray:
    """(L, columns) leaf weights from the ``{prefix}_*`` attributes (class or target)."""
    trees, ids = _ints(attrs, f"{prefix}_treeids"), _ints(attrs, f"{prefix}_nodeids")
    targets = _ints(attrs, f"{prefix}_ids")
    weights = _floats(attrs, f"{prefix}_weights")
    if not len(trees) == len(ids) == len(targets) == len(weights):
        raise GraphError(f"{where}: the {prefix}_* attributes have different lengths")
    out = np.zeros((forest.n_leaves, columns))
    for t, i, c, w in zip(trees, ids, targets, weights):
        entry = forest.table.get((int(t), int(i)))
        if entry is None or entry[0] != "leaf":
            raise GraphError(f"{where}: a weight names ({t}, {i}), which is not a leaf")
        if not 0 <= c < columns:
            raise GraphError(f"{where}: weight for output {c} of {columns}")
        out[entry[1], c] += w
    return out


def _classifier(forest: _Forest, attrs: dict, base: np.ndarray, where: str) -> dict:
    """Columns, base and ONNX's binary case of a TreeEnsembleClassifier, as onnxruntime
    aggregates it (always a sum)."""
    labels = tuple(attrs["classlabels_int64s"]) if attrs.get("classlabels_int64s") else \
        tuple(_text(s) for s in attrs.get("classlabels_strings", ()))
    if not labels:
        raise GraphError(f"{where}: a classifier without class labels")
    k = len(labels)
    ids = _ints(attrs, "class_ids")
    weighted = set(ids.tolist())
    weights = _leaf_weights(forest, attrs, "class", k, where)
    all_positive = bool(np.all(_floats(attrs, "class_weights") >= 0))
    if k == 2 and len(weighted) == 1:
        if weighted != {0}:
            raise UnsupportedOperation(f"{where}: a binary classifier with weights for "
                                       "class 1 only is not supported")
        if base.size > 1:       # onnxruntime 1.23 then outputs [s + b0, 0], label 0
            raise UnsupportedOperation(f"{where}: ONNX's binary case with {base.size} "
                                       "base values is not supported (one or none is)")
        return dict(weights=weights[:, :1], base=base[:1] if base.size else np.zeros(1),
                    labels=labels, binary=True, all_positive=all_positive)
    if k == 2 and base.size == 2:
        raise UnsupportedOperation(f"{where}: two weighted classes with two base values "
                                   "(onnxruntime then ignores class 1's weights)")
    if base.size > k:
        raise GraphError(f"{where}: {base.size} base values for {k} classes")
    return dict(weights=weights, base=np.concatenate([base, np.zeros(k - base.size)]),
                labels=labels, binary=False, all_positive=all_positive)


def _regressor(forest: _Forest, attrs: dict, base: np.ndarray, where: str) -> dict:
    targets = int(attrs.get("n_targets", 1))
    weights = _leaf_weights(forest, attrs, "target", targets, where)
    agg = _text(attrs.get("aggregate_function", "SUM"))
    return dict(weights=_aggregate(weights, agg, len(forest.roots), where),
                base=_base(base, targets, where), labels=None)


def _aggregate(weights: np.ndarray, agg: str, n_trees: int, where: str) -> np.ndarray:
    if agg == "AVERAGE":
        return weights / max(n_trees, 1)
    if agg != "SUM":
        raise UnsupportedOperation(f"{where}: aggregate function {agg} is not supported "
                                   "(SUM and AVERAGE are)")
    return weights


def _base(base: np.ndarray, targets: int, where: str) -> np.ndarray:
    if base.size not in (0, targets):
        raise GraphError(f"{where}: {base.size} base values for {targets} targets")
    return base if base.size else np.zeros(targets)


def _forest_v5(attrs: dict, where: str) -> tuple[_Forest, np.ndarray, int]:
    """Branches, leaves and (L, T) weights of ai.onnx.ml opset 5's TreeEnsemble (its
    leaves are their own arrays: a child index is a leaf's when its ``*leafs`` flag
    is set)."""
    features, splits = _ints(attrs, "nodes_featureids"), _floats(attrs, "nodes_splits")
    modes = np.asarray(attrs.get("nodes_modes", ()), dtype=np.int64).ravel()
    true, false = _ints(attrs, "nodes_truenodeids"), _ints(attrs, "nodes_falsenodeids")
    true_leaf, false_leaf = _ints(attrs, "nodes_trueleafs"), _ints(attrs, "nodes_falseleafs")
    leaf_targets, leaf_weights = _ints(attrs, "leaf_targetids"), _floats(attrs, "leaf_weights")
    roots, targets = _ints(attrs, "tree_roots"), int(attrs.get("n_targets", 1))
    forest = _Forest()
    for i in range(len(features)):
        if int(modes[i]) not in _V5_MODES:
            raise UnsupportedOperation(f"{where}: node test code {int(modes[i])} is not "
                                       "supported (only LEQ, LT, GTE and GT)")
        forest.branch(("n", i), int(features[i]), float(splits[i]), _V5_MODES[int(modes[i])],
                      ("l" if true_leaf[i] else "n", int(true[i])),
                      ("l" if false_leaf[i] else "n", int(false[i])))
    for j in range(len(leaf_weights)):
        forest.leaf(("l", j))
    weights = np.zeros((len(leaf_weights), targets))
    weights[np.arange(len(leaf_weights)), leaf_targets] = leaf_weights
    if np.any((roots < 0) | (roots >= len(features))):
        raise GraphError(f"{where}: a tree root is not a node")
    forest.roots = [("n", int(r)) for r in roots]
    return forest, weights, targets


def _parse_v5(attrs: dict, where: str) -> dict:
    forest, weights, targets = _forest_v5(attrs, where)
    agg = _V5_AGGREGATES[int(attrs.get("aggregate_function", 1))]
    post = _V5_TRANSFORMS[int(attrs.get("post_transform", 0))]
    return dict(forest=forest, weights=_aggregate(weights, agg, len(forest.roots), where),
                base=np.zeros(targets), labels=None, post=post)


def parse_tree_ensemble(node, where: str | None = None) -> ParsedTrees:
    """The TREE_ENSEMBLE node of an ONNX ``TreeEnsembleClassifier``,
    ``TreeEnsembleRegressor`` (ai.onnx.ml opsets 1 and 3) or ``TreeEnsemble`` (opset 5)
    NodeProto, with what its outputs need afterwards (:class:`ParsedTrees`).

    Raises:
        UnsupportedOperation: a node test, aggregation or post transform veil does not
            run (the module docstring lists them).
        GraphError: the node's attributes are inconsistent.
    """
    where = where or f"{node.op_type} node {node.name!r}"
    if node.op_type not in TREE_OPS:
        raise UnsupportedOperation(f"{where} is not a tree ensemble")
    attrs = _attributes(node)
    if node.op_type == "TreeEnsemble":
        got = _parse_v5(attrs, where)
        forest, post = got.pop("forest"), got.pop("post")
    else:
        forest = _forest_v1(attrs, where)
        post = _text(attrs.get("post_transform", "NONE"))
        base = _floats(attrs, "base_values")
        got = (_classifier if node.op_type == "TreeEnsembleClassifier" else _regressor)(
            forest, attrs, base, where)
    if post not in TRANSFORMS:
        raise UnsupportedOperation(f"{where}: post transform {post} is not supported "
                                   f"({', '.join(TRANSFORMS)} are)")
    params = {"feature": np.asarray(forest.feature, np.float64),
              "threshold": np.asarray(forest.threshold, np.float64),
              "mode": np.asarray(forest.mode, np.float64),
              "paths": forest.paths(where), "weights": np.asarray(got["weights"], np.float64),
              "base": np.asarray(got["base"], np.float64)}
    return ParsedTrees(params, params["weights"].shape[1], post, got["labels"],
                       got.get("binary", False), got.get("all_positive", True),
                       len(forest.roots))


def float32_tests(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``params`` with every node test rewritten so that comparing a float64 input
    decides what the float32 runtime decides on the same input rounded to float32.

    ONNX tree models take float32 inputs (scikit-learn casts X to float32 before its
    trees, onnxruntime computes in float32): a float64 value just above a threshold t
    can round onto t and go left there. Rounding to nearest-even is monotone, so
    ``round32(x) <= t`` holds exactly when x is below the midpoint between t and the next
    float32 up, or on it when t's last mantissa bit is 0 (the tie rounds to t); ``<``
    is ``<=`` the float32 below t, and GTE / GT are their complements. The midpoints are
    exact in float64, and every backend then compares the input as it is (no rounding
    step on shares)."""
    t = np.asarray(params["threshold"], dtype=np.float32)
    mode = np.asarray(params["mode"]).astype(np.int64)
    up, down = np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(-np.inf))
    mid_up = (t.astype(np.float64) + up.astype(np.float64)) / 2
    mid_down = (t.astype(np.float64) + down.astype(np.float64)) / 2
    even = (t.view(np.uint32) & 1) == 0                # the tie at mid_up rounds to t
    below_even = (down.view(np.uint32) & 1) == 0       # the tie at mid_down rounds down
    leq, lt, gte, gt = range(4)
    # round32(x) <= t: x <= mid_up (t even) or x < mid_up; round32(x) < t: the same
    # against mid_down with the float32 below t; GTE, GT: their complements
    new_mode = np.select(
        [mode == leq, mode == lt, mode == gte, mode == gt],
        [np.where(even, leq, lt), np.where(below_even, leq, lt),
         np.where(below_even, gt, gte), np.where(even, gt, gte)])
    threshold = np.where((mode == leq) | (mode == gt), mid_up, mid_down)
    finite = np.isfinite(threshold)
    out = dict(params)
    out["threshold"] = np.where(finite, threshold, params["threshold"]).astype(np.float64)
    out["mode"] = np.where(finite, new_mode, mode).astype(np.float64)
    return out


# -- the post transform, as onnxruntime applies it -------------------------------------

def _softmax_zero(v: np.ndarray) -> np.ndarray:
    """onnxruntime's SOFTMAX_ZERO: a softmax over the entries that are not (nearly)
    zero; those stay (nearly) zero."""
    top = v.max(axis=1, keepdims=True)
    live = np.abs(v) > 1e-7
    e = np.where(live, np.exp(v - top), v * np.exp(-top))
    return e / np.where(live, e, 0.0).sum(axis=1, keepdims=True)


#: the post transforms the client's output head computes as IR ops (SOFTMAX_ZERO has none)
HEAD_TRANSFORMS = ("NONE", "LOGISTIC", "SOFTMAX")


def tree_head(b, name: str, raw: str, parsed: ParsedTrees) -> str:
    """onnxruntime's post transform of a classifier's raw scores ``raw`` (an IR value of
    builder ``b``) as IR ops, which the output head moves to the client:

    - the raw sums rounded to float32 as onnxruntime holds them (exact ties, a forest's
      0.5 / 0.5 vote that the float32 leaf weights miss by ~1e-8 when summed in float64
      or on shares, then fall as in onnxruntime and scikit-learn);
    - ONNX's binary case (one raw score s): with all class weights >= 0 (a random
      forest's probabilities) the columns are [1 - s, s] whatever the transform; with
      mixed weights (boosting's log-odds) [sigmoid(-s), sigmoid(s)] under LOGISTIC and
      [-s, s] otherwise;
    - otherwise the transform column-wise: NONE, LOGISTIC, SOFTMAX.

    Raises UnsupportedOperation for a transform outside :data:`HEAD_TRANSFORMS`.
    """
    from ..ir import Op

    post = parsed.post_transform
    if post not in HEAD_TRANSFORMS:
        raise UnsupportedOperation(f"{name}: post_transform {post!r} of a classifier is "
                                   f"not supported ({', '.join(HEAD_TRANSFORMS)} are)")
    scores = b.add(name, Op.FLOAT32, [raw])
    if parsed.binary:
        shift = 1.0 if parsed.all_positive else 0.0        # [1 - s, s] or [-s, s]
        other = b.add(name, Op.BATCHNORM, [scores], {}, {"scale": [-1.0], "shift": [shift]})
        scores = b.add(name, Op.CONCAT, [other, scores], {"axis": 0})
        if parsed.all_positive or post != "LOGISTIC":
            return scores
    op = {"NONE": None, "LOGISTIC": Op.SIGMOID, "SOFTMAX": Op.SOFTMAX}[post]
    return scores if op is None else b.add(name, op, [scores])


def finish_scores(raw: np.ndarray, parsed: ParsedTrees) -> np.ndarray:
    """The scores onnxruntime outputs (probabilities for a classifier) from the raw
    TREE_ENSEMBLE output (B, n_outputs), in float64: for a classifier, the client's
    output head that :func:`tree_head` builds (what veil runs), applied by the
    interpreter; SOFTMAX_ZERO, which the head does not offer, in numpy. A regressor's
    raw scores rounded to float32 (onnxruntime's one-output path applies only PROBIT,
    which is refused at parsing)."""
    from ..ir import run
    from ._builder import GraphBuilder

    raw = np.asarray(raw, dtype=np.float64).reshape(-1, parsed.n_outputs)
    if not parsed.is_classifier and parsed.n_outputs == 1:
        return raw.astype(np.float32).astype(np.float64)
    if parsed.post_transform == "SOFTMAX_ZERO" and not parsed.binary:
        return _softmax_zero(raw.astype(np.float32).astype(np.float64))
    if parsed.post_transform == "SOFTMAX_ZERO":      # the binary case ignores it
        parsed = ParsedTrees(parsed.params, parsed.n_outputs, "NONE", parsed.labels,
                             parsed.binary, parsed.all_positive, parsed.n_trees)
    b = GraphBuilder((parsed.n_outputs,))
    head = b.finish(tree_head(b, "post", b.input, parsed))
    return run(head, raw)


def predicted_labels(scores: np.ndarray, parsed: ParsedTrees) -> np.ndarray:
    """The class label of each row of :func:`finish_scores`' output (its first
    largest column, as onnxruntime and scikit-learn pick)."""
    if not parsed.is_classifier:
        raise GraphError("a regressor has no class labels")
    return np.asarray(parsed.labels)[np.argmax(scores, axis=1)]
