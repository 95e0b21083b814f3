"""Tree ensembles (TREE_ENSEMBLE): scikit-learn's forests and boosting exported by
skl2onnx, parsed by ``frontend/_trees.py``, against onnxruntime and scikit-learn; the
MPC kernel (``backends/mpc/trees.py``) against the reference, bit for bit on the node
tests (inputs at and one fixed-point unit around every threshold), within its stated
bound on the scores, with the rounds and bytes it derives; the enclave's runtimes; the
refusals (HE, unsupported ONNX features)."""
from __future__ import annotations

import numpy as np
import pytest

from veil.backends.mpc import evaluator as ev
from veil.backends.mpc.fixed import FRAC_BITS
from veil.backends.mpc.local import run_graph
from veil.backends.mpc.trees import tree_cost
from veil.compiler.targets import check_ops, lower
from veil.errors import GraphError, UnsupportedOperation
from veil.ir import Graph, Op, make_node, run
from veil.ir.serialize import graph_from_json, graph_to_json

from trees_util import random_ensemble

sklearn = pytest.importorskip("sklearn")
skl2onnx = pytest.importorskip("skl2onnx")
ort = pytest.importorskip("onnxruntime")

from sklearn import datasets, ensemble  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from veil.frontend._trees import (finish_scores, parse_tree_ensemble,  # noqa: E402
                                  predicted_labels)

RNG = np.random.default_rng(18)


def _bound(parsed) -> float:
    """The MPC scores' stated bound: each reached leaf's weight and the base rounded
    to 2^-2f (``backends/mpc/trees.py``)."""
    return (parsed.n_trees + 1) * 2.0 ** -(2 * FRAC_BITS + 1)


def _data(name: str):
    x, y = (datasets.load_breast_cancer if name == "cancer" else datasets.load_digits)(
        return_X_y=True)
    return x.astype(np.float32), y


MODELS = {
    "rf-cancer": ("cancer", lambda: ensemble.RandomForestClassifier(
        n_estimators=20, max_depth=6, random_state=0)),
    "gb-cancer": ("cancer", lambda: ensemble.GradientBoostingClassifier(
        n_estimators=15, max_depth=3, random_state=0)),
    "rf-digits": ("digits", lambda: ensemble.RandomForestClassifier(
        n_estimators=10, max_depth=6, random_state=0)),
    "gb-digits": ("digits", lambda: ensemble.GradientBoostingClassifier(
        n_estimators=5, max_depth=3, random_state=0)),
    "rf-regress": ("cancer", lambda: ensemble.RandomForestRegressor(
        n_estimators=10, max_depth=5, random_state=0)),
    "gb-regress": ("digits", lambda: ensemble.GradientBoostingRegressor(
        n_estimators=15, max_depth=3, random_state=0)),
}
_FITTED: dict = {}


def _fitted(name: str):
    """(model, onnx ModelProto, parsed, one-node graph, x_test, x_all), fitted once."""
    if name not in _FITTED:
        data, make = MODELS[name]
        x, y = _data(data)
        x_train, x_test, y_train, _ = train_test_split(x, y, test_size=0.25, random_state=0)
        model = make().fit(x_train, y_train if "regress" not in name
                           else y_train.astype(np.float64))
        options = {"zipmap": False} if hasattr(model, "predict_proba") else None
        proto = skl2onnx.to_onnx(model, x[:1], options=options)
        node = next(n for n in proto.graph.node if n.op_type.startswith("TreeEnsemble"))
        parsed = parse_tree_ensemble(node)
        _FITTED[name] = (model, proto, parsed, _graph(parsed.params, x.shape[1]),
                         x_test, x)
    return _FITTED[name]


def _graph(params, n_features: int) -> Graph:
    x = make_node("input", Op.INPUT, [], [], {"shape": (n_features,)})
    t = make_node("trees", Op.TREE_ENSEMBLE, ["input"], [(n_features,)], {}, params)
    return Graph((x, t), "trees")


def _onnxruntime(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _mpc(graph, x, cmp="circuit"):
    return run_graph(ev.lower_for_mpc(lower(graph, "mpc")[0]), np.asarray(x, np.float64),
                     cmp=cmp)


# -- the reference and the parser against onnxruntime and scikit-learn ------------------

@pytest.mark.parametrize("name", sorted(MODELS))
def test_reference_and_finish_match_onnxruntime_and_sklearn(name):
    model, proto, parsed, graph, x_test, x = _fitted(name)
    scores = finish_scores(run(graph, x.astype(np.float64)), parsed)
    outputs = _onnxruntime(proto, x)
    want = outputs[-1] if parsed.is_classifier else outputs[0]
    np.testing.assert_allclose(scores, want.reshape(scores.shape), rtol=0, atol=2e-6)
    if parsed.is_classifier:
        labels = predicted_labels(scores, parsed)
        np.testing.assert_array_equal(labels, outputs[0])
        test_scores = finish_scores(run(graph, x_test.astype(np.float64)), parsed)
        np.testing.assert_array_equal(predicted_labels(test_scores, parsed),
                                      model.predict(x_test))
        np.testing.assert_allclose(test_scores, model.predict_proba(x_test), atol=1e-6)
    else:
        np.testing.assert_allclose(scores[:, 0], model.predict(x), atol=1e-5)


def _with(proto, **attrs):
    """A copy of ``proto`` with its tree node's attributes replaced."""
    from onnx import helper

    out = type(proto)()
    out.CopyFrom(proto)
    node = next(n for n in out.graph.node if n.op_type.startswith("TreeEnsemble"))
    for a in [a for a in node.attribute if a.name in attrs]:
        node.attribute.remove(a)
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    return out, node


@pytest.mark.parametrize("post", ["NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO"])
@pytest.mark.parametrize("name,base", [("rf-cancer", None), ("gb-cancer", None),
                                       ("gb-cancer", [-0.4]), ("gb-digits", None),
                                       ("rf-digits", None)])
def test_finish_reproduces_onnxruntime_binary_case_and_transforms(name, base, post):
    """ONNX's binary case (all-positive weights: [1 - s, s] whatever the transform;
    mixed: [sigmoid(-s), sigmoid(s)] under LOGISTIC, [-s, s] otherwise) and the
    column-wise transforms, both winning classes present."""
    _, proto, _, _, _, x = _fitted(name)
    attrs = {"post_transform": post, **({"base_values": base} if base else {})}
    proto, node = _with(proto, **attrs)
    parsed = parse_tree_ensemble(node)
    scores = finish_scores(run(_graph(parsed.params, x.shape[1]), x.astype(np.float64)),
                           parsed)
    labels, probabilities = _onnxruntime(proto, x)
    np.testing.assert_allclose(scores, probabilities, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(predicted_labels(scores, parsed), labels)
    assert parsed.binary == name.endswith("cancer") and len(set(labels)) > 1


@pytest.mark.parametrize("attrs,match", [
    ({"nodes_modes": ["BRANCH_EQ"]}, "BRANCH_EQ"),
    ({"post_transform": "PROBIT"}, "PROBIT"),
    ({"base_values": [0.1, 0.2]}, "binary case"),
])
def test_unsupported_onnx_features_are_refused_by_name(attrs, match):
    _, proto, _, _, _, _ = _fitted("gb-cancer")
    if "nodes_modes" in attrs:
        node = next(n for n in proto.graph.node if n.op_type.startswith("TreeEnsemble"))
        modes = [m.decode() for m in next(a for a in node.attribute
                                          if a.name == "nodes_modes").strings]
        attrs = {"nodes_modes": ["BRANCH_EQ" if m != "LEAF" else m for m in modes]}
    _, node = _with(proto, **attrs)
    with pytest.raises(UnsupportedOperation, match=match):
        parse_tree_ensemble(node)


def test_min_aggregation_is_refused_and_average_folds_into_the_weights():
    _, proto, parsed, _, _, x = _fitted("rf-regress")
    with pytest.raises(UnsupportedOperation, match="MIN"):
        parse_tree_ensemble(_with(proto, aggregate_function="MIN")[1])
    avg_proto, node = _with(proto, aggregate_function="AVERAGE")
    avg = parse_tree_ensemble(node)
    got = run(_graph(avg.params, x.shape[1]), x.astype(np.float64))
    np.testing.assert_allclose(got, _onnxruntime(avg_proto, x)[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(avg.params["weights"] * parsed.n_trees,
                               parsed.params["weights"])


def _v5_node(params):
    """ai.onnx.ml opset 5's TreeEnsemble for TREE_ENSEMBLE ``params`` (one target, no
    one-leaf tree: its roots are split nodes), built from the paths as the enclave's
    emitter rebuilds its trees."""
    from onnx import helper, numpy_helper

    from veil.backends.tee.onnx_kernels import _tree_children

    child, roots = _tree_children(params["paths"])
    n = params["feature"].size
    sides = [[child[(i, side)] for i in range(n)] for side in (True, False)]
    return helper.make_node(
        "TreeEnsemble", ["X"], ["Y"], domain="ai.onnx.ml",
        nodes_featureids=[int(v) for v in params["feature"]],
        nodes_splits=numpy_helper.from_array(params["threshold"].astype(np.float32)),
        nodes_modes=numpy_helper.from_array(params["mode"].astype(np.uint8)),
        nodes_truenodeids=[c[1] for c in sides[0]],
        nodes_trueleafs=[int(c[0] == "l") for c in sides[0]],
        nodes_falsenodeids=[c[1] for c in sides[1]],
        nodes_falseleafs=[int(c[0] == "l") for c in sides[1]],
        leaf_targetids=[0] * params["weights"].shape[0],
        leaf_weights=numpy_helper.from_array(params["weights"][:, 0].astype(np.float32)),
        tree_roots=[r[1] for r in roots], n_targets=1, aggregate_function=1,
        post_transform=0)


def test_the_opset5_tree_ensemble_parses_and_matches_onnxruntime():
    from onnx import TensorProto, helper

    params = random_ensemble(RNG, 6, n_trees=5, depth=4, n_targets=1)
    params = {**params, "paths": params["paths"][:-1], "weights": params["weights"][:-1]}
    node = _v5_node(params)
    graph = helper.make_graph(
        [node], "trees", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 6])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("ai.onnx.ml", 5)])
    proto.ir_version = 10
    x = RNG.normal(size=(64, 6)).astype(np.float32)
    parsed = parse_tree_ensemble(node)
    got = run(_graph(parsed.params, 6), x.astype(np.float64))
    np.testing.assert_allclose(got, _onnxruntime(proto, x)[0], rtol=0, atol=2e-6)


# -- the IR op -------------------------------------------------------------------------

def test_the_op_serializes_and_checks_its_parameters():
    params = random_ensemble(RNG, 7, n_trees=3, depth=3)
    graph = _graph(params, 7)
    data, arrays = graph_to_json(graph)
    again = graph_from_json(data, arrays)
    x = RNG.normal(size=(5, 7))
    np.testing.assert_array_equal(run(again, x), run(graph, x))
    for key, value in (("feature", params["feature"] + 7), ("mode", params["mode"] + 4),
                       ("paths", params["paths"] * 100), ("base", np.zeros(5))):
        with pytest.raises(GraphError):
            _graph({**params, key: value}, 7)


def test_he_and_simulate_refuse_trees_with_the_reason():
    from veil.compiler.pipeline import compile_graph

    graph = _graph(random_ensemble(RNG, 5), 5)
    with pytest.raises(UnsupportedOperation, match="no exact comparison.*mpc or tee"):
        lower(graph, "he")
    with pytest.raises(UnsupportedOperation, match="no exact comparison.*mpc or tee"):
        check_ops(graph, "simulate")
    result = compile_graph(graph, RNG.normal(size=(8, 5)))
    assert result.plan is None and result.he_refusal[0] is UnsupportedOperation
    with pytest.raises(UnsupportedOperation, match="use mode mpc or tee"):
        result.he_plan()


# -- MPC -------------------------------------------------------------------------------

#: just over one fixed-point unit: exactly one unit from a threshold t whose t 2^f is a
#: half-integer rounds into t's own cell (``backends/mpc/trees.py``), so the stated
#: exactness is for x = t and |x - t| > 2^-f
UNIT = 2.0 ** -FRAC_BITS * (1 + 2.0 ** -8)


def _edges(params, x: np.ndarray, ulp: float = UNIT) -> np.ndarray:
    """Rows of ``x`` with random nodes' features set to their threshold and just over
    one fixed-point unit either side."""
    rows = []
    for delta in (0.0, ulp, -ulp):
        z = x.copy()
        for row in z:
            for n in RNG.choice(params["feature"].size, size=min(8, params["feature"].size),
                                replace=False):
                row[int(params["feature"][n])] = params["threshold"][n] + delta
        rows.append(z)
    return np.concatenate(rows)


@pytest.mark.parametrize("cmp", ["circuit", "fss"])
def test_mpc_node_tests_are_exact_at_and_around_every_threshold(cmp):
    """Every node test (LEQ, LT, GTE, GT) on shares equals the reference's at the
    threshold and just over one fixed-point unit either side: a wrong bit would move
    the score by a whole leaf weight (~1), the bound is 1e-12."""
    params = random_ensemble(RNG, 6, n_trees=6, depth=5, n_targets=3)
    graph = _graph(params, 6)
    x = _edges(params, RNG.uniform(-2.5, 2.5, size=(20, 6)))
    out, _ = _mpc(graph, x, cmp)
    want = run(graph, x)
    assert np.abs(out - want).max() <= 7 * 2.0 ** -(2 * FRAC_BITS + 1)


@pytest.mark.parametrize("name", ["rf-cancer", "gb-digits", "rf-regress"])
def test_mpc_matches_the_reference_on_sklearn_models(name):
    """Labels bit for bit, scores within the stated bound, on test rows and on rows
    pushed onto thresholds; the rounds and bytes are tree_cost's."""
    model, _, parsed, graph, x_test, _ = _fitted(name)
    x = np.concatenate([x_test[:24], _edges(parsed.params, x_test[24:32])]).astype(
        np.float64)
    out, chans = _mpc(graph, x)
    want = run(graph, x)
    assert np.abs(out - want).max() <= _bound(parsed)
    if parsed.is_classifier:
        np.testing.assert_array_equal(predicted_labels(finish_scores(out, parsed), parsed),
                                      predicted_labels(finish_scores(want, parsed), parsed))
        np.testing.assert_array_equal(
            predicted_labels(finish_scores(out[:24], parsed), parsed),
            model.predict(x_test[:24]))
    rounds, sent = tree_cost(graph.node("trees"), len(x))
    assert (chans[0].rounds, chans[0].bytes_sent) == (rounds, sent)
    assert (chans[1].rounds, chans[1].bytes_sent) == (rounds, sent)


def test_mpc_tree_scores_feed_later_layers_truncated():
    """Not the output: the 2f-bit scores are truncated (fused with a ReLU here), or
    left at 2f bits for a residual ADD with a linear layer, like any affine layer."""
    params = random_ensemble(RNG, 6, n_trees=4, depth=4, n_targets=3)
    nodes = [make_node("input", Op.INPUT, [], [], {"shape": (6,)})]
    nodes.append(make_node("trees", Op.TREE_ENSEMBLE, ["input"], [(6,)], {}, params))
    nodes.append(make_node("relu", Op.RELU, ["trees"], [(3,)]))
    nodes.append(make_node("lin", Op.LINEAR, ["input"], [(6,)], {},
                           {"weight": RNG.normal(size=(3, 6)), "bias": RNG.normal(size=3)}))
    nodes.append(make_node("sum", Op.ADD, ["relu", "lin"], [(3,), (3,)]))
    nodes.append(make_node("trees2", Op.TREE_ENSEMBLE, ["input"], [(6,)], {}, params))
    nodes.append(make_node("out", Op.ADD, ["sum", "trees2"], [(3,), (3,)]))
    graph = Graph(tuple(nodes), "out")
    x = _edges(params, RNG.uniform(-2.5, 2.5, size=(10, 6)))
    out, _ = _mpc(graph, x)
    np.testing.assert_allclose(out, run(graph, x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_mpc_a_larger_forest_matches_the_reference():
    x, y = _data("digits")
    model = ensemble.RandomForestClassifier(n_estimators=100, max_depth=10,
                                            random_state=0).fit(x, y)
    proto = skl2onnx.to_onnx(model, x[:1], options={"zipmap": False})
    parsed = parse_tree_ensemble(next(n for n in proto.graph.node
                                      if n.op_type.startswith("TreeEnsemble")))
    graph = _graph(parsed.params, x.shape[1])
    out, chans = _mpc(graph, x[:64])
    assert np.abs(out - run(graph, x[:64].astype(np.float64))).max() <= _bound(parsed)
    np.testing.assert_array_equal(predicted_labels(finish_scores(out, parsed), parsed),
                                  model.predict(x[:64]))
    assert (chans[0].rounds, chans[0].bytes_sent) == tree_cost(graph.node("trees"), 64)


# -- the enclave's runtimes --------------------------------------------------------------

@pytest.mark.parametrize("runtime,dtype", [("onnxruntime", "float32"), ("torch", "float32"),
                                           ("torch", "float64")])
@pytest.mark.parametrize("name", ["rf-cancer", "gb-digits", "gb-regress"])
def test_tee_runtimes_match_the_reference(name, runtime, dtype):
    from veil.backends.tee.executor import RuntimeSpec, make_executor

    pytest.importorskip(runtime)
    model, _, parsed, graph, x_test, x = _fitted(name)
    got = make_executor(lower(graph, "tee")[0], RuntimeSpec(runtime, dtype), threads=1)(
        x.astype(np.float64))
    want = run(graph, x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=0, atol=0 if dtype == "float64" else 2e-6)
    if parsed.is_classifier:
        # float32 sums in another order than onnxruntime's own export: exact ties (a
        # forest's 0.5 / 0.5) may fall either way, so labels are compared off them
        ref = finish_scores(want, parsed)
        top2 = np.sort(ref, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-5
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(
            predicted_labels(finish_scores(got, parsed), parsed)[clear],
            predicted_labels(ref, parsed)[clear])


# -- XGBoost and LightGBM through onnxmltools ------------------------------------------

def _converted(kind: str, x, y):
    onnxmltools = pytest.importorskip("onnxmltools", reason="onnxmltools is not installed")
    from onnxmltools.convert.common.data_types import FloatTensorType

    types = [("input", FloatTensorType([None, x.shape[1]]))]
    if kind == "xgboost":
        xgboost = pytest.importorskip("xgboost", reason="xgboost is not installed")
        model = xgboost.XGBClassifier(n_estimators=10, max_depth=3).fit(x, y)
        proto = onnxmltools.convert_xgboost(model, initial_types=types)
    else:
        lightgbm = pytest.importorskip("lightgbm", reason="lightgbm is not installed")
        model = lightgbm.LGBMClassifier(n_estimators=10, max_depth=3, verbose=-1).fit(x, y)
        proto = onnxmltools.convert_lightgbm(model, initial_types=types, zipmap=False)
    return model, proto


@pytest.mark.parametrize("data", ["cancer", "digits"])
@pytest.mark.parametrize("kind", ["xgboost", "lightgbm"])
def test_xgboost_and_lightgbm_exports_parse_and_match(kind, data):
    x, y = _data(data)
    model, proto = _converted(kind, x, y)
    trees = [n for n in proto.graph.node if n.op_type.startswith("TreeEnsemble")]
    assert len(trees) == 1, [n.op_type for n in proto.graph.node]
    parsed = parse_tree_ensemble(trees[0])
    graph = _graph(parsed.params, x.shape[1])
    scores = finish_scores(run(graph, x.astype(np.float64)), parsed)
    outputs = _onnxruntime(proto, x)
    probabilities = outputs[1] if not isinstance(outputs[1], list) else np.array(
        [[row[k] for k in sorted(row)] for row in outputs[1]])
    np.testing.assert_allclose(scores, probabilities, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(predicted_labels(scores, parsed), model.predict(x))
    out, _ = _mpc(graph, x[:16])
    assert np.abs(out - run(graph, x[:16].astype(np.float64))).max() <= _bound(parsed)


# -- end to end: the compiled model's processes ------------------------------------------

def test_a_compiled_forest_runs_in_the_mpc_and_tee_processes_and_he_refuses():
    """The lead's ``veil.compile`` path from the IR on: the compile result of a tree
    graph (no HE estimate), then ``run`` in the dealer and parties' processes and in the
    enclave's, against plain; simulate and he refuse with the reason."""
    from veil.compiler.pipeline import compile_graph
    from veil.model import CompiledModel

    model, _, parsed, graph, x_test, x = _fitted("gb-digits")
    result = compile_graph(graph, x[:32].astype(np.float64))
    assert result.estimate is None and "no exact comparison" in str(
        CompiledModel(result, (0.0, 16.0), {}).report())
    with CompiledModel(result, (0.0, 16.0), {}) as compiled:
        want = compiled.run(x_test[:6], "plain")
        assert np.abs(compiled.run(x_test[:6], "mpc") - want).max() <= _bound(parsed)
        np.testing.assert_allclose(compiled.run(x_test[:6], "tee"), want, rtol=0, atol=2e-6)
        np.testing.assert_array_equal(predicted_labels(finish_scores(want, parsed), parsed),
                                      model.predict(x_test[:6]))
        for mode in ("simulate", "he"):
            with pytest.raises(UnsupportedOperation, match="use mode mpc or tee"):
                compiled.run(x_test[:2], mode)
