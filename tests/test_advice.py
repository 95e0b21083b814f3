"""Advice before cost: which modes suit a model and their seconds per input
(``veil.advice``, ``CompiledModel.report().advice``), and HE's batch progress."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

import veil
from veil.advice import LINKS, he_seconds
from veil.compiler.estimate import ROTATION_S_REF, rotation_seconds
from veil.compiler.params import keyswitch_cost
from veil.deploy.local import BatchProgress

torch = pytest.importorskip("torch")


def _mlp(norm: bool = False):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 8)] + ([torch.nn.LayerNorm(8)] if norm else []) \
        + [torch.nn.ReLU(), torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def mlp():
    x = np.random.default_rng(0).uniform(-1, 1, (64, 4))
    with veil.compile(_mlp(), x) as compiled:
        yield compiled


def test_every_mode_is_advised_in_seconds(mlp):
    report = mlp.report()
    by = {a.mode: a for a in report.advice}
    assert list(by) == ["plain", "simulate", "he", "mpc", "tee"]
    assert all(a.suits == "yes" for a in report.advice), [a.line() for a in report.advice]
    # HE: the slot plan's rotation units times one rotation at the plan's ring and towers
    plan = mlp.result.plan
    p = plan.params
    rot = rotation_seconds(p.ring_dim, keyswitch_cost(p.mult_depth, p.scaling_bits,
                                                      p.first_mod_bits, p.num_large_digits))
    assert by["he"].seconds == pytest.approx(plan.costs["lanes_per_ciphertext"] * rot)
    assert he_seconds(mlp.result)[0] == by["he"].seconds
    assert f"depth {plan.depth}" in by["he"].why and "no bootstrapping" in by["he"].why
    # at 2^14 with depth 7's towers a rotation is the bench-measured reference
    if p.ring_dim == 1 << 14 and p.mult_depth == 7:
        assert rot == pytest.approx(ROTATION_S_REF, rel=0.05)
    # MPC: one ReLU layer (a fused truncation + ReLU, then the output's truncation is
    # left to the client): the in-process run counts its rounds; LAN and WAN cost more
    rounds = int(by["mpc"].why.split(" party rounds")[0])
    assert 1 <= rounds <= 10
    assert by["mpc"].seconds > 0 and "LAN" in by["mpc"].why and "WAN" in by["mpc"].why
    plain, tee = by["plain"].seconds, by["tee"].seconds
    assert 0 < plain < by["mpc"].seconds and tee > plain
    assert by["he"].seconds > by["mpc"].seconds       # 15 rotations at 2^14: ~0.3 s


def test_advice_is_in_the_text_and_the_dict(mlp):
    report = mlp.report()
    text = str(report)
    assert "advice (mode, suits, seconds per input on this machine, why):" in text
    assert "he seconds: the slot plan's" in text and "bench-measured" in text
    d = json.loads(json.dumps(report.to_dict(), default=float))
    assert [a["mode"] for a in d["advice"]] == ["plain", "simulate", "he", "mpc", "tee"]
    assert mlp.report(advice=False).advice == []


def test_a_mode_that_refuses_an_op_is_advised_against():
    """LayerNorm: the share-based modes and the enclave run it, HE and simulate do not."""
    x = np.random.default_rng(1).uniform(-1, 1, (64, 4))
    with veil.compile(_mlp(norm=True), x) as compiled:
        by = {a.mode: a for a in compiled.report().advice}
    assert by["he"].suits == "no" and "refused" in by["he"].why
    assert by["simulate"].suits == "no" and "layernorm" in by["simulate"].why
    assert by["mpc"].suits == "yes" and by["tee"].suits == "yes"


def test_links_price_rounds_and_bytes():
    """The stated link model: a round costs a round trip, slower links cost more."""
    assert [k.name for k in LINKS] == ["loopback", "LAN", "WAN"]
    assert all(a.rtt_s < b.rtt_s and a.bytes_per_s > b.bytes_per_s
               for a, b in zip(LINKS, LINKS[1:]))


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_batch_progress_is_quiet_for_short_batches_and_reports_long_ones():
    clock, out = _Clock(), io.StringIO()
    short = BatchProgress(4, stream=out, clock=clock)
    for _ in range(4):
        clock.t += 1.0
        short.step()
    assert out.getvalue() == ""                       # 4 s in all: under 10 s
    clock.t, out = 0.0, io.StringIO()
    long = BatchProgress(8, stream=out, clock=clock)
    for _ in range(8):
        clock.t += 4.0
        long.step()
    lines = out.getvalue().splitlines()
    # past 10 s (12 s, at 3 of 8), then at most every 5 s: 20, 28 s; the last line ends
    assert lines[0] == "veil he: 3/8 ciphertexts in 12 s, ~20 s left"
    assert lines[1:] == ["veil he: 5/8 ciphertexts in 20 s, ~12 s left",
                         "veil he: 7/8 ciphertexts in 28 s, ~4 s left"]


def test_batch_progress_calls_back_after_every_ciphertext():
    calls, clock = [], _Clock()
    progress = BatchProgress(3, lambda *a: calls.append(a), clock=clock)
    for _ in range(3):
        clock.t += 2.0
        progress.step()
    assert calls == [(1, 3, 2.0), (2, 3, 4.0), (3, 3, 6.0)]


def test_local_he_reports_progress_per_ciphertext():
    """Real HE (INSECURE test ring): a batch of two ciphertexts calls back twice."""
    pytest.importorskip("openfhe")
    from veil.deploy.local import LocalHE

    x = np.random.default_rng(2).uniform(-1, 1, (64, 4))
    with veil.compile(_mlp(), x, insecure_test_params=True) as compiled:
        calls = []
        he = LocalHE(compiled.client_bundle(), compiled.server_bundle(),
                     progress=lambda *a: calls.append(a[:2]))
        try:
            xs = np.random.default_rng(3).uniform(-1, 1, (he.client.lanes + 1, 4))
            out = he.infer_batch(xs)
        finally:
            he.close()
        plain = compiled.run(xs, "plain", head=False)
    assert calls == [(1, 2), (2, 2)]
    assert np.abs(np.asarray(out) - plain).max() < 0.1
