"""Benchmark: the digits CNN and MLP under CKKS, end to end, against plain and simulate.

Writes bench/results/he_digits.json and bench/results/he_digits.md. Peers' figures
(Concrete ML 1.9, measured on these 2-core machines: 3.66 s per image for the MLP,
10.7 s for the CNN) are shown beside ours with the speed-up.

Usage: python bench/he_digits.py [--n N]   (N test images run encrypted; default 360)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

PEERS = {"digits CNN": ("Concrete ML 1.9", 10.7), "digits MLP": ("Concrete ML 1.9", 3.66)}
TARGET_S = {"digits CNN": 1.0, "digits MLP": 0.5}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=360, help="test images run encrypted")
    ap.add_argument("--n-encrypted-weights", type=int, default=50,
                    help="test images run in encrypted-weight mode")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)

    import numpy as np

    import veil
    from harness import measure, table, write_results
    from models import trained_digits_cnn, trained_digits_mlp

    results = []
    for name, train in (("digits CNN", trained_digits_cnn), ("digits MLP", trained_digits_mlp)):
        model, (xtr, xte, ytr, yte) = train()
        compiled = veil.compile(model, xtr)
        batched = veil.compile(model, xtr, layout="throughput")
        print(f"{name}: depth {compiled.report().depth}, running {args.n} images encrypted "
              f"one by one, then {args.n} in ciphertexts of {batched.report().lanes}",
              flush=True)
        results.append(measure(name, compiled, xte, yte, args.n, batched, args.n,
                               args.n_encrypted_weights))
    lines = [table(results), "",
             "peak RSS: client and server roles in one worker process (keygen dominates).",
             "", "| model | veil end-to-end s | target s | peer | peer s | speed-up "
             "| he acc - plain acc (same images) | max rel. error vs simulate (target 2^-16) "
             "| batched images/s | encrypted-weights end-to-end s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        he = next(row for row in r["rows"] if row["mode"] == "he")
        enc = next((row for row in r["rows"] if row.get("encrypted_weights")), None)
        batch = next(row for row in r["rows"] if row.get("batch"))
        he["batch_throughput_per_s"] = batch["throughput_per_s"]
        peer, peer_s = PEERS[r["model"]]
        delta = he["accuracy"] - he["plain_accuracy_same_images"]
        he["speedup_vs_peer"] = peer_s / he["latency_s"]
        lines.append(f"| {r['model']} | {he['latency_s']:.3f} | < {TARGET_S[r['model']]} | "
                     f"{peer} | {peer_s} | {peer_s / he['latency_s']:.1f}x | "
                     f"{delta * 100:+.2f} pt | 2^{np.log2(he['max_rel_error_vs_simulate']):.1f} | "
                     f"{batch['throughput_per_s']:.0f} | "
                     + (f"{enc['latency_s']:.3f} |" if enc else "- |"))
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
           "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "veil": veil.__version__}
    return write_results(Path(args.out), "he_digits", {"env": env, "results": results},
                         f"{env['date']}, {env['cpus']} CPUs, OMP_NUM_THREADS="
                         f"{env['omp_num_threads']}", lines)


if __name__ == "__main__":
    raise SystemExit(main())
