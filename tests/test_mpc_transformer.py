"""The transformer protocols on shares (``backends/mpc/nonlinear.py``) against the
reference kernels over each op's whole calibrated input range, with the error bounds
their docstrings state; and MiniLM-L6 end to end (slow)."""
from __future__ import annotations

import numpy as np
import pytest

from veil.backends.mpc import evaluator as ev
from veil.backends.mpc import nonlinear as nl
from veil.ir import Op

from test_mpc_ops import chain, run_mpc

RNG = np.random.default_rng(17)


def _softmax_bound(x: np.ndarray) -> np.ndarray:
    """Each probability's error bound from the exponential's (``chains.exp_error`` at
    softmax's chain bits, at d + levels/16, where a coarse row max may put it, plus the
    fit's): with |e_j' - e_j| <= E_j and S = sum e >= 1 (the shifted row's sum is
    larger still), |p_i' - p_i| <= (E_i + p_i sum E) / (S - sum E), and 2e-5 for the
    reciprocal and the row scaling."""
    from veil.backends.mpc import chains
    from veil.backends.mpc.fixed import FRAC_BITS
    from veil.backends.mpc.nonlinear import SOFTMAX_CHAIN_BITS
    levels = int(np.ceil(np.log2(x.shape[-1])))
    d = np.maximum(x - x.max(-1, keepdims=True), -17.0)
    e = np.exp(d)
    big = chains.exp_error(np.minimum(d + levels / 16, 1.0), FRAC_BITS, SOFTMAX_CHAIN_BITS) \
        + chains.EXP_FIT_ERROR
    total, s = big.sum(-1, keepdims=True), e.sum(-1, keepdims=True)
    return (big + e / s * total) / (s - total) + 2e-5


def test_softmax_over_the_exponential_range_and_masked_entries():
    """Rows of 2 to 64 scores spread far past the clamp (d = x - max down to -600, the
    clamp at -16), with additive-mask entries at -10^4 (which must not wrap): each
    probability within :func:`_softmax_bound` (the exponential chain at 14 bits,
    ``nonlinear.SOFTMAX_CHAIN_BITS``; 9.7e-3 at most here, the
    two-entry rows, 4.5e-4 measured)."""
    rows = []
    for width in (2, 5, 64):
        for spread in (0.5, 4.0, 30.0, 300.0):
            x = RNG.uniform(-spread, spread, size=(6, width))
            x[:, -1] = -10000.0 if width > 2 else x[:, -1]
            rows.append(x)
    for x in rows:
        got, want, _ = run_mpc(chain(x.shape, (Op.SOFTMAX, {}, {})), x[None])
        bound = _softmax_bound(x)
        assert bound.max() <= 1e-2
        assert np.all(np.abs(got - want).reshape(x.shape) <= bound)


def test_softmax_whose_row_max_is_a_near_tie():
    """The row max's comparisons leave out the bits below 2^-4: on 128 scores within
    2^-3 of each other (seven levels of near ties) the max may fall short by up to
    7/16, d = x - max is then positive, and the probabilities stay within
    :func:`_softmax_bound`."""
    x = 3.0 + RNG.uniform(0.0, 0.125, size=(4, 128))
    x[:, 0] = -10000.0
    got, want, _ = run_mpc(chain(x.shape, (Op.SOFTMAX, {}, {})), x[None])
    assert np.all(np.abs(got - want).reshape(x.shape) <= _softmax_bound(x))


def test_reciprocal_over_its_range():
    """1/x for x log-uniform over the node's [lo, hi]: relative error within 1e-4 where
    1/x is well above the fixed point's 2^-20, absolute 2^-19 beyond."""
    lo, hi = 2.0 ** -6, 2.0 ** 10
    x = np.exp(RNG.uniform(np.log(lo), np.log(hi), size=(1, 400)))
    x[0, :2] = lo, hi
    got, want, _ = run_mpc(chain(x.shape[1:], (Op.RECIPROCAL, {"lo": lo, "hi": hi}, {})), x)
    assert np.all(np.abs(got - want) <= 1e-4 * np.abs(want) + 2.0 ** -19)


def test_layernorm_over_the_variance_range():
    """Rows whose variance spans ``nonlinear.VAR_RANGE`` (2^-10 to 2^12): within 1e-4 of
    the reference (outputs O(1) times |weight| up to ~2.5; 3.3e-5 measured: the
    variance at 26 bits and the inverse square root at 28 keep both ends precise)."""
    rng = np.random.default_rng(17)         # the same rows whatever ran before
    lo, hi = nl.VAR_RANGE
    scales = np.sqrt(np.exp(np.linspace(np.log(lo), np.log(hi), 12)))
    x = rng.normal(size=(12, 48)) * scales[:, None] + rng.normal(size=(12, 1)) * 3
    w, b = rng.normal(size=48), rng.normal(size=48) * 0.1
    got, want, _ = run_mpc(chain(x.shape, (Op.LAYERNORM, {"eps": 1e-12},
                                           {"weight": w, "bias": b})), x[None])
    assert np.abs(got - want).max() <= 1e-4


def test_matmul_of_two_shared_matrices_is_exact_to_the_truncation():
    """Q K^T per head with matrix triples: one opening of X - A and Y - B, then one
    truncation (error below 2^-19 plus the inputs' own fixed-point rounding)."""
    from veil.ir import Graph, make_node
    x = RNG.normal(size=(1, 3, 7, 5)) * 2
    nodes = [make_node("x", Op.INPUT, [], [], {"shape": (3, 7, 5)})]
    nodes.append(make_node("t", Op.TRANSPOSE, ["x"], [(3, 7, 5)], {"perm": (0, 2, 1)}))
    nodes.append(make_node("y", Op.MATMUL, ["x", "t"], [(3, 7, 5), (3, 5, 7)]))
    graph = Graph(tuple(nodes), "y")
    got, want, chans = run_mpc(graph, x)
    assert np.abs(got - want).max() <= 5 * 2.0 ** -20 * 5 * 8
    plan = ev.material_plan(ev.lower_for_mpc(graph))
    (mm,) = [s for layer in plan for s in layer.steps if s.kind == "matmul"]
    assert mm.dims == (3, 7, 5, 7)
    # the product opened 7x5 + 5x7 values per head, not 2 x 7x5x7
    assert chans[0].bytes_sent <= 8 * (3 * 70 + 3 * 49) + 64


def test_a_step_that_lies_about_its_dims_is_refused():
    from veil.errors import InputError
    with pytest.raises(InputError):
        ev.Step("matmul", 10, dims=(2, 3, 4, 5))
    with pytest.raises(InputError):
        ev.Step.from_wire(["matmul", 30, 0, 2, 3])
    with pytest.raises(InputError):
        ev.Step("relu", 4, dims=(1, 1, 1, 1))
    assert ev.Step.from_wire(ev.Step("matmul", 30, dims=(2, 3, 4, 5)).wire()).dims == \
        (2, 3, 4, 5)


def _tiny_bert(seq: int = 8):
    """A 2-layer BERT (hidden 16, 2 heads, vocabulary 40), random weights, wrapped as the
    MiniLM sentence encoder is: the same ops, seconds instead of minutes."""
    transformers = pytest.importorskip("transformers")
    import torch

    from veil.text.minilm import SentenceEncoder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=seq, attn_implementation="eager")
    bert = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    return SentenceEncoder(bert, seq_len=seq)


def _tokens(n: int, seq: int, rng) -> np.ndarray:
    x = np.zeros((n, 2, seq))
    for i in range(n):
        length = int(rng.integers(2, seq + 1))
        x[i, 0, :length] = rng.integers(1, 40, size=length)
        x[i, 1, :length] = 1.0
    return x


def test_a_tiny_bert_compiles_from_the_module_and_runs_in_plain_tee_and_mpc():
    """torch module -> (torch.onnx) -> IR -> each mode, through ``compiled.run``: mpc is
    the dealer and both parties as processes, the client one-hot encoding the ids."""
    import torch

    import veil
    from veil.errors import UnsupportedOperation

    model = _tiny_bert()
    x = _tokens(3, 8, np.random.default_rng(3))
    with torch.no_grad():
        want = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
    compiled = veil.compile(model, x)
    for mode in ("plain", "tee", "mpc"):
        got = compiled.run(x, mode=mode)
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() >= 0.9999, (mode, cos)
    with pytest.raises(UnsupportedOperation, match="softmax|layernorm|matmul|slice|embed"):
        compiled.run(x, mode="he")


def test_token_ids_outside_the_vocabulary_are_refused_before_sharing():
    from veil.compiler.passes import encode_input
    from veil.errors import InputError
    from veil.frontend import to_graph

    g = ev.lower_for_mpc(to_graph(_tiny_bert(), (2, 8)))
    x = _tokens(1, 8, np.random.default_rng(4))
    assert encode_input(g, x).shape == (1,) + g.input_shape
    for bad in (40.0, -1.0, 2.5):
        y = x.copy()
        y[0, 0, 0] = bad
        with pytest.raises(InputError, match="token ids"):
            encode_input(g, y)


@pytest.mark.slow
def test_minilm_in_mpc_matches_plain():
    """all-MiniLM-L6-v2 at 32 tokens on shares (in process): cosine to plain >= 0.999
    on real sentences (bench/transformer.py runs it through the processes)."""
    pytest.importorskip("transformers")
    from veil.backends.mpc.local import run_graph
    from veil.frontend import to_graph
    from veil.ir import run
    try:
        from veil.text.minilm import load_minilm
        from veil.text.tokenize import Tokenizer
        model, tok = load_minilm(32), Tokenizer(32)
    except ImportError as exc:
        pytest.skip(str(exc))
    x = tok.encode(["The wheat harvest fell short this year.",
                    "Corn futures rose in Chicago on export demand."])
    g = to_graph(model, (2, 32))
    got, _ = run_graph(ev.lower_for_mpc(g), x, timeout=600)
    want = run(g, x)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.999


def test_a_softmax_read_by_a_matrix_product_is_normalized_after_it():
    """Attention's P V with P = softmax(S): the softmax is left unnormalized and the
    product scales its rows by the reciprocals of the row sums (n = 4 values a row
    instead of k = 16), the same product: within sum_j |v_j| times the probabilities'
    bound (:func:`_softmax_bound`) and 2e-4 for the scaling's truncations, with masked
    entries; the softmax has no row scaling of its own."""
    from veil.ir import Graph, make_node
    x = RNG.normal(size=(1, 3, 16, 16)) * 4
    x[..., -1] = -10000.0
    nodes = [make_node("x", Op.INPUT, [], [], {"shape": (3, 16, 16)})]
    nodes.append(make_node("p", Op.SOFTMAX, ["x"], [(3, 16, 16)], {"axis": -1}))
    nodes.append(make_node("v", Op.SLICE, ["x"], [(3, 16, 16)],
                           {"axis": -1, "start": 0, "stop": 4}))
    nodes.append(make_node("y", Op.MATMUL, ["p", "v"], [(3, 16, 16), (3, 16, 4)]))
    graph = Graph(tuple(nodes), "y")
    prog = ev.Program(ev.lower_for_mpc(graph))
    assert prog.normalizes == {"y": "p"}
    assert [s.kind for s in prog.steps["p"]][-2:] != ["matmul", "trunc"]
    assert [s.dims for s in prog.steps["y"] if s.kind == "matmul"] == [
        (3, 16, 16, 4), (48, 4, 1, 1)]
    got, want, _ = run_mpc(graph, x)
    bound = _softmax_bound(x[0]) @ np.abs(x[0][..., :4]) + 2e-4
    assert np.all(np.abs(got - want).reshape(bound.shape) <= bound)


def test_a_layernorm_of_a_residual_sum_centers_it_untruncated():
    """LayerNorm(linear(x) + x), the transformer's residual: the sum stays at 2f bits
    and the layer norm's centering truncates D x - sum x by f + ceil(log2 D) (rho (x -
    mean), rho = 48 / 64, which the normalization cancels; eps and the variance range
    scaled by rho^2): the sum's own truncation goes, and rows whose variance spans
    ``nonlinear.VAR_RANGE`` stay within 1e-4 of the reference."""
    from veil.ir import Graph, make_node
    rng = np.random.default_rng(18)
    lo, hi = nl.VAR_RANGE
    scales = np.sqrt(np.exp(np.linspace(np.log(lo * 1.1), np.log(hi / 1.1), 12)))
    x = rng.normal(size=(12, 48)) * scales[:, None] + rng.normal(size=(12, 1)) * 3
    w, b = rng.normal(size=48), rng.normal(size=48) * 0.1
    # a linear layer whose weights are exact in fixed point (its rounding would
    # otherwise dominate the rows of variance 2^-10)
    lin = {k: np.round(rng.normal(size=shape) * 4.0) / 2.0 ** 12
           for k, shape in (("weight", (48, 48)), ("bias", (48,)))}
    nodes = [make_node("x", Op.INPUT, [], [], {"shape": (12, 48)}),
             make_node("l", Op.LINEAR, ["x"], [(12, 48)], {}, lin)]
    nodes.append(make_node("s", Op.ADD, ["l", "x"], [(12, 48), (12, 48)]))
    nodes.append(make_node("n", Op.LAYERNORM, ["s"], [(12, 48)], {"eps": 1e-12},
                           {"weight": w, "bias": b}))
    graph = Graph(tuple(nodes), "n")
    prog = ev.Program(ev.lower_for_mpc(graph))
    assert "s" in prog.deferred and prog.steps["s"] == ()
    assert prog.steps["n"][0].kind == "tsq" and prog.steps["n"][0].shift == 20 + 6
    got, want, _ = run_mpc(graph, x[None])
    assert np.abs(got - want).max() <= 1e-4


def test_attention_scores_from_half_precision_operands_need_no_truncation():
    """Q K^T where Q and K are linear layers reaching the product only through reshapes
    and transposes (attention's scores): the layers truncate to f/2 = 10 bits
    (``Program.half_bits``: a shift of 30 from 2f) and the product comes out at f bits
    with no truncation of its own; each score within 2^-10 (|Q|_1 + |K|_1) of the
    reference (the operands' rounding, floor or floor + 1) and 1e-4 more, where a
    product at f-bit operands would be within 2^-19."""
    d, heads, length = 16, 2, 8
    wq, wk = RNG.normal(size=(d, d)) / 2, RNG.normal(size=(d, d)) / 2
    bq, bk = RNG.normal(size=d), RNG.normal(size=d)
    g = chain((length, d), (Op.LINEAR, {}, {"weight": wq, "bias": bq}),
              (Op.RESHAPE, {"shape": (length, heads, d // heads)}, {}),
              (Op.TRANSPOSE, {"perm": (1, 0, 2)}, {}),
              (Op.LINEAR, {}, {"weight": wk, "bias": bk}, ["n0"]),
              (Op.RESHAPE, {"shape": (length, heads, d // heads)}, {}),
              (Op.TRANSPOSE, {"perm": (1, 2, 0)}, {}),
              (Op.MATMUL, {}, {}, ["n3", "n6"]))
    prog = ev.Program(ev.lower_for_mpc(g))
    assert prog.half_bits == {"n1": 10, "n4": 10} and prog.exact_products == {"n7"}
    assert [s.kind for s in prog.steps["n7"]] == ["matmul"]
    assert [(s.kind, s.shift) for s in prog.steps["n1"]] == [("trunc", 30)]
    x = RNG.normal(size=(2, length, d))
    got, want, _ = run_mpc(g, x)
    q = (x @ wq.T + bq).reshape(2, length, heads, -1).transpose(0, 2, 1, 3)
    k = (x @ wk.T + bk).reshape(2, length, heads, -1).transpose(0, 2, 1, 3)
    bound = 2.0 ** -10 * (np.abs(q).sum(-1)[..., :, None] + np.abs(k).sum(-1)[..., None, :])
    err = np.abs(got - want).reshape(bound.shape)
    assert np.all(err <= bound + 1e-4)
    assert err.max() > 2.0 ** -19          # the operands' rounding shows
