"""Every MPC kernel against the reference kernel, on shares, through an in-process
channel; the sigmoid/SiLU error bound; material streamed layer by layer; the memory
budget."""
import threading

import numpy as np
import pytest

from veil.backends.mpc import evaluator as ev
from veil.backends.mpc.fixed import FRAC_BITS, decode, encode
from veil.backends.mpc.local import run_graph, run_parties
from veil.backends.mpc.prg import Prg
from veil.backends.mpc.protocols import reconstruct, share
from veil.errors import ModelTooLargeError, ResourceError, VeilError
from veil.ir import Graph, Op, make_node, ops_for
from veil.ir import run as interpret

RNG = np.random.default_rng(7)


def chain(shape, *specs):
    """INPUT then each spec (op, attrs, params, inputs) in order; inputs default to the
    previous node, and may name earlier nodes by index ("n0" is the input)."""
    nodes = [make_node("n0", Op.INPUT, (), [], {"shape": shape})]
    for i, (op, attrs, params, *ins) in enumerate(specs, start=1):
        names = ins[0] if ins else [nodes[-1].name]
        shapes = [next(n.shape for n in nodes if n.name == s) for s in names]
        nodes.append(make_node(f"n{i}", op, names, shapes, attrs, params))
    return Graph(tuple(nodes), nodes[-1].name)


def conv(ci, co, k, groups=1, **attrs):
    w = RNG.normal(size=(co, ci // groups, k, k)) / np.sqrt(ci // groups * k * k)
    return (Op.CONV2D, {"groups": groups, **attrs}, {"weight": w, "bias": RNG.normal(size=co)
                                                     * 0.1})


def run_mpc(graph, x, cmp="circuit"):
    """(outputs, plain reference on the encoded input, channels), both flat per input."""
    got, chans = run_graph(ev.lower_for_mpc(graph), x, cmp=cmp)
    want = interpret(graph, decode(encode(x))).reshape(len(x), -1)
    return got.reshape(len(x), -1), want, chans


CASES = {
    "conv_stride_pad_relu": ((3, 9, 9), [conv(3, 6, 3, stride=(2, 2), padding=(1, 1)),
                                          (Op.RELU, {}, {})]),
    "conv_dilated_out": ((2, 9, 9), [conv(2, 4, 3, dilation=(2, 2), padding=(2, 2))]),
    "conv_grouped": ((4, 6, 6), [conv(4, 6, 3, groups=2, padding=(1, 1)),
                                  (Op.RELU, {}, {}), conv(6, 2, 1)]),
    "conv_depthwise_strided": ((5, 7, 7), [conv(5, 5, 3, groups=5, stride=(2, 2),
                                                 padding=(1, 1)),
                                            (Op.CLIP, {"lo": 0.0, "hi": 6.0}, {})]),
    "linear_2d": ((3, 5), [(Op.LINEAR, {}, {"weight": RNG.normal(size=(4, 5)),
                                             "bias": RNG.normal(size=4)}),
                            (Op.CLIP, {"lo": -1.0, "hi": 1.5}, {})]),
    "batchnorm_unfolded": ((3, 4, 4), [(Op.RELU, {}, {}),
                                        (Op.BATCHNORM, {}, {"scale": RNG.normal(size=3),
                                                            "shift": RNG.normal(size=3)}),
                                        (Op.RELU, {}, {})]),
    "avgpool_ceil_nopad": ((2, 7, 7), [(Op.AVGPOOL2D, {"kernel": (3, 3), "stride": (2, 2),
                                                       "padding": (1, 1), "ceil_mode": True,
                                                       "count_include_pad": False}, {}),
                                        (Op.RELU, {}, {})]),
    "avgpool_include_pad": ((2, 6, 6), [(Op.AVGPOOL2D, {"kernel": (2, 2), "stride": (2, 2),
                                                        "padding": (1, 1)}, {}),
                                         (Op.SQUARE, {}, {})]),
    "global_avgpool": ((3, 5, 5), [(Op.GLOBALAVGPOOL, {}, {}),
                                    (Op.RESHAPE, {"shape": (3,)}, {}),
                                    (Op.RELU, {}, {})]),
    "maxpool_pad_ceil": ((2, 8, 8), [(Op.MAXPOOL2D, {"kernel": (3, 3), "stride": (2, 2),
                                                     "padding": (1, 1), "ceil_mode": True},
                                      {})]),
    "maxpool_plain": ((2, 6, 6), [(Op.MAXPOOL2D, {"kernel": (2, 2), "stride": (2, 2)}, {})]),
    "squeeze_excite_mul": ((4, 3, 3), [(Op.GLOBALAVGPOOL, {}, {}),
                                        (Op.HARDSIGMOID, {}, {}),
                                        (Op.MUL, {}, {}, ["n0", "n2"])]),
    "add_sub_concat": ((2, 3, 3), [(Op.RELU, {}, {}), (Op.ADD, {}, {}, ["n0", "n1"]),
                                   (Op.SUB, {}, {}, ["n2", "n0"]),
                                   (Op.CONCAT, {"axis": 0}, {}, ["n3", "n1"]),
                                   (Op.RESHAPE, {"shape": (36,)}, {}),
                                   (Op.GATHER, {"indices": (5, -1, 0, 35)}, {})]),
    "residual_add_relu": ((4, 6, 6), [conv(4, 4, 3, padding=(1, 1)), (Op.RELU, {}, {}),
                                       conv(4, 4, 3, padding=(1, 1)),
                                       (Op.ADD, {}, {}, ["n3", "n0"]), (Op.RELU, {}, {})]),
    "sub_of_two_convs_out": ((3, 5, 5), [conv(3, 2, 3), (*conv(3, 2, 3), ["n0"]),
                                          (Op.SUB, {}, {}, ["n1", "n2"])]),
    "pool_head_merged": ((2, 4, 4), [conv(2, 3, 3, padding=(1, 1)), (Op.RELU, {}, {}),
                                      (Op.AVGPOOL2D, {"kernel": (2, 2), "stride": (2, 2)},
                                       {}),
                                      (Op.RESHAPE, {"shape": (12,)}, {}),
                                      (Op.LINEAR, {}, {"weight": RNG.normal(size=(5, 12)),
                                                       "bias": RNG.normal(size=5)})]),
    "clip_alone": ((40,), [(Op.CLIP, {"lo": -0.5, "hi": 2.0}, {})]),
    "hardswish": ((50,), [(Op.HARDSWISH, {}, {})]),
    "poly": ((20,), [(Op.POLY, {"coeffs": (0.1, 0.5, 0.25, -0.05), "lo": -4.0, "hi": 4.0},
                      {})]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_op_matches_the_reference_kernel_on_shares(name):
    """Exact ops (everything but sigmoid/SiLU) agree with the reference kernel up to
    fixed point: weights and reciprocals rounded to 2^-20, one rounding per
    truncation: within 1e-4 here (values of order 1-10); a POLY's power-basis
    coefficients are rounded to 2^-20 too, which costs up to |x|^3 2^-21 ~ 5e-4 at
    |x| = 10."""
    shape, specs = CASES[name]
    x = RNG.normal(size=(3,) + shape) * 3
    got, want, _ = run_mpc(chain(shape, *specs), x)
    np.testing.assert_allclose(got, want, atol=1e-3 if name == "poly" else 1e-4)


def test_a_small_pooled_head_is_merged_into_one_dense_layer():
    shape, specs = CASES["pool_head_merged"]
    lowered = ev.lower_for_mpc(chain(shape, *specs))
    assert [n.op for n in lowered.nodes] == [Op.INPUT, Op.CONV2D, Op.RELU, Op.DENSE]
    big = ev.lower_for_mpc(chain((512, 7, 7), (Op.GLOBALAVGPOOL, {}, {}),
                                 (Op.RESHAPE, {"shape": (512,)}, {}),
                                 (Op.LINEAR, {}, {"weight": np.zeros((1000, 512)),
                                                  "bias": np.zeros(1000)})))
    assert Op.GLOBALAVGPOOL in big.ops()          # 25088 x 1000 entries: kept


def test_the_mpc_target_lists_exactly_the_ops_with_a_kernel():
    assert ops_for("mpc") == ev.MPC_OPS == frozenset(ev.KERNELS)
    with pytest.raises(VeilError, match="bootstrap"):
        ev.lower_for_mpc(chain((4,), (Op.BOOTSTRAP, {}, {})))


@pytest.mark.parametrize("op,bound", [(Op.SIGMOID, 7e-5), (Op.SILU, 2.5e-4),
                                      (Op.HARDSIGMOID, 1e-5), (Op.GELU, 2e-5),
                                      (Op.TANH, 1.2e-4)])
def test_sigmoid_and_silu_stay_within_their_stated_error_bound(op, bound):
    """The exact pieces plus a selected polynomial correction (``evaluator.Tail``), and
    hardsigmoid's exact pieces: the float form is within the bound of the true function
    on a dense grid, and the shares (fixed point included) within the same bound, also
    far outside the fitted range where the powers wrap around the ring."""
    from veil.ir import ops as registry
    pw = ev.approximation(op)
    true = registry.REGISTRY[op].kernel
    grid = np.linspace(-40, 40, 400_001)
    assert np.abs(pw(grid) - true([grid], {}, {})).max() <= bound * 0.9
    x = np.concatenate([np.linspace(-14, 14, 1401), [-5000.0, -300.0, -12.0, 12.0, 300.0,
                                                      5000.0], RNG.normal(size=200) * 4])
    got, want, chans = run_mpc(chain((x.size,), (op, {}, {})), x[None])
    # GELU's chain runs at 10 fractional bits (``evaluator.TAIL_CHAIN_BITS``): its
    # rounding, ``tail_chain_error``, joins the bound
    extra = ev.tail_chain_error(op) if op is not Op.HARDSIGMOID else 0.0
    assert extra <= 7.7e-3
    assert np.abs(got - want).max() <= bound + extra
    assert np.abs(got - pw(decode(encode(x)))).max() <= 2.5e-4 + extra  # fixed point


def test_material_is_fetched_one_layer_at_a_time():
    """A streaming source is asked for layer i only when the run reaches it, in order,
    once, and the run never holds more than one layer's material."""
    shape = (3, 8, 8)
    g = ev.lower_for_mpc(chain(shape, conv(3, 4, 3, padding=(1, 1)), (Op.RELU, {}, {}),
                               (Op.MAXPOOL2D, {"kernel": (2, 2), "stride": (2, 2)}, {}),
                               conv(4, 4, 3, padding=(1, 1)), (Op.ADD, {}, {}, ["n3", "n4"]),
                               (Op.RELU, {}, {}), (Op.GLOBALAVGPOOL, {}, {}),
                               (Op.RESHAPE, {"shape": (4,)}, {}),
                               (Op.LINEAR, {}, {"weight": RNG.normal(size=(3, 4)),
                                                "bias": np.zeros(3)})))
    plan = ev.material_plan(g)
    x = RNG.normal(size=(2,) + shape)
    prg = Prg()
    s0, s1 = share(encode(x), prg)
    log, held, peak = [], {0: 0, 1: 0}, {0: 0, 1: 0}
    pending, lock = {}, threading.Lock()

    def source(p):
        def fetch(i):
            with lock:                                # the dealer makes layer i on demand
                if i not in pending:
                    pending[i] = ev.dealer_material(list(plan[i].steps), len(x), prg)
            log.append((p, i))
            held[p] = ev.material_bytes(plan[i].steps, len(x))    # the previous is dropped
            peak[p] = max(peak[p], held[p])
            return pending[i][p]
        return fetch

    (o0, o1), _ = run_parties(lambda p, ch, inp: ev.evaluate(p, ch, g, inp, source(p)),
                              (s0, s1))
    assert [i for p, i in log if p == 0] == list(range(len(plan)))
    assert [i for p, i in log if p == 1] == list(range(len(plan)))
    total = ev.material_bytes([s for layer in plan for s in layer.steps], len(x))
    largest = max(ev.material_bytes(layer.steps, len(x)) for layer in plan)
    assert peak[0] == largest < total
    want = interpret(g, decode(encode(x)))
    np.testing.assert_allclose(decode(reconstruct(o0, o1), ev.output_frac_bits(g)), want,
                               atol=1e-4)


def test_a_model_over_the_memory_budget_is_refused_before_allocation():
    """The estimate comes from the graph alone; over the budget: ModelTooLargeError (a
    ResourceError) naming the model, the estimate and the budget."""
    g = chain((3, 64, 64), conv(3, 16, 3, padding=(1, 1)), (Op.RELU, {}, {}))
    est = ev.estimate_memory(g, batch=1)
    assert est["party"] > ev.BASE_BYTES and est["dealer"] > ev.BASE_BYTES
    assert ev.estimate_memory(g, batch=8)["party"] > est["party"]
    with pytest.raises(ModelTooLargeError, match=r"tiny-conv needs an estimated \d+ MiB.*"
                       r"budget of 100 MiB") as info:
        ev.check_memory(g, batch=64, budget=100 << 20, name="tiny-conv")
    assert isinstance(info.value, ResourceError)
    assert ev.check_memory(g, batch=1)["party"] == est["party"]      # fits 2 GiB


def test_clients_split_batches_to_what_the_budget_admits():
    """``max_batch``: the largest power-of-two request every process can hold, as the
    parties check it (current layer plus one ahead, layers over the budget's share
    streamed chunk by chunk: ``stream_threshold``); clients split larger batches."""
    g = chain((3, 128, 128), conv(3, 16, 3, padding=(1, 1)), (Op.RELU, {}, {}))
    budget = ev.estimate_memory(g, 4, layers_held=2)["party"] + 1
    # 4 fits with every layer held whole: nothing streams
    assert ev.stream_threshold(g, 4, budget, layers_held=2) == ev.LAZY_BYTES
    b = ev.max_batch(g, budget=budget)
    assert b >= 8                  # streaming the big layer admits larger requests
    t = ev.stream_threshold(g, b, budget, layers_held=2)
    assert ev.streams_in_chunks(ev.Program(g).layers[0].steps, b, above=t)
    ev.check_memory(g, b, budget=budget, layers_held=2, above=t)
    with pytest.raises(ModelTooLargeError):
        ev.check_memory(g, 2 * b, budget=budget, layers_held=2,
                        above=ev.stream_threshold(g, 2 * b, budget, layers_held=2))
    assert ev.max_batch(g, budget=1) == 1          # one input is always tried


def test_fss_comparisons_run_the_same_kernels():
    shape, specs = CASES["conv_depthwise_strided"]
    x = RNG.normal(size=(2,) + shape)
    got, want, chans = run_mpc(chain(shape, *specs), x, cmp="fss")
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert FRAC_BITS == 20


def test_circuit_material_in_chunks_joins_into_one():
    """The processes fetch large steps in chunks; joined, the chunks are material for
    the whole step: ReLU and truncation stay exact across the seams."""
    from veil.backends.mpc import protocols as pr

    prg = Prg()
    x = RNG.normal(size=1000) * 50
    s0, s1 = share(encode(x), prg)
    for kind in ("relu", "trunc_relu"):
        halves = [ev.dealer_material([ev.Step(kind, n)], 1, prg) for n in (512, 488)]
        mats = [pr.material_from_arrays(pr.concat_circuit_arrays(
            [pr.material_arrays(h[p]) for h in halves]))[0] for p in (0, 1)]
        if kind == "relu":
            (r0, r1), _ = run_parties(lambda p, ch, inp: pr.relu(ch, p, *inp),
                                      ((s0, mats[0]), (s1, mats[1])))
            assert np.array_equal(reconstruct(r0, r1), encode(np.maximum(decode(encode(x)), 0)))
        else:
            y = [s * np.uint64(1 << FRAC_BITS) for s in (s0, s1)]
            (r0, r1), _ = run_parties(lambda p, ch, inp: pr.trunc_relu(ch, p, *inp),
                                      ((y[0], mats[0]), (y[1], mats[1])))
            assert np.array_equal(reconstruct(r0, r1),
                                  np.maximum(encode(x).view(np.int64), 0).view(np.uint64))


@pytest.mark.parametrize("kind", ["trunc_relu", "mul", "select"])
def test_seeded_material_keeps_every_share_sum_and_sends_little(kind):
    """With a ``prg.Deal`` the dealer sends party 0 a seed and the list of its draws,
    and party 1 a seed, its draws and only the halves of secrets the dealer computed:
    expanded, the halves add (XOR) up to consistent material and the protocol is
    exact; party 0's message is a few hundred bytes, party 1's a fraction of its
    material (a Beaver triple: c only; a comparison's tables, which depend on the
    mask, are sent whole: 0.9 of a fused truncation and ReLU)."""
    from veil.backends.mpc import protocols as pr
    from veil.backends.mpc.prg import Deal
    from veil.backends.sockets import pack_arrays

    deal, n = Deal(), 776
    m0, m1 = ev.dealer_material([ev.Step(kind, n)], 1, deal)
    full = [pr.material_arrays(m0), pr.material_arrays(m1)]
    sent = [pr.seeded_arrays(deal, b, full[b]) for b in (0, 1)]
    got = [pr.expand_seeded(s) for s in sent]
    for b in (0, 1):
        assert got[b].keys() == full[b].keys()
        for k, v in full[b].items():
            assert np.array_equal(got[b][k], v), k
    whole = sum(a.nbytes for a in full[1].values())
    assert len(pack_arrays(sent[0])) < 2000 < whole
    assert len(pack_arrays(sent[1])) < {"mul": 0.4, "trunc_relu": 0.9,
                                        "select": 0.75}[kind] * whole
    x = RNG.normal(size=n) * 20
    s0, s1 = share(encode(x), Prg())
    mats = [pr.material_from_arrays(g)[0] for g in got]
    if kind == "mul":
        (r0, r1), _ = run_parties(lambda p, ch, inp: pr.mul(ch, p, *inp),
                                  ((s0, s0, mats[0]), (s1, s1, mats[1])))
        want = encode(x) * encode(x)
    elif kind == "select":
        (r0, r1), _ = run_parties(lambda p, ch, inp: pr.select(ch, p, *inp),
                                  ((s0, s0, mats[0]), (s1, s1, mats[1])))
        want = encode(np.maximum(decode(encode(x)), 0))
    else:
        y = [s * np.uint64(1 << FRAC_BITS) for s in (s0, s1)]
        (r0, r1), _ = run_parties(lambda p, ch, inp: pr.trunc_relu(ch, p, *inp),
                                  ((y[0], mats[0]), (y[1], mats[1])))
        want = np.maximum(encode(x).view(np.int64), 0).view(np.uint64)
    assert np.array_equal(reconstruct(r0, r1), want)


def test_chunked_material_gives_the_same_outputs_as_whole_layers(monkeypatch):
    """A layer whose material streams in chunks (``ev.Chunked``, what the processes do
    above ``--stream-above``) runs every protocol chunk by chunk, each chunk with its own
    dealer material: the outputs are those of whole-layer material up to the
    truncations' stochastic rounding (a unit in the last place each), over several
    chunks of a fused trunc+ReLU6, a max pool, a SiLU (a ReLU, products, truncations
    and a selection) and a product."""
    monkeypatch.setattr(ev, "CHUNK", 64)
    graph = chain((3, 8, 8), conv(3, 4, 3, padding=(1, 1)),
                  (Op.CLIP, {"lo": 0.0, "hi": 6.0}, {}),
                  (Op.MAXPOOL2D, {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0)}, {}),
                  (Op.SILU, {}, {}), (Op.MUL, {}, {}, ["n3", "n4"]))
    x = RNG.normal(size=(2, 3, 8, 8))
    got_whole, want, _ = run_mpc(graph, x)
    g = ev.lower_for_mpc(graph)
    plan = ev.material_plan(g)
    prg, cache, lock, chunks = Prg(), {}, threading.Lock(), []

    def chunk(i, j, c, p):
        with lock:
            key = (i, j, c)
            if key not in cache:
                size = ev.chunk_sizes(plan[i].steps[j].size * len(x))[c]
                step = plan[i].steps[j]
                m0, m1 = ev.dealer_material([ev.Step(step.kind, size, step.shift)], 1, prg)
                cache[key] = (m0[0], m1[0])
                chunks.append(key)
            return cache[key][p]

    def source(p):
        return lambda i: [ev.Chunked(ev.chunk_sizes(s.size * len(x)),
                                     lambda c, i=i, j=j: chunk(i, j, c, p))
                          for j, s in enumerate(plan[i].steps)]

    s0, s1 = share(encode(x), Prg())
    (o0, o1), _ = run_parties(lambda p, ch, inp: ev.evaluate(p, ch, g, inp, source(p)),
                              (s0, s1), timeout=120)
    got = decode(reconstruct(o0, o1), ev.output_frac_bits(g))
    np.testing.assert_allclose(got, got_whole, atol=2e-5)
    np.testing.assert_allclose(got, want, atol=5e-3)
    assert max(c for _, _, c in chunks) >= 3          # several chunks per step ran


def test_steps_travel_with_their_shift_and_bad_ones_are_refused():
    """A party asks the dealer for steps as [kind, size] or [kind, size, shift]; only a
    truncation may shift, by 2..60 bits."""
    from veil import InputError
    step = ev.Step("trunc", 10, 40)
    assert step.wire() == ["trunc", 10, 40] and ev.Step.from_wire(step.wire()) == step
    assert ev.Step.from_wire(["relu", 7]) == ev.Step("relu", 7)
    for bad in (["relu", 7, 20], ["trunc", 7, 61], ["trunc", 7, 1, 2], ["nope", 7]):
        with pytest.raises(InputError):
            ev.Step.from_wire(bad)


def test_a_large_average_pool_keeps_its_precision():
    """1/n at f bits is off by up to n 2^-(f+1) relative (0.6% for the 112x112 pools of
    EfficientNet's squeeze-excite blocks); such pools take their reciprocal with extra
    bits and shift their truncation further (``evaluator._divisor_bits``)."""
    shape = (2, 112, 112)
    graph = chain(shape, (Op.GLOBALAVGPOOL, {}, {}), conv(2, 3, 1))
    g = ev.lower_for_mpc(graph)
    assert [s.shift for s in ev.Program(g).steps["n1"]] == [ev.FRAC_BITS + 10]
    x = RNG.uniform(0, 4, size=(1,) + shape)
    got, want, _ = run_mpc(graph, x)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("op", [Op.SILU, Op.SIGMOID, Op.GELU, Op.TANH, "exp"])
def test_the_correction_terms_stay_below_one_in_the_band(op):
    """``chains._poly12`` keeps z^4 q_2' and h at 3f = 60 bits before h's truncation:
    they must stay below 2^62 / 2^60 = 4 (the faithful truncation's bound); p at 2f
    bits below 2^41 / 2^40 = 2 (its 43-bit ring). The tails' fits keep all of them
    below 1 on [-1, 1]; the exponential's (z in [-9/8, 9/8], p up to e^(1/2)) below 2."""
    from numpy.polynomial import polynomial as P

    from veil.backends.mpc import chains
    if op == "exp":
        c, z, limit = chains.exp_coeffs(), np.linspace(-1.125, 1.125, 20001), 2
    else:
        c, z, limit = ev.approximation(op).coeffs, np.linspace(-1, 1, 20001), 1
    q = [P.polyval(z, c[4 * j:4 * j + 4]) for j in range(4)]
    top = q[2] + z ** 4 * q[3]
    h = q[1] + z ** 4 * top
    for v in (z ** 4 * top, h, z ** 4 * h, q[0] + z ** 4 * h):
        assert np.abs(v).max() < limit


@pytest.mark.parametrize("cmp", ["circuit", "fss"])
@pytest.mark.parametrize("op,bound", [(Op.GELU, 2e-5), (Op.SILU, 2.5e-4)])
def test_a_linear_layer_read_by_gelu_or_silu_is_truncated_with_their_relu(op, bound, cmp):
    """A linear layer whose only reader is a GELU or SiLU leaves its result at 2f bits,
    and the tail takes the truncated value and its ReLU from one opening
    (``protocols.trunc_and_relu``), where the layer's truncation and the tail's
    comparison opened twice: the layer has no material of its own, and the outputs
    stay within the op's bound, with either comparison protocol."""
    w, b = RNG.normal(size=(64, 16)) / 2, RNG.normal(size=64)
    g = chain((16,), (Op.LINEAR, {}, {"weight": w, "bias": b}), (op, {}, {}))
    prog = ev.Program(ev.lower_for_mpc(g))
    assert prog.steps["n1"] == () and prog.steps["n2"][0].kind == "trunc_relu"
    x = RNG.normal(size=(3, 16)) * 3
    got, want, _ = run_mpc(g, x, cmp)
    assert np.abs(got - want).max() <= bound + ev.tail_chain_error(op)
