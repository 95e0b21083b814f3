"""1-D models: Conv1d, pooling 1d and BatchNorm1d (as the 2-D ops over a (C, 1, L) view)
and the leaky rectifiers (LEAKYRELU, PRELU, ELU), from torch and from ONNX; their MPC
error bounds; the synthetic ECG CNN (``veil.compare.ecg``) in every mode."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil
from veil.compare import ecg
from veil.errors import UnsupportedOperation
from veil.frontend import to_graph
from veil.ir import Graph, Op, make_node, run

RNG = np.random.default_rng(11)


def _torch(model, x):
    with torch.no_grad():
        return model(torch.tensor(x, dtype=torch.float32)).double().numpy()


def _onnx(model, shape, opset=17):
    import onnx

    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros((1,) + shape),), buf, opset_version=opset,
                          dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return onnx.load_from_string(buf.getvalue())


def _randomize_bn(model):
    """Non-trivial running statistics, so a wrong fold or view shows."""
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


# -- frontends -----------------------------------------------------------------------------

LAYERS = {
    "conv-bn-leaky-maxpool": lambda: nn.Sequential(
        nn.Conv1d(2, 4, 7, padding=3), nn.BatchNorm1d(4), nn.LeakyReLU(0.1),
        nn.MaxPool1d(2)),
    "conv-strided-dilated-prelu": lambda: nn.Sequential(
        nn.Conv1d(2, 6, 5, stride=2, padding=4, dilation=2), nn.PReLU(6)),
    "conv-grouped-same-elu": lambda: nn.Sequential(
        nn.Conv1d(2, 4, 3, padding="same", groups=2, bias=False), nn.ELU(0.5)),
    "maxpool-ceil-pad": lambda: nn.MaxPool1d(3, 2, padding=1, ceil_mode=True),
    "avgpool-pad-exclude": lambda: nn.AvgPool1d(3, 2, padding=1, count_include_pad=False),
    "avgpool-ceil": lambda: nn.AvgPool1d(2, ceil_mode=True),
    "adaptive": lambda: nn.Sequential(nn.AdaptiveAvgPool1d(4), nn.Flatten(),
                                      nn.Linear(8, 3), nn.BatchNorm1d(3), nn.PReLU()),
    "adaptive-one": lambda: nn.AdaptiveAvgPool1d(1),
    "bn-alone": lambda: nn.BatchNorm1d(2),
}


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_torch_1d_layers_equal_torch_and_keep_the_users_shapes(case):
    torch.manual_seed(0)
    model = _randomize_bn(LAYERS[case]())
    x = RNG.normal(size=(3, 2, 17))
    graph = to_graph(model, (2, 17))
    want = _torch(model, x)
    assert graph.input_shape == (2, 17) and graph.output_shape == want.shape[1:]
    np.testing.assert_allclose(run(graph, x), want, atol=1e-5)


def test_a_batch_norm_after_conv1d_sits_on_the_view_and_folds():
    """Conv1d -> BatchNorm1d: the batch norm reads the convolution itself (no reshape in
    between), so the backends fold it; consecutive 1-D layers share one view."""
    from veil.compiler.targets import lower

    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv1d(1, 3, 5), nn.BatchNorm1d(3),
                                        nn.MaxPool1d(2), nn.Conv1d(3, 2, 3)))
    graph = to_graph(model, (1, 20))
    bn = next(n for n in graph.nodes if n.op is Op.BATCHNORM)
    assert graph.node(bn.inputs[0]).op is Op.CONV2D
    pool = next(n for n in graph.nodes if n.op is Op.MAXPOOL2D)
    assert graph.node(pool.inputs[0]).op is Op.BATCHNORM
    assert [n.op for n in graph.nodes].count(Op.RESHAPE) == 2      # in and out
    for target in ("mpc", "tee"):
        lowered, _ = lower(graph, target)
        assert Op.BATCHNORM not in {n.op for n in lowered.nodes}
        x = RNG.normal(size=(2, 1, 20))
        np.testing.assert_allclose(run(lowered, x), _torch(model, x), atol=1e-5)


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2, 5))
        self.b = nn.Parameter(torch.randn(3))
        self.slope = nn.Parameter(torch.tensor([0.1, -0.3, 0.5]))

    def forward(self, x):
        y = F.leaky_relu(F.conv1d(x, self.w, self.b, stride=1, padding=2), 0.2)
        y = F.prelu(F.max_pool1d(y, 2), self.slope)
        return F.elu(F.avg_pool1d(y, 3, 1, 1), alpha=0.7)


def test_torch_functionals_map():
    torch.manual_seed(1)
    model = _Functional().eval()
    graph = to_graph(model, (2, 16))
    ops = {n.op for n in graph.nodes}
    assert {Op.CONV2D, Op.LEAKYRELU, Op.MAXPOOL2D, Op.PRELU, Op.AVGPOOL2D, Op.ELU} <= ops
    x = RNG.normal(size=(3, 2, 16))
    np.testing.assert_allclose(run(graph, x), _torch(model, x), atol=1e-5)


def test_onnx_exports_of_1d_models_map():
    """torch.onnx's Conv with a 1-D kernel, MaxPool / AveragePool 1-D, LeakyRelu, PRelu
    (per channel and single) and Elu become the same computation."""
    torch.manual_seed(2)
    model = _randomize_bn(nn.Sequential(
        nn.Conv1d(2, 4, 5, padding=2), nn.LeakyReLU(0.05), nn.MaxPool1d(2),
        nn.Conv1d(4, 4, 3, stride=2, padding=1, groups=2), nn.PReLU(4),
        nn.AvgPool1d(2), nn.ELU(0.8), nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6),
        nn.PReLU(), nn.Linear(6, 2)))
    proto = _onnx(model, (2, 32))
    assert {"Conv", "MaxPool", "AveragePool", "LeakyRelu", "PRelu", "Elu"} <= \
        {n.op_type for n in proto.graph.node}
    graph = to_graph(proto, (2, 32))
    assert graph.input_shape == (2, 32)
    x = RNG.normal(size=(4, 2, 32))
    np.testing.assert_allclose(run(graph, x), _torch(model, x), atol=1e-5)


def test_onnx_batch_normalization_on_rank_three_input():
    """A BatchNormalization over the channels of (N, C, L) that no Conv precedes."""
    from onnx import TensorProto, helper, numpy_helper

    c = 3
    stats = [numpy_helper.from_array(RNG.uniform(0.5, 1.5, c).astype(np.float32), name)
             for name in ("g", "b", "m", "v")]
    node = helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"],
                            epsilon=1e-5)
    g = helper.make_graph([node], "bn", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["n", c, 7])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["n", c, 7])], stats)
    graph = to_graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                     (c, 7))
    gamma, beta, mean, var = (numpy_helper.to_array(t).astype(np.float64) for t in stats)
    x = RNG.normal(size=(2, c, 7))
    want = (x - mean[:, None]) / np.sqrt(var[:, None] + 1e-5) * gamma[:, None] + beta[:, None]
    np.testing.assert_allclose(run(graph, x), want, atol=1e-6)


def test_rank_two_batch_norms_and_views_run_in_every_backend():
    """What the 1-D lowering leaves that no convolution absorbs (a BATCHNORM on a (C, L)
    value, RESHAPEs to and from views, a global pool of the view, a one-slope PRELU)
    through the enclave's ONNX, the parties and HE's slot evaluator, in process."""
    from veil.backends.he.evaluator import Evaluator
    from veil.backends.he.layout import pack_inputs, unpack_outputs
    from veil.backends.he.slot_engine import NumpySlotEngine
    from veil.backends.mpc import evaluator as ev
    from veil.backends.mpc.local import run_graph
    from veil.backends.tee.executor import RuntimeSpec, make_executor
    from veil.compiler.pipeline import compile_graph
    from veil.compiler.targets import lower

    torch.manual_seed(4)
    model = _randomize_bn(nn.Sequential(
        nn.BatchNorm1d(2), nn.PReLU(), nn.Conv1d(2, 3, 3, padding=1), nn.ELU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(3, 2)))
    graph = to_graph(model, (2, 12))
    assert graph.node(graph.nodes[1].name).op is Op.BATCHNORM
    x = RNG.uniform(-1.0, 1.0, size=(3, 2, 12))
    plain = run(graph, x)
    np.testing.assert_allclose(plain, _torch(model, x), atol=1e-5)
    tee = make_executor(lower(graph, "tee")[0], RuntimeSpec(), threads=1)(x)
    np.testing.assert_allclose(tee, plain, atol=1e-4)
    mpc, _ = run_graph(ev.lower_for_mpc(graph), x)
    np.testing.assert_allclose(mpc.reshape(plain.shape), plain, atol=1e-4)
    res = compile_graph(graph, RNG.uniform(-1.0, 1.0, size=(64, 2, 12)),
                        insecure_test_params=True)
    plan = res.he_plan()
    he = [unpack_outputs(Evaluator(res.lowered, plan).run(
        NumpySlotEngine(plan.params.slots, set(plan.rotations)),
        pack_inputs([xi], plan.manifest(), plan.params.slots)), plan.manifest(), 1)[0]
        for xi in x]
    np.testing.assert_allclose(np.stack(he).reshape(plain.shape), run(res.lowered, x),
                               atol=1e-8)
    np.testing.assert_allclose(run(res.lowered, x), plain, atol=0.05)


REFUSED = {
    "circular padding": (lambda: nn.Conv1d(1, 2, 3, padding=1, padding_mode="circular"),
                         "padding_mode"),
    "dilated max pool": (lambda: nn.MaxPool1d(2, dilation=2), "dilation"),
    "max pool indices": (lambda: nn.MaxPool1d(2, return_indices=True), "return_indices"),
    "same padding, even span": (lambda: nn.Conv1d(1, 2, 4, padding="same"), "same"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_1d_variants_are_refused_by_name(case):
    build, word = REFUSED[case]
    with pytest.raises(UnsupportedOperation, match=word):
        to_graph(nn.Sequential(build()).eval(), (1, 12))


def test_onnx_asymmetric_1d_pads_are_refused():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(RNG.normal(size=(2, 1, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 2], kernel_shape=[3])
    g = helper.make_graph([node], "c", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["n", 1, 10])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["n", 2, 10])], [w])
    with pytest.raises(UnsupportedOperation, match="asymmetric"):
        to_graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), (1, 10))


def test_onnx_prelu_slopes_broadcast_as_onnx_says():
    """A slope of shape (C, 1) is per channel; one of shape (L,) varies along the signal,
    which no PRELU holds, and is refused by name."""
    from onnx import TensorProto, helper, numpy_helper

    def model(slope):
        node = helper.make_node("PRelu", ["x", "s"], ["y"])
        g = helper.make_graph([node], "p", [helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, ["n", 3, 4])], [helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, ["n", 3, 4])],
            [numpy_helper.from_array(slope.astype(np.float32), "s")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    slope = np.array([[0.1], [0.5], [-0.2]])
    graph = to_graph(model(slope), (3, 4))
    x = RNG.normal(size=(2, 3, 4))
    np.testing.assert_allclose(run(graph, x), np.where(x >= 0, x, slope[None] * x),
                               atol=1e-7)
    with pytest.raises(UnsupportedOperation, match="varies within a channel"):
        to_graph(model(np.array([0.1, 0.2, 0.3, 0.4])), (3, 4))


# -- the leaky rectifiers ------------------------------------------------------------------

def _single(op, shape, attrs=None, params=None):
    nodes = [make_node("x", Op.INPUT, (), [], {"shape": shape})]
    nodes.append(make_node("y", op, ["x"], [shape], attrs or {}, params or {}))
    return Graph(tuple(nodes), "y")


def test_split_prelu_is_exact_and_leaves_one_slope_alone():
    from veil.compiler.prelu import split_prelu

    per = _single(Op.PRELU, (3, 8), params={"slope": np.array([0.2, -0.4, 1.5])})
    split, note = split_prelu(per)
    assert Op.PRELU not in {n.op for n in split.nodes} and note.messages
    x = RNG.normal(size=(4, 3, 8)) * 3
    np.testing.assert_allclose(run(split, x), run(per, x), atol=1e-12)
    same = _single(Op.PRELU, (3, 8), params={"slope": np.array([0.3, 0.3, 0.3])})
    kept, _ = split_prelu(same)
    assert [n.op for n in kept.nodes] == [Op.INPUT, Op.PRELU]
    assert kept.nodes[1].params["slope"].shape == (1,)
    np.testing.assert_allclose(run(kept, x), run(same, x), atol=1e-12)


MPC_CASES = {
    "leaky": (Op.LEAKYRELU, {"alpha": 0.01}, {}),
    "leaky-negative-slope": (Op.LEAKYRELU, {"alpha": -0.3}, {}),
    "prelu": (Op.PRELU, {}, {"slope": np.array([0.25, 0.0, 0.9])}),
    "elu": (Op.ELU, {"alpha": 1.0}, {}),
    "elu-alpha": (Op.ELU, {"alpha": 1.7}, {}),
}


@pytest.mark.parametrize("case", sorted(MPC_CASES))
def test_mpc_rectifiers_stay_within_their_stated_bounds(case):
    """On shares, in fixed point, against the reference kernel over [-300, 16] (ELU's
    clamp at -16 included) and densely near 0 (the comparisons' band)."""
    from veil.backends.mpc import evaluator as ev
    from veil.backends.mpc.local import run_graph
    from veil.backends.mpc.rectifiers import elu_bound, leaky_bound

    op, attrs, params = MPC_CASES[case]
    xs = np.concatenate([np.linspace(-300.0, 16.0, 2400), np.linspace(-1e-4, 1e-4, 240),
                         np.linspace(-8.0, 2.0, 2400)])
    x = xs.reshape(-1, 3, 8)
    graph = _single(op, (3, 8), attrs, params)
    got, _ = run_graph(ev.lower_for_mpc(graph), x)
    err = np.abs(got.reshape(x.shape) - run(graph, x)).max()
    slopes = params["slope"] if params else [attrs.get("alpha")]
    bound = elu_bound(attrs["alpha"]) if op is Op.ELU else \
        max(leaky_bound(float(s), 300.0) for s in slopes)
    assert err <= bound, (err, bound)
    assert bound < (4e-5 * max(1.0, attrs["alpha"]) if op is Op.ELU else 2e-4)


def test_he_fits_the_rectifiers_at_the_default_degree():
    """LeakyReLU and ELU become POLY nodes; at the same degree (27) ELU, smooth, fits
    far better than the kinked ones, so by default it takes a lower degree within 2^-8
    of its output span while they keep 27; a PReLU per channel fits its ReLU."""
    from veil.compiler.approx import DEFAULT_DEGREE
    from veil.compiler.pipeline import compile_graph

    model = ecg.trained_ecg_cnn()
    graph = to_graph(model, (1, ecg.LENGTH))
    res = compile_graph(graph, ecg.beats(200)[0], insecure_test_params=True,
                        degree=DEFAULT_DEGREE)
    fits = {r.function: r for r in res.activations}
    assert set(fits) == {"leakyrelu", "relu", "elu"}
    assert all(r.degree == DEFAULT_DEGREE for r in res.activations)
    rel = {k: r.max_abs_error_range / (r.hi - r.lo) for k, r in fits.items()}
    assert rel["elu"] < 2e-3 and rel["leakyrelu"] < 2e-2 and rel["relu"] < 2e-2
    assert rel["elu"] * 5 < rel["leakyrelu"]
    assert res.plan is not None and {n.op for n in res.lowered.nodes} <= {
        Op.INPUT, Op.DENSE, Op.POLY, Op.ADD}
    auto = compile_graph(graph, ecg.beats(200)[0], insecure_test_params=True)
    chosen = {r.function: r for r in auto.activations}
    assert chosen["elu"].degree < DEFAULT_DEGREE
    assert chosen["elu"].max_abs_error_range <= chosen["elu"].target
    assert chosen["leakyrelu"].degree == chosen["relu"].degree == DEFAULT_DEGREE
    assert auto.plan.depth < res.plan.depth


# -- the ECG model in every mode -------------------------------------------------------------

def test_ecg_beats_are_deterministic_and_the_shipped_model_classifies_them():
    x, y = ecg.beats(500, ecg.TEST_SEED)
    x2, y2 = ecg.beats(500, ecg.TEST_SEED)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, ecg.beats(500, ecg.TRAIN_SEED)[0])
    assert x.shape == (500, 1, ecg.LENGTH) and np.bincount(y).tolist() == [100] * 5
    assert ecg.accuracy(_torch(ecg.trained_ecg_cnn(), x), y) >= 0.97


@pytest.fixture(scope="module")
def ecg_compiled():
    model = ecg.trained_ecg_cnn()
    compiled = veil.compile(model, ecg.beats(200, ecg.TRAIN_SEED)[0],
                            insecure_test_params=True)
    x, y = ecg.beats(40, ecg.TEST_SEED)
    yield model, compiled, x, y, compiled.run(x, "plain")
    compiled.close()


def test_ecg_plain_equals_torch_and_its_onnx_export(ecg_compiled):
    model, compiled, x, _, plain = ecg_compiled
    assert compiled.input_shape == (1, ecg.LENGTH) and plain.shape == (len(x), 5)
    np.testing.assert_allclose(plain, _torch(model, x), atol=1e-5)
    from_onnx = to_graph(_onnx(model, (1, ecg.LENGTH)), (1, ecg.LENGTH))
    np.testing.assert_allclose(run(from_onnx, x), plain, atol=1e-5)


def test_ecg_simulate_agrees_with_plain(ecg_compiled):
    """HE's polynomial model: the fits' errors move the logits (up to ~2 of ~10 here),
    not the predicted beat types."""
    _, compiled, x, y, plain = ecg_compiled
    sim = compiled.run(x, "simulate")
    assert np.mean(sim.argmax(1) == plain.argmax(1)) >= 0.95
    assert np.abs(sim - plain).max() < 0.3 * np.abs(plain).max()


@pytest.mark.parametrize("mode,atol", [("tee", 1e-4), ("mpc", 5e-4)])
def test_ecg_tee_and_mpc_agree_with_plain(ecg_compiled, mode, atol):
    _, compiled, x, _, plain = ecg_compiled
    one = compiled.run(x[0], mode)
    batch = compiled.run(x[:8], mode)
    assert one.shape == (5,)
    np.testing.assert_allclose(one, plain[0], atol=atol, rtol=0)
    np.testing.assert_allclose(batch, plain[:8], atol=atol, rtol=0)


def test_ecg_under_he(ecg_compiled):
    """CKKS (insecure test parameters): the classes of plain on a handful of beats,
    and the logits of simulate up to the encryption noise."""
    _, compiled, x, _, plain = ecg_compiled
    he = compiled.run(x[:4], "he")
    assert np.array_equal(he.argmax(1), plain[:4].argmax(1))
    sim = compiled.run(x[:4], "simulate")
    assert np.abs(he - sim).max() < 1e-3 * np.abs(sim).max()
