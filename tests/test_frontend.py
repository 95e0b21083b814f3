"""Tests of veil.frontend: torch and ONNX models -> IR, checked against torch / numpy."""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
nn = torch.nn
F = torch.nn.functional

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from veil.errors import GraphError, InputError, UnsupportedOperation  # noqa: E402
from veil.frontend import to_graph  # noqa: E402
from veil.ir import Op, run  # noqa: E402
from veil.ir.head import run_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


# ---- models ---------------------------------------------------------------------------

def _randomize_bn(bn: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial running statistics and affine parameters."""
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
        bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return bn


class ConvBNActs(nn.Module):
    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = _randomize_bn(nn.BatchNorm2d(4), gen)
        self.pool = nn.MaxPool2d(2)
        self.gelu, self.silu, self.sig, self.tanh = nn.GELU(), nn.SiLU(), nn.Sigmoid(), nn.Tanh()

    def forward(self, x):
        x = self.pool(self.bn(self.conv(x)))
        x = self.gelu(x) + self.silu(x) + self.sig(x) + self.tanh(x)
        return x * x + torch.square(x) + x.pow(2) + x ** 2


class Residual(nn.Module):
    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = _randomize_bn(nn.BatchNorm2d(3), gen)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.conv2(y) + x
        y = nn.functional.adaptive_avg_pool2d(torch.relu(y), 1)
        return self.head(torch.flatten(y, 1))


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(48, 5)
        self.drop = nn.Dropout(0.3)
        self.ident = nn.Identity()

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = self.ident(self.drop(x))
        x = F.dropout(x, 0.2, self.training)
        x = x.view(x.size(0), -1)
        return self.fc(x)


class Reshapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding="same")
        self.avg = nn.AvgPool2d(3, stride=2, padding=1)
        self.gap = nn.AdaptiveAvgPool2d((1, 1))
        self.fa, self.fm = nn.Linear(36, 4), nn.Linear(16, 4)

    def forward(self, x):
        x = self.avg(self.conv(x))  # (4, 3, 3)
        a = x.reshape(x.shape[0], -1).view(-1, x.size(1) * x.size(2) * x.size(3))
        m = F.max_pool2d(x, 2, padding=1).view(x.size(0), -1)  # (4, 2, 2) -> 16
        b = self.gap(x).flatten(1) + x.mean((2, 3))
        b = b + x.mean(dim=(-2, -1), keepdim=True).view(x.size(0), 4)
        return torch.sigmoid(b) + self.fa(a) + self.fm(m)


def _models() -> dict:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    bn_mlp = nn.Sequential(nn.Linear(6, 8), _randomize_bn(nn.BatchNorm1d(8), gen), nn.ReLU(),
                           nn.Linear(8, 3), _randomize_bn(nn.BatchNorm1d(3, affine=False), gen))
    return {
        "mlp": (nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 4)), (30,)),
        "digits_cnn": (nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                     nn.Flatten(), nn.Linear(128, 10)), (1, 8, 8)),
        "conv_bn_acts": (ConvBNActs(gen), (2, 6, 6)),
        "bn1d_mlp": (bn_mlp, (6,)),
        "strided_conv": (nn.Sequential(nn.Conv2d(2, 3, (3, 5), stride=(2, 1), padding=(1, 2)),
                                       nn.Tanh(), nn.MaxPool2d(3, stride=2, padding=1),
                                       nn.Flatten(), nn.Linear(3 * 3 * 4, 2)), (2, 9, 7)),
        "residual": (Residual(gen), (3, 6, 6)),
        "adaptive_pool": (nn.Sequential(nn.Conv2d(1, 4, 3), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                        nn.Flatten(), nn.Linear(4, 3)), (1, 7, 7)),
        "functional": (Functional(), (1, 8, 8)),
        "reshapes": (Reshapes(), (2, 6, 6)),
    }


MODELS = _models()
ONNX_MODELS = ["mlp", "digits_cnn", "conv_bn_acts", "bn1d_mlp", "strided_conv", "residual",
               "adaptive_pool", "functional", "reshapes"]


def _reference(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The model evaluated in float64 on a copy (so float32 rounding does not blur the test)."""
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return ref(torch.tensor(x)).numpy()


def _batch(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(4,) + shape)


def _export(model: nn.Module, shape: tuple[int, ...], path: Path, dynamic: bool) -> Path:
    kwargs = {"input_names": ["x"], "output_names": ["y"]}
    if dynamic:
        kwargs["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.zeros((1,) + shape), str(path), dynamo=False,
                          opset_version=17, **kwargs)
    return path


# ---- torch path -----------------------------------------------------------------------

def test_import_does_not_load_torch_or_onnx():
    code = "import veil.frontend, sys; print('torch' in sys.modules, 'onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_models_match(name):
    model, shape = MODELS[name]
    graph = to_graph(model, shape)
    x = _batch(shape)
    expected = _reference(model, x)
    got = run(graph, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    assert graph.input.name == "input" and graph.input_shape == shape


def test_torch_node_structure_and_names():
    model, shape = MODELS["digits_cnn"]
    graph = to_graph(model, shape)
    assert graph.ops() == [Op.INPUT, Op.CONV2D, Op.RELU, Op.AVGPOOL2D, Op.RESHAPE, Op.LINEAR]
    conv = graph.nodes[1]
    assert conv.attrs["stride"] == (1, 1) and conv.attrs["padding"] == (1, 1)
    assert conv.params["weight"].dtype == np.float64
    assert graph.nodes[3].attrs == {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0),
                                    "ceil_mode": False, "count_include_pad": True}
    assert graph.output_shape == (10,)
    graph = to_graph(*MODELS["functional"])
    assert [n.name for n in graph.nodes] == ["input", "conv", "relu", "view", "fc"]


def test_mean_without_keepdim_reshapes_to_channels():
    graph = to_graph(*MODELS["reshapes"])
    means = [n for n in graph.nodes if n.op is Op.GLOBALAVGPOOL]
    assert len(means) == 3
    assert graph.node("mean_reshape").shape == (4,)


def test_bn_folded_into_scale_shift():
    bn = _randomize_bn(nn.BatchNorm2d(3, eps=1e-3), torch.Generator().manual_seed(3))
    graph = to_graph(nn.Sequential(bn), (3, 2, 2))
    node = graph.nodes[1]
    assert node.op is Op.BATCHNORM
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + 1e-3)
    np.testing.assert_allclose(node.params["scale"], scale.numpy(), rtol=1e-12)
    shift = bn.bias.detach().double() - bn.running_mean.double() * scale
    np.testing.assert_allclose(node.params["shift"], shift.numpy(), rtol=1e-12)


def test_train_mode_is_restored():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    model[1].eval()
    before = copy.deepcopy(model.state_dict())
    graph = to_graph(model, (4,))
    assert model.training and model[0].training and not model[1].training and model[2].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert graph.ops() == [Op.INPUT, Op.LINEAR, Op.BATCHNORM]


def test_scalar_constants_become_affine():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return torch.tanh(self.fc(x) * 0.5 + 1.0) / 4 - 2

    model = Scaled()
    graph = to_graph(model, (3,))
    assert graph.ops() == [Op.INPUT, Op.LINEAR, Op.TANH, Op.BATCHNORM]  # folded into fc
    x = _batch((3,))
    np.testing.assert_allclose(run(graph, x), _reference(model, x), atol=TOL, rtol=0)


def test_gelu_tanh_maps_to_gelu_with_log(caplog):
    with caplog.at_level("INFO", logger="veil.frontend"):
        graph = to_graph(nn.Sequential(nn.GELU(approximate="tanh")), (3,))
    assert graph.ops() == [Op.INPUT, Op.GELU]
    assert "approximate='tanh'" in caplog.text


class _Softmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        return self.softmax(self.fc(x))


class _LayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(4)

    def forward(self, x):
        return self.ln1(x)


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class _TwoOutputs(nn.Module):
    def forward(self, x):
        return torch.relu(x), torch.tanh(x)


class _RankMismatch(nn.Module):
    def forward(self, x):  # (B, 3, 1) * (B, 3) broadcasts the batch against features
        return torch.relu(x).view(x.size(0), 3, 1) * torch.tanh(x)


class _CatBatch(nn.Module):
    def forward(self, x):
        return torch.cat([x, torch.relu(x)])


class _ClampByTensor(nn.Module):
    def forward(self, x):
        return torch.clamp(x, min=torch.relu(x))


@pytest.mark.parametrize("model, shape, words", [
    (nn.Sequential(nn.Conv2d(2, 2, 4, padding="same")), (2, 7, 7), ["Conv2d", "'_0'", "same"]),
    (nn.Sequential(nn.Conv2d(2, 2, 2, padding="same", dilation=3)), (2, 7, 7), ["same"]),
    (nn.Sequential(nn.Conv2d(2, 2, 3, padding_mode="reflect")), (2, 7, 7), ["reflect"]),
    (nn.Sequential(nn.AvgPool2d(2, divisor_override=3)), (1, 5, 5),
     ["AvgPool2d", "divisor_override"]),
    (nn.Sequential(nn.MaxPool2d(2, dilation=2)), (1, 6, 6), ["MaxPool2d", "dilation"]),
    (nn.Sequential(nn.Flatten(0)), (3,), ["Flatten", "batch"]),
    (_Branchy(), (3,), ["trace", "control flow"]),
    (_TwoOutputs(), (3,), ["single tensor"]),
    (_RankMismatch(), (3,), ["mul", "ranks", "mix samples"]),
    (_CatBatch(), (3,), ["cat", "axis 0"]),
    (_ClampByTensor(), (3,), ["clamp", "constant number"]),
    (nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), (3,), ["running"]),
])
def test_torch_unsupported(model, shape, words):
    with pytest.raises(UnsupportedOperation) as info:
        to_graph(model, shape)
    for word in words:
        assert word in str(info.value)


def test_torch_wrong_input_shape_is_graph_error():
    with pytest.raises(GraphError, match="input_shape"):
        to_graph(MODELS["digits_cnn"][0], (1, 10, 10))


def test_bad_arguments():
    with pytest.raises(TypeError):
        to_graph(object(), (3,))
    with pytest.raises(InputError):
        to_graph(MODELS["mlp"][0], (0, 3))
    with pytest.raises(InputError, match="no ONNX file"):
        to_graph("/nonexistent/model.onnx", (3,))


# ---- ONNX path: exported models -----------------------------------------------------------

@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", ONNX_MODELS)
def test_onnx_exported_models_match(name, dynamic, tmp_path):
    model, shape = MODELS[name]
    path = _export(model, shape, tmp_path / f"{name}.onnx", dynamic)
    graph = to_graph(path, shape)
    x = _batch(shape, seed=1)
    # The exported weights are float32; compare against torch with the same weights.
    np.testing.assert_allclose(run(graph, x), _reference(model, x), atol=TOL, rtol=0)
    proto_graph = to_graph(onnx.load(str(path)), shape)
    assert proto_graph.ops() == graph.ops()


def test_onnx_activation_patterns_fused(tmp_path):
    model, shape = MODELS["conv_bn_acts"]
    graph = to_graph(str(_export(model, shape, tmp_path / "acts.onnx", False)), shape)
    ops = graph.ops()
    assert Op.GELU in ops and Op.SILU in ops  # from the erf and sigmoid decompositions
    # x * x, torch.square, x.pow(2), x ** 2 (the exporter may merge identical Pow nodes)
    assert ops.count(Op.SQUARE) >= 2 and Op.BATCHNORM not in ops


def test_onnx_input_shape_mismatch(tmp_path):
    path = _export(*MODELS["digits_cnn"], tmp_path / "digits.onnx", True)
    with pytest.raises(InputError) as info:
        to_graph(path, (1, 28, 28))
    assert "(1, 28, 28)" in str(info.value) and "(1, 8, 8)" in str(info.value)
    with pytest.raises(InputError):
        to_graph(path, (8, 8))


# ---- ONNX path: hand-built models -------------------------------------------------------

def _model(nodes, inits, x_shape, y_shape, opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) if np.asarray(v).dtype.kind == "f"
         else numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _f32(a):
    return np.asarray(a, np.float32).astype(np.float64)


def test_onnx_gemm_transb_alpha_beta():
    rng = np.random.default_rng(2)
    w, c = _f32(rng.normal(size=(3, 5))), _f32(rng.normal(size=(1, 3)))
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], alpha=0.5, beta=2.0, transB=1)
    graph = to_graph(_model([node], {"w": w, "c": c}, ["N", 5], ["N", 3]), (5,))
    x = _batch((5,))
    np.testing.assert_allclose(run(graph, x), 0.5 * x @ w.T + 2.0 * c, atol=1e-12)


def test_onnx_matmul_add_relu_folds_bias():
    rng = np.random.default_rng(3)
    w, b = _f32(rng.normal(size=(4, 2))), _f32(rng.normal(size=2))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
             helper.make_node("Relu", ["hb"], ["y"], name="act")]
    graph = to_graph(_model(nodes, {"w": w, "b": b}, [None, 4], [None, 2]), (4,))
    assert graph.ops() == [Op.INPUT, Op.LINEAR, Op.RELU]
    x = _batch((4,))
    np.testing.assert_allclose(run(graph, x), np.maximum(x @ w + b, 0), atol=1e-12)


def test_onnx_conv_pool_reshape_constant():
    rng = np.random.default_rng(4)
    w, b = _f32(rng.normal(size=(3, 2, 3, 3))), _f32(rng.normal(size=3))
    shape_const = helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(
        np.array([0, -1], np.int64)))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1]),
             helper.make_node("Mul", ["c", "c"], ["sq"]),
             helper.make_node("AveragePool", ["sq"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             shape_const, helper.make_node("Reshape", ["p", "s"], ["y"], name="flat")]
    graph = to_graph(_model(nodes, {"w": w, "b": b}, [1, 2, 4, 4], [1, 12]), (2, 4, 4))
    assert graph.ops() == [Op.INPUT, Op.CONV2D, Op.SQUARE, Op.AVGPOOL2D, Op.RESHAPE]
    x = _batch((2, 4, 4))
    with torch.no_grad():
        conv = F.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), padding=1)
        want = F.avg_pool2d(conv ** 2, 2).reshape(4, -1).numpy()
    np.testing.assert_allclose(run(graph, x), want, atol=1e-9)


def test_onnx_gelu_opset20():
    node = helper.make_node("Gelu", ["x"], ["y"])
    graph = to_graph(_model([node], {}, ["N", 3], ["N", 3], opset=20), (3,))
    assert graph.ops() == [Op.INPUT, Op.GELU]


@pytest.mark.parametrize("node, inits, words", [
    (helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=1), {}, ["Softmax", "'sm'"]),
    (helper.make_node("Div", ["c", "x"], ["y"], name="ratio"), {"c": np.ones(1)},
     ["Div", "'ratio'", "constant by a tensor"]),
    (helper.make_node("MaxPool", ["x"], ["y"], name="mp", kernel_shape=[2, 2],
                      dilations=[2, 2]), {}, ["MaxPool", "dilations"]),
    (helper.make_node("Conv", ["x", "w"], ["y"], name="pconv", pads=[0, 0, 1, 1]),
     {"w": np.ones((4, 4, 1, 1))}, ["asymmetric"]),
    (helper.make_node("Mul", ["x", "x2"], ["y"], name="m"),
     {"x2": np.arange(72.0).reshape(2, 4, 3, 3)}, ["'m'", "batch axis"]),
])
def test_onnx_unsupported(node, inits, words):
    model = _model([node], inits, ["N", 4, 3, 3], ["N", "C", "H", "W"])
    with pytest.raises(UnsupportedOperation) as info:
        to_graph(model, (4, 3, 3))
    for word in words:
        assert word in str(info.value)


def test_onnx_lstm_unsupported():
    rng = np.random.default_rng(5)
    inits = {"W": rng.normal(size=(1, 8, 3)), "R": rng.normal(size=(1, 8, 2))}
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="rnn", hidden_size=2)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, "N", 2])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOperation, match="LSTM.*'rnn'"):
        to_graph(model, (5, 3))


@pytest.mark.parametrize("model, shape", [(_LayerNorm(), (4,)), (_Softmax(), (4,))])
def test_modules_fx_cannot_map_convert_through_torch_onnx(model, shape):
    """fx has no mapping for layer norm and softmax; the torch.onnx fallback converts
    them, checked against the module (a final softmax is the client's output head)."""
    graph = to_graph(model.eval(), shape)
    x = np.random.default_rng(1).normal(size=(3,) + shape)
    with torch.no_grad():
        want = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(run_model(graph, x), want, atol=1e-5)


def test_an_export_that_drops_an_attribute_is_refused():
    """torch.onnx exports AvgPool2d(divisor_override=3) as a plain average: the probe
    check catches the difference instead of compiling the wrong model."""
    with pytest.raises(UnsupportedOperation, match="computes something else"):
        to_graph(nn.Sequential(nn.AvgPool2d(2, divisor_override=3)).eval(), (1, 5, 5))
