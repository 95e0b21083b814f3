"""The scikit-learn models users already have, in every mode (issue 18).

    python bench/tabular.py [--datasets cancer,digits] [--models logreg,mlp,forest,boosting]
                            [--n-latency 10] [--he-n N]

For each dataset (scikit-learn's breast_cancer: 30 features, 2 classes; digits: 64
features, 10 classes; a 75/25 split, seed 0) and model (a StandardScaler +
LogisticRegression pipeline; StandardScaler + MLPClassifier(32 ReLU); a random forest of
50 trees, depth 8; gradient boosting, 30 rounds of depth 3 per class), exported as users
do (``skl2onnx.to_onnx``, ZipMap kept) and compiled by ``veil.compile`` with the default
(secure) CKKS parameters: the accuracy of every mode on the whole test split against
scikit-learn's, the share of rows whose predicted class equals scikit-learn's, and the
latency of one input (median of ``--n-latency``) and the time per input of the whole test
split as one batch. The MLP under HE is compiled twice: with the default activation fit
and with ``relu_bits=8`` (a composite sign, accurate at the cost of depth). Trees run in
plain, tee and mpc; HE refuses them (no exact comparison under CKKS) and says so. The
MPC rows add the online bytes between the parties and rounds of one input.

``ecg`` is the 1-D signal workload (``veil.compare.ecg``: synthetic beats of five
classes, a Conv1d/BatchNorm1d/LeakyReLU/MaxPool1d/PReLU/AvgPool1d/ELU network with its
shipped weights; model name ``cnn1d``), calibrated on 256 training beats and tested on
300 others, in every mode; its reference is torch's own prediction.

Concrete ML's published figures for its built-in models (TFHE, quantized) sit beside
them (``CONCRETE``, with their sources).

Writes bench/results/tabular.json and bench/results/tabular.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results"

DATASETS = ("cancer", "digits", "ecg")
MODELS = ("logreg", "mlp", "forest", "boosting")
TREES = ("forest", "boosting")
TARGET_HE_POINTS = 0.5          # the issue: HE within 0.5 point of scikit-learn
# Concrete ML's published figures (TFHE, inputs quantized to n_bits; one server, no
# interaction: HE's threat model, not MPC's), as printed in its repository at v1.9.0
# (notebook outputs from the 1.6.0 commit 810e8a8a4). wdbc (OpenML 1510) is the data of
# scikit-learn's load_breast_cancer; accuracy there is a 5-fold x 3 cross-validation mean,
# latency one predict(X[:1], fhe="execute") after key generation, hardware not stated.
# No digits figures are published.
CONCRETE: dict[tuple[str, str], str] = {
    ("cancer", "forest"): "RandomForest (50 trees), 6 bits: FHE 95.6 % vs float 95.3 %, "
                          "1.35 s per input [A]",
    ("cancer", "boosting"): "XGBoost (50 trees, depth 3), 6 bits: FHE 96.8 % vs float "
                            "96.5 %, 0.82 s per input [A]",
    ("cancer", "tree"): "DecisionTree (depth 5), 6 bits: FHE 94.2 % vs float 93.9 %, "
                        "0.72 s per input [A]",
    ("-", "logreg"): "linear models: '~1ms FHE inference time' [I]; LogisticRegression on "
                     "synthetic 2-feature data, 8 bits: 0.925 FHE = float, 3.5 ms [B]",
    ("-", "mlp"): "NeuralNetClassifier (3 layers, ReLU, 3 bits) on iris: FHE 97.37 % vs "
                  "float 100 %, 0.95 s per input [D]",
}
CONCRETE_SOURCES: list[str] = [
    "[A] github.com/zama-ai/concrete-ml docs/advanced_examples/"
    "ExperimentPrivacyTreePaper.ipynb (cells 6-7)",
    "[B] docs/advanced_examples/LogisticRegression.ipynb",
    "[D] docs/advanced_examples/FullyConnectedNeuralNetwork.ipynb",
    "[I] docs/tutorials/ml_examples.md"]


def models(name: str):
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "mlp": lambda: make_pipeline(StandardScaler(), MLPClassifier(
            hidden_layer_sizes=(32,), max_iter=500, random_state=0)),
        "forest": lambda: RandomForestClassifier(n_estimators=50, max_depth=8,
                                                 random_state=0),
        "boosting": lambda: GradientBoostingClassifier(n_estimators=30, max_depth=3,
                                                       random_state=0),
    }[name]()


def dataset(name: str):
    if name == "ecg":
        from veil.compare.ecg import TEST_SEED, TRAIN_SEED, beats

        (xtr, ytr), (xte, yte) = beats(256, TRAIN_SEED), beats(300, TEST_SEED)
        return xtr, xte, ytr, yte
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    x, y = {"cancer": load_breast_cancer, "digits": load_digits}[name](return_X_y=True)
    return train_test_split(x, y, test_size=0.25, random_state=0)


def _timed(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure_mode(compiled, mode: str, xte, yte, want, n_latency: int) -> dict:
    """Accuracy and agreement on the whole split (one batch), single-input latency."""
    # HE (and simulate, which predicts it) refuses inputs outside the calibrated range
    # of a model that fits activations over it: clamp them, and count them
    clip = mode in ("simulate", "he")
    clipped = int(compiled.input_range.outside(xte).reshape(len(xte), -1).any(axis=1).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        pred = compiled.predict(xte, mode, clip=clip)   # starts the mode's processes
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        pred = compiled.predict(xte, mode, clip=clip)
        batch_s = time.perf_counter() - t
        latency = _timed(lambda: compiled.predict(xte[:1], mode, clip=clip), n_latency)
    row = {"mode": mode, "accuracy": float(np.mean(pred == yte)),
           "agree_sklearn": float(np.mean(pred == want)), "n": int(len(xte)),
           "clipped_rows": clipped if clip else 0,
           "batch_s_per_input": batch_s / len(xte), "first_batch_s": first_s,
           "latency_s": latency}
    if mode == "mpc":
        result = compiled._local("mpc").client.infer(xte[:1])
        row["online_bytes"] = int(sum(s["online_bytes_sent"] for s in result.stats))
        row["offline_bytes"] = int(sum(s["offline_bytes"] for s in result.stats))
        row["rounds"] = int(max(s["online_rounds"] for s in result.stats))
    if mode == "he":
        report = compiled.report()
        row.update(depth=report.depth, ring=report.params["ring_dim"],
                   rotation_keys=len(report.rotations))
    return row


class _Torch:
    """The ECG network with scikit-learn's predict/score, for the same table."""

    def __init__(self) -> None:
        from veil.compare.ecg import trained_ecg_cnn

        self.net = trained_ecg_cnn().eval()

    def predict(self, x) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.net(torch.as_tensor(x, dtype=torch.float32)).numpy().argmax(1)

    def score(self, x, y) -> float:
        return float(np.mean(self.predict(x) == y))


def run_one(data: str, name: str, args) -> dict:
    import veil

    xtr, xte, ytr, yte = dataset(data)
    if data == "ecg":
        model = _Torch()
        onx = model.net
    else:
        from skl2onnx import to_onnx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = models(name).fit(xtr, ytr)
        onx = to_onnx(model, xtr[:1].astype(np.float32))
    want = model.predict(xte)
    out = {"dataset": data, "model": name, "sklearn_accuracy": float(model.score(xte, yte)),
           "n_test": int(len(xte)), "n_features": int(xtr.shape[1]), "rows": []}
    variants = [("", {})]
    if name == "mlp":
        variants.append((" relu_bits=8", {"relu_bits": 8}))
    for suffix, options in variants:
        t = time.perf_counter()
        compiled = veil.compile(onx, xtr, **options)
        out.setdefault("compile_s", time.perf_counter() - t)
        out["head"] = compiled.head.ops()
        modes = ["plain", "tee", "mpc"] if name in TREES else ["plain", "simulate", "he",
                                                                 "tee", "mpc"]
        if suffix:
            modes = ["simulate", "he"]
        else:
            out["he_refusal"] = compiled.report().he_error
        with compiled:
            for mode in modes:
                xs, ys, ws = xte, yte, want
                if mode == "he" and args.he_n:
                    xs, ys, ws = xte[:args.he_n], yte[:args.he_n], want[:args.he_n]
                print(f"{data} {name}{suffix} {mode} ...", flush=True)
                row = measure_mode(compiled, mode, xs, ys, ws, args.n_latency)
                row["mode"] = mode + suffix
                out["rows"].append(row)
                print(f"  accuracy {row['accuracy']:.4f} (sklearn {out['sklearn_accuracy']:.4f}),"
                      f" agree {row['agree_sklearn']:.4f}, latency {row['latency_s'] * 1e3:.1f} ms",
                      flush=True)
    return out


def markdown(results: list[dict]) -> str:
    lines = ["# scikit-learn models in every mode (bench/tabular.py)", "",
             "Test split 25 % (seed 0); accuracy on the whole split in every mode (HE: "
             "the first `--he-n` rows when given); *agree* = share of rows whose class "
             "equals scikit-learn's `predict` (ecg: torch's; its *sklearn* column is "
             "torch's accuracy); latency = one input, median; batch = the "
             "split as one batch, per input; *clipped rows*: test rows outside the calibrated "
             "per-feature range of a model HE fits activations over, clamped into it "
             "(`clip=True`) for simulate and he. 2-core machine, one thread per process.",
             "",
             "| dataset | model | mode | accuracy | sklearn | agree | clipped rows | "
             "latency ms | batch ms/input | MPC online KB / rounds | HE depth / ring |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            mpc = (f"{row['online_bytes'] / 1e3:.1f} / {row['rounds']}"
                   if "online_bytes" in row else "")
            he = f"{row['depth']} / 2^{row['ring'].bit_length() - 1}" if "depth" in row else ""
            lines.append(
                f"| {r['dataset']} | {r['model']} | {row['mode']} | {row['accuracy']:.4f} | "
                f"{r['sklearn_accuracy']:.4f} | {row['agree_sklearn']:.4f} | "
                f"{row['clipped_rows'] or ''} | "
                f"{row['latency_s'] * 1e3:.1f} | {row['batch_s_per_input'] * 1e3:.2f} | "
                f"{mpc} | {he} |")
        if r.get("he_refusal"):
            lines.append(f"| {r['dataset']} | {r['model']} | he | refused: "
                         f"{r['he_refusal'][:90]} | | | | | | | |")
    lines += ["", "Output heads (computed by the client, exactly): " + "; ".join(
        f"{r['dataset']}/{r['model']}: {', '.join(r['head']) or 'none'}" for r in results)]
    worst = [(r["dataset"], r["model"], row["mode"],
              abs(row["accuracy"] - r["sklearn_accuracy"]) * 100)
             for r in results for row in r["rows"] if row["mode"].startswith("he")]
    if worst:
        lines += ["", f"HE target: within {TARGET_HE_POINTS} point of scikit-learn: " + "; ".join(
            f"{d}/{m} {mode} {p:.2f} pt {'ok' if p <= TARGET_HE_POINTS else 'MISSED'}"
            for d, m, mode, p in worst)]
    if CONCRETE:
        lines += ["", "## Concrete ML's published figures (TFHE, quantized; not run here)", "",
                  "| dataset | model | figure |", "|---|---|---|"]
        lines += [f"| {d} | {m} | {text} |" for (d, m), text in CONCRETE.items()]
        lines += ["", "Sources: " + "; ".join(CONCRETE_SOURCES)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--n-latency", type=int, default=10)
    ap.add_argument("--he-n", type=int, default=0,
                    help="HE: only the first N test rows (default: all)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    results = []
    for data in args.datasets.split(","):
        for name in (("cnn1d",) if data == "ecg" else args.models.split(",")):
            results.append(run_one(data, name, args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tabular.json").write_text(json.dumps(
        {"results": results, "concrete_ml": {f"{d}/{m}": t for (d, m), t in CONCRETE.items()},
         "argv": sys.argv[1:]}, indent=1))
    (out / "tabular.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
