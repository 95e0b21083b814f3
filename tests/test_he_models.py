"""More architectures through the real CKKS round trip: residual adds at different
levels, BatchNorm, max-pool, smooth activations, and an ONNX file as the source."""
import numpy as np
import pytest
import torch
from torch import nn

import veil

REL_TOL = 2.0 ** -16


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = nn.functional.silu(self.bn(self.conv(x)))
        h = h + torch.tanh(self.conv2(h))          # residual: operands at different levels
        return self.fc(torch.flatten(self.pool(h), 1))


def _check(compiled, xs, tol=REL_TOL):
    with compiled:
        he = compiled.run(xs, mode="he")
        sim = compiled.run(xs, mode="simulate")
        assert np.abs(he - sim).max() / np.abs(sim).max() < tol


def test_residual_bn_maxpool_smooth_activations():
    torch.manual_seed(0)
    model = ResidualNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    model.eval()
    cal = np.random.default_rng(0).uniform(0, 1, size=(64, 1, 8, 8))
    compiled = veil.compile(model, cal, degree=13)
    report = compiled.report()
    assert any("max-pool" in n for n in report.notes)
    assert any("batchnorm" in n for n in report.notes)
    ref = model(torch.tensor(cal[:2], dtype=torch.float32)).detach().numpy()
    assert np.abs(compiled.run(cal[:2], "plain") - ref).max() < 1e-4
    _check(compiled, cal[:2])


def test_onnx_file_source(tmp_path, rng):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 12), nn.GELU(), nn.Linear(12, 3)).eval()
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, torch.zeros(1, 10), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    cal = rng.normal(size=(128, 10))
    compiled = veil.compile(str(path), cal, degree=13)
    ref = model(torch.tensor(cal[:3], dtype=torch.float32)).detach().numpy()
    assert np.abs(compiled.run(cal[:3], "plain") - ref).max() < 1e-4
    _check(compiled, cal[:2])


def test_insecure_params_are_opt_in_and_recorded(tmp_path, rng):
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    cal = rng.normal(size=(8, 4))
    secure = veil.compile(model, cal)
    assert not secure.result.plan.params.insecure_test_params
    toy = veil.compile(model, cal, insecure_test_params=True)
    assert "INSECURE" in str(toy.report())
    server_dir, client_dir = toy.export(tmp_path)
    import json
    for f in (server_dir / "model.json", client_dir / "client.json"):
        assert json.loads(f.read_text())["insecure_test_params"] is True
    from veil.wire import unpack
    client = veil.ModelClient(client_dir)
    keys = client.keygen()
    assert keys.insecure_test_params
    assert unpack(client.encrypt(cal[0]), "veil-ciphertext")[0]["insecure"] is True
    _check(toy, cal[:2])


def test_square_activation_model_at_low_depth(rng):
    """x*x activations run as single squarings: depth 1 per layer, a smaller ring."""
    class Sq(nn.Module):
        def forward(self, x):
            return x * x

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(30, 16), Sq(), nn.Linear(16, 2)).eval()
    cal = rng.normal(size=(64, 30))
    compiled = veil.compile(model, cal)
    report = compiled.report()
    assert report.depth == 3 and report.params["ring_dim"] == 8192
    _check(compiled, cal[:2], tol=2.0 ** -13)      # 32-bit scale: ~15 bits (measured)
    precise = veil.compile(model, cal, precision_bits=19)
    assert precise.report().params["scaling_bits"] >= 36
    _check(precise, cal[:2], tol=2.0 ** -17)


def test_feature_layout_for_large_batches(rng, tmp_path):
    """One ciphertext per feature, one input per slot: no rotations, same results."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    cal = rng.normal(size=(64, 12))
    compiled = veil.compile(model, cal, degree=13)
    server_dir, client_dir = compiled.export(tmp_path)
    client = veil.ModelClient(client_dir)
    keys = client.keygen()
    assert client.batch_layout(client.bundle.params.slots) == "features"
    assert client.batch_layout(client.lanes) == "lanes"
    xs = cal[:40]
    cts = client.encrypt_batch(xs, layout="features")
    assert len(cts) == 1
    with veil.ModelServer(server_dir).open_session(keys) as session:
        outs = client.decrypt_batch(session.run_batch(cts))
        with pytest.raises(veil.SerializationError, match="feature-layout"):
            import veil.wire as wire
            header, parts = wire.unpack(cts[0], "veil-ciphertext")
            parts.pop("f0")
            session.run(wire.pack("veil-ciphertext", parts, {k: v for k, v in header.items()
                                                              if k not in ("kind", "parts")}))
    sim = compiled.run(xs, "simulate")
    assert outs.shape == (40, 3)
    assert np.abs(outs - sim).max() / np.abs(sim).max() < REL_TOL
    with pytest.raises(veil.InputError, match="layout"):
        client.encrypt_batch(xs, layout="diagonal")
