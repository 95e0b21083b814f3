"""scikit-learn models as users export them (skl2onnx, pinned), and output heads.

Every classifier compiles as exported (several outputs, ZipMap or not, ONNX-ML
operators), predicts what scikit-learn predicts, and its final softmax / sigmoid /
normalization and labels run on the client (``graph.head``).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("skl2onnx")
sklearn = pytest.importorskip("sklearn")

from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits  # noqa: E402
from sklearn.ensemble import (GradientBoostingClassifier,  # noqa: E402
                              RandomForestClassifier)
from sklearn.linear_model import (LinearRegression, LogisticRegression,  # noqa: E402
                                  SGDClassifier)
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier, MLPRegressor  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.svm import LinearSVC  # noqa: E402
from skl2onnx import to_onnx  # noqa: E402

import veil  # noqa: E402
from veil.errors import GraphError, InputError  # noqa: E402
from veil.frontend import to_graph  # noqa: E402
from veil.ir import Op, run  # noqa: E402
from veil.ir.head import Head, run_model  # noqa: E402
from veil.ir.serialize import graph_from_json, graph_to_json  # noqa: E402


def _data(name):
    loader = {"cancer": load_breast_cancer, "digits": load_digits,
              "diabetes": load_diabetes}[name]
    x, y = loader(return_X_y=True)
    return train_test_split(x, y, test_size=0.25, random_state=0)


def _fit(model, name):
    xtr, xte, ytr, yte = _data(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # convergence of the small MLPs
        model.fit(xtr, ytr)
    return model, xtr, xte, yte


def _onnx(model, x, zipmap=True):
    options = None if zipmap else {id(model): {"zipmap": False}}
    return to_onnx(model, x[:1].astype(np.float32), options=options)


# (name, estimator factory, dataset, the client's head ops)
CLASSIFIERS = [
    ("logreg-binary", lambda: make_pipeline(StandardScaler(), LogisticRegression()),
     "cancer", ["sigmoid"]),
    ("logreg-multiclass", lambda: make_pipeline(StandardScaler(),
                                                LogisticRegression(max_iter=500)),
     "digits", ["softmax", "normalize"]),
    ("mlp-binary", lambda: make_pipeline(StandardScaler(), MLPClassifier(
        hidden_layer_sizes=(16,), max_iter=300, random_state=0)), "cancer",
     ["sigmoid", "batchnorm", "concat"]),
    ("mlp-multiclass", lambda: make_pipeline(StandardScaler(), MLPClassifier(
        hidden_layer_sizes=(16,), max_iter=300, random_state=0)), "digits", ["softmax"]),
    ("sgd-log-binary", lambda: make_pipeline(StandardScaler(), SGDClassifier(
        loss="log_loss", random_state=0)), "cancer", ["sigmoid", "batchnorm", "concat"]),
    ("sgd-hinge-multiclass", lambda: make_pipeline(StandardScaler(), SGDClassifier(
        random_state=0)), "digits", []),
]


@pytest.mark.parametrize("name, factory, data, ops", CLASSIFIERS, ids=[c[0] for c in CLASSIFIERS])
@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "no-zipmap"])
def test_classifier_as_exported_predicts_what_sklearn_predicts(name, factory, data, ops,
                                                               zipmap):
    model, xtr, xte, _ = _fit(factory(), data)
    graph = to_graph(_onnx(model, xtr, zipmap), (xtr.shape[1],))
    assert graph.head.ops() == ops
    assert not any(n.op in (Op.SIGMOID, Op.SOFTMAX, Op.NORMALIZE) for n in graph.nodes)
    out = run_model(graph, xte)
    np.testing.assert_array_equal(graph.head.predict(out), model.predict(xte))
    if hasattr(model, "predict_proba") and ops:
        np.testing.assert_allclose(out, model.predict_proba(xte), atol=1e-5)
    assert graph.head.labels == tuple(model.classes_.tolist())


def test_label_output_is_computed_by_the_client():
    model, xtr, xte, _ = _fit(make_pipeline(StandardScaler(), LogisticRegression()), "cancer")
    onx = _onnx(model, xtr, zipmap=False)
    assert [o.name for o in onx.graph.output] == ["label", "probabilities"]
    graph = to_graph(onx, (30,), output="label")
    assert graph.head.returns == "labels" and graph.output_shape == (2,)
    np.testing.assert_array_equal(run_model(graph, xte), model.predict(xte))
    with pytest.raises(InputError, match="no output 'nope'.*label.*probabilities"):
        to_graph(onx, (30,), output="nope")


def test_linear_svc_decision_function_and_string_labels():
    """LinearSVC's binary export keeps one decision column (ArrayFeatureExtractor);
    its class is the sign of the decision, mapped to string labels."""
    xtr, xte, ytr, _ = _data("cancer")
    names = np.array(["benign", "malignant"])[ytr]
    scaler = StandardScaler().fit(xtr)
    svc = LinearSVC(random_state=0).fit(scaler.transform(xtr), names)
    graph = to_graph(to_onnx(svc, xtr[:1].astype(np.float32)), (30,))
    assert graph.output_shape == (1,) and graph.head.threshold == 0.0
    out = run_model(graph, scaler.transform(xte))
    np.testing.assert_allclose(out[:, 0], svc.decision_function(scaler.transform(xte)),
                               atol=1e-4)
    np.testing.assert_array_equal(graph.head.predict(out), svc.predict(scaler.transform(xte)))


@pytest.mark.parametrize("factory", [
    LinearRegression,
    lambda: make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(16,),
                                                         max_iter=400, random_state=0)),
], ids=["linear-regression", "mlp-regressor"])
def test_regressors_as_exported(factory):
    model, xtr, xte, _ = _fit(factory(), "diabetes")
    graph = to_graph(to_onnx(model, xtr[:1].astype(np.float32)), (xtr.shape[1],))
    assert graph.head is None or graph.head.graph is None
    want = model.predict(xte)
    np.testing.assert_allclose(run_model(graph, xte).ravel(), want,
                               atol=1e-5 * np.abs(want).max())


def test_compiled_classifier_in_plain_and_simulate():
    """compile(), run() (the head applied), predict() (labels) and the report's
    accuracy of a binary classifier."""
    model, xtr, xte, yte = _fit(make_pipeline(StandardScaler(), LogisticRegression()),
                                "cancer")
    compiled = veil.compile(_onnx(model, xtr), xtr, insecure_test_params=True)
    assert compiled.output_shape == (2,)
    np.testing.assert_allclose(compiled.run(xte), model.predict_proba(xte), atol=1e-5)
    np.testing.assert_array_equal(compiled.predict(xte), model.predict(xte))
    logits = compiled.run(xte, head=False)
    assert np.abs(logits).max() > 1.5         # logits, not probabilities
    report = compiled.report(xte, yte)
    assert report.accuracy["plain"] == pytest.approx(model.score(xte, yte))
    # a few test rows lie outside the calibrated per-feature range, but a linear model
    # fits nothing over a range (its sigmoid is the client's): HE, and simulate with it,
    # compute them exactly, so none is refused
    beyond = compiled.input_range.beyond(xte).any(axis=1)
    assert 0 < beyond.sum() < 10 and not compiled.input_range.enforced
    assert not compiled.input_range.outside(xte).any()
    from veil.compiler.ranges import InputRange
    assert not InputRange.from_manifest(compiled.manifest()["input"]).enforced  # HE client
    assert report.accuracy["simulate"] == pytest.approx(model.score(xte, yte))
    np.testing.assert_array_equal(compiled.predict(xte, "simulate"), model.predict(xte))
    assert any("output head on the client: sigmoid" in n for n in report.notes)


def test_a_fitted_activation_makes_the_range_binding():
    """An MLP's ReLU is fitted over the calibrated range: simulate (like HE) refuses the
    rows outside the per-feature bounds and names them; clip=True clamps them."""
    model, xtr, xte, yte = _fit(make_pipeline(StandardScaler(), MLPClassifier(
        hidden_layer_sizes=(8,), max_iter=300, random_state=0)), "cancer")
    compiled = veil.compile(_onnx(model, xtr), xtr, insecure_test_params=True)
    assert compiled.input_range.enforced
    outside = np.flatnonzero(compiled.input_range.outside(xte).any(axis=1))
    assert len(outside)
    with pytest.raises(veil.errors.InputRangeError, match=f"input row {outside[0]}, feature"):
        compiled.predict(xte, "simulate")
    with pytest.warns(veil.errors.InputClippedWarning):
        assert len(compiled.predict(xte, "simulate", clip=True)) == len(xte)


class _BinaryNet:
    """A torch binary classifier with one logit (BCEWithLogits-style), and one ending in
    a sigmoid; the class is the logit's sign (the probability above 1/2)."""

    @staticmethod
    def build(final_sigmoid: bool):
        torch = pytest.importorskip("torch")
        torch.manual_seed(0)
        layers = [torch.nn.Linear(30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)]
        if final_sigmoid:
            layers.append(torch.nn.Sigmoid())
        return torch.nn.Sequential(*layers).eval()


@pytest.mark.parametrize("final_sigmoid", [False, True], ids=["logit", "sigmoid"])
def test_binary_torch_classifier_accuracy_is_right(final_sigmoid):
    """One output column: the predicted class is the logit's sign (argmax over one
    column would say class 0 for every row)."""
    torch = pytest.importorskip("torch")
    xtr, xte, ytr, yte = _data("cancer")
    scaler = StandardScaler().fit(xtr)
    xs, xt = scaler.transform(xtr), scaler.transform(xte)
    net = _BinaryNet.build(final_sigmoid)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    core = net[:3]
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            core(torch.as_tensor(xs, dtype=torch.float32))[:, 0],
            torch.as_tensor(ytr, dtype=torch.float32))
        loss.backward()
        opt.step()
    with torch.no_grad():
        logit = core(torch.as_tensor(xt, dtype=torch.float32))[:, 0].numpy()
    truth = float(np.mean((logit > 0) == yte))
    assert truth > 0.9
    compiled = veil.compile(net, xs, insecure_test_params=True)
    assert compiled.head.ops() == (["sigmoid"] if final_sigmoid else [])
    assert compiled.report(xt, yte).accuracy["plain"] == pytest.approx(truth)
    np.testing.assert_array_equal(compiled.predict(xt), (logit > 0).astype(int))


def test_head_kept_on_the_server_when_asked():
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softmax(dim=1)).eval()
    x = np.random.default_rng(0).normal(size=(16, 4))
    on_client = to_graph(net, (4,))
    on_server = to_graph(net, (4,), client_head=False)
    assert on_client.head.ops() == ["softmax"] and on_client.output_shape == (3,)
    assert on_server.head.graph is None and on_server.node(on_server.output).op is Op.SOFTMAX
    np.testing.assert_allclose(run_model(on_client, x), run(on_server, x), atol=1e-12)
    with pytest.warns(veil.errors.VeilWarning, match="softmax .* stays on the server"):
        compiled = veil.compile(net, x, client_head=False, insecure_test_params=True)
    assert any("runs on the server (client_head=False)" in n for n in compiled.report().notes)


def test_head_round_trips_and_refuses_malformed():
    model, xtr, xte, _ = _fit(make_pipeline(StandardScaler(), MLPClassifier(
        hidden_layer_sizes=(8,), max_iter=200, random_state=0)), "cancer")
    graph = to_graph(_onnx(model, xtr), (30,))
    data, arrays = graph_to_json(graph)
    again = graph_from_json(data, arrays)
    np.testing.assert_array_equal(run_model(again, xte), run_model(graph, xte))
    head = Head.from_dict(graph.head.to_dict())
    assert head.labels == graph.head.labels and head.ops() == graph.head.ops()
    bad = graph.head.to_dict()
    bad["arrays"] = {k: {"shape": [3], "values": [1.0]} for k in bad["arrays"]}
    with pytest.raises(GraphError, match="malformed"):
        Head.from_dict(bad)
    with pytest.raises(GraphError, match="labels must be ints or strings"):
        Head(labels=(1.5, 2.5))


@pytest.fixture(scope="module")
def mlp_digits():
    model, xtr, xte, yte = _fit(make_pipeline(StandardScaler(), MLPClassifier(
        hidden_layer_sizes=(16,), max_iter=300, random_state=0)), "digits")
    compiled = veil.compile(_onnx(model, xtr, zipmap=False), xtr, insecure_test_params=True)
    yield model, compiled, xte[:24]
    compiled.close()


@pytest.mark.parametrize("mode", ["tee", "mpc"])
def test_sklearn_mlp_in_tee_and_mpc_predicts_what_sklearn_predicts(mlp_digits, mode):
    """The servers compute the logits; the client's softmax and labels are exact."""
    model, compiled, x = mlp_digits
    np.testing.assert_array_equal(compiled.predict(x, mode), model.predict(x))
    np.testing.assert_allclose(compiled.run(x, mode), model.predict_proba(x), atol=2e-3)


def test_sklearn_logistic_regression_in_he():
    """Under CKKS the server computes the two logits (depth of the affine chain only);
    the sigmoid is the client's."""
    model, xtr, xte, _ = _fit(make_pipeline(StandardScaler(), LogisticRegression()), "cancer")
    compiled = veil.compile(_onnx(model, xtr), xtr, insecure_test_params=True)
    assert compiled.report().depth <= 2
    with compiled:
        x = xte[:4]
        np.testing.assert_array_equal(compiled.predict(x, "he"), model.predict(x))
        np.testing.assert_allclose(compiled.run(x, "he"), model.predict_proba(x), atol=1e-3)


def test_served_classifier_heads_on_the_sdk_and_cli(tmp_path):
    """An exported scikit-learn classifier behind `veil serve`: the service describes
    its head, the SDK computes probabilities and labels from the logits it decrypts,
    and `veil predict` reports the right accuracy of a binary classifier."""
    import os
    import subprocess
    import sys

    from service_util import ServerProcess
    from veil.model import export_model
    from veil.service.auth import KeyStore

    model, xtr, xte, yte = _fit(make_pipeline(StandardScaler(), LogisticRegression()),
                                "cancer")
    export_model(_onnx(model, xtr), xtr, tmp_path / "lr", modes=("he",))   # secure ring
    keys = KeyStore(tmp_path / "store")
    token = keys.create("alice")
    server = ServerProcess([tmp_path / "lr"], tmp_path / "store")
    try:
        x = xte[:6]
        with veil.Client(server.url, "lr", api_key=token, key_dir=tmp_path / "k") as client:
            assert client.info()["head"]["labels"] == [0, 1]
            np.testing.assert_allclose(client.predict(x), model.predict_proba(x), atol=1e-3)
            np.testing.assert_array_equal(client.classify(x), model.predict(x))
            assert client.infer_batch(x).shape == (6, 2)        # the logits, as served
        np.savez(tmp_path / "data.npz", x=xte[:20], y=yte[:20])
        out = subprocess.run(
            [sys.executable, "-m", "veil", "predict", server.url, "--model", "lr",
             "--mode", "he", "--input", str(tmp_path / "data.npz"), "--api-key", token],
            capture_output=True, text=True, check=True,
            env={**os.environ, "HOME": str(tmp_path)})     # its keys under tmp_path/.veil
        want = float(np.mean(model.predict(xte[:20]) == yte[:20]))
        assert f"accuracy {want:.4f} on 20 labelled inputs" in out.stdout
    finally:
        server.stop()
        keys.close()
    assert server.errors() == "", server.errors()


# -- tree ensembles ------------------------------------------------------------------

TREES = [
    ("forest-binary", lambda: RandomForestClassifier(n_estimators=20, max_depth=6,
                                                     random_state=0), "cancer",
     ["float32", "batchnorm", "concat"]),
    ("boosting-binary", lambda: GradientBoostingClassifier(n_estimators=20, max_depth=3,
                                                           random_state=0), "cancer",
     ["float32", "batchnorm", "concat", "sigmoid"]),
    ("forest-multiclass", lambda: RandomForestClassifier(n_estimators=20, max_depth=6,
                                                         random_state=0), "digits",
     ["float32"]),
    ("boosting-multiclass", lambda: GradientBoostingClassifier(n_estimators=10, max_depth=3,
                                                               random_state=0), "digits",
     ["float32", "softmax"]),
]


@pytest.mark.parametrize("name, factory, data, ops", TREES, ids=[t[0] for t in TREES])
def test_tree_ensembles_as_exported_predict_what_sklearn_predicts(name, factory, data, ops):
    """On held-out rows, whose float64 values round to float32 (as scikit-learn's trees
    and onnxruntime compare them) across some thresholds."""
    model, xtr, xte, _ = _fit(factory(), data)
    graph = to_graph(_onnx(model, xtr), (xtr.shape[1],))
    assert graph.head.ops() == ops
    out = run_model(graph, xte)
    np.testing.assert_array_equal(graph.head.predict(out), model.predict(xte))
    np.testing.assert_allclose(out, model.predict_proba(xte), atol=1e-6)


def test_tree_tests_decide_as_on_float32_inputs():
    """A float64 value just above a float32 threshold rounds onto it: it goes where the
    float32 runtime sends it, at every tie and rounding edge."""
    from veil.frontend._trees import float32_tests
    from veil.ir import kernels

    t = np.array([1.5, 3.0000002, 0.1, 1000.5], dtype=np.float32)
    up = np.nextafter(t, np.float32(np.inf)).astype(np.float64)
    down = np.nextafter(t, np.float32(-np.inf)).astype(np.float64)
    t64 = t.astype(np.float64)
    mid_up, mid_down = (t64 + up) / 2, (t64 + down) / 2
    xs = np.concatenate([t64, mid_up, mid_down, np.nextafter(mid_up, 9e9),
                         np.nextafter(mid_down, -9e9), up, down])
    for code in range(4):
        params = {"feature": np.zeros(4), "threshold": t64, "mode": np.full(4, code)}
        new = float32_tests(params)
        x = xs[:, None]
        want = kernels.tree_tests(x.astype(np.float32).astype(np.float64), params["feature"],
                                  params["threshold"], params["mode"])
        got = kernels.tree_tests(x, new["feature"], new["threshold"], new["mode"])
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["tee", "mpc"])
def test_forest_in_tee_and_mpc_predicts_what_sklearn_predicts(mode):
    model, xtr, xte, _ = _fit(RandomForestClassifier(n_estimators=10, max_depth=5,
                                                     random_state=0), "cancer")
    with veil.compile(_onnx(model, xtr), xtr, insecure_test_params=True) as compiled:
        x = xte[:40]
        np.testing.assert_array_equal(compiled.predict(x, mode), model.predict(x))
        np.testing.assert_allclose(compiled.run(x, mode), model.predict_proba(x), atol=1e-6)


def test_trees_are_refused_by_he_with_the_reason():
    model, xtr, xte, _ = _fit(GradientBoostingClassifier(n_estimators=5, random_state=0),
                              "cancer")
    compiled = veil.compile(_onnx(model, xtr), xtr)
    assert "no exact comparison" in compiled.report().he_error
    with pytest.raises(veil.UnsupportedOperation, match="no exact comparison.*mpc or tee"):
        compiled.run(xte[:2], "simulate")


@pytest.mark.parametrize("library", ["xgboost", "lightgbm"])
def test_gradient_boosting_libraries_through_onnxmltools(library):
    lib = pytest.importorskip(library)
    onnxmltools = pytest.importorskip("onnxmltools")
    from onnxmltools.convert.common.data_types import FloatTensorType

    for data in ("cancer", "digits"):
        model = (lib.XGBClassifier(n_estimators=10, max_depth=3) if library == "xgboost"
                 else lib.LGBMClassifier(n_estimators=10, num_leaves=15, verbose=-1))
        model, xtr, xte, _ = _fit(model, data)
        types = [("input", FloatTensorType([None, xtr.shape[1]]))]
        onx = (onnxmltools.convert_xgboost(model, initial_types=types) if library == "xgboost"
               else onnxmltools.convert_lightgbm(model, initial_types=types, zipmap=False))
        graph = to_graph(onx, (xtr.shape[1],))
        out = run_model(graph, xte)
        np.testing.assert_array_equal(graph.head.predict(out), model.predict(xte))
        np.testing.assert_allclose(out, model.predict_proba(xte), atol=1e-5)


def test_veil_compare_reports_a_binary_classifiers_accuracy(tmp_path):
    """`veil compare` on a binary scikit-learn export: each mode's accuracy is the
    model's (the sigmoid's side of 1/2), not an argmax over one column."""
    import json
    import subprocess
    import sys

    model, xtr, xte, yte = _fit(make_pipeline(StandardScaler(), MLPClassifier(
        hidden_layer_sizes=(8,), max_iter=300, random_state=0)), "cancer")
    (tmp_path / "mlp.onnx").write_bytes(_onnx(model, xtr).SerializeToString())
    x = np.concatenate([xtr[:32], xte[:32]])      # compare calibrates on the first half
    y = np.concatenate([model.predict(xtr[:32]), yte[:32]])
    np.savez(tmp_path / "data.npz", x=x, y=y)
    proc = subprocess.run(
        [sys.executable, "-m", "veil.compare", str(tmp_path / "mlp.onnx"), "--data",
         str(tmp_path / "data.npz"), "--modes", "plain,tee", "--n", "32", "--batch", "8",
         "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (w,) = json.loads((tmp_path / "out" / "report.json").read_text())["workloads"]
    want = float(np.mean(model.predict(xte[:32]) == yte[:32]))
    for mode in ("plain", "tee"):
        assert w["modes"][mode]["accuracy"] == pytest.approx(want), mode
        assert w["modes"][mode]["agreement"] == 1.0
