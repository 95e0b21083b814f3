"""Benchmark: large batches in the feature layout (one ciphertext per feature, one input
per slot) against the lane layout, for the fine-tuned digits models.

The 360 test images are repeated to fill a full batch of ``slots`` inputs. Writes
bench/results/he_throughput.{json,md}. Usage: python bench/he_throughput.py
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def main() -> int:
    import numpy as np

    import veil
    from harness import _batch_row, write_results
    from models import trained_digits_cnn, trained_digits_mlp

    rows = []
    for name, train in (("digits MLP", trained_digits_mlp), ("digits CNN", trained_digits_cnn)):
        model, (xtr, xte, ytr, yte) = train()
        tuned = veil.finetune(model, (xtr, ytr), epochs=30, lr=1e-2, degree=2)
        compiled = veil.compile(tuned, xtr, layout="throughput")
        slots = compiled.result.plan.params.slots
        reps = -(-slots // len(xte))
        xs, ys = np.tile(xte, (reps, 1, 1, 1))[:slots], np.tile(yte, reps)[:slots]
        print(f"{name} (fine-tuned): {slots} inputs, feature and lane layouts", flush=True)
        for how in ("features", "lanes"):
            row = _batch_row(compiled, xs if how == "features" else xs[:512],
                             ys if how == "features" else ys[:512], how)
            row["model"] = f"{name} (fine-tuned)"
            rows.append(row)
    lines = ["| model | layout | inputs | ciphertexts | accuracy | encrypt s | server s "
             "| decrypt s | per input ms | inputs/s | upload MiB |", "|" + "---|" * 11]
    for r in rows:
        up = r["ct_in_bytes"] * r["ciphertexts"] / 2**20
        lines.append(f"| {r['model']} | {r['mode']} | {r['n']} | {r['ciphertexts']} | "
                     f"{r['accuracy']:.4f} | {r['encrypt_s'] * r['ciphertexts']:.2f} | "
                     f"{r['eval_s'] * r['ciphertexts']:.2f} | "
                     f"{r['decrypt_s'] * r['ciphertexts']:.2f} | {r['amortized_s'] * 1e3:.2f} | "
                     f"{r['throughput_per_s']:.0f} | {up:.1f} |")
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count()}
    return write_results(ROOT / "bench" / "results", "he_throughput",
                         {"env": env, "rows": rows}, f"{env['date']}, {env['cpus']} CPUs",
                         ["`python bench/he_throughput.py`; one worker process per row "
                          "(client and server roles); the lane rows use 512 inputs.", "",
                          *lines])


if __name__ == "__main__":
    raise SystemExit(main())
