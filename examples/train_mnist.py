"""Train the MNIST-size CNNs, fine-tune them for degree-2 polynomials, save the weights.

    python examples/train_mnist.py                 # all three models
    python examples/train_mnist.py lola_fashion    # one of lola_fashion, lola_mnist,
                                                   # lenet_fashion

For each model: train with ReLU (Adam, a few epochs on CPU), compile with the default
degree-27 and with degree-2 Chebyshev fits and measure plain / simulate accuracy on
the test split, then
``veil.finetune(degree=2)`` (with knowledge distillation from the ReLU network where
the table says so), compile again and measure again. Weights of the fine-tuned model go
to ``examples/weights/<name>.npz``, those of the ReLU original it came from to
``<name>_relu.npz`` (the benchmarks measure the accuracy loss against it), and the
accuracies to ``examples/weights/<name>.json``. Deterministic given the seeds below (on
one machine and torch version).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import veil  # noqa: E402
from veil.finetune import finetune  # noqa: E402

import datasets  # noqa: E402
from mnist_models import DEGREE, LeNet5, LoLaCNN, save_npz, weights_path  # noqa: E402
from models import train  # noqa: E402

# name: (dataset, model class, ReLU epochs, ReLU lr, fine-tuning epochs, fine-tuning lr,
#        distillation weight)
RUNS = {
    "lola_fashion": ("fashion", LoLaCNN, 4, 1e-3, 3, 3e-3, 0.0),
    "lola_mnist": ("mnist", LoLaCNN, 15, 1e-3, 10, 3e-3, 0.0),
    "lenet_fashion": ("fashion", LeNet5, 3, 3e-3, 4, 3e-3, 0.9),
}
N_CALIBRATION = 512
N_EVAL = 2000      # test images for the accuracy table (simulate is a float run)


def accuracies(model, calibration, x, y, degree: int = DEGREE) -> dict:
    """Plain and simulate accuracy, depth and ring of ``model`` compiled at ``degree``."""
    compiled = veil.compile(model, calibration, degree=degree)
    report = compiled.report(x, y)
    return {"plain": report.accuracy["plain"], "simulate": report.accuracy["simulate"],
            "depth": report.depth, "ring_dim": report.params["ring_dim"]}


def run(name: str) -> dict:
    dataset, cls, epochs, lr, ft_epochs, ft_lr, distill = RUNS[name]
    xtr, ytr, xte, yte = datasets.load(dataset)
    calibration, xev, yev = xtr[:N_CALIBRATION], xte[:N_EVAL], yte[:N_EVAL]
    start = time.perf_counter()
    model = train(cls(), xtr, ytr, epochs=epochs, lr=lr)
    trained = time.perf_counter()
    baseline = accuracies(model, calibration, xev, yev, degree=27)
    before = accuracies(model, calibration, xev, yev)
    tuned = finetune(model, (xtr, ytr), epochs=ft_epochs, degree=DEGREE, lr=ft_lr,
                     calibration=calibration, distill=distill)
    done = time.perf_counter()
    after = accuracies(tuned, calibration, xev, yev)
    weights_path(name).parent.mkdir(exist_ok=True)
    save_npz(tuned, weights_path(name))
    save_npz(model, weights_path(f"{name}_relu"))
    result = {"model": name, "dataset": dataset, "test_images": int(len(yev)),
              "relu_epochs": epochs, "relu_lr": lr, "finetune_epochs": ft_epochs,
              "finetune_lr": ft_lr, "distill": distill,
              "train_seconds": round(trained - start, 1),
              "finetune_seconds": round(done - trained, 1),
              "relu_degree27": baseline, "before_finetune": before,
              "after_finetune": after}
    weights_path(name).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(names: list[str]) -> None:
    torch.set_num_threads(2)
    print(f"{'model':<15}{'':<8}{'plain':>8}{'simulate':>10}{'depth':>7}{'ring':>7}")
    for name in names or list(RUNS):
        result = run(name)
        for stage in ("relu_degree27", "before_finetune", "after_finetune"):
            r = result[stage]
            print(f"{name:<15}{stage[:7]:<8}{r['plain']:>8.4f}{r['simulate']:>10.4f}"
                  f"{r['depth']:>7}{r['ring_dim']:>7}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main(sys.argv[1:])
