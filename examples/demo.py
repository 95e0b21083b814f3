"""`make demo`: train two small models in seconds, compile them, run them encrypted.

Prints the compile report and a table for plain / simulate / he: accuracy, per-stage
time, ciphertext and evaluation-key sizes, and peak memory of the encrypted pipeline
(client and server roles in a separate process, talking only through bytes).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import veil  # noqa: E402
from harness import measure, table  # noqa: E402
from models import trained_cancer_mlp, trained_digits_cnn  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-he", type=int, default=100,
                    help="test inputs to run encrypted per model (default 100)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = []
    for name, train in (("digits CNN", trained_digits_cnn),
                        ("breast-cancer MLP", trained_cancer_mlp)):
        print(f"== {name}: training ...", flush=True)
        model, (xtr, xte, ytr, yte) = train()
        compiled = veil.compile(model, xtr)
        batched = veil.compile(model, xtr, layout="throughput")
        print(compiled.report(xte, yte), flush=True)
        print(f"-- running {args.n_he} test inputs encrypted one by one, then "
              f"{batched.report().lanes} per ciphertext ...", flush=True)
        results.append(measure(name, compiled, xte, yte, args.n_he, batched,
                               batched.report().lanes))
    print()
    print(table(results))
    print("\nplain/simulate latency is per input for the whole test split in one batch; "
          "he runs one input at a time, end to end (encrypt + server + decrypt); the batch "
          "row packs one input per lane of a throughput-layout ciphertext.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
