"""Polynomial-aware fine-tuning: the trained polynomial is the one veil compiles."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import veil
from veil import InputError
from veil.finetune import PolyAct, finetune, replace_activations
from veil.frontend import to_graph
from veil.ir import Op

REL_TOL = 2.0 ** -16


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(torch.as_tensor(x)).argmax(1).numpy() == y).mean())


@pytest.fixture(scope="module")
def digits_mlp_tuned(request):
    from models import digits_split, digits_mlp, train

    xtr, xte, ytr, yte = digits_split()
    model = train(digits_mlp(), xtr, ytr, epochs=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = finetune(model, (xtr, ytr), epochs=2, degree=2, lr=3e-3)
    return model, before, tuned, (xtr, xte, ytr, yte)


def test_user_model_untouched(digits_mlp_tuned):
    model, before, tuned, _ = digits_mlp_tuned
    assert tuned is not model
    assert isinstance(model[2], nn.ReLU) and isinstance(tuned[2], PolyAct)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_degree2_compile_is_shallower_and_simulates_the_tuned_model(digits_mlp_tuned):
    model, _, tuned, (xtr, xte, ytr, yte) = digits_mlp_tuned
    deep = veil.compile(model, xtr)                      # ReLU at degree 27
    shallow = veil.compile(tuned, xtr, degree=2)
    assert shallow.report().depth < deep.report().depth
    # dense, degree-2 poly (one squaring after fold_quadratic, two levels without), dense
    assert shallow.report().depth <= 1 + 2 + 1
    acc = shallow.report(xte, yte).accuracy
    torch_acc = _accuracy(tuned, xte, yte)
    assert abs(acc["simulate"] - torch_acc) <= 0.01
    assert abs(acc["plain"] - torch_acc) <= 0.01
    assert torch_acc > 0.9
    # The compiled polynomial is the trained one, not a refit of ReLU.
    with torch.no_grad():
        logits = tuned(torch.as_tensor(xte[:50])).double().numpy()
    np.testing.assert_allclose(shallow.run(xte[:50], mode="simulate"), logits,
                               rtol=1e-4, atol=1e-4)


def test_finetune_beats_a_plain_degree2_fit(digits_mlp_tuned):
    model, _, tuned, (xtr, xte, ytr, yte) = digits_mlp_tuned
    naive = veil.compile(model, xtr, degree=2).report(xte, yte).accuracy["simulate"]
    tuned_acc = veil.compile(tuned, xtr).report(xte, yte).accuracy["simulate"]
    assert tuned_acc > naive


def test_he_matches_simulate(digits_mlp_tuned):
    _, _, tuned, (xtr, xte, _, _) = digits_mlp_tuned
    with veil.compile(tuned, xtr, insecure_test_params=True) as compiled:
        he = compiled.run(xte[:1], mode="he")
        sim = compiled.run(xte[:1], mode="simulate")
    assert np.abs(he - sim).max() / np.abs(sim).max() < REL_TOL


def test_polyact_is_one_poly_node_with_its_coefficients():
    act = PolyAct(3, lo=-2.0, hi=3.0, source="tanh")
    with torch.no_grad():
        act.coeffs.copy_(torch.tensor([0.1, 0.5, -0.2, 0.05]))
    model = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 2))
    graph = to_graph(model, (4,))
    polys = [n for n in graph.nodes if n.op is Op.POLY]
    assert len(polys) == 1
    assert polys[0].attrs["lo"] == -2.0 and polys[0].attrs["hi"] == 3.0
    np.testing.assert_allclose(polys[0].attrs["coeffs"], [0.1, 0.5, -0.2, 0.05], rtol=1e-6)
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    compiled = veil.compile(model, x)
    assert compiled.report().depth == 1 + 3 + 1          # degree 3 costs 3 levels
    with torch.no_grad():
        expected = model(torch.as_tensor(x)).double().numpy()
    np.testing.assert_allclose(compiled.run(x, mode="simulate"), expected, atol=1e-5)


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(nn.functional.relu(self.fc1(x)) - 0.5))


def test_functional_activations_are_replaced():
    torch.manual_seed(0)
    net = replace_activations(FunctionalNet(), degree=2)
    assert sum(isinstance(m, PolyAct) for m in net.modules()) == 2
    sources = sorted(m.source for m in net.modules() if isinstance(m, PolyAct))
    assert sources == ["relu", "tanh"]


def test_functional_model_finetunes_and_compiles():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    tuned = finetune(FunctionalNet(), (x, y), epochs=2, lr=1e-2)
    compiled = veil.compile(tuned, x)
    assert not any(n.op in (Op.RELU, Op.TANH) for n in compiled.result.source.nodes)
    with torch.no_grad():
        expected = tuned(torch.as_tensor(x)).double().numpy()
    np.testing.assert_allclose(compiled.run(x, mode="simulate"), expected, atol=1e-4)


def test_initial_fit_follows_the_activation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 5)).astype(np.float32)
    model = nn.Sequential(nn.Linear(5, 5), nn.Sigmoid())
    tuned = finetune(model, (x, np.zeros(512, dtype=np.int64)), epochs=0, degree=3)
    with torch.no_grad():
        h = model[0](torch.as_tensor(x))
        err = (tuned[1](h) - torch.sigmoid(h)).abs().max().item()
    assert err < 0.02


def test_finetune_is_deterministic_and_keeps_global_rng():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    a = finetune(model, (x, y), epochs=2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = finetune(model, (x, y), epochs=2, seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("data, words", [
    ((np.zeros((4, 3), np.float32), np.zeros(5, np.int64)), "shape"),
    ((np.zeros((4, 3), np.float32), np.zeros(4, np.float32)), "integer"),
    ((np.full((4, 3), np.nan, np.float32), np.zeros(4, np.int64)), "NaN"),
    (np.zeros((4, 3)), "pair"),
])
def test_bad_training_data_raises_input_error(data, words):
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    with pytest.raises(InputError, match=words):
        finetune(model, data)


def test_bad_degree_raises_input_error():
    with pytest.raises(InputError, match="degree"):
        replace_activations(nn.Sequential(nn.ReLU()), degree=0)


def test_import_does_not_load_torch():
    code = "import sys, veil, veil.finetune; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_validation_keeps_the_best_epoch():
    """Early stopping on held-out data: the kept weights are the best epoch's."""
    from sklearn.datasets import load_digits

    from veil.finetune import _accuracy

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, ytr, xva, yva = x[:1200], y[:1200], x[1200:1500], y[1200:1500]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    plain = finetune(model, (xtr, ytr), epochs=6, lr=5e-2)
    early = finetune(model, (xtr, ytr), epochs=6, lr=5e-2, validation=(xva, yva))
    assert _accuracy(early, xva, yva) >= _accuracy(plain, xva, yva)
    with pytest.raises(veil.InputError, match="validation inputs"):
        finetune(model, (xtr, ytr), epochs=1, validation=(xva[:, :10], yva))


def test_distillation_learns_from_the_original_network_not_the_labels():
    """distill=1 ignores the labels: trained on shuffled labels, the polynomial copy still
    agrees with the original network; cross-entropy alone learns the noise instead."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    torch.manual_seed(0)
    from models import train
    teacher = train(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                    x[:1200], y[:1200], epochs=10)
    with torch.no_grad():
        want = teacher(torch.as_tensor(x[1200:])).argmax(1).numpy()
    noise = np.random.default_rng(0).permutation(y[:1200])
    kd = finetune(teacher, (x[:1200], noise), epochs=8, lr=1e-2, distill=1.0)
    ce = finetune(teacher, (x[:1200], noise), epochs=8, lr=1e-2)
    assert _accuracy(kd, x[1200:], want) > 0.9 > _accuracy(ce, x[1200:], want) + 0.2
    with pytest.raises(InputError, match="distill"):
        finetune(teacher, (x[:10], y[:10]), distill=1.5)
