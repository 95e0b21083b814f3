"""ReLU to a stated precision by a composite minimax sign (issue 16, item 5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.polynomial import chebyshev

import veil
from veil.compiler.composite import sign_stages
from veil.errors import CompileError
from veil.ir import Op


@pytest.mark.parametrize("bits", [6, 8])
def test_composite_sign_meets_its_stated_precision(bits):
    stages, err = sign_stages(bits)
    assert err <= 2.0 ** -bits
    x = np.linspace(-1, 1, 100_001)
    y = x
    for c in stages:
        y = chebyshev.chebval(y, c)
    step = np.where(x > 0, 1.0, 0.0)
    far = np.abs(x) >= 2.0 ** -bits
    # the last stage is the step (1 + sign) / 2: within half the sign error
    assert np.abs(y[far] - step[far]).max() <= 2.0 ** -(bits + 1) + 1e-12
    relu = x * y
    assert np.abs(relu - np.maximum(x, 0)).max() <= 2.0 ** -bits
    with pytest.raises(CompileError, match="relu_bits"):
        sign_stages(30)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3)).eval()


def test_a_relu_model_compiles_to_sign_stages_and_one_product_and_runs_under_he():
    model = _mlp()
    cal = np.random.default_rng(0).uniform(-1, 1, (128, 6))
    compiled = veil.compile(model, cal, relu_bits=8, insecure_test_params=True)
    poly = compiled.result.polynomial
    assert [n.op for n in poly.nodes].count(Op.MUL) == 1
    (report,) = compiled.result.activations
    assert report.stages and report.max_abs_error_range <= 2.0 ** -8 * max(
        abs(report.lo), abs(report.hi))
    x = cal[:4]
    with torch.no_grad():
        ref = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
    sim = compiled.run(x, mode="simulate")
    assert np.abs(sim - ref).max() < 0.02
    # a single Chebyshev fit of the default degree is further from ReLU on this range
    plain_fit = veil.compile(model, cal, degree=7, insecure_test_params=True)
    assert np.abs(plain_fit.run(x, mode="simulate") - ref).max() > np.abs(sim - ref).max()
    he = compiled.run(x[:2], mode="he")
    assert np.abs(he - sim[:2]).max() < 1e-3
    compiled.close()


def test_composite_relus_past_the_unbootstrapped_depth_bootstrap_and_agree():
    torch.manual_seed(1)
    layers = [torch.nn.Linear(6, 8), torch.nn.ReLU()]
    for _ in range(3):      # four ReLUs of ~18 levels: past the 55 one ring holds
        layers += [torch.nn.Linear(8, 8), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(8, 3)).eval()
    cal = np.random.default_rng(1).uniform(-1, 1, (128, 6))
    compiled = veil.compile(model, cal, relu_bits=8, insecure_test_params=True)
    lowered = compiled.result.lowered
    assert sum(n.op is Op.BOOTSTRAP for n in lowered.nodes) >= 1
    x = cal[:2]
    with torch.no_grad():
        ref = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
    sim = compiled.run(x, mode="simulate")
    assert np.abs(sim - ref).max() < 0.02
    he = compiled.run(x, mode="he")
    assert np.abs(he - sim).max() < 1e-2
    compiled.close()
