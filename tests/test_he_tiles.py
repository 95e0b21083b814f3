"""Values wider than one ciphertext (veil.compiler.tiles): convolutions and dense layers
run as block matrices over the parts of their values, planned on one part. Against the
interpreter on the numpy slot engine, and under real OpenFHE with and without
bootstrapping."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import veil
from veil.backends.he.evaluator import Evaluator
from veil.backends.he.layout import pack_inputs, pack_parts, part_names, unpack_parts
from veil.backends.he.slot_engine import NumpySlotEngine
from veil.compare.resnet20 import ResNet20
from veil.compiler.dense import DensePlan
from veil.compiler.plan import HEPlan, plan_he
from veil.compiler.tiles import block, blocks_and_union, tile_of
from veil.deploy import ModelClient, ModelServer
from veil.deploy.keys import CIPHERTEXT_KIND
from veil.errors import CompileError, SerializationError
from veil.ir import Op, run
from veil.wire import pack, unpack


def _convnet(seed=0):
    """Multi-channel, strided and depthwise convolutions, a batch norm, and a linear
    layer reading every channel."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def convnet():
    cal = np.random.default_rng(0).uniform(0, 1, size=(8, 3, 16, 16))
    return cal, veil.compile(_convnet(), cal, insecure_test_params=True)


def _slot_run(graph, plan, xs):
    eng = NumpySlotEngine(plan.params.slots, set(plan.rotations))
    m = plan.manifest()
    lanes = plan.lanes
    outs = []
    for k in range(0, len(xs), lanes):
        batch = list(xs[k:k + lanes])
        cts = Evaluator(graph, plan).run_parts(eng, pack_parts(batch, m, plan.params.slots))
        assert len(cts) == plan.output_parts
        outs.append(unpack_parts(cts, m, len(batch)))
    return np.concatenate(outs), eng


def test_a_value_is_cut_between_channels_when_a_channel_fits():
    t = tile_of((16, 8, 8), 256)
    assert t.shape == (4, 8, 8) and t.parts == 4
    assert tile_of((3, 16, 16), 256).shape == (1, 16, 16)
    assert tile_of((3, 16, 16), 1024) == tile_of((3, 16, 16), 1024) and \
        tile_of((3, 16, 16), 1024).parts == 1
    flat = tile_of((2, 32, 32), 256)            # one channel is 1024 values: flat parts
    assert flat.shape == (256,) and flat.parts == 8
    assert tile_of((1000,), 256).parts == 4


def test_blocks_cover_the_matrix(rng):
    m = sp.random(37, 23, density=0.2, random_state=1, format="csr")
    pairs, union = blocks_and_union(m, 8, 10)
    rebuilt = np.zeros((40, 24))
    for j in range(4):
        for i in range(3):
            b = block(m, j, i, 8, 10).toarray()
            assert b.shape == (10, 8)
            if (j, i) not in pairs:
                assert not b.any()
            rebuilt[j * 10:(j + 1) * 10, i * 8:(i + 1) * 8] = b
            assert not (np.abs(b) > union.toarray() + 1e-12).any()
    np.testing.assert_array_equal(rebuilt[:37, :23], m.toarray())


@pytest.mark.parametrize("max_slots", [256, 512])
def test_convolutions_across_ciphertexts_match_the_interpreter(convnet, max_slots):
    cal, compiled = convnet
    graph = compiled.result.lowered
    plan = plan_he(graph, insecure_test_params=True, max_slots=max_slots)
    assert plan.input_parts > 1 and max(plan.parts.values()) > 2
    layers = [plan.dense[n.name] for n in graph.nodes if n.op is Op.DENSE]
    assert all(p.blocks is not None for p in layers)
    # the depthwise layer's blocks stay on the diagonal of its parts
    depthwise = layers[2]
    assert depthwise.in_parts == depthwise.out_parts > 1
    assert all(j == i for j, i in depthwise.blocks)
    # with small parts, several inputs ride in the slots one part leaves free (lanes)
    assert plan.lanes > 1 or max_slots > 256
    xs = cal[:plan.lanes + 1]
    got, eng = _slot_run(graph, plan, xs)
    np.testing.assert_allclose(got, run(graph, xs), atol=1e-9)
    assert eng.used_rotations <= set(plan.rotations)
    # the plan survives the manifest, as a server reads it
    back = HEPlan.from_manifest(plan.params, plan.manifest())
    assert back.input_parts == plan.input_parts and back.output_parts == plan.output_parts
    assert back.dense == plan.dense
    np.testing.assert_allclose(_slot_run(graph, back, xs)[0], got, atol=1e-12)


def test_a_tiled_plan_costs_more_per_part_than_one_ciphertext(convnet):
    _, compiled = convnet
    graph = compiled.result.lowered
    whole = plan_he(graph, insecure_test_params=True)
    cut = plan_he(graph, insecure_test_params=True, max_slots=256)
    assert whole.input_parts == 1 and not whole.parts
    assert cut.costs["lanes_per_ciphertext"] > whole.costs["lanes_per_ciphertext"]
    first = cut.dense[graph.nodes[1].name]
    d = DensePlan.from_dict(first.to_dict())
    assert d == first and d.products() == len(d.diagonals) * len(d.blocks)


def test_values_cut_flat_and_a_dense_layer_wider_than_one_ciphertext(rng):
    """A single channel wider than a part (flat cut) and a linear layer from 1024 to
    600 values, both spanning several ciphertexts."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Flatten(),
                          nn.Linear(1024, 600), nn.Tanh(), nn.Linear(600, 5)).eval()
    cal = rng.uniform(0, 1, size=(4, 1, 32, 32))
    compiled = veil.compile(model, cal, insecure_test_params=True)
    graph = compiled.result.lowered
    plan = plan_he(graph, insecure_test_params=True, max_slots=256)
    assert plan.input_parts == 4 and plan.output_parts == 1
    wide = [p for p in plan.dense.values() if p.in_parts == 4 and p.out_parts == 3]
    assert wide and len(wide[0].blocks) == 12
    got, eng = _slot_run(graph, plan, cal[:2])
    np.testing.assert_allclose(got, run(graph, cal[:2]), atol=1e-9)


def test_a_residual_network_across_ciphertexts_bootstraps_every_part():
    torch.manual_seed(0)
    model = ResNet20(blocks_per_stage=2).eval()
    cal = np.random.default_rng(0).uniform(0, 1, size=(8, 3, 8, 8))
    compiled = veil.compile(model, cal, degree=15, insecure_test_params=True, max_slots=256)
    res, plan = compiled.result, compiled.result.plan
    boots = [n for n in res.lowered.nodes if n.op is Op.BOOTSTRAP]
    assert plan.params.bootstraps and boots and max(plan.parts.values()) == 4
    assert "cut into parts" in plan.param_reason
    got, eng = _slot_run(res.lowered, plan, cal[:2])
    np.testing.assert_allclose(got, run(res.lowered, cal[:2]), atol=1e-9)
    np.testing.assert_allclose(got, compiled.run(cal[:2], mode="simulate"), atol=1e-9)
    # one bootstrap per part of each bootstrapped value, per input
    per_input = sum(plan.parts.get(n.name, 1) for n in boots)
    assert eng.bootstraps == 2 * per_input > 2 * len(boots)
    assert eng.largest_bootstrap_input <= 1.0 + 1e-9


def test_single_ciphertext_helpers_refuse_a_tiled_model(convnet):
    cal, compiled = convnet
    plan = plan_he(compiled.result.lowered, insecure_test_params=True, max_slots=256)
    with pytest.raises(ValueError):
        pack_inputs([cal[0]], plan.manifest(), plan.params.slots)
    eng = NumpySlotEngine(plan.params.slots)
    with pytest.raises(CompileError):
        Evaluator(compiled.result.lowered, plan).run(eng, np.zeros(plan.params.slots))
    with pytest.raises(CompileError):
        Evaluator(compiled.result.lowered, plan).run_parts(eng, [np.zeros(plan.params.slots)])


@pytest.mark.parametrize("bad", [0, 3, 100])
def test_max_slots_must_be_a_power_of_two(convnet, bad):
    cal, _ = convnet
    with pytest.raises(CompileError):
        veil.compile(_convnet(), cal, insecure_test_params=True, max_slots=bad)


# -- real OpenFHE ---------------------------------------------------------------------------

def test_convolutions_across_ciphertexts_under_openfhe(convnet, tmp_path):
    cal, _ = convnet
    compiled = veil.compile(_convnet(), cal, insecure_test_params=True, max_slots=512)
    plan = compiled.result.plan
    assert plan.input_parts == 2 and not plan.params.bootstraps
    x = cal[:2]
    he = compiled.run(x, mode="he")
    np.testing.assert_allclose(he, compiled.run(x, mode="simulate"), atol=1e-3)
    # the wire carries one ciphertext per part and refuses a request missing one
    server_dir, client_dir = compiled.export(tmp_path)
    with ModelClient(client_dir) as client:
        client.keygen()
        blob = client.encrypt(x[0])
        header, parts = unpack(blob, CIPHERTEXT_KIND)
        assert sorted(parts) == sorted(part_names(2))
        server = ModelServer(server_dir)
        with server.open_session(client.evaluation_keys()) as session:
            out = client.decrypt(session.run(blob))
            np.testing.assert_allclose(out, he[0], atol=1e-3)
            short = pack(CIPHERTEXT_KIND, {"ct": parts["ct"]}, header)
            with pytest.raises(SerializationError):
                session.run(short)
    with pytest.raises(CompileError):
        compiled.export(tmp_path / "enc", encrypted_weights=True)


class _Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc, self.act = nn.Linear(width, width), nn.Tanh()

    def forward(self, x):
        return x + self.act(self.fc(x))


def test_a_deep_network_across_ciphertexts_bootstraps_under_openfhe():
    torch.manual_seed(0)
    model = nn.Sequential(*[_Residual(8) for _ in range(12)], nn.Linear(8, 3)).eval()
    cal = np.random.default_rng(0).normal(size=(128, 8))
    compiled = veil.compile(model, cal, degree=13, insecure_test_params=True, max_slots=4)
    plan = compiled.result.plan
    assert plan.params.bootstraps and plan.input_parts == 2 and plan.params.slots == 4
    x = cal[:1]
    he = compiled.run(x, mode="he")
    sim = compiled.run(x, mode="simulate")
    assert np.abs(he - sim).max() < 1e-3 and np.argmax(he) == np.argmax(sim)


def test_a_second_strided_stage_interleaves_channels_in_every_gap(rng):
    """Two stride-2 stages leave gaps of 16 slots per pixel; when the layer's own four
    phases cannot fit its channels, the candidates fill every gap (16 phases), and the
    layer's diagonals stay independent of the pixel."""
    from veil.backends.he.evaluator import PreparedDense
    from veil.compiler.dense import plan_dense
    from veil.compiler.layout import _grid_candidates, _grid_positions
    from veil.compiler.sparse import chain_matrix
    from veil.ir import make_node
    in_shape = (8, 8, 8)                       # a stage-2 value on a stride-2 grid
    in_grid = (tuple((k // 4) * 256 + (0, 1, 16, 17)[k % 4] for k in range(8)), 32, 2)
    conv = make_node("c", Op.CONV2D, ["x"], [in_shape],
                     {"stride": (2, 2), "padding": (1, 1)},
                     {"weight": rng.normal(size=(16, 8, 3, 3)), "bias": rng.normal(size=16)})
    matrix, bias = chain_matrix([conv], in_shape)
    node = make_node("c", Op.DENSE, ["x"], [in_shape],
                     {"shape": (16, 4, 4), "grid_stride": (2, 2)},
                     {"matrix": matrix, "bias": bias})
    slots = 512        # the stride's four phases alone would need 1024
    cands = _grid_candidates(node, in_grid, slots)
    assert cands
    period, pos, grid = cands[0]
    assert len({o % 64 for o in grid[0]}) > 4          # more phases than the stride's
    in_pos = _grid_positions(in_shape, in_grid)
    in_period = 512
    plan = plan_dense(matrix, in_pos, pos, in_period, period)
    assert len(plan.diagonals) < 16 * 8 * 9 / 2      # per channel pair and tap, not pixel
    x = rng.normal(size=int(np.prod(in_shape)))
    vec = np.zeros(slots)
    vec[in_pos] = x
    layer = PreparedDense("c", matrix, bias, plan, slots)
    out = layer(NumpySlotEngine(slots), vec)
    np.testing.assert_allclose(out[pos], matrix @ x + bias, atol=1e-9)
