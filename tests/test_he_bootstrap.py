"""Bootstrapping (issue 16): the engine with real OpenFHE, the levels pass, and a deep
narrow network under HE agreeing with simulate.

The OpenFHE tests use ``bootstrap_params(insecure_test_params=True)``: ring 2^12 with no
security level enforced (INSECURE, test-only), the smallest ring that still
bootstraps; the secure set's figures are in bench/results/he_deep.md.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import veil
from veil import ModelClient, ModelServer
from veil.backends.he.evaluator import Evaluator
from veil.backends.he.layout import pack_inputs, unpack_outputs
from veil.backends.he.slot_engine import NumpySlotEngine
from veil.compiler.levels import check_levels, graph_depth, place_bootstraps
from veil.compiler.params import KEY_DISTS, bootstrap_depth, bootstrap_params
from veil.errors import EngineError, MissingKeyError, SerializationError
from veil.ir import Graph, Op, make_node, run

ofhe = pytest.importorskip("openfhe")
from veil.backends.he import openfhe_engine as E  # noqa: E402

SLOTS = 64


def test_bootstrap_depth_matches_openfhe():
    for dist in KEY_DISTS:
        for budget in ((1, 1), (2, 2), (3, 3), (4, 4), (2, 3), (4, 1)):
            assert bootstrap_depth(budget, dist) == ofhe.CryptoContext.GetBootstrapDepth(
                list(budget), getattr(ofhe, dist))


def test_the_secure_bootstrapping_set_passes_openfhes_128_bit_check():
    params = bootstrap_params(slots=1 << 12)
    assert params.security == "HEStd_128_classic" and not params.insecure_test_params
    assert params.ring_dim == 1 << 16 and params.boot_budget_levels >= 10
    # the same moduli and digits without the (slow) bootstrap precomputation
    cc = E.build_context(replace(params, boot_budget=None))
    assert cc.GetRingDimension() == 1 << 16


@pytest.fixture(scope="module")
def keyed():
    params = bootstrap_params(insecure_test_params=True, slots=SLOTS)
    validator = E.payload_validator(params, [])
    client = E.ClientCrypto(params)
    parts = client.keygen([])
    return params, validator, client, parts


def _spend(session, ct, levels):
    for _ in range(levels):
        ct = session.mul_scalar(ct, 1.0)
    return ct


def test_bootstrap_round_trip_restores_levels_within_the_stated_precision(keyed):
    params, validator, client, parts = keyed
    assert params.bootstraps and params.insecure_test_params
    assert set(parts) == {"mult", "bootstrap"}   # no rotations: one part per key
    x = np.random.default_rng(3).uniform(-1, 1, SLOTS)
    with E.EvaluationSession(params, client.tag, parts, [], validator=validator) as s:
        assert not hasattr(s, "_secret")
        ct = _spend(s, s.load(client.encrypt(x)), params.fresh_budget)
        errors = []
        for _ in range(3):       # fresh budget, then the budget a bootstrap gives back
            ct = s.bootstrap(ct)
            errors.append(np.abs(client.decrypt(s.dump(ct), SLOTS) - x).max())
            ct = _spend(s, ct, params.boot_budget_levels)
        # the budgets are tight: one level more and OpenFHE cannot bootstrap
        with pytest.raises(EngineError):
            s.bootstrap(s.mul_scalar(ct, 1.0))
    # measured 3e-5 to 6e-5 (14-15 bits) at this 50-bit scale; errors do not compound
    assert max(errors) < 2.0 ** -12, errors


def test_bootstrap_keys_are_validated(keyed):
    params, validator, client, parts = keyed
    # keys without the bootstrapping keys (a model that does not bootstrap): refused
    plain = E.ClientCrypto(replace(params, boot_budget=None)).keygen([])
    assert plain["rotations"] == b""
    with pytest.raises(MissingKeyError, match="bootstrapping keys"):
        validator.check_eval_keys({"mult": parts["mult"]}, client.tag)
    with pytest.raises(SerializationError, match="not laid out for this model"):
        E.EvaluationSession(params, client.tag, plain, [], validator=validator)
    # a flipped structure byte in the bootstrapping keys (the sparse secret's key tag
    # included), and a truncated part
    blob = parts["bootstrap"].read()
    checker = validator.boot
    assert checker.aux_tag_offsets, "the sparse-secret switching keys carry their own tag"
    for offset in (checker.segments[len(checker.segments) // 2][0],
                   checker.aux_tag_offsets[0]):
        bad = bytearray(blob)
        bad[offset] = ord("Z") if bad[offset] != ord("Z") else ord("Y")
        with pytest.raises(SerializationError):
            validator.check_eval_keys({"mult": parts["mult"], "bootstrap": bytes(bad)},
                                      client.tag)
    with pytest.raises(SerializationError):
        validator.check_eval_keys({"mult": parts["mult"], "bootstrap": blob[:-8]},
                                  client.tag)


@pytest.fixture(scope="module")
def rotated():
    params = bootstrap_params(insecure_test_params=True, slots=SLOTS)
    rotations = [1, 3, -5, 16]
    validator = E.payload_validator(params, rotations)
    client = E.ClientCrypto(params)
    return params, rotations, validator, client, client.keygen(rotations)


def test_rotation_keys_come_one_part_each_and_are_checked_against_their_index(rotated):
    params, rotations, validator, client, parts = rotated
    assert set(parts) == {"mult", "bootstrap"} | {f"rotation/{r}" for r in rotations}
    one = parts["rotation/3"].read()
    validator.check_rotation(3, one, client.tag)
    # the right bytes under another rotation's name: its automorphism index differs
    with pytest.raises(SerializationError):
        validator.check_rotation(1, one, client.tag)
    with pytest.raises(SerializationError, match="uses no rotation key"):
        validator.check_rotation(2, one, client.tag)
    keys = {k: (v.read() if k != "mult" else v) for k, v in parts.items()}
    # a missing rotation is named; an extra one is refused
    with pytest.raises(MissingKeyError, match=r"\[-5\]"):
        validator.check_eval_keys({k: v for k, v in keys.items() if k != "rotation/-5"},
                                  client.tag)
    with pytest.raises(SerializationError, match="does not use"):
        validator.check_eval_keys({**keys, "rotation/7": one}, client.tag)
    # a coefficient at its modulus in one rotation key: refused when the session opens
    bad = bytearray(keys["rotation/16"])
    at = int(validator.rotation_key.hole_offsets[3])
    bad[at:at + 8] = b"\xff" * 8
    with pytest.raises(SerializationError, match="modulus"):
        E.EvaluationSession(params, client.tag, {**keys, "rotation/16": bytes(bad)},
                            rotations, validator=validator)


@pytest.mark.parametrize("budget", [1, 1 << 40])
def test_rotation_keys_loaded_per_use_give_the_same_rotations(rotated, budget):
    """A budget of one byte holds one key at a time (every rotation loads its key and
    drops the last); a large one keeps them all. Both rotate correctly."""
    params, rotations, validator, client, parts = rotated
    x = np.random.default_rng(5).uniform(-1, 1, SLOTS)
    with E.EvaluationSession(params, client.tag, parts, rotations, validator=validator,
                             key_cache_bytes=budget) as s:
        ct = s.load(client.encrypt(x))
        for k in rotations:
            got = client.decrypt(s.dump(s.rotate(ct, k)), SLOTS)
            assert np.abs(got - np.roll(x, -k)).max() < 1e-4
        hoisted = s.rotate_hoisted(ct, rotations)
        for k in rotations:
            got = client.decrypt(s.dump(hoisted[k]), SLOTS)
            assert np.abs(got - np.roll(x, -k)).max() < 1e-4
        # the input kept its tag: products and sums with it still work
        both = s.add(ct, s.rotate(ct, 1))
        assert np.abs(client.decrypt(s.dump(both), SLOTS) - x - np.roll(x, -1)).max() < 1e-4
        stats = s.key_stats
        assert stats["per_key"]
        # one byte: each rotation loads its key over the last one, hoisted ones too
        # (the hoisting digits need no key), then rotation 1 again: one key held at a time
        n = len(rotations)
        assert stats["loads"] == (n if budget > 1 else 2 * n + 1)
        size = len(parts["rotation/1"].read())
        assert stats["peak_bytes"] == (n if budget > 1 else 1) * size


def test_bootstrap_without_bootstrapping_params_is_refused():
    params = replace(bootstrap_params(insecure_test_params=True, slots=SLOTS),
                     boot_budget=None, mult_depth=2)
    client = E.ClientCrypto(params)
    parts = client.keygen([])
    with E.EvaluationSession(params, client.tag, parts, []) as s:
        with pytest.raises(EngineError, match="no bootstrapping"):
            s.bootstrap(s.load(client.encrypt(np.zeros(SLOTS))))


# -- the levels pass ----------------------------------------------------------------------

def _deep(width=8, layers=12, residual=False, seed=0):
    torch.manual_seed(seed)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = torch.nn.Linear(width, width), torch.nn.Tanh()

        def forward(self, x):
            y = self.act(self.fc(x))
            return x + y if residual else y

    return torch.nn.Sequential(*[Block() for _ in range(layers)],
                               torch.nn.Linear(width, 3)).eval()


def _slot_run(compiled, x):
    res, plan = compiled.result, compiled.result.plan
    eng = NumpySlotEngine(plan.params.slots, set(plan.rotations))
    outs = []
    for xi in x:
        ct = Evaluator(res.lowered, plan).run(eng, pack_inputs([xi], plan.manifest(),
                                                               plan.params.slots))
        outs.append(unpack_outputs(ct, plan.manifest(), 1)[0])
    return np.stack(outs), eng


@pytest.mark.parametrize("residual", [False, True])
def test_levels_pass_places_bootstraps_that_fit(residual):
    cal = np.random.default_rng(0).normal(size=(128, 8))
    compiled = veil.compile(_deep(residual=residual), cal, degree=13,
                            insecure_test_params=True)
    res = compiled.result
    lowered, params = res.lowered, res.plan.params
    boots = [n for n in lowered.nodes if n.op is Op.BOOTSTRAP]
    depth = graph_depth(lowered)
    assert params.bootstraps and depth > 55
    left = check_levels(lowered, params)
    assert min(left.values()) >= 0
    # lazy placement: never more bootstraps than one per layer, at least the minimum
    # the budgets allow on the longest path
    minimum = -(-(depth - params.fresh_budget) // params.boot_budget_levels)
    assert minimum <= len(boots) <= 12
    # a residual sum reads the freshest copy of its skip value: no node reads a value
    # whose bootstrapped copy already exists
    position = {n.name: i for i, n in enumerate(lowered.nodes)}
    for node in lowered.nodes:
        for src in node.inputs:
            copy = f"{src}/bootstrap"
            assert copy not in position or position[copy] > position[node.name] \
                or node.op is Op.BOOTSTRAP
    if residual:
        assert sum(n.op is Op.ADD for n in lowered.nodes) == 12
    x = cal[:3]
    got, eng = _slot_run(compiled, x)
    np.testing.assert_allclose(got, run(lowered, x), atol=1e-9)
    assert eng.bootstraps == 3 * len(boots) and eng.largest_bootstrap_input <= 1.0
    # bootstraps are the identity on values: the lowered graph is the polynomial one
    np.testing.assert_allclose(compiled.run(x, mode="simulate"), run(res.polynomial, x),
                               atol=1e-9)
    notes = {n.pass_name: n for n in res.notes}
    assert notes["place_bootstraps"].data["bootstraps"] == len(boots)
    # the report says where each bootstrap sits and how many levels its value had left
    placed = notes["place_bootstraps"].data["placed"]
    assert [p["node"] for p in placed] == [b.name for b in boots]
    assert all(p["levels_left"] == left[p["value"]] for p in placed)
    assert f"bootstrap {boots[0].name!r}" in str(compiled.report())


def test_levels_pass_scales_large_values_into_the_unit_interval():
    # dense x, then a degree-1 series 2 + 0.1 t on [-4, 4]: every value is near 2, so
    # every bootstrap gets a bound (and costs a level on each side)
    nodes = [make_node("x", Op.INPUT, [], [], {"shape": (4,)})]
    prev = "x"
    for i in range(120):
        name = f"n{i}"
        if i % 2:
            nodes.append(make_node(name, Op.POLY, [prev], [(4,)],
                                   {"coeffs": (2.0, 0.1), "lo": -4.0, "hi": 4.0}, {}))
        else:
            nodes.append(make_node(name, Op.DENSE, [prev], [(4,)], {"shape": (4,)},
                                   {"matrix": np.eye(4), "bias": np.zeros(4)}))
        prev = name
    graph = Graph(tuple(nodes), prev)
    cal = np.random.default_rng(1).uniform(1.5, 2.0, size=(16, 4))
    lowered, note = place_bootstraps(graph, calibration=cal, insecure_test_params=True)
    boots = [n for n in lowered.nodes if n.op is Op.BOOTSTRAP]
    assert boots and all(2.0 < b.attrs["bound"] < 3.0 for b in boots)
    check_levels(lowered, bootstrap_params(insecure_test_params=True))
    np.testing.assert_allclose(run(lowered, cal), run(graph, cal))
    assert note.data["bootstraps"] == len(boots)


def test_shallow_models_get_no_bootstraps():
    cal = np.random.default_rng(0).normal(size=(64, 8))
    compiled = veil.compile(_deep(layers=3), cal, degree=13, insecure_test_params=True)
    assert not any(n.op is Op.BOOTSTRAP for n in compiled.result.lowered.nodes)
    assert not compiled.result.plan.params.bootstraps
    assert compiled.result.plan.manifest()["bootstrapping"] is False


# -- a deep narrow network under HE ---------------------------------------------------------

def test_deep_network_under_he_agrees_with_simulate(tmp_path):
    """Client and server from exported bundles: the server gets evaluation keys only."""
    cal = np.random.default_rng(0).normal(size=(128, 8))
    compiled = veil.compile(_deep(residual=True), cal, degree=13, insecure_test_params=True)
    plan = compiled.result.plan
    boots = sum(n.op is Op.BOOTSTRAP for n in compiled.result.lowered.nodes)
    assert boots >= 2 and plan.manifest()["bootstrapping"] is True
    server_dir, client_dir = compiled.export(tmp_path)
    x = cal[:1]
    with ModelClient(client_dir) as client:
        assert client.bundle.params.bootstraps
        client.keygen()
        server = ModelServer(server_dir)
        with server.open_session(client.evaluation_keys()) as session:
            assert not hasattr(session, "_secret")
            he = client.decrypt(session.run(client.encrypt(x[0])))
    sim = compiled.run(x, mode="simulate")
    assert np.abs(he.reshape(sim.shape) - sim).max() < 1e-3
    assert np.argmax(he) == np.argmax(sim)


def test_a_residual_blocks_bootstrap_moves_to_its_fork_when_that_saves_some():
    from veil.compiler.levels import _place

    # x -> [dense 0.3, poly (degree 5: 3 levels)] + x -> dense 0.5 -> ...: 5 levels a
    # block, two per bootstrap at a fork; values stay in [-1, 1], so no bootstrap needs
    # scaling. Lazily, each bootstrap lands on a branch's dense output and the skip
    # value stays old, so the sums soon run out again
    nodes = [make_node("x", Op.INPUT, [], [], {"shape": (4,)})]
    prev = "x"
    coeffs = tuple([0.0, 0.3] + [0.0] * 4)
    for i in range(14):
        nodes += [
            make_node(f"d{i}", Op.DENSE, [prev], [(4,)], {"shape": (4,)},
                      {"matrix": np.eye(4) * 0.3, "bias": np.zeros(4)}),
            make_node(f"p{i}", Op.POLY, [f"d{i}"], [(4,)],
                      {"coeffs": coeffs, "lo": -1.0, "hi": 1.0}, {}),
            make_node(f"a{i}", Op.ADD, [prev, f"p{i}"], [(4,), (4,)], {}, {}),
            make_node(f"s{i}", Op.DENSE, [f"a{i}"], [(4,)], {"shape": (4,)},
                      {"matrix": np.eye(4) * 0.5, "bias": np.zeros(4)})]
        prev = f"s{i}"
    graph = Graph(tuple(nodes), prev)
    cal = np.random.default_rng(2).uniform(-0.5, 0.5, size=(16, 4))
    params = bootstrap_params()          # the secure set's budgets (no OpenFHE here)
    lazy_only = _place(graph, params, lambda name: 1.0, frozenset())[1]
    lowered, note = place_bootstraps(graph, calibration=cal)
    boots = [n for n in lowered.nodes if n.op is Op.BOOTSTRAP]
    assert len(boots) < len(lazy_only)
    assert any(n.inputs[0].startswith("s") for n in boots), "a fork was bootstrapped"
    check_levels(lowered, params)
    np.testing.assert_allclose(run(lowered, cal), run(graph, cal))


def test_a_bootstrapped_model_is_served_over_http(tmp_path):
    """The service and the SDK with a model that bootstraps: its keys go up one part
    per rotation key and the server's session loads them per layer."""
    from service_util import ServerProcess

    from veil.model import export_model
    from veil.service.auth import KeyStore

    cal = np.random.default_rng(0).normal(size=(128, 8))
    model = _deep(residual=True)
    compiled = veil.compile(model, cal, degree=13, insecure_test_params=True)
    assert sum(n.op is Op.BOOTSTRAP for n in compiled.result.lowered.nodes) >= 2
    export_model(model, cal, tmp_path / "deep", name="deep", modes=("he",),
                 compiled=compiled)
    store = tmp_path / "store"
    keys = KeyStore(store)
    token = keys.create("alice")
    server = ServerProcess([tmp_path / "deep"], store, timeout=120)
    try:
        with veil.Client(server.url, "deep", api_key=token, key_dir=tmp_path / "keys",
                         allow_insecure=True) as client:
            he = client.predict(cal[:2])
    finally:
        server.stop()
        keys.close()
    assert server.errors() == "", server.errors()
    sim = compiled.run(cal[:2], mode="simulate")
    assert np.abs(np.asarray(he).reshape(sim.shape) - sim).max() < 1e-3
