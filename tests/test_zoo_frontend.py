"""The model zoo through both frontends: torchvision's ImageNet models and ResNet-20,
from the nn.Module (torch.fx) and from their ONNX export, against torch.

The default run covers ResNet-20 and one small model per new op mapping; the
224x224 models are ``slow``.
"""
from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
nn = torch.nn
F = torch.nn.functional

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from veil.compare import zoo  # noqa: E402
from veil.errors import GraphError, InputError  # noqa: E402
from veil.frontend import to_graph  # noqa: E402
from veil.ir import Op, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-4  # max abs error / logit range, against torch


def _export(model: nn.Module, shape: tuple[int, ...], path: Path, dynamic: bool = True,
            opset: int = 17) -> Path:
    kwargs = {"input_names": ["x"], "output_names": ["y"]}
    if dynamic:
        kwargs["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.zeros((1,) + shape), str(path), dynamo=False,
                          opset_version=opset, **kwargs)
    return path


def _reference(model: nn.Module, x: np.ndarray, double: bool = True) -> np.ndarray:
    ref = copy.deepcopy(model).eval()
    ref = ref.double() if double else ref.float()
    with torch.no_grad():
        return ref(torch.tensor(x, dtype=torch.float64 if double else torch.float32)).numpy()


def _assert_agrees(got: np.ndarray, want: np.ndarray, rel: float = REL_TOL) -> float:
    """Max abs error within ``rel`` of the output range; returns the relative error."""
    assert got.shape == want.shape
    err = float(np.abs(got - want).max()) / float(np.ptp(want))
    assert np.ptp(want) > 0 and err <= rel, f"max abs error {err:.2e} x range"
    return err


# ---- the zoo ------------------------------------------------------------------------

def test_zoo_table():
    assert list(zoo.ZOO) == ["resnet18", "resnet50", "vgg16", "mobilenet_v2",
                             "efficientnet_b0", "resnet20"]
    claims = {name: e.claimed_he_ms for name, e in zoo.ZOO.items()}
    assert claims == {"resnet18": 9.8, "resnet50": None, "vgg16": 24.3, "mobilenet_v2": 4.1,
                      "efficientnet_b0": 2.9, "resnet20": None}
    assert zoo.ZOO["resnet20"].input_shape == (3, 32, 32)
    assert all(e.input_shape == (3, 224, 224) for n, e in zoo.ZOO.items() if n != "resnet20")
    with pytest.raises(InputError, match="resnet18"):
        zoo.build("resnet21")


def test_zoo_import_is_light():
    code = ("import sys, veil.compare.zoo; "
            "print(any(m in sys.modules for m in ('torch', 'torchvision', 'sklearn')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["False"]


def test_sample_images_deterministic_and_normalised():
    a = zoo.sample_images((3, 32, 32), 6, seed=3)
    assert a.shape == (6, 3, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, zoo.sample_images((3, 32, 32), 6, seed=3))
    assert not np.array_equal(a, zoo.sample_images((3, 32, 32), 6, seed=4))
    assert len({img.tobytes() for img in a}) == 6  # distinct crops
    # ImageNet normalisation of natural photos: roughly centred, unit-scale values
    assert abs(float(a.mean())) < 1.0 and 0.3 < float(a.std()) < 2.0
    assert zoo.sample_images((1, 8, 12), 2).shape == (2, 1, 8, 12)
    with pytest.raises(InputError):
        zoo.sample_images((2, 8, 8), 1)
    with pytest.raises(InputError):
        zoo.sample_images((3, 8, 8), 0)


@pytest.fixture(scope="module")
def resnet20():
    return zoo.build("resnet20", seed=0)


def test_resnet20_architecture(resnet20):
    params = sum(p.numel() for p in resnet20.parameters())
    assert 0.26e6 < params < 0.28e6  # 0.27M (He et al. 2016, Table 6) + 2,560 projection
    assert not resnet20.training
    convs = [m for m in resnet20.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 18 + 2  # stem, 9 blocks x 2, two 1x1 projections
    assert sum(m.kernel_size == (1, 1) for m in convs) == 2


def test_build_is_deterministic(resnet20):
    again = zoo.build("resnet20", seed=0)
    for key, value in resnet20.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    other = zoo.build("resnet20", seed=1, calibration_images=4)
    assert not torch.equal(other.fc.weight, resnet20.fc.weight)


def test_calibrated_logits_are_not_degenerate(resnet20):
    x = zoo.sample_images((3, 32, 32), 16, seed=100)  # not the calibration photos
    logits = _reference(resnet20, x, double=False)
    top2 = np.sort(logits, axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    assert 0.3 < float(logits.std()) < 3.0  # calibrated to unit std on other photos
    assert len(set(logits.argmax(axis=1).tolist())) >= 3  # the class depends on the image
    assert float(np.median(margins)) > 0.05 and float(logits.std(axis=0).mean()) > 0.2


def test_batchnorm_calibration_normalises_activations(resnet20):
    seen = []
    # clone: the block applies an in-place ReLU to this output
    hook = resnet20.layers[4].bn1.register_forward_hook(
        lambda m, a, out: seen.append(out.clone()))
    try:
        with torch.no_grad():  # the calibration photos
            resnet20(torch.from_numpy(zoo.sample_images((3, 32, 32), 16, seed=1)))
    finally:
        hook.remove()
    out = seen[0].transpose(0, 1).reshape(seen[0].shape[1], -1)
    np.testing.assert_allclose(out.mean(dim=1).numpy(), 0.0, atol=1e-3)
    np.testing.assert_allclose(out.std(dim=1).numpy(), 1.0, atol=1e-3)


def test_resnet20_torch_frontend_matches(resnet20):
    graph = to_graph(resnet20, (3, 32, 32))
    ops = graph.ops()
    assert ops.count(Op.CONV2D) == 21 and ops.count(Op.ADD) == 9
    assert ops.count(Op.BATCHNORM) == 21 and ops.count(Op.RELU) == 19
    x = zoo.sample_images((3, 32, 32), 4, seed=7).astype(np.float64)
    got = run(graph, x)
    _assert_agrees(got, _reference(resnet20, x), rel=1e-9)
    _assert_agrees(got, _reference(resnet20, x, double=False))


def test_resnet20_onnx_frontend_matches(resnet20, tmp_path):
    path = _export(resnet20, (3, 32, 32), tmp_path / "resnet20.onnx")
    graph = to_graph(path, (3, 32, 32))
    assert graph.ops().count(Op.ADD) == 9
    x = zoo.sample_images((3, 32, 32), 4, seed=7).astype(np.float64)
    _assert_agrees(run(graph, x), _reference(resnet20, x))


def test_wrong_input_size_is_typed_error(resnet20, tmp_path):
    with pytest.raises(GraphError, match="input_shape"):
        to_graph(resnet20, (1, 32, 32))  # channels
    with pytest.raises(GraphError, match="input_shape"):
        to_graph(resnet20, (32, 32))  # rank
    path = _export(resnet20, (3, 32, 32), tmp_path / "static.onnx", dynamic=False)
    with pytest.raises(InputError, match=r"\(3, 32, 32\)"):
        to_graph(path, (3, 224, 224))
    graph = to_graph(resnet20, (3, 32, 32))
    with pytest.raises(GraphError, match="expects"):
        run(graph, np.zeros((1, 3, 28, 28)))


# ---- one small model per op mapping ---------------------------------------------------

class _SE(nn.Module):
    """EfficientNet's squeeze-excitation: x * sigmoid(fc2(silu(fc1(gap(x)))))."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)
        self.act, self.gate = nn.SiLU(inplace=True), nn.Sigmoid()

    def forward(self, x):
        s = self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return s * x


class _Clamps(nn.Module):
    def forward(self, x):
        a = F.relu6(x * 4) + nn.functional.hardtanh(x, -0.5, 0.25)
        b = torch.clamp(x, min=0.5) + x.clamp(max=-0.2) + torch.clip(x, -1.0, 1.0)
        return a + b + torch.clamp(x, min=0.0)


class _Residuals(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        y += x
        return torch.mul(y - torch.tanh(x), torch.sigmoid(y)) * 0.5


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        return torch.relu(torch.cat([self.a(x), self.b(x), x], dim=1))


class _Dropped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.sd, self.drop, self.ident = StochasticDepth(0.5, "row"), nn.Dropout(0.5), nn.Identity()

    def forward(self, x):
        return self.ident(self.drop(self.sd(self.conv(x)) + x))


def _op_models() -> dict:
    torch.manual_seed(0)
    return {
        "grouped_conv": (nn.Sequential(
            nn.Conv2d(4, 6, 3, groups=2, padding=2, dilation=2), nn.ReLU6(),
            nn.Conv2d(6, 6, 3, stride=2, groups=6, padding=1, bias=False),
            nn.Conv2d(6, 2, 1)), (4, 9, 9), [Op.CONV2D, Op.CLIP]),
        "relu6_clamp": (_Clamps(), (3, 4, 4), [Op.CLIP, Op.RELU]),
        "hardswish": (nn.Sequential(nn.Conv2d(2, 3, 1), nn.Hardswish(),
                                    nn.Conv2d(3, 3, 1)), (2, 5, 5), [Op.HARDSWISH]),
        "hardsigmoid": (nn.Sequential(nn.Conv2d(2, 3, 1), nn.Hardsigmoid()), (2, 5, 5),
                        [Op.HARDSIGMOID]),
        "se_mul": (_SE(), (4, 6, 6), [Op.MUL, Op.GLOBALAVGPOOL, Op.SIGMOID, Op.SILU]),
        "ceil_maxpool": (nn.Sequential(nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
                                       nn.AvgPool2d(2, ceil_mode=True),
                                       nn.AvgPool2d(3, 1, padding=1, count_include_pad=False)),
                         (2, 10, 10), [Op.MAXPOOL2D, Op.AVGPOOL2D]),
        "concat": (_Cat(), (2, 5, 5), [Op.CONCAT]),
        "residual_sub_mul": (_Residuals(), (3, 4, 4), [Op.ADD, Op.SUB, Op.MUL]),
        "dropout_removed": (_Dropped(), (2, 4, 4), []),
        "adaptive_pools": (nn.Sequential(nn.AdaptiveAvgPool2d((5, 5)), nn.AdaptiveAvgPool2d(3),
                                         nn.AdaptiveAvgPool2d((1, 3))), (2, 5, 5),
                           [Op.LINEAR, Op.AVGPOOL2D]),
    }


OP_MODELS = _op_models()


def _random_bn_free_input(shape, seed=0):
    return np.random.default_rng(seed).normal(size=(4,) + shape) * 3  # reaches the clip ends


@pytest.mark.parametrize("name", sorted(OP_MODELS))
def test_op_mapping_torch(name):
    model, shape, ops = OP_MODELS[name]
    graph = to_graph(model, shape)
    for op in ops:
        assert op in graph.ops(), (op, graph.ops())
    x = _random_bn_free_input(shape)
    np.testing.assert_allclose(run(graph, x), _reference(model, x), atol=1e-9, rtol=0)


# torch's ONNX exporter refuses adaptive pools whose output does not divide the input
@pytest.mark.parametrize("name", sorted(set(OP_MODELS) - {"adaptive_pools"}))
def test_op_mapping_onnx(name, tmp_path):
    model, shape, ops = OP_MODELS[name]
    graph = to_graph(_export(model, shape, tmp_path / f"{name}.onnx"), shape)
    for op in ops:
        assert op in graph.ops(), (op, graph.ops())
    x = _random_bn_free_input(shape)
    np.testing.assert_allclose(run(graph, x), _reference(model, x), atol=1e-5, rtol=0)


def test_dropout_and_stochastic_depth_leave_no_node():
    model, shape, _ = OP_MODELS["dropout_removed"]
    assert to_graph(model, shape).ops() == [Op.INPUT, Op.CONV2D, Op.ADD]


def test_relu6_is_one_clip_node():
    graph = to_graph(nn.Sequential(nn.ReLU6()), (3,))
    assert graph.ops() == [Op.INPUT, Op.CLIP]
    assert (graph.nodes[1].attrs["lo"], graph.nodes[1].attrs["hi"]) == (0.0, 6.0)


def test_adaptive_pool_of_the_input_size_is_removed():
    graph = to_graph(nn.Sequential(nn.Conv2d(2, 2, 1), nn.AdaptiveAvgPool2d((7, 7))), (2, 7, 7))
    assert graph.ops() == [Op.INPUT, Op.CONV2D]


# ---- hand-built ONNX: attribute and input variants ---------------------------------

def _model(nodes, inits, x_shape, y_shape, opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_onnx_hardsigmoid_alpha_beta():
    torch_style = helper.make_node("HardSigmoid", ["x"], ["y"], alpha=1 / 6, beta=0.5)
    graph = to_graph(_model([torch_style], {}, ["N", 2, 3, 3], ["N", 2, 3, 3]), (2, 3, 3))
    assert graph.ops() == [Op.INPUT, Op.HARDSIGMOID]
    onnx_default = helper.make_node("HardSigmoid", ["x"], ["y"])  # alpha 0.2, beta 0.5
    graph = to_graph(_model([onnx_default], {}, ["N", 2, 3, 3], ["N", 2, 3, 3]), (2, 3, 3))
    assert graph.ops() == [Op.INPUT, Op.BATCHNORM, Op.CLIP]
    x = _random_bn_free_input((2, 3, 3))
    np.testing.assert_allclose(run(graph, x), np.clip(0.2 * x + 0.5, 0, 1), atol=1e-12)


@pytest.mark.parametrize("opset, make, want", [
    (6, lambda: helper.make_node("Clip", ["x"], ["y"], min=-1.0, max=2.0),
     lambda x: np.clip(x, -1, 2)),
    (17, lambda: helper.make_node("Clip", ["x", "lo"], ["y"]), lambda x: np.maximum(x, 0.5)),
    (17, lambda: helper.make_node("Clip", ["x", "", "hi"], ["y"]), lambda x: np.minimum(x, 6)),
    (17, lambda: helper.make_node("Clip", ["x", "lo", "hi"], ["y"]),
     lambda x: np.clip(x, 0.5, 6)),
])
def test_onnx_clip_bounds(opset, make, want):
    inits = {"lo": np.float32(0.5), "hi": np.float32(6.0)} if opset > 6 else {}
    node = make()
    inits = {k: v for k, v in inits.items() if k in node.input}
    graph = to_graph(_model([node], inits, ["N", 2, 3], ["N", 2, 3], opset), (2, 3))
    x = _random_bn_free_input((2, 3)) * 3
    np.testing.assert_allclose(run(graph, x), want(x), atol=1e-12)


def test_onnx_grouped_conv_same_pad_and_pool_variants():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], group=4, auto_pad="SAME_UPPER",
                              dilations=[2, 2]),
             helper.make_node("HardSwish", ["c"], ["h"]),
             helper.make_node("AveragePool", ["h"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              strides=[2, 2], count_include_pad=0, ceil_mode=1),
             helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                              ceil_mode=1)]
    graph = to_graph(_model(nodes, {"w": w}, ["N", 4, 7, 7], ["N", 4, 2, 2]), (4, 7, 7))
    assert graph.ops() == [Op.INPUT, Op.CONV2D, Op.HARDSWISH, Op.AVGPOOL2D, Op.MAXPOOL2D]
    x = _random_bn_free_input((4, 7, 7))
    with torch.no_grad():
        t = F.conv2d(torch.tensor(x), torch.tensor(w, dtype=torch.float64), padding=2,
                     dilation=2, groups=4)
        t = F.avg_pool2d(F.hardswish(t), 3, 2, 1, ceil_mode=True, count_include_pad=False)
        want = F.max_pool2d(t, 2, 2, ceil_mode=True).numpy()
    np.testing.assert_allclose(run(graph, x), want, atol=1e-12)


def test_onnx_two_tensor_arithmetic_broadcasts():
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"]),
             helper.make_node("Sigmoid", ["g"], ["s"]),
             helper.make_node("Mul", ["x", "s"], ["m"]),
             helper.make_node("Sub", ["m", "g"], ["d"]),
             helper.make_node("Add", ["d", "x"], ["a"]),
             helper.make_node("Concat", ["a", "x"], ["y"], axis=1)]
    graph = to_graph(_model(nodes, {}, ["N", 2, 3, 3], ["N", 4, 3, 3]), (2, 3, 3))
    assert [Op.MUL, Op.SUB, Op.ADD, Op.CONCAT] == graph.ops()[-4:]
    x = _random_bn_free_input((2, 3, 3))
    g = x.mean(axis=(2, 3), keepdims=True)
    want = np.concatenate([x / (1 + np.exp(-g)) - g + x, x], axis=1)
    np.testing.assert_allclose(run(graph, x), want, atol=1e-12)


# ---- the 224x224 torchvision models (slow) -------------------------------------------

IMAGENET = ["resnet18", "resnet50", "vgg16", "mobilenet_v2", "efficientnet_b0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_models_match_torch(name, tmp_path):
    """Both frontends agree with torch within 1e-4 of the logit range on photos."""
    model = zoo.build(name, seed=0)
    x = zoo.sample_images((3, 224, 224), 2, seed=11).astype(np.float64)
    with torch.no_grad():  # in place, not on copies: VGG-16 is 0.5 GB in float32
        want32 = model(torch.tensor(x, dtype=torch.float32)).numpy()
        want = model.double()(torch.tensor(x)).numpy()
        model.float()  # exact: the weights were float32
    assert np.ptp(want) > 1.0 and len(set(want.argmax(axis=1).tolist())) == 2
    graph = to_graph(model, (3, 224, 224))
    got = run(graph, x)
    errors = {"module_vs_float64": _assert_agrees(got, want, rel=1e-9),
              "module_vs_float32": _assert_agrees(got, want32)}
    del graph, got
    gc.collect()
    path = _export(model, (3, 224, 224), tmp_path / f"{name}.onnx")
    del model  # VGG-16: keep the float32 model, the ONNX weights and the graph apart
    gc.collect()
    errors["onnx_vs_float64"] = _assert_agrees(run(to_graph(path, (3, 224, 224)), x), want)
    print(name, f"logit range {np.ptp(want):.2f}",
          {k: f"{v:.1e}" for k, v in errors.items()})  # max abs error / logit range


_MEASURE = """
import json, time
import psutil, torch, torchvision
from veil.frontend import to_graph

def peak_mib():
    # VmHWM, not ru_maxrss: the latter survives exec, so a child of a big pytest
    # process would report its parent's peak
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024

model = torchvision.models.resnet18(weights=None).eval()  # the cost does not depend on values
before = psutil.Process().memory_info().rss / 2**20
start = time.perf_counter()
graph = to_graph(model, (3, 224, 224))
seconds = time.perf_counter() - start
peak = peak_mib()
import sys, warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(model, torch.zeros(1, 3, 224, 224), sys.argv[1], dynamo=False,
                      opset_version=17)
start = time.perf_counter()
onnx_nodes = len(to_graph(sys.argv[1], (3, 224, 224)).nodes)
onnx_seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_before_mib": before, "peak_rss_mib": peak,
                  "peak_over_before_mib": peak - before, "nodes": len(graph.nodes),
                  "onnx_seconds": onnx_seconds, "onnx_nodes": onnx_nodes}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_resnet18_frontend_time_and_memory(tmp_path):
    """to_graph on ResNet-18 must be a small share of the 30 s / 4 GiB compile budget."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "r18.onnx")],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=600)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(m)
    assert m["seconds"] < 5.0 and m["peak_over_before_mib"] < 512 and m["peak_rss_mib"] < 1536
    assert m["onnx_seconds"] < 5.0


def test_weights_of_any_float_dtype_are_copied_not_shared():
    """Conv/linear weights reach the IR as views (one float64 copy, made by the node);
    other dtypes are converted, and the model's own weights never change."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2)).to(torch.bfloat16)
    graph = to_graph(model, (2, 4, 4))
    conv = graph.nodes[1].params["weight"]
    assert conv.dtype == np.float64 and not conv.flags.writeable
    np.testing.assert_array_equal(conv, model[0].weight.detach().double().numpy())
    model32 = nn.Sequential(nn.Linear(3, 2))
    graph = to_graph(model32, (3,))
    with torch.no_grad():
        model32[0].weight.add_(1.0)  # later edits to the model do not reach the graph
    assert not np.allclose(graph.nodes[1].params["weight"],
                           model32[0].weight.detach().double().numpy())
