"""The enclave's model runtimes (veil/backends/tee/executor.py) against the interpreter:
every op in small graphs (table-driven), a ResNet-20-like CIFAR model through the real
enclave and baseline processes, and the 224x224 zoo models (slow).

Tolerances: onnxruntime and torch in float32 agree with the float64 interpreter within
float32 rounding (FLOAT32_TOL, relative to the output's scale); torch in float64 within
1e-10."""
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

from veil.backends.tee import SoftwareAttester, TEEClient, PlaintextClient, Policy
from veil.backends.tee import TrustedAttester, bundle, executor, onnx_kernels, torch_kernels
from veil.backends.tee.executor import RuntimeSpec, make_executor
from veil.errors import InputError, TEEError, UnsupportedOperation
from veil.ir import Graph, Op, interpreter, make_node, ops_for

from trees_util import random_ensemble

FLOAT32_TOL = 2e-5
SPECS = [RuntimeSpec("onnxruntime", "float32"), RuntimeSpec("torch", "float32"),
         RuntimeSpec("torch", "float64")]


def _tol(spec: RuntimeSpec) -> float:
    return 1e-10 if spec.dtype == "float64" else FLOAT32_TOL


class _G:
    """A graph under construction: ``add(op, inputs, attrs, params)`` -> name."""

    def __init__(self, shape):
        self.nodes = [make_node("x", Op.INPUT, [], [], {"shape": shape})]

    def add(self, op, inputs, attrs=None, params=None):
        shapes = {n.name: n.shape for n in self.nodes}
        name = f"n{len(self.nodes)}"
        self.nodes.append(make_node(name, op, inputs, [shapes[i] for i in inputs],
                                    attrs, params))
        return name

    def graph(self):
        return Graph(tuple(self.nodes), self.nodes[-1].name)


def _rng():
    return np.random.default_rng(7)


def _conv(shape, co, k, **attrs):
    g, r = _G(shape), _rng()
    groups = attrs.get("groups", 1)
    g.add(Op.CONV2D, ["x"], attrs, {"weight": r.normal(size=(co, shape[0] // groups, k, k)),
                                    "bias": r.normal(size=co)})
    return g.graph()


def _unary(op, in_shape=(3, 5, 5), **attrs):
    g = _G(in_shape)
    g.add(op, ["x"], attrs)
    return g.graph()


def _prelu(slope, in_shape=(3, 5, 5)):
    g = _G(in_shape)
    g.add(Op.PRELU, ["x"], {}, {"slope": slope})
    return g.graph()


def _pool(op, shape=(2, 7, 6), **attrs):
    return _unary(op, shape, **attrs)


def _binary(op, broadcast):
    g = _G((4, 5, 5) if broadcast != "rank" else (2, 5))
    if broadcast == "channel":      # (4,5,5) with (4,1,1): squeeze-excite's gating
        other = g.add(Op.SIGMOID, [g.add(Op.GLOBALAVGPOOL, ["x"])])
    elif broadcast == "rank":       # (2,5) with (5,): per-sample ranks aligned
        other = g.add(Op.DENSE, ["x"], {"shape": (5,)},
                      {"matrix": _rng().normal(size=(5, 10)), "bias": np.ones(5)})
    else:
        other = g.add(Op.TANH, ["x"])
    g.add(op, ["x", other])
    return g.graph()


def _concat(axis):
    g = _G((3, 4, 4))
    g.add(Op.CONCAT, ["x", g.add(Op.RELU, ["x"]), g.add(Op.SQUARE, ["x"])], {"axis": axis})
    return g.graph()


def _linear():
    g, r = _G((2, 6)), _rng()
    g.add(Op.LINEAR, ["x"], {}, {"weight": r.normal(size=(3, 6)), "bias": r.normal(size=3)})
    return g.graph()


def _batchnorm(shape):
    g, r = _G(shape), _rng()
    g.add(Op.BATCHNORM, ["x"], {}, {"scale": r.normal(size=shape[0]),
                                    "shift": r.normal(size=shape[0])})
    return g.graph()


def _dense():
    g, r = _G((2, 3, 3)), _rng()
    g.add(Op.DENSE, ["x"], {"shape": (4, 2)}, {"matrix": r.normal(size=(8, 18)),
                                                "bias": r.normal(size=8)})
    return g.graph()


def _poly(coeffs):
    return _unary(Op.POLY, (6,), coeffs=coeffs, lo=-3.0, hi=2.0, source="relu")


def _gather():
    return _unary(Op.GATHER, (2, 3), indices=(5, -1, 0, 0, 3, -1, 2))


def _reshape():
    return _unary(Op.RESHAPE, (2, 3, 4), shape=(4, 6))


# -- transformer ops (tokens 5, features 8, heads 2) --------------------------------------

VOCAB = 11


def _embed():
    g = _G((2, 3))                  # token ids of any per-sample shape
    g.add(Op.EMBED, ["x"], {}, {"table": _rng().normal(size=(VOCAB, 8))})
    return g.graph()


def _token_ids(shape):
    return _rng().integers(0, VOCAB, size=shape).astype(np.float64)


def _affine(scale_shape, shift_shape):
    g, r = _G((5, 8)), _rng()
    g.add(Op.AFFINE, ["x"], {}, {"scale": r.normal(size=scale_shape),
                                 "shift": r.normal(size=shift_shape)})
    return g.graph()


def _matmul(broadcast):
    """(3,4,4) @ (3,4,4); with a (1,4,4) right operand (leading axes broadcast); with a
    (4,4) one (per-sample ranks aligned)."""
    g = _G((3, 4, 4))
    other = g.add(Op.TANH, ["x"])
    if broadcast != "same":
        other = g.add(Op.SLICE, [other], {"axis": 0, "start": 1, "stop": 2})
    if broadcast == "rank":
        other = g.add(Op.RESHAPE, [other], {"shape": (4, 4)})
    g.add(Op.MATMUL, ["x", other])
    return g.graph()


def _attention():
    """One self-attention block as the ONNX frontend emits BERT's: per-head reshapes and
    transposes, scores scaled and masked, softmax, heads merged, residual, layer norm."""
    g, r = _G((5, 8)), _rng()

    def heads(perm):
        y = g.add(Op.LINEAR, ["x"], {}, {"weight": r.normal(size=(8, 8)) / 3,
                                         "bias": r.normal(size=8)})
        return g.add(Op.TRANSPOSE, [g.add(Op.RESHAPE, [y], {"shape": (5, 2, 4)})],
                     {"perm": perm})
    q, k, v = heads((1, 0, 2)), heads((1, 2, 0)), heads((1, 0, 2))
    s = g.add(Op.AFFINE, [g.add(Op.MATMUL, [q, k])], {},
              {"scale": np.array(0.5), "shift": np.array([0, 0, 0, -1e4, -1e4])})
    o = g.add(Op.MATMUL, [g.add(Op.SOFTMAX, [s]), v])
    o = g.add(Op.RESHAPE, [g.add(Op.TRANSPOSE, [o], {"perm": (1, 0, 2)})], {"shape": (5, 8)})
    g.add(Op.LAYERNORM, [g.add(Op.ADD, [o, "x"])], {"eps": 1e-5},
          {"weight": r.normal(size=8), "bias": r.normal(size=8)})
    return g.graph()


def _layernorm():
    g, r = _G((5, 8)), _rng()
    g.add(Op.LAYERNORM, ["x"], {"eps": 1e-3}, {"weight": r.normal(size=8),
                                               "bias": r.normal(size=8)})
    return g.graph()


def _reciprocal():
    """1 / (x^2 + 1/2): inputs inside the op's positive range."""
    g = _G((5, 8))
    y = g.add(Op.AFFINE, [g.add(Op.SQUARE, ["x"])], {},
              {"scale": np.array(1.0), "shift": np.array(0.5)})
    g.add(Op.RECIPROCAL, [y])
    return g.graph()


def _pooled():
    """Masked mean pooling, as sentence encoders end: sum over tokens / token count."""
    g = _G((5, 8))
    mask = g.add(Op.SIGMOID, [g.add(Op.SLICE, ["x"], {"axis": 1, "start": 0, "stop": 1})])
    total = g.add(Op.REDUCESUM, [g.add(Op.MUL, ["x", mask])], {"axes": (0,)})
    count = g.add(Op.REDUCESUM, [mask], {"axes": (0,)})
    g.add(Op.MUL, [total, g.add(Op.RECIPROCAL, [count])])
    return g.graph()


def _trees():
    g = _G((12,))
    g.add(Op.TREE_ENSEMBLE, ["x"], {}, random_ensemble(_rng(), 12, n_trees=5, depth=4))
    return g.graph()


CASES = {
    "linear": _linear,
    "conv2d": lambda: _conv((3, 7, 7), 4, 3),
    "conv2d-stride-pad": lambda: _conv((3, 8, 7), 5, 3, stride=(2, 1), padding=(1, 2)),
    "conv2d-dilated": lambda: _conv((2, 9, 9), 3, 3, dilation=(2, 2), padding=(2, 2)),
    "conv2d-depthwise": lambda: _conv((4, 6, 6), 4, 3, groups=4, padding=(1, 1),
                                      stride=(2, 2)),
    "conv2d-grouped": lambda: _conv((4, 6, 6), 6, 1, groups=2),
    "batchnorm": lambda: _batchnorm((3, 4, 4)),
    "batchnorm-vector": lambda: _batchnorm((5,)),
    "relu": lambda: _unary(Op.RELU),
    "clip-relu6": lambda: _unary(Op.CLIP, lo=0.0, hi=6.0),
    "clip-hardtanh": lambda: _unary(Op.CLIP, lo=-1.0, hi=0.5),
    "gelu": lambda: _unary(Op.GELU),
    "silu": lambda: _unary(Op.SILU),
    "sigmoid": lambda: _unary(Op.SIGMOID),
    "tanh": lambda: _unary(Op.TANH),
    "hardsigmoid": lambda: _unary(Op.HARDSIGMOID),
    "hardswish": lambda: _unary(Op.HARDSWISH),
    "leakyrelu": lambda: _unary(Op.LEAKYRELU, alpha=0.2),
    "prelu-per-channel": lambda: _prelu(np.array([0.25, -0.5, 0.0])),
    "prelu-one-slope-vector": lambda: _prelu(np.array([0.3]), (4,)),
    "elu": lambda: _unary(Op.ELU, alpha=0.7),
    "square": lambda: _unary(Op.SQUARE),
    "avgpool": lambda: _pool(Op.AVGPOOL2D, kernel=(2, 2), stride=(2, 2)),
    "avgpool-ceil-pad": lambda: _pool(Op.AVGPOOL2D, kernel=(3, 3), stride=(2, 2),
                                      padding=(1, 1), ceil_mode=True),
    "avgpool-ceil-pad-exclude": lambda: _pool(Op.AVGPOOL2D, kernel=(3, 2), stride=(2, 2),
                                              padding=(1, 1), ceil_mode=True,
                                              count_include_pad=False),
    "maxpool": lambda: _pool(Op.MAXPOOL2D, kernel=(3, 3), stride=(2, 2), padding=(1, 1)),
    "maxpool-ceil-pad": lambda: _pool(Op.MAXPOOL2D, kernel=(3, 3), stride=(2, 2),
                                      padding=(1, 1), ceil_mode=True),
    "avgpool-ceil-overhang": lambda: _pool(Op.AVGPOOL2D, (1, 6, 6), kernel=(3, 3),
                                           stride=(2, 2), ceil_mode=True),
    "maxpool-ceil": lambda: _pool(Op.MAXPOOL2D, kernel=(2, 2), stride=(2, 2), ceil_mode=True),
    "globalavgpool": lambda: _unary(Op.GLOBALAVGPOOL),
    "reshape": _reshape,
    "concat-channels": lambda: _concat(0),
    "concat-width": lambda: _concat(2),
    "add": lambda: _binary(Op.ADD, "same"),
    "sub-rank": lambda: _binary(Op.SUB, "rank"),
    "mul-broadcast": lambda: _binary(Op.MUL, "channel"),
    "mul-rank": lambda: _binary(Op.MUL, "rank"),
    "dense": _dense,
    "poly": lambda: _poly((0.3, -1.2, 0.5, 0.25, -0.1)),
    "poly-linear": lambda: _poly((0.3, -1.2)),
    "poly-constant": lambda: _poly((0.7,)),
    "gather": _gather,
    "embed": _embed,
    "slice": lambda: _unary(Op.SLICE, (3, 5, 5), axis=1, start=1, stop=4),
    "transpose": lambda: _unary(Op.TRANSPOSE, (2, 3, 4), perm=(2, 0, 1)),
    "affine-scalar": lambda: _affine((), ()),
    "affine-vector": lambda: _affine((8,), (5, 8)),
    "matmul": lambda: _matmul("same"),
    "matmul-broadcast": lambda: _matmul("lead"),
    "matmul-rank": lambda: _matmul("rank"),
    "softmax": lambda: _unary(Op.SOFTMAX, (2, 5, 5)),
    "layernorm": _layernorm,
    "reducesum": lambda: _unary(Op.REDUCESUM, (3, 4, 5), axes=(0, 2)),
    "reducesum-keepdims": lambda: _unary(Op.REDUCESUM, (3, 4, 5), axes=(1,), keepdims=True),
    "reciprocal": _reciprocal,
    "attention": _attention,
    "masked-mean-pool": _pooled,
    "tree-ensemble": _trees,
}
INPUTS = {"embed": _token_ids}      # the rest: normal(scale=2)


def test_every_tee_op_has_a_case_and_a_kernel_in_every_runtime():
    """The tee target lists exactly the ops every runtime implements, and each of them
    is exercised below."""
    covered = {n.op for case in CASES.values() for n in case().nodes}
    assert ops_for("tee") == set(onnx_kernels.KERNELS) == set(torch_kernels.KERNELS)
    assert covered == ops_for("tee")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.dtype}")
@pytest.mark.parametrize("case", sorted(CASES))
def test_runtime_agrees_with_the_interpreter(case, spec):
    graph = CASES[case]()
    shape = (3, *graph.input_shape)
    x = INPUTS[case](shape) if case in INPUTS else _rng().normal(scale=2.0, size=shape)
    want = interpreter.run(graph, x)
    got = make_executor(graph, spec, threads=1)(x)
    assert got.dtype == np.float64 and got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=_tol(spec) * scale)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.dtype}")
@pytest.mark.parametrize("bad", [2.5, -1.0, float(VOCAB), np.nan, np.inf])
def test_a_bad_token_id_is_an_input_error_as_in_the_interpreter(bad, spec):
    graph = CASES["embed"]()
    x = _token_ids((2, *graph.input_shape))
    x[1, 1, 2] = bad
    with pytest.raises(InputError, match="token ids"):
        interpreter.run(graph, x)
    run_fn = make_executor(graph, spec, threads=1)
    with pytest.raises(InputError, match=rf"token ids must be integers in \[0, {VOCAB}\)"):
        run_fn(x)
    x[1, 1, 2] = VOCAB - 1
    np.testing.assert_allclose(run_fn(x), interpreter.run(graph, x), rtol=0,
                               atol=_tol(spec) * 10)


def test_an_op_without_a_kernel_is_refused_at_export(tmp_path, monkeypatch):
    graph = CASES["hardswish"]()
    partial = {op: k for op, k in onnx_kernels.KERNELS.items() if op is not Op.HARDSWISH}
    with pytest.raises(UnsupportedOperation, match="hardswish node 'n1'.*onnxruntime"):
        executor.check_kernels(graph, partial, "onnxruntime")
    monkeypatch.setattr(bundle, "_kernels", lambda runtime: partial)
    with pytest.raises(UnsupportedOperation, match="hardswish"):
        bundle.export_model(graph, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_runtime_is_a_typed_error(tmp_path, monkeypatch):
    graph = CASES["relu"]()
    real = metadata.version

    def version(name):
        if name == "onnxruntime":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(executor.metadata, "version", version)
    with pytest.raises(TEEError, match=r"pip install 'veil\[tee\]'"):
        make_executor(graph)
    with pytest.raises(TEEError, match="not installed"):
        bundle.export_model(graph, tmp_path / "out")
    with pytest.raises(TEEError, match="unknown TEE runtime"):
        RuntimeSpec("tensorflow")
    with pytest.raises(TEEError, match="float32"):
        RuntimeSpec("onnxruntime", "float64")


def test_importing_veil_and_its_service_loads_no_runtime():
    code = ("import sys, veil, veil.backends.tee, veil.backends.tee.service, veil.service, "
            "veil.sdk; print(sorted(m for m in ('torch', 'onnxruntime', 'onnx') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "[]"


# -- a ResNet-20-like CIFAR model through the real processes ----------------------------

def _resnet20_like():
    """3 stages of BasicBlocks (16, 32, 64 channels; 1x1 projection shortcuts on the
    strided blocks), as He et al.'s CIFAR ResNets, 2 blocks a stage to stay quick."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.short(x))

    torch.manual_seed(0)
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    for m in model.modules():           # non-trivial batch-norm statistics to fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def _start(args):
    proc = subprocess.Popen([sys.executable, "-m", "veil", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise AssertionError(f"veil {args[0]} did not start: {proc.stderr.read()}")
    host, port = line.split()[-1].rsplit(":", 1)
    return proc, (host, int(port))


def _served(graph, tmp_path, x, runtime=None):
    """(enclave outputs, baseline outputs, enclave status) for ``x``, each server a
    process of its own running ``graph``'s bundle."""
    SoftwareAttester.create(tmp_path / "att")
    ex = bundle.export_model(graph, tmp_path / "export", runtime=runtime)
    policy = Policy(frozenset({ex.measurement}), (TrustedAttester.load(tmp_path / "att"),),
                    allow_insecure=True)
    procs = []
    try:
        enclave, addr = _start(["tee-serve", str(ex.directory), "--attester-key",
                                str(tmp_path / "att"), "--threads", "2"])
        procs.append(enclave)
        base, base_addr = _start(["tee-serve", str(ex.directory), "--plaintext-baseline",
                                  "--threads", "2"])
        procs.append(base)
        with TEEClient(addr, policy) as client:
            ys = client.infer_batch(x, batch_size=4)
            status = client.status()
        with PlaintextClient(base_addr, 30.0) as client:
            ys_plain = client.infer_batch(x, batch_size=4)
        return ys, ys_plain, status
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_resnet20_like_through_the_enclave_process(tmp_path):
    torch = pytest.importorskip("torch")
    from veil.frontend import to_graph

    model = _resnet20_like()
    graph = to_graph(model, (3, 32, 32))
    x = _rng().normal(size=(6, 3, 32, 32))
    want = interpreter.run(graph, x)
    with torch.no_grad():
        torch_out = model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    ys, ys_plain, status = _served(graph, tmp_path, x)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(ys, want, rtol=0, atol=FLOAT32_TOL * scale)
    np.testing.assert_allclose(ys, torch_out, rtol=0, atol=FLOAT32_TOL * scale)
    np.testing.assert_array_equal(ys, ys_plain)   # same runtime: sealing changes nothing
    assert status["runtime"] == {"name": "onnxruntime", "dtype": "float32",
                                 "version": metadata.version("onnxruntime")}
    # the bundle keeps the convolutions (no dense collapse) with batch norms folded
    ops = [n.op for n in bundle.load_model(tmp_path / "export").nodes]
    assert Op.BATCHNORM not in ops and Op.DENSE not in ops and ops.count(Op.CONV2D) == 15


# -- the 224x224 zoo (slow) -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_zoo_224_through_the_enclave_process(name, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from veil.frontend import to_graph

    model = getattr(torchvision.models, name)(weights=None).eval()
    try:
        graph = to_graph(model, (3, 224, 224))
    except UnsupportedOperation as exc:     # grouped convolutions need the new frontend
        pytest.skip(f"the frontend cannot convert {name} yet: {exc}")
    x = _rng().normal(size=(2, 3, 224, 224))
    with torch.no_grad():
        want = model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    ref = interpreter.run(graph, x)
    ys, ys_plain, _ = _served(graph, tmp_path, x)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(ys, ref, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(ys, want, rtol=0, atol=1e-4 * scale)
    np.testing.assert_array_equal(ys, ys_plain)


def test_the_measurement_covers_the_runtime_version(tmp_path, monkeypatch):
    ex = bundle.export_model(CASES["relu"](), tmp_path / "b")
    assert bundle.measure(ex.directory) == ex.measurement
    real = metadata.version
    monkeypatch.setattr(executor.metadata, "version",
                        lambda name: "9.9.9" if name == "onnxruntime" else real(name))
    assert bundle.measure(ex.directory) != ex.measurement


@pytest.mark.parametrize("parallel", [1, None])
def test_parallel_bounds_the_model_runs_at_once(parallel):
    """``tee-serve --parallel N``: at most N model runs at once, whatever the number of
    connections (a Ray enclave replica stays on its CPUs); without it, one per
    connection."""
    import threading
    import time

    from veil.backends.tee.baseline import PlaintextServer

    g = _G((4,))
    g.add(Op.LINEAR, ["x"], {}, {"weight": np.eye(4), "bias": np.zeros(4)})
    srv = PlaintextServer(g.graph(), ("127.0.0.1", 0), 10.0,
                          RuntimeSpec.default_for("interpreter"), 1, parallel)
    run, lock, state = srv.executor, threading.Lock(), {"now": 0, "most": 0}

    def slow(xs):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return run(xs)

    srv.executor = slow
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    x = np.arange(8.0).reshape(2, 4)

    def client():
        with PlaintextClient(srv.address, 10.0) as pc:
            for _ in range(3):
                np.testing.assert_allclose(pc.infer(x), x)
    try:
        pool = [threading.Thread(target=client) for _ in range(4)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        srv.server.close()
    assert srv.counts["served"] == 12
    assert state["most"] == 1 if parallel == 1 else state["most"] > 1
