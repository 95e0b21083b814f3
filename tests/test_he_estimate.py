"""HE at real-model size: the cost estimate, the bootstrap refusal, the size check before
the dense probe, and the HE target's pass list driving the compile. No OpenFHE needed."""
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import veil
from veil.compiler.estimate import (BOOTSTRAP_RING, FRESH_LEVELS, LEVELS_AFTER_BOOTSTRAP,
                                    estimate_he, max_depth_without_bootstrapping)
from veil.compiler.params import chebyshev_depth
from veil.compiler.passes import MAX_DENSE_ENTRIES, dense_chains, probe_entries
from veil.compiler.pipeline import PASSES, compile_graph
from veil.compiler.targets import HE, TARGETS, lower
from veil.errors import CompileError
from veil.ir import Graph, Op, make_node, run


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20: 3 stages of 3 basic blocks, 16/32/64 channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(Block(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks, self.fc = nn.Sequential(*blocks), nn.Linear(64, 10)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    model = ResNet20().eval()
    cal = np.random.default_rng(0).normal(size=(4, 3, 32, 32))
    return model, cal, veil.compile(model, cal)


def test_resnet20_estimate_needs_bootstraps_with_sane_depth_and_keys(resnet20):
    _, _, compiled = resnet20
    est = compiled.result.estimate
    # 19 ReLUs at degree 27 (5 levels each, plus 1 for the domain map of the 9 that
    # follow a residual add), 19 convolutions and the pool + fc chain (1 level each).
    assert est.depth == 19 * 5 + 9 + 19 + 1
    assert est.max_depth == max_depth_without_bootstrapping() == 55
    assert not est.fits and est.bootstraps > 0
    # A fresh ciphertext may spend 23 levels, each bootstrap gives back 10: at least this
    # many.
    assert (FRESH_LEVELS, LEVELS_AFTER_BOOTSTRAP) == (23, 10)
    assert est.bootstraps >= -(-(est.depth - FRESH_LEVELS) // LEVELS_AFTER_BOOTSTRAP)
    assert est.ring_dim == BOOTSTRAP_RING
    # 3x3 kernels on 32x32, 16x16 and 8x8 grids need their 8 offsets each, plus channel
    # and stride steps; far below one key per slot.
    assert 3 * 8 <= est.rotation_keys < 2000
    assert est.key_bytes == 2 * BOOTSTRAP_RING * 8 * est.towers_per_key
    assert est.keys_bytes == est.rotation_keys * est.key_bytes
    assert est.latency_s > est.bootstrap_ciphertexts * 16     # bootstraps alone: 16-24 s
    convs = [layer for layer in est.layers if layer.op == "conv2d"]
    assert len(convs) == 21 and all(layer.levels in (0, 1) for layer in convs)
    assert all(layer.ciphertexts >= 1 for layer in est.layers)


def test_resnet20_gets_a_bootstrapped_plan_built_from_its_kernels(resnet20):
    # every convolution is lowered from its kernel (a sparse matrix, never a dense
    # probe), the stages sit on strided grids in a ring-2^16 ciphertext, and the layers
    # share a few dozen rotation keys
    _, _, compiled = resnet20
    plan = compiled.result.plan
    assert plan is not None and plan.params.bootstraps and plan.params.ring_dim == 1 << 16
    dense = [n for n in compiled.result.lowered.nodes if n.op is Op.DENSE]
    assert len(dense) == 22
    assert all(sp.issparse(n.params["matrix"]) for n in dense[1:])
    assert sum(n.op is Op.BOOTSTRAP for n in compiled.result.lowered.nodes) >= 9
    assert len(plan.rotations) < 100
    assert sum(len(p.diagonals) for p in plan.dense.values()) < 8000
    big = [(name, n_in, n_out) for name, n_in, n_out, _ in dense_chains(
        compiled.result.polynomial) if probe_entries(n_in, n_out) > MAX_DENSE_ENTRIES]
    assert big


def test_resnet20_simulate_and_report(resnet20):
    model, cal, compiled = resnet20
    cal = cal[:2]
    sim = compiled.run(cal, mode="simulate")
    np.testing.assert_allclose(sim, run(compiled.result.polynomial, cal), atol=1e-12)
    with torch.no_grad():
        plain = model(torch.as_tensor(cal, dtype=torch.float32)).numpy()
    assert np.abs(compiled.run(cal, mode="plain") - plain).max() < 1e-4
    report = compiled.report()
    text = str(report)
    assert "HE structural estimate (the plan's figures below are what runs): depth 124" \
        in text and "bootstraps needed: " in text
    assert "rotation keys:" in text and "estimated latency" in text
    # scaled by what the shipped ResNet-20 measured under HE (bench/he_deep.py)
    cal = report.estimate["calibrated"]
    assert "calibrated on ResNet-20" in text and cal["latency_s"] < report.estimate["latency_s"]
    assert cal["rotation_keys"] < report.estimate["rotation_keys"]
    # HE runs it now (bootstrapped, from its kernels): the report places its bootstraps
    assert "mode 'he': not available" not in text and "note:   bootstrap " in text
    d = json.loads(json.dumps(report.to_dict()))
    assert d["estimate"]["bootstraps"] > 0 and d["estimate"]["fits"] is False
    assert not d["he_error"] and d["estimate"]["depth"] == 124 and d["depth"] > 55


def rng_cnn(rng, act=Op.RELU, pool=Op.AVGPOOL2D):
    i = make_node("input", Op.INPUT, [], [], {"shape": (1, 8, 8)})
    c = make_node("c", Op.CONV2D, ["input"], [(1, 8, 8)],
                  {"stride": (1, 1), "padding": (1, 1)},
                  {"weight": rng.normal(size=(4, 1, 3, 3)) * 0.5, "bias": rng.normal(size=4)})
    r = make_node("r", act, ["c"], [c.shape])
    p = make_node("p", pool, ["r"], [c.shape],
                  {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0)})
    f = make_node("f", Op.RESHAPE, ["p"], [p.shape], {"shape": (64,)})
    fc = make_node("fc", Op.LINEAR, ["f"], [(64,)], {},
                   {"weight": rng.normal(size=(10, 64)), "bias": rng.normal(size=10)})
    return Graph((i, c, r, p, f, fc), "fc")


def residual_graph(rng, act=Op.TANH):
    i = make_node("input", Op.INPUT, [], [], {"shape": (16,)})
    a = make_node("a", Op.LINEAR, ["input"], [(16,)], {},
                  {"weight": rng.normal(size=(16, 16)) * 0.3, "bias": rng.normal(size=16)})
    t = make_node("t", act, ["a"], [(16,)])
    b = make_node("b", Op.LINEAR, ["t"], [(16,)], {},
                  {"weight": rng.normal(size=(16, 16)) * 0.3, "bias": rng.normal(size=16)})
    s = make_node("s", Op.ADD, ["a", "b"], [(16,), (16,)])
    u = make_node("u", act, ["s"], [(16,)])
    o = make_node("o", Op.LINEAR, ["u"], [(16,)], {},
                  {"weight": rng.normal(size=(3, 16)), "bias": rng.normal(size=3)})
    return Graph((i, a, t, b, s, u, o), "o")


@pytest.mark.parametrize("make, shape, act, degree", [
    (rng_cnn, (1, 8, 8), Op.RELU, 27), (rng_cnn, (1, 8, 8), Op.SQUARE, 27),
    (rng_cnn, (1, 8, 8), Op.HARDSWISH, 13), (residual_graph, (16,), Op.TANH, 7),
    (residual_graph, (16,), Op.SILU, 2)])
def test_estimate_depth_matches_the_slot_plan_where_both_apply(rng, make, shape, act, degree):
    g = make(rng, act)
    result = compile_graph(g, rng.normal(size=(16,) + shape), degree=degree)
    assert result.plan is not None and result.estimate.fits
    assert result.estimate.depth == result.plan.depth
    assert result.estimate.ring_dim == result.plan.params.ring_dim
    # the simulate graph is the slot evaluator's graph when HE can run the model
    assert set(result.lowered.ops()) <= {Op.INPUT, Op.GATHER, Op.DENSE, Op.POLY,
                                         Op.SQUARE, Op.ADD}


def test_mul_and_activations_of_the_new_ops_are_priced(rng):
    """Squeeze-excite style gate: x * hardsigmoid(x) of two activations costs one level."""
    i = make_node("input", Op.INPUT, [], [], {"shape": (8,)})
    a = make_node("a", Op.LINEAR, ["input"], [(8,)], {},
                  {"weight": rng.normal(size=(8, 8)), "bias": rng.normal(size=8)})
    h = make_node("h", Op.HARDSIGMOID, ["a"], [(8,)])
    c = make_node("c", Op.CLIP, ["a"], [(8,)], {"lo": 0.0, "hi": 6.0})
    m = make_node("m", Op.MUL, ["h", "c"], [(8,), (8,)])
    o = make_node("o", Op.LINEAR, ["m"], [(8,)], {},
                  {"weight": rng.normal(size=(2, 8)), "bias": rng.normal(size=2)})
    g = Graph((i, a, h, c, m, o), "o")
    x = rng.normal(size=(32, 8))
    result = compile_graph(g, x, degree=13)
    assert {a.function for a in result.activations} == {"hardsigmoid", "clip"}
    # linear 1 + Chebyshev degree 13 (4, plus 1 for the domain map: 'a' has two
    # readers, so it cannot absorb it) + mul 1 + linear 1
    assert result.estimate.depth == 8
    levels = {layer.name: layer.levels for layer in result.estimate.layers}
    assert levels["m"] == 1 and levels["h"] == 5 and levels["c"] == 5
    # the slot evaluator multiplies the two ciphertexts: HE plans it
    assert result.plan is not None and result.he_refusal is None
    assert Op.MUL in set(result.lowered.ops())
    np.testing.assert_allclose(run(result.lowered, x), run(result.polynomial, x))


def test_a_large_layer_is_lowered_from_its_kernel_without_a_probe(rng):
    """One convolution's dense matrix would hold ~805M entries: compile writes its
    sparse matrix from the kernel (quickly) and plans it; no dense probe runs."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 64 * 64, 10))
    cal = rng.normal(size=(2, 3, 64, 64))
    t0 = time.perf_counter()
    compiled = veil.compile(model, cal, degree=7)
    assert time.perf_counter() - t0 < 60
    sizes = {name: (n_in, n_out) for name, n_in, n_out, _ in dense_chains(
        compiled.result.polynomial)}
    first = next(n.name for n in compiled.result.polynomial.nodes if n.op is Op.CONV2D)
    assert sizes[first] == (3 * 64 * 64, 16 * 64 * 64)
    conv = next(n for n in compiled.result.lowered.nodes if n.name == first)
    assert sp.issparse(conv.params["matrix"])
    assert conv.params["matrix"].nnz <= 16 * 64 * 64 * 27
    assert compiled.result.plan is not None
    x = cal[:1]
    np.testing.assert_allclose(run(compiled.result.lowered, x),
                               run(compiled.result.polynomial, x), atol=1e-9)
    assert "HE structural estimate" in str(compiled.report())   # a plan exists


def test_he_target_pass_list_drives_the_compile(rng):
    g = rng_cnn(rng)
    cal = rng.normal(size=(16, 1, 8, 8))
    assert TARGETS["he"] is HE and PASSES == HE.pass_names + ("plan_he",)
    assert HE.pass_names[:HE.split] == ("split_prelu", "fold_batchnorm", "replace_maxpool",
                                        "approximate")
    lowered, notes = lower(g, "he", calibration=cal)
    result = compile_graph(g, cal)
    assert [n.name for n in lowered.nodes] == [n.name for n in result.lowered.nodes]
    for a, b in zip(lowered.nodes, result.lowered.nodes):
        for k in a.params:
            np.testing.assert_array_equal(a.params[k], b.params[k])
    assert len(notes) == len(HE.passes)
    with pytest.raises(CompileError, match="calibration"):
        lower(g, "he")


def test_estimate_rejects_unapproximated_activations(rng):
    with pytest.raises(CompileError, match="approximate the activations first"):
        estimate_he(rng_cnn(rng))


@pytest.mark.slow
def test_resnet18_224_compiles_within_30s_and_4gib():
    """torchvision ResNet-18 at 224x224, in a fresh process so RSS is its own."""
    code = textwrap.dedent("""
        import json, resource, time
        import numpy as np, torchvision, veil
        model = torchvision.models.resnet18(weights=None).eval()
        cal = np.random.default_rng(0).normal(size=(2, 3, 224, 224))
        t0 = time.perf_counter()
        compiled = veil.compile(model, cal)
        seconds = time.perf_counter() - t0
        text = str(compiled.report())
        print(json.dumps({"seconds": seconds, "text": text,
                          "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          "estimate": compiled.result.estimate.to_dict()}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["seconds"] <= 30 and r["rss"] <= 4 * 2**30
    est = r["estimate"]
    assert est["bootstraps"] > 0 and est["depth"] > est["max_depth"]
    assert "HE estimate: depth" in r["text"] and "bootstraps needed" in r["text"]


@pytest.mark.parametrize("cin, cout, kernel, stride, padding, dilation, groups", [
    (3, 8, 7, 2, 3, 1, 1), (16, 8, 1, 1, 0, 1, 1), (16, 8, 1, 2, 0, 1, 1),
    (8, 8, 1, 1, 1, 1, 1), (8, 8, 3, 1, 1, 1, 8), (8, 12, 3, 2, 2, 2, 4), (6, 6, 2, 1, 0, 1, 3)])
def test_reference_conv_matches_torch(rng, cin, cout, kernel, stride, padding, dilation,
                                      groups):
    """Calibration at 224x224 runs the reference conv: it must stay exact when fast."""
    from veil.ir.kernels import conv2d

    x = rng.normal(size=(2, cin, 17, 15))
    w, b = rng.normal(size=(cout, cin // groups, kernel, kernel)), rng.normal(size=cout)
    ours = conv2d([x], {"stride": (stride, stride), "padding": (padding, padding),
                        "dilation": (dilation, dilation), "groups": groups},
                  {"weight": w, "bias": b})
    ref = torch.nn.functional.conv2d(torch.as_tensor(x), torch.as_tensor(w),
                                     torch.as_tensor(b), stride=stride, padding=padding,
                                     dilation=dilation, groups=groups).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_a_lowering_past_he_limits_is_a_refusal_not_a_compile_failure(monkeypatch):
    """Some limits are only met once HE's lowering runs (EfficientNet-B0: a chain grows
    past MAX_NONZEROS when a squeeze-excite broadcast is expanded): compile still
    returns the polynomial graph, the estimate and simulate; mode "he" names why."""
    import veil.compiler.pipeline as pipeline

    real = pipeline.run_passes

    def lowering_fails(graph, passes, options=None):
        if tuple(passes) == tuple(HE.back):
            raise CompileError("layer 'x' maps 1 to 2 values through too many weights")
        return real(graph, passes, options)

    monkeypatch.setattr(pipeline, "run_passes", lowering_fails)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    cal = np.random.default_rng(0).normal(size=(16, 4))
    compiled = veil.compile(model, cal, degree=3)
    assert compiled.result.plan is None
    assert "too many weights" in compiled.result.he_refusal[1]
    assert compiled.run(cal[:2], mode="simulate").shape == (2, 2)
    with pytest.raises(CompileError, match="too many weights"):
        compiled.result.he_plan()


# -- transformers: compiled for tee / mpc, priced for HE --------------------------------

def tiny_transformer(rng):
    """One attention head and a feed-forward activation on 4 tokens of 8 features,
    summed over the tokens into 2 outputs."""
    def linear(name, src, n_in=8, n_out=8):
        return make_node(name, Op.LINEAR, [src], [(4, n_in)], {},
                         {"weight": rng.normal(size=(n_out, n_in)) * 0.4,
                          "bias": rng.normal(size=n_out) * 0.1})
    i = make_node("input", Op.INPUT, [], [], {"shape": (4, 8)})
    q, k, v = linear("q", "input"), linear("k", "input"), linear("v", "input")
    kt = make_node("kt", Op.TRANSPOSE, ["k"], [(4, 8)], {"perm": (1, 0)})
    s = make_node("scores", Op.MATMUL, ["q", "kt"], [(4, 8), (8, 4)])
    p = make_node("attn", Op.SOFTMAX, ["scores"], [(4, 4)])
    o = make_node("mix", Op.MATMUL, ["attn", "v"], [(4, 4), (4, 8)])
    n = make_node("norm", Op.LAYERNORM, ["mix"], [(4, 8)], {"eps": 1e-5},
                  {"weight": np.ones(8), "bias": np.zeros(8)})
    g = make_node("act", Op.GELU, ["norm"], [(4, 8)])
    pool = make_node("pool", Op.REDUCESUM, ["act"], [(4, 8)], {"axes": (0,)})
    out = make_node("out", Op.LINEAR, ["pool"], [(8,)], {},
                    {"weight": rng.normal(size=(2, 8)) * 0.4, "bias": np.zeros(2)})
    return Graph((i, q, k, v, kt, s, p, o, n, g, pool, out), "out")


def _compiled(graph, cal):
    from veil.model import CompiledModel

    result = compile_graph(graph, cal)
    ranges = {n.name: result.extents[n.inputs[0]] for n in result.polynomial.nodes[1:]}
    return CompiledModel(result, (float(cal.min()), float(cal.max())), ranges)


def test_a_transformer_compiles_with_an_he_estimate_and_a_refusal_by_name(rng):
    from veil.errors import UnsupportedOperation

    g = tiny_transformer(rng)
    cal = rng.normal(size=(16, 4, 8))
    compiled = _compiled(g, cal)
    result = compiled.result
    assert result.plan is None and result.he_refusal[0] is UnsupportedOperation
    # named by the first op that makes it a transformer
    assert "matmul node 'scores' has no HE kernel" in result.he_refusal[1]
    # the front stage ran: GELU has its calibrated fit, the rest is kept for the estimate
    assert [a.function for a in result.activations] == ["gelu"]
    est = result.estimate
    assert est.transformer and est.depth > 0 and est.bootstraps >= 0
    levels = {layer.name: layer.levels for layer in est.layers}
    # Q K^T: both operands come out of linear layers (sigma and tau fold into them); P V:
    # the softmax's output needs its sigma (1 level more)
    assert levels["scores"] == 2 and levels["mix"] == 3
    assert levels["q"] == 1 and levels["kt"] == 0          # the transpose folds into k
    assert levels["attn"] >= 1 + 8 + 1 + 1 and levels["norm"] >= 4
    methods = {layer.name: layer.method for layer in est.layers}
    assert methods["attn"].startswith("max-free softmax: exp by 8 squarings")
    assert "Newton" in methods["norm"] and "JKLS" in methods["scores"]
    assert est.depth == sum(levels[n] for n in ("q", "scores", "attn", "mix", "norm",
                                                "act", "pool", "out"))
    assert est.rotation_keys > 0 and est.latency_s > 0 and est.calibrated() == {}
    assert any("MATMUL of two ciphertexts" in a for a in est.assumptions)
    report = compiled.report()
    text = str(report)
    assert "HE estimate: depth" in text and "mode 'he': not available" in text
    assert report.depth == est.depth > 0 and report.estimate["bootstraps"] >= 0
    json.dumps(report.to_dict())
    # simulate and he refuse by name; plain runs the source graph
    x = cal[:3]
    with pytest.raises(UnsupportedOperation, match="transpose node 'kt'"):
        compiled.run(x, mode="simulate")
    with pytest.raises(UnsupportedOperation, match="'scores' has no HE kernel"):
        compiled.run(x, mode="he")
    with pytest.raises(UnsupportedOperation, match="no HE kernel"):
        compiled.manifest()
    np.testing.assert_allclose(compiled.run(x, mode="plain"), run(g, x))
    # accuracy in the report: plain only (simulate cannot run it)
    acc = compiled.report(x, np.zeros(3, dtype=int)).accuracy
    assert set(acc) == {"plain"}


def test_a_transformer_runs_on_shares(rng):
    g = tiny_transformer(rng)
    cal = rng.normal(size=(16, 4, 8))
    with _compiled(g, cal) as compiled:      # the dealer and both parties, as processes
        x = cal[0]
        # the transformer chains run at fewer fractional bits since issue 17's byte cuts
        # (softmax's exponential within 7.6e-3, GELU's correction within 7.6e-3 a value):
        # 3.1e-3 measured at most over 12 runs of this graph, where 2e-3 held before
        np.testing.assert_allclose(compiled.run(x, mode="mpc"), run(g, x[None])[0],
                                   atol=1e-2)


def test_transformer_estimate_without_calibrated_ranges_uses_the_defaults(rng):
    from veil.compiler.estimate import DEFAULT_VAR_RANGE, EXP_MIN_SQUARINGS

    result = compile_graph(tiny_transformer(rng), rng.normal(size=(16, 4, 8)))
    est = estimate_he(result.polynomial)
    methods = {layer.name: layer.method for layer in est.layers}
    assert f"exp by {EXP_MIN_SQUARINGS} squarings" in methods["attn"]
    assert f"{DEFAULT_VAR_RANGE[1]:.3g}]" in methods["norm"]
    # a wider variance range costs the inverse square root more levels
    assert ({layer.name: layer.levels for layer in est.layers}["norm"]
            >= {layer.name: layer.levels for layer in result.estimate.layers}["norm"])


def test_inverse_iterations_follow_the_error_recurrences():
    from veil.compiler.estimate import TARGET_BITS, _inverse, _iterations

    # Goldschmidt from the constant 2 / (lo + hi): e0 = (hi - lo) / (hi + lo), e_n = e0^2^n
    for lo, hi in ((1.0, 2.0), (1.0, 100.0), (1e-3, 1.0)):
        e0 = (hi - lo) / (hi + lo)
        want = math.ceil(math.log2(TARGET_BITS * math.log(2) / -math.log(e0)))
        x = np.geomspace(lo, hi, 4001)
        assert _iterations(x * 2 / (lo + hi), True) == want
    levels, units, method = _inverse("reciprocal", 1.0, 2.0)
    assert levels == 3 and method.startswith("Goldschmidt from a constant, 3 iterations")
    # Newton's inverse square root: a wide range needs more levels than a narrow one
    assert _inverse("rsqrt", 0.3, 140.0)[0] > _inverse("rsqrt", 0.2, 0.5)[0] > 0
    # a guess that does not converge is refused
    assert _iterations(np.array([0.5, 2.5]), True) is None


def _minilm(seq_len):
    pytest.importorskip("torch", reason="needs torch")
    pytest.importorskip("transformers", reason="needs transformers")
    pytest.importorskip("tokenizers", reason="needs tokenizers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import veil.text as text

    try:
        text.model_dir()
    except text.TextDependencyError as exc:
        pytest.skip(str(exc))
    from veil.text.minilm import load_minilm
    from veil.text.tokenize import Tokenizer

    x = Tokenizer(seq_len).encode(["The wheat harvest fell short.", "Corn prices rose."])
    return load_minilm(seq_len), x


def test_minilm_compiles_and_reports_what_he_would_cost():
    """all-MiniLM-L6-v2 at 32 tokens (two short sentences, padded: the -10^4 mask sets
    exp's squarings to 13): compile succeeds, HE is refused by name and priced."""
    from veil.errors import UnsupportedOperation

    model, x = _minilm(32)
    compiled = veil.compile(model, x)
    est = compiled.result.estimate
    assert compiled.result.he_refusal[0] is UnsupportedOperation
    assert est.transformer and not est.fits and est.ring_dim == BOOTSTRAP_RING
    ops = [layer.op for layer in est.layers]
    assert ops.count("softmax") == 6 and ops.count("layernorm") == 13
    assert ops.count("matmul") == 12 and ops.count("gelu") == 6
    levels = [(layer.op, layer.levels) for layer in est.layers]
    assert [lv for op, lv in levels if op == "matmul"] == [2, 3] * 6
    assert all(13 <= lv <= 30 for op, lv in levels if op == "softmax")
    assert all("exp by 13 squarings" in layer.method for layer in est.layers
               if layer.op == "softmax")
    # each GELU costs its chosen degree's depth (folded map): 27 (5 levels) where the
    # range is wide, 13 (4) on the last layer's [-5, 3.8]
    degrees = [a.degree for a in compiled.result.activations if a.function == "gelu"]
    assert [lv for op, lv in levels if op == "gelu"] == \
        [chebyshev_depth(d) for d in degrees] == [5] * 5 + [4]
    # six layers of roughly 50-60 levels: some 30-40 bootstraps on the longest path
    assert 250 <= est.depth <= 450
    assert est.bootstraps >= -(-(est.depth - FRESH_LEVELS) // LEVELS_AFTER_BOOTSTRAP)
    assert est.bootstraps <= est.bootstrap_ciphertexts <= 3 * est.bootstraps
    # JKLS's shifts of 32 x 32 blocks need ~4 x 31 keys, the linear layers a few dozen
    assert 124 <= est.rotation_keys <= 400
    assert est.keys_bytes == est.rotation_keys * est.key_bytes
    # bootstraps alone take 19 s per ciphertext; in all between 10 minutes and 2 hours
    assert est.bootstrap_ciphertexts * 19 < est.latency_s
    assert 600 < est.latency_s < 7200
    text = str(compiled.report())
    assert "HE estimate: depth" in text and "has no HE kernel" in text
    assert "layernorm node 'LayerNorm_LayerNormalization' has no HE kernel" in text
    with pytest.raises(UnsupportedOperation, match="cannot run in 'simulate' mode"):
        compiled.run(x, mode="simulate")
    with pytest.raises(UnsupportedOperation, match="no HE kernel"):
        compiled.run(x, mode="he")
    with torch.no_grad():
        want = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
    assert np.abs(compiled.run(x, mode="plain") - want).max() < 1e-4
