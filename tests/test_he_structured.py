"""Structured linear layers under HE: each affine op's sparse matrix is written from its
kernel (never from a dense probe), residual networks keep strided, multiplexed grids
through their sums, and bootstrapped models share rotation keys across layers. Runs on
the numpy slot engine against the interpreter; no OpenFHE needed."""
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import veil
import veil.compiler.passes as passes
import veil.compiler.pipeline as pipeline
from veil.backends.he.evaluator import Evaluator
from veil.backends.he.layout import pack_inputs, pack_parts, unpack_outputs, unpack_parts
from veil.backends.he.slot_engine import NumpySlotEngine
from veil.compare.resnet20 import ResNet20
from veil.compiler.layout import _assign_layouts, _client_entry
from veil.compiler.plan import BOOT_KEY_WEIGHT
from veil.compiler.sparse import chain_matrix
from veil.deploy.bundle import ServerBundle
from veil.errors import BundleError
from veil.ir import Graph, Op, eval_node, make_node, run
from veil.ir.serialize import graph_from_json, graph_to_json


def _probe(chain, in_shape):
    """The chain's matrix and bias by running it on the identity (the small-layer path)."""
    n = int(np.prod(in_shape))
    x = np.vstack([np.zeros((1, n)), np.eye(n)]).reshape((n + 1,) + in_shape)
    for node in chain:
        x = eval_node(node, [x])
    flat = x.reshape(n + 1, -1)
    return (flat[1:] - flat[0]).T, flat[0]


def _node(name, op, src, in_shape, attrs=None, params=None):
    return make_node(name, op, [src], [in_shape], attrs or {}, params or {})


@pytest.mark.parametrize("attrs,cin,cout,k", [
    ({"stride": (1, 1), "padding": (1, 1)}, 3, 4, 3),
    ({"stride": (2, 2), "padding": (1, 1)}, 4, 6, 3),
    ({"stride": (2, 1), "padding": (0, 2), "dilation": (2, 1)}, 2, 3, 3),
    ({"stride": (1, 1), "padding": (1, 1), "groups": 4}, 4, 4, 3),      # depthwise
    ({"stride": (1, 1), "padding": (1, 1), "groups": 2}, 4, 6, 3),
    ({"stride": (2, 2), "padding": (0, 0)}, 5, 3, 1),                   # 1x1 shortcut
])
def test_a_convolutions_sparse_matrix_is_its_probe(attrs, cin, cout, k, rng):
    shape = (cin, 7, 6)
    groups = attrs.get("groups", 1)
    conv = _node("c", Op.CONV2D, "x", shape, attrs,
                 {"weight": rng.normal(size=(cout, cin // groups, k, k)),
                  "bias": rng.normal(size=cout)})
    m, b = chain_matrix([conv], shape)
    assert sp.issparse(m)
    want_m, want_b = _probe([conv], shape)
    np.testing.assert_allclose(m.toarray(), want_m, atol=1e-12)
    np.testing.assert_allclose(b, want_b, atol=1e-12)
    # one weight per (output, tap inside the input): never a dense matrix
    assert m.nnz <= conv.shape[0] * conv.shape[1] * conv.shape[2] * (cin // groups) * k * k


@pytest.mark.parametrize("attrs", [
    {"kernel": (2, 2), "stride": (2, 2)},
    {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1)},
    {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1), "count_include_pad": False},
    {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1), "ceil_mode": True},
])
def test_pooling_batchnorm_reshape_and_linear_chains_match_their_probe(attrs, rng):
    shape = (3, 7, 7)
    conv = _node("c", Op.CONV2D, "x", shape, {"padding": (1, 1)},
                 {"weight": rng.normal(size=(4, 3, 3, 3)), "bias": rng.normal(size=4)})
    bn = _node("bn", Op.BATCHNORM, "c", conv.shape, {},
               {"scale": rng.normal(size=4), "shift": rng.normal(size=4)})
    pool = _node("p", Op.AVGPOOL2D, "bn", bn.shape, attrs)
    flat = _node("f", Op.RESHAPE, "p", pool.shape, {"shape": (int(np.prod(pool.shape)),)})
    fc = _node("fc", Op.LINEAR, "f", flat.shape, {},
               {"weight": rng.normal(size=(5, flat.shape[0])), "bias": rng.normal(size=5)})
    gp = _node("g", Op.GLOBALAVGPOOL, "bn", bn.shape)
    for chain in ([conv, bn, pool, flat, fc], [conv, bn, gp]):
        m, b = chain_matrix(chain, shape)
        want_m, want_b = _probe(chain, shape)
        np.testing.assert_allclose(m.toarray(), want_m, atol=1e-12)
        np.testing.assert_allclose(b, want_b, atol=1e-12)


def test_sparse_weights_survive_serialization_and_tampering_is_refused(rng):
    shape = (2, 6, 6)
    conv = _node("c", Op.CONV2D, "x", shape, {"padding": (1, 1)},
                 {"weight": rng.normal(size=(3, 2, 3, 3)), "bias": rng.normal(size=3)})
    m, b = chain_matrix([conv], shape)
    x = make_node("x", Op.INPUT, [], [], {"shape": shape})
    dense = make_node("c", Op.DENSE, ["x"], [shape], {"shape": conv.shape},
                      {"matrix": m, "bias": b})
    graph = Graph((x, dense), "c")
    doc, arrays = graph_to_json(graph)
    assert "c/matrix.indices" in arrays and "c/matrix" not in arrays
    back = graph_from_json(doc, arrays)
    xs = rng.normal(size=(2,) + shape)
    np.testing.assert_allclose(run(back, xs), run(graph, xs))
    np.testing.assert_allclose(run(back, xs), eval_node(conv, [xs]), atol=1e-12)
    bad = dict(arrays)
    bad["c/matrix.indices"] = arrays["c/matrix.indices"] + 10 ** 6
    with pytest.raises(veil.errors.GraphError):
        graph_from_json(doc, bad)


def _mini_resnet(seed=0):
    torch.manual_seed(seed)
    model = ResNet20(blocks_per_stage=2).eval()
    with torch.no_grad():      # non-trivial batch norms
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def sparse_resnet():
    """A two-block-per-stage ResNet on 8x8 inputs, every affine chain lowered from its
    kernels (the dense probe disabled), deep enough to need bootstraps."""
    model = _mini_resnet()
    cal = np.random.default_rng(0).uniform(0, 1, size=(16, 3, 8, 8))
    saved = passes.MAX_DENSE_ENTRIES, pipeline.MAX_DENSE_ENTRIES
    passes.MAX_DENSE_ENTRIES = pipeline.MAX_DENSE_ENTRIES = 0
    try:
        compiled = veil.compile(model, cal, degree=15, insecure_test_params=True)
    finally:
        passes.MAX_DENSE_ENTRIES, pipeline.MAX_DENSE_ENTRIES = saved
    return model, cal, compiled


def _slot_run(compiled, x):
    plan = compiled.result.plan
    eng = NumpySlotEngine(plan.params.slots, set(plan.rotations))
    evaluator = Evaluator(compiled.result.lowered, plan)
    outs = [unpack_outputs(evaluator.run(eng, pack_inputs([xi], plan.manifest(),
                                                          plan.params.slots)),
                           plan.manifest(), 1)[0] for xi in x]
    return np.stack(outs), eng


def test_a_residual_network_lowered_from_its_kernels_runs_on_the_slot_engine(sparse_resnet):
    model, cal, compiled = sparse_resnet
    res, plan = compiled.result, compiled.result.plan
    dense = [n for n in res.lowered.nodes if n.op is Op.DENSE]
    assert dense and all(sp.issparse(n.params["matrix"]) for n in dense)
    assert plan.params.bootstraps
    assert sum(n.op is Op.BOOTSTRAP for n in res.lowered.nodes) >= 2
    x = cal[:2]
    got, eng = _slot_run(compiled, x)
    np.testing.assert_allclose(got, run(res.lowered, x), atol=1e-9)
    np.testing.assert_allclose(got, compiled.run(x, mode="simulate"), atol=1e-9)
    assert eng.used_rotations <= set(plan.rotations) and eng.bootstraps > 0
    # the same model lowered by the dense probe computes the same function
    probed = veil.compile(model, cal, degree=15, insecure_test_params=True)
    np.testing.assert_allclose(probed.run(x, mode="simulate"), got, atol=1e-9)


def _feeding_dense(graph, name):
    by_name = {n.name: n for n in graph.nodes}
    node = by_name[name]
    while node.op is not Op.DENSE:
        if node.op is Op.ADD:
            return None
        node = by_name[node.inputs[0]]
    return node.name


def test_residual_sums_keep_strided_grids_and_both_branches_agree(sparse_resnet):
    _, _, compiled = sparse_resnet
    res, plan = compiled.result, compiled.result.plan
    adds = [n for n in res.lowered.nodes if n.op is Op.ADD]
    assert len(adds) == 6
    pinned = 0
    for add in adds:
        sources = [_feeding_dense(res.lowered, i) for i in add.inputs]
        layers = [plan.dense[s] for s in sources if s is not None]
        if len(layers) == 2:     # both branches end in a dense layer (shortcut or stem)
            a, b = layers
            assert a.out_period == b.out_period and a.out_positions == b.out_positions
            pinned += 1
    assert pinned >= 2      # the two projection shortcuts at least
    # the later stages sit on strided grids (positions with gaps), not compact vectors
    grids = [p for p in plan.dense.values() if p.out_positions is not None
             and max(p.out_positions) + 1 > len(p.out_positions)]
    assert grids


def test_bootstrapped_layers_share_rotation_keys(sparse_resnet):
    _, _, compiled = sparse_resnet
    res, plan = compiled.result, compiled.result.plan
    entry = _client_entry(res.lowered)
    slots = plan.params.slots
    _, _, alone = _assign_layouts(res.lowered, entry, slots, search=True)
    _, _, shared = _assign_layouts(res.lowered, entry, slots, search=True,
                                   key_weight=BOOT_KEY_WEIGHT)

    def keys(dense):
        return {r % slots for p in dense.values() for r in p.rotations()} - {0}
    assert len(keys(shared)) < len(keys(alone))
    assert {r % slots for r in plan.rotations} == keys(shared)


def test_a_server_bundle_with_sparse_layers_round_trips(sparse_resnet, tmp_path):
    _, cal, compiled = sparse_resnet
    server_dir, _ = compiled.export(tmp_path)
    server_dir = Path(server_dir)
    bundle = ServerBundle.load(server_dir)
    dense = [n for n in bundle.graph.nodes if n.op is Op.DENSE]
    assert all(sp.issparse(n.params["matrix"]) for n in dense)
    np.testing.assert_allclose(run(bundle.graph, cal[:2]),
                               run(compiled.result.lowered, cal[:2]))
    host = bundle.without_weights()
    for n in host.graph.nodes:
        if n.op is Op.DENSE:
            assert n.params["matrix"].nnz == 0 or not np.any(n.params["matrix"].data)
    (server_dir / "weights.npz").write_bytes(b"not an npz")
    with pytest.raises(BundleError):
        ServerBundle.load(server_dir)


def test_a_value_wider_than_the_largest_ring_is_cut_into_ciphertexts(rng):
    # 16 x 96 x 96 values exceed the 2^16 slots of the largest ring: at secure
    # parameters each such value takes several 2^15-slot ciphertexts (veil.compiler.tiles)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 96 * 96, 10))
    cal = rng.normal(size=(2, 3, 96, 96))
    compiled = veil.compile(model, cal, degree=7)
    plan = compiled.result.plan
    assert plan is not None and not plan.params.insecure_test_params
    assert plan.params.slots == 1 << 15 and plan.input_parts == 1
    assert max(plan.parts.values()) == 8           # 2 channels of 96 x 96 per part
    lowered = compiled.result.lowered
    eng = NumpySlotEngine(plan.params.slots, set(plan.rotations))
    m = plan.manifest()
    got = unpack_parts(Evaluator(lowered, plan).run_parts(
        eng, pack_parts([cal[0]], m, plan.params.slots)), m, 1)
    np.testing.assert_allclose(got, run(lowered, cal[:1]), atol=1e-8)


def test_a_sparse_dense_node_lowers_in_a_chain_although_its_params_are_frozen():
    """expand_broadcasts writes DENSE nodes with sparse matrices (frozen by the IR);
    a chain that starts with one is composed and cleaned without writing into them."""
    from veil.compiler.sparse import chain_matrix
    from veil.ir import Node

    m = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]]))
    node = Node("d", Op.DENSE, ("x",), (3,), {"shape": (3,)},
                {"matrix": m, "bias": np.zeros(3)})
    assert not node.params["matrix"].data.flags.writeable
    matrix, bias = chain_matrix([node], (2,))
    np.testing.assert_array_equal(matrix.toarray(), m.toarray())
    assert matrix.nnz == 2 and not bias.any()
