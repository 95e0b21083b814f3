"""Train ResNet-20 on CIFAR-shaped Fashion-MNIST, fine-tune it for polynomials, save it.

    python examples/train_resnet20.py --threads 1          # the shipped recipe
    python examples/train_resnet20.py --reuse-relu --degree 4   # fine-tune the saved
                                                           # ReLU weights at another degree
    python examples/train_resnet20.py --measure-only       # compile + measure saved weights

1. Train :class:`ResNet20` with ReLU: SGD with Nesterov momentum, a one-cycle learning
   rate, weight decay, random flips and shifts of up to 2 pixels, on the first 55,000
   training images (the last 5,000 are held out for choosing the fine-tuning epoch).
2. ``veil.finetune(degree=D)``: every ReLU becomes a trainable degree-D polynomial,
   fitted to ReLU on 512 calibration images, then the network is fine-tuned with
   knowledge distillation from the ReLU network; the epoch with the best held-out
   accuracy is kept.
3. ``veil.compile`` the fine-tuned network (512 training images as calibration; with
   ``--compile-relu`` also the ReLU one, at the compiler's default degree) and measure
   plain and simulate accuracy on the full 10,000-image test split with
   ``compiled.report(x, y)``, batch by batch, plus the depth and the HE estimate
   (bootstraps) of ``compiled.report()``.

Writes ``examples/weights/resnet20_fashion.npz`` (fine-tuned),
``resnet20_fashion_relu.npz`` (ReLU) and ``resnet20_fashion.json`` (settings, wall
times, accuracies, depth, bootstraps). Deterministic given the seeds (on one machine,
torch version and thread count). On a 2-core machine with one core busy elsewhere
(``--threads 1``): ReLU training 16 minutes, degree-2 fine-tuning 21 minutes,
``veil.compile`` about 1.5 minutes (the HE slot planning) and the 10,000-image plain +
simulate measurement about 6 minutes.

Degree 2 is shipped: one HE level per activation, depth 58 and 5 bootstraps on the
longest path (veil's estimate) against depth 77 / 7 for degrees 3-4 and 124 / 12 for
ReLU at the compiler's default degree 27. Degree 4 diverged in the first fine-tuning
epoch (loss NaN) at lr 1e-3 and again at 3e-4.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a machine whose cores another
# process is using, spinning threads made each training step ~8x slower. Must be set
# before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import veil  # noqa: E402
from veil.finetune import finetune  # noqa: E402

from mnist_models import load_npz, save_npz, weights_path  # noqa: E402
from resnet20_models import DEGREE, NAME, ResNet20, fashion32, polynomial  # noqa: E402

SEED = 0
N_VALIDATION = 5000      # held out of the training split, for the fine-tuning epoch
N_CALIBRATION = 512
BATCH = 128
EVAL_BATCH = 500         # the float64 interpreter's working set stays ~1 GiB
RELU = {"epochs": 5, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
FINETUNE = {"epochs": 3, "lr": 1e-3, "distill": 0.5}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (the zero border)."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2, len(x)), generator=gen).tolist()
    return torch.stack([padded[i, :, a:a + 32, b:b + 32] for i, (a, b) in
                        enumerate(zip(dy, dx))])


def train_relu(x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, momentum: float,
               weight_decay: float) -> torch.nn.Module:
    """SGD (Nesterov) with a one-cycle schedule; channels-last (2x faster on CPU)."""
    torch.manual_seed(SEED)
    model = ResNet20().to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    other = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                           {"params": other, "weight_decay": 0.0}],
                          lr=lr, momentum=momentum, nesterov=True)
    steps = epochs * math.ceil(len(x) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.15)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        start, total = time.perf_counter(), 0.0
        for idx in torch.randperm(len(xt), generator=gen).split(BATCH):
            xb = augment(xt[idx], gen).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"relu epoch {epoch + 1}/{epochs}: loss {total / len(xt):.4f}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return model.eval()


def contiguous(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(memory_format=torch.contiguous_format)


def torch_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = np.concatenate([model(torch.as_tensor(x[i:i + EVAL_BATCH])).argmax(1).numpy()
                               for i in range(0, len(x), EVAL_BATCH)])
    return float(np.mean(pred == y))


def measure(model: torch.nn.Module, calibration: np.ndarray, x: np.ndarray,
            y: np.ndarray, **compile_options) -> dict:
    """Compile, then plain and simulate accuracy over ``x`` (``compiled.report`` batch
    by batch), depth, parameters and the HE estimate."""
    start = time.perf_counter()
    compiled = veil.compile(contiguous(model), calibration, **compile_options)
    compiled_s = time.perf_counter() - start
    correct = {"plain": 0.0, "simulate": 0.0}
    for i in range(0, len(x), EVAL_BATCH):
        report = compiled.report(x[i:i + EVAL_BATCH], y[i:i + EVAL_BATCH])
        for mode in correct:
            correct[mode] += report.accuracy[mode] * len(y[i:i + EVAL_BATCH])
    report = compiled.report()
    est = report.estimate
    return {"plain": round(correct["plain"] / len(y), 4),
            "simulate": round(correct["simulate"] / len(y), 4),
            "depth": report.depth, "ring_dim": report.params["ring_dim"],
            "estimate": {k: est.get(k) for k in
                         ("depth", "max_depth", "fits", "bootstraps",
                          "bootstrap_ciphertexts", "rotation_keys", "keys_bytes",
                          "latency_s")},
            "he_error": report.he_error,
            "compile_seconds": round(compiled_s, 1),
            "evaluate_seconds": round(time.perf_counter() - start - compiled_s, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--degree", type=int, default=DEGREE)
    parser.add_argument("--relu-epochs", type=int, default=RELU["epochs"])
    parser.add_argument("--epochs", type=int, default=FINETUNE["epochs"],
                        help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=FINETUNE["lr"], help="fine-tuning lr")
    parser.add_argument("--distill", type=float, default=FINETUNE["distill"])
    parser.add_argument("--reuse-relu", action="store_true",
                        help="load the saved ReLU weights instead of training them")
    parser.add_argument("--measure-only", action="store_true",
                        help="compile and measure the saved weights (no training); "
                             "adds the measurements to the saved JSON")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip veil.compile and the plain / simulate measurement")
    parser.add_argument("--compile-relu", action="store_true",
                        help="also compile the ReLU network at the default degree")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 is faster while another process "
                             "keeps a core busy)")
    parser.add_argument("--out", default=NAME, help="weights name (default %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    xtr, ytr, xte, yte = fashion32()
    xfit, yfit = xtr[:-N_VALIDATION], ytr[:-N_VALIDATION]
    validation = (xtr[-N_VALIDATION:], ytr[-N_VALIDATION:])
    calibration = xtr[:N_CALIBRATION]
    relu_settings = dict(RELU, epochs=args.relu_epochs)

    json_path = weights_path(args.out).with_suffix(".json")
    weights_path(args.out).parent.mkdir(exist_ok=True)
    if args.measure_only:
        result = json.loads(json_path.read_text())
        relu = load_npz(ResNet20(), weights_path(f"{args.out}_relu"))
        tuned = load_npz(polynomial(ResNet20(), result["finetune"]["degree"]),
                         weights_path(args.out))
        return measure_all(args, result, relu, tuned, calibration, xte, yte, json_path)
    start = time.perf_counter()
    if args.reuse_relu:  # the ReLU network and its settings from an earlier full run
        relu = load_npz(ResNet20(), weights_path(f"{args.out}_relu"))
        earlier = json.loads(json_path.read_text()) if json_path.is_file() else {}
        relu_settings = earlier.get("relu", relu_settings)
        train_seconds = earlier.get("train_seconds")
    else:
        relu = train_relu(xfit, yfit, **relu_settings)
        train_seconds = round(time.perf_counter() - start, 1)
        save_npz(contiguous(relu), weights_path(f"{args.out}_relu"))
    trained = time.perf_counter()
    print(f"relu: validation {torch_accuracy(relu, *validation):.4f}", flush=True)
    tuned = finetune(relu, (xfit, yfit), epochs=args.epochs, degree=args.degree, lr=args.lr,
                     calibration=calibration, validation=validation, distill=args.distill,
                     seed=SEED)
    done = time.perf_counter()
    relu, tuned = contiguous(relu), contiguous(tuned)
    print(f"fine-tuned: validation {torch_accuracy(tuned, *validation):.4f}", flush=True)

    save_npz(tuned, weights_path(args.out))

    result = {"model": args.out, "dataset": "fashion-mnist padded to 3x32x32",
              "train_images": len(yfit), "validation_images": N_VALIDATION,
              "test_images": len(yte), "calibration_images": N_CALIBRATION,
              "seed": SEED, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "relu": {**relu_settings, "batch": BATCH, "optimizer": "sgd-nesterov-onecycle",
                       "augment": "flip+shift2"},
              "finetune": {"degree": args.degree, "epochs": args.epochs, "lr": args.lr,
                           "distill": args.distill, "batch": 128, "optimizer": "adam"},
              "train_seconds": train_seconds,
              "finetune_seconds": round(done - trained, 1),
              "torch_test_accuracy": {"relu": torch_accuracy(relu, xte, yte),
                                      "finetuned": torch_accuracy(tuned, xte, yte)}}
    print(json.dumps(result, indent=2), flush=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    return measure_all(args, result, relu, tuned, calibration, xte, yte, json_path)


def measure_all(args, result: dict, relu, tuned, calibration, xte, yte,
                json_path: Path) -> dict:
    """Add the compiled measurements ``args`` asks for to ``result``; save it."""
    if not args.no_compile:
        result["finetuned"] = measure(tuned, calibration, xte, yte)
        print("finetuned:", json.dumps(result["finetuned"]), flush=True)
    if args.compile_relu:
        result["relu_degree27"] = measure(relu, calibration, xte, yte)
        print("relu:", json.dumps(result["relu_degree27"]), flush=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
