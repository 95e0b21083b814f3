"""IR verifier and reference interpreter: no OpenFHE, no torch."""
import numpy as np
import pytest

from veil.errors import GraphError
from veil.ir import Graph, Node, Op, make_node, run
from veil.ir.serialize import graph_from_json, graph_to_json


def _mlp(rng):
    i = make_node("input", Op.INPUT, [], [], {"shape": (4,)})
    l1 = make_node("l1", Op.LINEAR, ["input"], [(4,)], {},
                   {"weight": rng.normal(size=(3, 4)), "bias": rng.normal(size=3)})
    r = make_node("r", Op.RELU, ["l1"], [(3,)])
    return Graph((i, l1, r), "r")


def test_linear_relu_matches_numpy(rng):
    g = _mlp(rng)
    x = rng.normal(size=(5, 4))
    w, b = g.node("l1").params["weight"], g.node("l1").params["bias"]
    np.testing.assert_allclose(run(g, x), np.maximum(x @ w.T + b, 0))


def test_conv_matches_direct_loop(rng):
    w, b = rng.normal(size=(2, 3, 3, 3)), rng.normal(size=2)
    i = make_node("input", Op.INPUT, [], [], {"shape": (3, 5, 6)})
    c = make_node("c", Op.CONV2D, ["input"], [(3, 5, 6)], {"stride": (2, 1), "padding": (1, 0)},
                  {"weight": w, "bias": b})
    x = rng.normal(size=(2, 3, 5, 6))
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    ref = np.zeros((2,) + c.shape)
    for o in range(2):
        for r in range(c.shape[1]):
            for s in range(c.shape[2]):
                ref[:, o, r, s] = (xp[:, :, 2 * r:2 * r + 3, s:s + 3] * w[o]).sum((1, 2, 3)) + b[o]
    np.testing.assert_allclose(run(Graph((i, c), "c"), x), ref, atol=1e-12)


def test_pools_and_global_pool(rng):
    i = make_node("input", Op.INPUT, [], [], {"shape": (2, 4, 4)})
    a = make_node("a", Op.AVGPOOL2D, ["input"], [(2, 4, 4)],
                  {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0)})
    m = make_node("m", Op.MAXPOOL2D, ["input"], [(2, 4, 4)],
                  {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0)})
    s = make_node("s", Op.ADD, ["a", "m"], [a.shape, m.shape])
    gp = make_node("g", Op.GLOBALAVGPOOL, ["s"], [s.shape])
    x = rng.normal(size=(3, 2, 4, 4))
    blocks = x.reshape(3, 2, 2, 2, 2, 2)
    ref = (blocks.mean((3, 5)) + blocks.max((3, 5))).mean((2, 3), keepdims=True)
    np.testing.assert_allclose(run(Graph((i, a, m, s, gp), "g"), x), ref)


def test_verifier_rejects_bad_graphs(rng):
    i = make_node("input", Op.INPUT, [], [], {"shape": (4,)})
    with pytest.raises(GraphError, match="before it is defined"):
        Graph((i, Node("r", Op.RELU, ("nope",), (4,))), "r")
    with pytest.raises(GraphError, match="declares shape"):
        Graph((i, Node("r", Op.RELU, ("input",), (5,))), "r")
    with pytest.raises(GraphError, match="not finite"):
        make_node("l", Op.LINEAR, ["input"], [(4,)], {},
                  {"weight": np.full((2, 4), np.nan), "bias": np.zeros(2)})
        Graph((i, make_node("l", Op.LINEAR, ["input"], [(4,)], {},
                            {"weight": np.full((2, 4), np.nan), "bias": np.zeros(2)})), "l")
    with pytest.raises(GraphError, match="duplicate"):
        Graph((i, Node("input", Op.RELU, ("input",), (4,))), "input")


def test_nodes_are_frozen(rng):
    g = _mlp(rng)
    with pytest.raises(Exception):
        g.node("l1").params["weight"][0, 0] = 1.0
    with pytest.raises(Exception):
        g.node("l1").name = "x"


def test_serialization_round_trip(rng):
    g = _mlp(rng)
    doc, arrays = graph_to_json(g)
    g2 = graph_from_json(doc, arrays)
    x = rng.normal(size=(3, 4))
    np.testing.assert_array_equal(run(g, x), run(g2, x))
    with pytest.raises(GraphError):
        graph_from_json({"nodes": [{"name": "input"}], "output": "input"}, {})


def test_interpreter_rejects_wrong_shape(rng):
    with pytest.raises(GraphError, match="per-sample shape"):
        run(_mlp(rng), np.zeros((2, 5)))
