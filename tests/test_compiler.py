"""Compiler passes, planning and the slot layout: no OpenFHE needed.

The layout is checked with the numpy slot engine, which performs the same rotations
and products as CKKS would, and refuses rotations that the manifest did not list.
"""
import numpy as np
import pytest

from veil.backends.he.evaluator import Evaluator
from veil.backends.he.layout import pack_inputs, unpack_outputs
from veil.backends.he.slot_engine import NumpySlotEngine
from veil.compiler.approx import approximate_activations, fit_chebyshev
from veil.compiler.passes import fold_batchnorm, fold_poly_domain, linearize, replace_maxpool
from veil.compiler.pipeline import compile_graph
from veil.compiler.plan import (HE_STD_128_LOGQP, chebyshev_depth, plan_dense, plan_he,
                                select_params)
from veil.errors import CompileError, MissingKeyError
from veil.ir import Graph, Op, make_node, run


def cnn(rng, pool=Op.AVGPOOL2D, bn=False):
    i = make_node("input", Op.INPUT, [], [], {"shape": (1, 8, 8)})
    c = make_node("c", Op.CONV2D, ["input"], [(1, 8, 8)], {"stride": (1, 1), "padding": (1, 1)},
                  {"weight": rng.normal(size=(4, 1, 3, 3)) * 0.5, "bias": rng.normal(size=4)})
    nodes = [i, c]
    if bn:
        nodes.append(make_node("bn", Op.BATCHNORM, ["c"], [c.shape], {},
                               {"scale": rng.uniform(0.5, 2, 4), "shift": rng.normal(size=4)}))
    r = make_node("r", Op.RELU, [nodes[-1].name], [c.shape])
    p = make_node("p", pool, ["r"], [c.shape], {"kernel": (2, 2), "stride": (2, 2),
                                               "padding": (0, 0)})
    f = make_node("f", Op.RESHAPE, ["p"], [p.shape], {"shape": (64,)})
    fc = make_node("fc", Op.LINEAR, ["f"], [(64,)], {},
                   {"weight": rng.normal(size=(10, 64)), "bias": rng.normal(size=10)})
    return Graph(tuple(nodes) + (r, p, f, fc), "fc")


def one_dense(matrix, bias):
    """INPUT -> DENSE graph of ``matrix`` (m x n) and ``bias``."""
    m, n = matrix.shape
    i = make_node("input", Op.INPUT, [], [], {"shape": (n,)})
    d = make_node("d", Op.DENSE, ["input"], [(n,)], {"shape": (m,)},
                  {"matrix": matrix, "bias": bias})
    return Graph((i, d), "d")


def residual(rng):
    i = make_node("input", Op.INPUT, [], [], {"shape": (16,)})
    a = make_node("a", Op.LINEAR, ["input"], [(16,)], {},
                  {"weight": rng.normal(size=(16, 16)) * 0.3, "bias": rng.normal(size=16)})
    t = make_node("t", Op.TANH, ["a"], [(16,)])
    b = make_node("b", Op.LINEAR, ["t"], [(16,)], {},
                  {"weight": rng.normal(size=(16, 16)) * 0.3, "bias": rng.normal(size=16)})
    s = make_node("s", Op.ADD, ["a", "b"], [(16,), (16,)])
    o = make_node("o", Op.LINEAR, ["s"], [(16,)], {},
                  {"weight": rng.normal(size=(3, 16)), "bias": rng.normal(size=3)})
    return Graph((i, a, t, b, s, o), "o")


def test_fold_batchnorm_is_exact_and_removes_the_node(rng):
    g = cnn(rng, bn=True)
    folded, note = fold_batchnorm(g)
    assert Op.BATCHNORM not in folded.ops() and note.messages
    x = rng.normal(size=(3, 1, 8, 8))
    np.testing.assert_allclose(run(folded, x), run(g, x), atol=1e-10)


def test_replace_maxpool_reports_it(rng):
    g, note = replace_maxpool(cnn(rng, pool=Op.MAXPOOL2D))
    assert Op.MAXPOOL2D not in g.ops() and Op.AVGPOOL2D in g.ops()
    assert "replaced by average pooling" in note.messages[0]


def test_linearize_composes_affine_chains_exactly(rng):
    g = cnn(rng)
    lowered, _ = linearize(g)
    assert lowered.ops() == [Op.INPUT, Op.DENSE, Op.RELU, Op.DENSE]
    x = rng.normal(size=(4, 1, 8, 8))
    np.testing.assert_allclose(run(lowered, x), run(g, x), atol=1e-10)


def test_linearize_keeps_values_a_residual_branch_needs(rng):
    g = residual(rng)
    lowered, _ = linearize(g)
    assert "a" in [n.name for n in lowered.nodes]
    x = rng.normal(size=(4, 16))
    np.testing.assert_allclose(run(lowered, x), run(g, x), atol=1e-10)


@pytest.mark.parametrize("op", [Op.RELU, Op.GELU, Op.SILU, Op.SIGMOID, Op.TANH])
def test_chebyshev_fit_error_shrinks_with_degree(op):
    from veil.ir.interpreter import ELEMENTWISE
    from veil.ir import cheb_eval

    grid = np.linspace(-4, 4, 2001)
    errs = [np.abs(cheb_eval(grid, fit_chebyshev(op, -4, 4, d), -4, 4)
                   - ELEMENTWISE[op](grid)).max() for d in (3, 7, 15, 27)]
    assert errs[-1] < errs[0]
    limit = 0.12 if op is Op.RELU else 1e-3  # ReLU's kink converges only as 1/degree
    assert errs[-1] < limit


def test_approximation_ranges_come_from_calibration_and_contain_zero(rng):
    g = cnn(rng)
    cal = rng.uniform(0, 1, size=(64, 1, 8, 8))
    poly, reports = approximate_activations(g, cal, degree=15, margin=0.1)
    (rep,) = reports
    pre = run(g, cal, trace=True)["c"]
    assert rep.observed_lo == pytest.approx(pre.min()) and rep.observed_hi == pytest.approx(pre.max())
    assert rep.lo < min(pre.min(), 0) and rep.hi > max(pre.max(), 0)
    assert rep.degree == 15 and poly.node("r").op is Op.POLY
    # the report's error is the real error of the polynomial on the calibration inputs
    from veil.ir import cheb_eval
    coeffs = poly.node("r").attrs["coeffs"]
    real = np.abs(cheb_eval(pre, coeffs, rep.lo, rep.hi) - np.maximum(pre, 0)).max()
    assert rep.max_abs_error == pytest.approx(real)


def test_square_is_exact_at_degree_two(rng):
    i = make_node("input", Op.INPUT, [], [], {"shape": (5,)})
    s = make_node("s", Op.SQUARE, ["input"], [(5,)])
    poly, reports = approximate_activations(Graph((i, s), "s"), rng.normal(size=(10, 5)),
                                            degree=27)
    assert reports[0].degree == 2 and reports[0].max_abs_error < 1e-12


def test_fold_poly_domain_saves_a_level_and_keeps_values(rng):
    res_graph = compile_graph(cnn(rng), rng.uniform(0, 1, size=(32, 1, 8, 8)), degree=13)
    unfolded, _ = linearize(res_graph.polynomial)
    assert plan_he(unfolded).depth == plan_he(res_graph.lowered).depth + 1
    folded, _ = fold_poly_domain(unfolded)
    x = rng.uniform(0, 1, size=(4, 1, 8, 8))
    np.testing.assert_allclose(run(folded, x), run(unfolded, x), atol=1e-9)


def test_depth_table():
    assert [chebyshev_depth(d) for d in (1, 2, 5, 6, 13, 14, 27, 28, 59)] == \
        [1, 2, 3, 4, 4, 5, 5, 6, 6]
    assert chebyshev_depth(27, -3.0, 2.0) == 6


def test_params_are_secure_by_default_and_insecure_only_when_asked():
    p, why = select_params(7, 512)
    assert p.security == "HEStd_128_classic" and not p.insecure_test_params
    assert p.ring_dim in HE_STD_128_LOGQP and "128-bit" in why
    q, why = select_params(7, 512, insecure_test_params=True)
    assert q.insecure_test_params and "INSECURE" in why
    with pytest.raises(CompileError, match="depth"):
        select_params(200, 16)


def test_lower_precision_buys_cheaper_key_switching():
    from veil.compiler.plan import keyswitch_cost

    def cost(p):
        return keyswitch_cost(p.mult_depth, p.scaling_bits, p.first_mod_bits,
                              p.num_large_digits)

    default, why = select_params(9, 512)
    cheap, why12 = select_params(9, 512, precision_bits=12)
    assert default.ring_dim == cheap.ring_dim == 16384 and "largest scale" in why
    assert default.scaling_bits > cheap.scaling_bits and ">= 12 output bits" in why12
    assert cost(cheap) < cost(default) / 2      # 4 digits instead of 10 at depth 9
    with pytest.raises(CompileError, match="precision_bits"):
        select_params(3, 16, precision_bits=30)


def test_params_grow_ring_for_depth_and_slots():
    small, _ = select_params(3, 16)
    deep, _ = select_params(12, 16)
    wide, _ = select_params(3, 16384)
    assert small.ring_dim < deep.ring_dim
    assert wide.slots >= 16384


@pytest.mark.parametrize("shape", [(10, 128), (128, 64), (64, 30), (7, 7), (1, 33)])
def test_dense_layout_matches_matrix_product(rng, shape):
    m = rng.normal(size=shape)
    plan = plan_dense(m)
    g = one_dense(m, rng.normal(size=shape[0]))
    hp = plan_he(g)
    eng = NumpySlotEngine(hp.params.slots, set(hp.rotations))
    x = rng.normal(size=shape[1])
    out = Evaluator(g, hp).run(eng, pack_inputs([x], hp.manifest(), hp.params.slots))
    np.testing.assert_allclose(unpack_outputs(out, hp.manifest(), 1)[0], run(g, x[None])[0],
                               atol=1e-9)
    assert eng.used_rotations == set(hp.rotations)  # the manifest lists exactly what is used
    assert len(plan.diagonals) <= min(plan.in_period, plan.out_period)


def test_conv_uses_few_rotations(rng):
    lowered = compile_graph(cnn(rng), rng.uniform(0, 1, size=(16, 1, 8, 8))).lowered
    conv_plan = plan_dense(lowered.node("c").params["matrix"])
    assert len(conv_plan.diagonals) == 9          # one per kernel offset
    assert len(conv_plan.rotations()) <= 4        # baby-step/giant-step on the 3x3 offsets


def test_evaluator_matches_interpreter_on_residual_graph(rng):
    res = compile_graph(residual(rng), rng.normal(size=(64, 16)), degree=15)
    eng = NumpySlotEngine(res.plan.params.slots, set(res.plan.rotations))
    x = rng.normal(size=16)
    out = Evaluator(res.lowered, res.plan).run(
        eng, pack_inputs([x], res.plan.manifest(), res.plan.params.slots))
    np.testing.assert_allclose(unpack_outputs(out, res.plan.manifest(), 1)[0],
                               run(res.lowered, x[None])[0], atol=1e-8)


def test_missing_rotation_key_is_a_veil_error(rng):
    res = compile_graph(cnn(rng), rng.uniform(0, 1, size=(16, 1, 8, 8)))
    keys = set(res.plan.rotations)
    keys.discard(res.plan.rotations[0])
    eng = NumpySlotEngine(res.plan.params.slots, keys)
    with pytest.raises(MissingKeyError):
        Evaluator(res.lowered, res.plan).run(eng, np.zeros(res.plan.params.slots))


def test_bad_calibration_is_rejected(rng):
    g = cnn(rng)
    with pytest.raises(CompileError, match="per-sample shape"):
        compile_graph(g, np.zeros((4, 8, 8)))
    with pytest.raises(CompileError, match="finite"):
        compile_graph(g, np.full((4, 1, 8, 8), np.nan))


def test_first_layer_uses_client_expanded_input_when_cheaper(rng):
    """A dense 32->64 first layer: 32 diagonals pre-rotated by the client, 5 folds."""
    g = one_dense(rng.normal(size=(64, 32)), rng.normal(size=64))
    hp = plan_he(g)
    spec = hp.manifest()["input"]
    assert spec["layout"] == "expanded" and spec["blocks"] == 32
    assert len(hp.rotations) == 5
    eng = NumpySlotEngine(hp.params.slots, set(hp.rotations))
    x = rng.normal(size=32)
    assert hp.lanes == hp.params.slots // (32 * 64)  # the expansion uses 32 blocks of 64
    out = Evaluator(g, hp).run(eng, pack_inputs([x], hp.manifest(), hp.params.slots))
    np.testing.assert_allclose(unpack_outputs(out, hp.manifest(), 1)[0], run(g, x[None])[0],
                               atol=1e-9)
    # a graph whose input also feeds a residual keeps the replicated layout
    i = make_node("input", Op.INPUT, [], [], {"shape": (32,)})
    d2 = make_node("d2", Op.DENSE, ["input"], [(32,)], {"shape": (32,)},
                   {"matrix": rng.normal(size=(32, 32)), "bias": np.zeros(32)})
    s = make_node("s", Op.ADD, ["input", "d2"], [(32,), (32,)])
    shared = plan_he(Graph((i, d2, s), "s"))
    assert shared.manifest()["input"]["layout"] == "replicated"


@pytest.mark.parametrize("layout", ["latency", "throughput"])
def test_interleaved_lanes_run_many_inputs_at_once(rng, layout):
    """Every lane computes its own input; lanes never mix."""
    res = compile_graph(cnn(rng), rng.uniform(0, 1, size=(16, 1, 8, 8)), degree=7)
    plan = plan_he(res.lowered, layout=layout)
    assert plan.lanes == plan.params.slots // 256   # CNN here needs 256 positions
    eng = NumpySlotEngine(plan.params.slots, set(plan.rotations))
    xs = rng.uniform(0, 1, size=(plan.lanes, 1, 8, 8))
    out = Evaluator(res.lowered, plan).run(eng, pack_inputs(list(xs), plan.manifest(),
                                                            plan.params.slots))
    got = unpack_outputs(out, plan.manifest(), plan.lanes)
    np.testing.assert_allclose(got, run(res.lowered, xs), atol=1e-8)
    assert eng.used_rotations == set(plan.rotations)


def test_throughput_layout_trades_expansion_for_lanes(rng):
    g = one_dense(rng.normal(size=(64, 32)), rng.normal(size=64))
    fast, wide = plan_he(g, layout="latency"), plan_he(g, layout="throughput")
    assert fast.lanes == fast.params.slots // 2048 and wide.lanes == wide.params.slots // 64
    assert wide.manifest()["input"]["layout"] == "replicated"
    with pytest.raises(CompileError, match="layout"):
        plan_he(g, layout="fastest")


def test_im2col_first_conv_is_exact_and_cuts_rotations(rng):
    """A strided 5x5 convolution on 28x28: the client sends patches, the server rotates less."""
    i = make_node("input", Op.INPUT, [], [], {"shape": (1, 28, 28)})
    c = make_node("c", Op.CONV2D, ["input"], [(1, 28, 28)], {"stride": (2, 2), "padding": (1, 1)},
                  {"weight": rng.normal(size=(5, 1, 5, 5)), "bias": rng.normal(size=5)})
    s = make_node("s", Op.SQUARE, ["c"], [c.shape])
    f = make_node("f", Op.RESHAPE, ["s"], [c.shape], {"shape": (845,)})
    o = make_node("o", Op.LINEAR, ["f"], [(845,)], {},
                  {"weight": rng.normal(size=(10, 845)) * 0.05, "bias": rng.normal(size=10)})
    g = Graph((i, c, s, f, o), "o")
    res = compile_graph(g, rng.uniform(0, 1, size=(8, 1, 28, 28)))
    assert res.lowered.ops()[:3] == [Op.INPUT, Op.GATHER, Op.DENSE]
    notes = [m for n in res.notes for m in n.messages if "im2col" in m]
    assert notes and notes[0].endswith("rotations 48 -> 11")  # the figure docs quote
    x = rng.uniform(0, 1, size=(3, 1, 28, 28))
    np.testing.assert_allclose(run(res.lowered, x), run(res.polynomial, x), atol=1e-8)
    manifest = res.plan.manifest()
    assert "gather" in manifest["input"]
    # 25 tap groups of 169 placed column-wise in 8 blocks: 4 offsets, so the conv has
    # (4 offsets - 5 channels) = 8 diagonals instead of 25 + 5 - 1 = 29 (layout._cell_layouts)
    assert "positions" in manifest["input"] and len(res.plan.dense["c"].diagonals) == 8
    eng = NumpySlotEngine(res.plan.params.slots, set(res.plan.rotations))
    out = Evaluator(res.lowered, res.plan).run(
        eng, pack_inputs([x[0]], manifest, res.plan.params.slots))
    np.testing.assert_allclose(unpack_outputs(out, manifest, 1)[0], run(res.lowered, x[:1])[0],
                               atol=1e-8)
    assert eng.used_rotations == set(res.plan.rotations)


def test_gather_is_client_side_only(rng):
    i = make_node("input", Op.INPUT, [], [], {"shape": (4,)})
    d = make_node("d", Op.DENSE, ["input"], [(4,)], {"shape": (4,)},
                  {"matrix": np.eye(4), "bias": np.zeros(4)})
    gth = make_node("g", Op.GATHER, ["d"], [(4,)], {"indices": (3, 2, -1, 0)})
    with pytest.raises(CompileError, match="only the client"):
        plan_he(Graph((i, d, gth), "g"))


def test_fold_quadratic_costs_one_level_and_keeps_values(rng):
    i = make_node("input", Op.INPUT, [], [], {"shape": (16,)})
    a = make_node("a", Op.LINEAR, ["input"], [(16,)], {},
                  {"weight": rng.normal(size=(32, 16)), "bias": rng.normal(size=32)})
    s = make_node("s", Op.SQUARE, ["a"], [(32,)])
    b = make_node("b", Op.LINEAR, ["s"], [(32,)], {},
                  {"weight": rng.normal(size=(4, 32)), "bias": rng.normal(size=4)})
    g = Graph((i, a, s, b), "b")
    res = compile_graph(g, rng.normal(size=(64, 16)))
    assert Op.SQUARE in res.lowered.ops() and Op.POLY not in res.lowered.ops()
    assert res.plan.depth == 3                      # dense, square, dense
    x = rng.normal(size=(5, 16))
    np.testing.assert_allclose(run(res.lowered, x), run(g, x), rtol=1e-9, atol=1e-9)
    manifest = res.plan.manifest()
    eng = NumpySlotEngine(res.plan.params.slots, set(res.plan.rotations))
    out = Evaluator(res.lowered, res.plan).run(
        eng, pack_inputs([x[0]], manifest, res.plan.params.slots))
    np.testing.assert_allclose(unpack_outputs(out, manifest, 1)[0], run(g, x[:1])[0],
                               rtol=1e-9, atol=1e-9)


def test_fold_quadratic_chains_share_a_dense_layer(rng):
    """Two quadratics around one dense layer: both folds must land in it."""
    i = make_node("input", Op.INPUT, [], [], {"shape": (6,)})
    a = make_node("a", Op.LINEAR, ["input"], [(6,)], {},
                  {"weight": rng.normal(size=(8, 6)), "bias": rng.normal(size=8)})
    s1 = make_node("s1", Op.SQUARE, ["a"], [(8,)])
    b = make_node("b", Op.LINEAR, ["s1"], [(8,)], {},
                  {"weight": rng.normal(size=(8, 8)) * 0.3, "bias": rng.normal(size=8)})
    s2 = make_node("s2", Op.SQUARE, ["b"], [(8,)])
    c = make_node("c", Op.LINEAR, ["s2"], [(8,)], {},
                  {"weight": rng.normal(size=(3, 8)), "bias": rng.normal(size=3)})
    g = Graph((i, a, s1, b, s2, c), "c")
    res = compile_graph(g, rng.normal(size=(32, 6)))
    assert res.lowered.ops().count(Op.SQUARE) == 2
    x = rng.normal(size=(4, 6))
    np.testing.assert_allclose(run(res.lowered, x), run(g, x), rtol=1e-8, atol=1e-8)


def test_report_estimates_both_batch_layouts(rng):
    import veil
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    report = veil.compile(model, rng.normal(size=(16, 8))).report()
    assert report.costs["lanes_per_ciphertext"] > 0 and report.costs["features_per_batch"] > 0
    text = str(report)
    assert "per input with" in text and "feature layout:" in text


def lenet_like(rng, size=12):
    """conv 5x5 pad 2 -> act -> avgpool 2 -> conv 3x3 -> act -> avgpool 2 -> fc: two
    convolutions, the second strided through a pool, on a width that is not 2^k."""
    i = make_node("input", Op.INPUT, [], [], {"shape": (1, size, size)})
    c1 = make_node("c1", Op.CONV2D, ["input"], [(1, size, size)],
                   {"stride": (1, 1), "padding": (2, 2)},
                   {"weight": rng.normal(size=(3, 1, 5, 5)) * 0.3, "bias": rng.normal(size=3)})
    a1 = make_node("a1", Op.SQUARE, ["c1"], [c1.shape])
    p1 = make_node("p1", Op.AVGPOOL2D, ["a1"], [c1.shape],
                   {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0)})
    c2 = make_node("c2", Op.CONV2D, ["p1"], [p1.shape], {"stride": (1, 1), "padding": (0, 0)},
                   {"weight": rng.normal(size=(5, 3, 3, 3)) * 0.3, "bias": rng.normal(size=5)})
    a2 = make_node("a2", Op.SQUARE, ["c2"], [c2.shape])
    p2 = make_node("p2", Op.AVGPOOL2D, ["a2"], [c2.shape],
                   {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0)})
    n = int(np.prod(p2.shape))
    f = make_node("f", Op.RESHAPE, ["p2"], [p2.shape], {"shape": (n,)})
    fc = make_node("fc", Op.LINEAR, ["f"], [(n,)], {},
                   {"weight": rng.normal(size=(4, n)), "bias": rng.normal(size=4)})
    return Graph((i, c1, a1, p1, c2, a2, p2, f, fc), "fc")


def test_slot_diagonals_match_the_slot_level_matrix(rng):
    """Every non-zero of W lands once, at W'[out_pos[r], in_pos[c]] of the slot matrix."""
    from veil.compiler.plan import slot_diagonals
    for (m, n, po, pi) in ((5, 7, 32, 16), (6, 9, 16, 64), (4, 4, 16, 16)):
        w = rng.normal(size=(m, n)) * (rng.uniform(size=(m, n)) < 0.6)
        out_pos = rng.choice(po, size=m, replace=False)
        in_pos = rng.choice(pi, size=n, replace=False)
        full = np.zeros((po, pi))
        full[np.ix_(out_pos, in_pos)] = w
        ids, vecs = slot_diagonals(w, pi, po, in_pos, out_pos)
        j = np.arange(max(pi, po))
        for i in range(min(pi, po)):
            want = full[j % po, (j + i) % pi]
            got = vecs[list(ids).index(i)] if i in ids else np.zeros_like(want)
            np.testing.assert_allclose(got, want)


def test_convolutions_get_strided_grid_layouts(rng):
    """The planner puts conv outputs on channel-blocked, strided grids: fewer diagonals
    and keys than compact placement, the same values, and exactly the manifest's keys."""
    g = lenet_like(rng)
    cal = rng.uniform(0, 1, size=(8, 1, 12, 12))
    res = compile_graph(g, cal)
    plan = res.plan
    compact = plan_he(res.lowered, layout="throughput")
    grid = plan.dense["c2"]
    assert plan.manifest()["input"]["positions"]          # input rows padded to 16
    assert grid.out_positions is not None and grid.in_positions is not None
    assert len(plan.dense["c1"].diagonals) == 25          # one per kernel offset
    assert len(grid.diagonals) < len(compact.dense["c2"].diagonals)
    assert len(plan.rotations) < len(compact.rotations)
    eng = NumpySlotEngine(plan.params.slots, set(plan.rotations))
    xs = rng.uniform(0, 1, size=(plan.lanes, 1, 12, 12))
    out = Evaluator(res.lowered, plan).run(eng, pack_inputs(list(xs), plan.manifest(),
                                                            plan.params.slots))
    np.testing.assert_allclose(unpack_outputs(out, plan.manifest(), plan.lanes),
                               run(res.lowered, xs), atol=1e-8)
    assert eng.used_rotations == set(plan.rotations)
    # the server reads the same plan back from the manifest
    from veil.compiler.plan import HEPlan
    back = HEPlan.from_manifest(plan.params, plan.manifest())
    assert back.dense == plan.dense
