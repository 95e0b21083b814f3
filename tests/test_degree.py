"""Per-activation polynomial degrees and the warnings a compile gives: no OpenFHE.

Each activation's degree is the smallest that uses its Chebyshev depth fully and keeps
the fit within 2^-activation_bits of the activation's output span (``approx.py``);
``degree=`` overrides it. A poor fit, a torch model in training mode and a depth that
forces a larger CKKS ring each warn with a :class:`veil.VeilWarning`.
"""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import veil
from veil.compiler.approx import (DEFAULT_DEGREE, WARN_ERROR_FRACTION,
                                  approximate_activations, fit_chebyshev)
from veil.compiler.params import FULL_DEPTH_DEGREES, chebyshev_depth
from veil.compiler.pipeline import compile_graph
from veil.errors import (ApproximationWarning, CompileError, DepthWarning,
                         TrainingModeWarning, VeilWarning)
from veil.ir import Graph, Op, cheb_eval, make_node


def scaled_mlp(rng, scale: float, act=Op.SIGMOID, width: int = 6) -> Graph:
    """input (4,) -> linear -> ``act`` -> linear: ``scale`` sets the activation's range."""
    i = make_node("input", Op.INPUT, [], [], {"shape": (4,)})
    a = make_node("a", Op.LINEAR, ["input"], [(4,)], {},
                  {"weight": rng.normal(size=(width, 4)) * scale, "bias": np.zeros(width)})
    s = make_node("s", act, ["a"], [(width,)])
    o = make_node("o", Op.LINEAR, ["s"], [(width,)], {},
                  {"weight": rng.normal(size=(2, width)), "bias": np.zeros(2)})
    return Graph((i, a, s, o), "o")


def range_error(op, lo, hi, degree):
    grid = np.linspace(lo, hi, 4001)
    exact = {Op.SIGMOID: lambda x: 1 / (1 + np.exp(-x)), Op.TANH: np.tanh}[op](grid)
    approx = cheb_eval(grid, fit_chebyshev(op, lo, hi, degree), lo, hi)
    return np.abs(approx - exact).max(), exact.max() - exact.min()


def no_veil_warnings(fn):
    """Run ``fn`` and return what it returns; fail on any VeilWarning it emits."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    found = [w.message for w in caught if issubclass(w.category, VeilWarning)]
    assert not found, found
    return out


def test_sigmoid_degree_follows_its_range(rng):
    """A narrow range needs a low degree (here 5 or less), a wide one the cap; each is
    the smallest full-depth degree within 2^-8 of the span: the one below misses it."""
    x = rng.normal(size=(256, 4))
    degrees = {}
    for scale in (0.3, 15.0):
        _, (rep,) = approximate_activations(scaled_mlp(rng, scale), x)
        err, span = range_error(Op.SIGMOID, rep.lo, rep.hi, rep.degree)
        assert rep.output_span == pytest.approx(span, rel=1e-9)
        assert rep.max_abs_error_range == pytest.approx(err, rel=1e-6)
        assert rep.target == pytest.approx(span / 256)
        below = [d for d in FULL_DEPTH_DEGREES if d < rep.degree]
        if below:      # the next cheaper degree does not meet the target
            assert range_error(Op.SIGMOID, rep.lo, rep.hi, below[-1])[0] > rep.target
        degrees[scale] = (rep.degree, err <= rep.target)
    (narrow, narrow_ok), (wide, wide_ok) = degrees[0.3], degrees[15.0]
    assert narrow <= 5 and narrow_ok                # within target, at 3 levels or fewer
    assert wide == DEFAULT_DEGREE and not wide_ok   # capped: never deeper than before


def test_more_bits_never_lower_the_degree_and_none_is_the_old_default(rng):
    g, x = scaled_mlp(rng, 1.0, Op.TANH), rng.normal(size=(128, 4))
    chosen = [approximate_activations(g, x, activation_bits=b)[1][0].degree
              for b in (2, 8, 20)]
    assert chosen == sorted(chosen) and chosen[0] < chosen[-1]
    (rep,) = approximate_activations(g, x, activation_bits=None)[1]
    assert rep.degree == DEFAULT_DEGREE and rep.target is None
    with pytest.raises(CompileError, match="activation_bits"):
        approximate_activations(g, x, activation_bits=0)


def test_a_zero_top_coefficient_is_dropped():
    """tanh on a symmetric narrow range: degree 1 misses 2^-8 of the span, degree 2
    meets it with c2 = 0, so the POLY is the degree-1 series (one level, not two)."""
    i = make_node("input", Op.INPUT, [], [], {"shape": (4,)})
    t = make_node("t", Op.TANH, ["input"], [(4,)])
    x = np.linspace(-0.25, 0.25, 40).reshape(10, 4)
    g, (rep,) = approximate_activations(Graph((i, t), "t"), x)
    assert range_error(Op.TANH, rep.lo, rep.hi, 1)[0] > rep.target
    assert rep.degree == 1 and len(g.node("t").attrs["coeffs"]) == 2
    assert rep.max_abs_error_range == pytest.approx(range_error(Op.TANH, rep.lo, rep.hi, 2)[0])
    assert rep.max_abs_error_range <= rep.target


def test_explicit_degree_wins(rng):
    i = make_node("input", Op.INPUT, [], [], {"shape": (4,)})
    t = make_node("t", Op.TANH, ["input"], [(4,)])
    s = make_node("s", Op.SIGMOID, ["t"], [(4,)])
    g, x = Graph((i, t, s), "s"), rng.normal(size=(64, 4)) * 0.2
    auto = {r.node: r.degree for r in approximate_activations(g, x)[1]}
    assert auto["t"] < 13 and auto["s"] < 13
    reports = approximate_activations(g, x, degree=13)[1]
    assert [(r.degree, r.target) for r in reports] == [(13, None), (13, None)]
    reports = approximate_activations(g, x, degree={"s": 27})[1]
    assert {r.node: r.degree for r in reports} == {"t": auto["t"], "s": 27}
    with pytest.raises(CompileError, match="not activations"):
        approximate_activations(g, x, degree={"nope": 5})
    with pytest.raises(CompileError, match=">= 1"):
        approximate_activations(g, x, degree={"t": 0})


def test_depth_does_not_grow_and_shrinks_on_narrow_ranges(rng):
    """Against the old fixed degree 27 (activation_bits=None): never deeper; the
    narrow-range model drops levels; the report's degree and error stay those of the
    POLY that simulate runs."""
    x = rng.normal(size=(64, 4))
    for scale, act in ((0.3, Op.SIGMOID), (1.0, Op.TANH), (1.0, Op.RELU), (15.0, Op.SIGMOID)):
        g = scaled_mlp(rng, scale, act)
        new = compile_graph(g, x, insecure_test_params=True)
        old = compile_graph(g, x, activation_bits=None, insecure_test_params=True)
        assert new.plan.depth <= old.plan.depth == 2 + chebyshev_depth(27)
        if scale == 0.3:
            assert new.plan.depth <= old.plan.depth - 2
        if act is Op.RELU or scale == 15.0:
            assert new.plan.depth == old.plan.depth
        (rep,) = new.activations
        poly = new.polynomial.node("s")
        assert len(poly.attrs["coeffs"]) - 1 == rep.degree
    # the chosen fit's error is what simulate shows against plain on an output sigmoid
    i = make_node("input", Op.INPUT, [], [], {"shape": (4,)})
    s = make_node("s", Op.SIGMOID, ["input"], [(4,)])
    res = compile_graph(Graph((i, s), "s"), x * 0.5, insecure_test_params=True)
    from veil.ir import run
    diff = np.abs(run(res.lowered, x * 0.5) - 1 / (1 + np.exp(-x * 0.5))).max()
    assert diff == pytest.approx(res.activations[0].max_abs_error, rel=1e-6)
    assert diff <= res.activations[0].target


def wide_sigmoid(scale: float) -> nn.Module:
    """Two sigmoids inside the model (a final one would go to the client's output
    head); ``scale`` widens the second one's range."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Sigmoid(),
                          nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight.mul_(scale)
    return model.eval()


def test_poor_fit_warns_with_node_range_degree_and_advice(rng):
    x = rng.normal(size=(128, 4))
    with pytest.warns(ApproximationWarning) as record:
        compiled = veil.compile(wide_sigmoid(60.0), x, insecure_test_params=True)
    (bad,) = [r for r in compiled.result.activations
              if r.relative_error > WARN_ERROR_FRACTION]
    text = str(next(w.message for w in record if w.category is ApproximationWarning))
    assert f"'{bad.node}' (sigmoid)" in text and "degree-27" in text
    assert f"{bad.lo:.4g}" in text and f"{100 * bad.relative_error:.1f} %" in text
    assert "veil.finetune" in text and "mpc or tee" in text
    assert text in compiled.report().notes


def test_training_mode_warns_reads_eval_and_leaves_the_model_alone(rng):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(6, 2))
    model(torch.randn(32, 4))                        # running statistics away from 0, 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = rng.normal(size=(64, 4))
    with pytest.warns(TrainingModeWarning, match=r"training mode .*model\.eval\(\)"):
        compiled = veil.compile(model, x, insecure_test_params=True)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        want = model(torch.tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(compiled.run(x), want, atol=1e-5)     # eval semantics
    assert any("training mode" in n for n in compiled.report().notes)
    assert isinstance(compiled.result.warnings[0], TrainingModeWarning)
    no_veil_warnings(lambda: veil.compile(model, x, insecure_test_params=True))


def test_explicit_training_dropout_call_warns():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return nn.functional.dropout(self.fc(x), 0.5, training=True)

    with pytest.warns(TrainingModeWarning, match="training=True"):
        veil.frontend.to_graph(Net().eval(), (4,))


def test_depth_that_forces_a_larger_ring_warns(rng):
    x = rng.normal(size=(128, 4))
    with pytest.warns(DepthWarning) as record:
        compiled = veil.compile(wide_sigmoid(60.0), x)
    text = str(next(w.message for w in record if w.category is DepthWarning))
    plan = compiled.result.plan
    ring = plan.params.ring_dim
    assert ring > plan.slot_ring == 1 << 13
    assert f"HE depth {plan.depth} needs ring 2^{ring.bit_length() - 1}" in text
    assert "'_3' (sigmoid, degree 27: 5), '_1' (sigmoid, degree 5: 3)" in text
    assert text in compiled.report().notes
    # deeper than 55 levels: the warning names the bootstraps
    torch.manual_seed(0)
    deep = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(4, 4), nn.Tanh())],
                         nn.Linear(4, 2)).eval()
    with pytest.warns(DepthWarning, match=r"needs bootstrapping \(\d+ bootstraps\) at "
                      r"ring 2\^16, where ring 2\^13"):
        compiled = veil.compile(deep, x, degree=27)
    assert compiled.result.plan.params.bootstraps and compiled.result.plan.depth > 55
    # test parameters: the slots alone set the ring, nothing to warn about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        veil.compile(wide_sigmoid(60.0), x, insecure_test_params=True)
    assert not [w for w in caught if w.category is DepthWarning]


def test_clean_model_compiles_without_warnings(rng):
    """A narrow sigmoid in eval mode: degree 1 (one level), depth 3, the smallest
    secure ring (2^13); and a ReLU model under test parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.1)
    x = rng.normal(size=(128, 4))
    compiled = no_veil_warnings(lambda: veil.compile(model, x))
    assert compiled.result.activations[0].degree in (1, 2)
    assert compiled.report().depth == 3 and compiled.report().params["ring_dim"] == 1 << 13
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    compiled = no_veil_warnings(lambda: veil.compile(relu, x, insecure_test_params=True))
    assert compiled.result.warnings == []


def test_cli_passes_activation_bits():
    from veil.cli import _parser
    from veil.commands import _compile_options

    args = _parser().parse_args(["compile", "m.onnx", "--calibration", "c.npy",
                                      "--activation-bits", "6"])
    assert _compile_options(args)["activation_bits"] == 6
    args = _parser().parse_args(["compile", "m.onnx", "--calibration", "c.npy"])
    assert "activation_bits" not in _compile_options(args)


def test_no_warning_for_what_changes_nothing(rng):
    """A fresh module is in training mode, but a Linear/ReLU stack computes the same in
    either mode; a ReLU MLP at depth 7 needs ring 2^14, twice the slots' 2^13, the price
    of any network: neither is worth a warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))     # not .eval()
    assert model.training
    compiled = no_veil_warnings(lambda: veil.compile(model, rng.normal(size=(64, 4))))
    plan = compiled.result.plan
    assert plan.params.ring_dim == 2 * plan.slot_ring
