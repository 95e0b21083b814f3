"""Benchmark: what the slot-layout planner saves, per shipped model and layer.

Compiles every shipped model twice: with the default latency layout (convolutions on
strided, channel-blocked slot grids, placed client input) and with every value compact
(``layout="throughput"``, also without im2col), and lists per dense layer the diagonals
(plaintext products and plaintexts held by the server), the estimated rotations, and the
model's rotation keys and their size. Compile-time only: no encryption, a few seconds.

Writes bench/results/layouts.{json,md}. Usage: python bench/layouts.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def _models():
    from datasets import DatasetUnavailable, load
    from mnist_models import load_lenet, load_lola
    from models import trained_digits_cnn

    cnn, (xtr, *_) = trained_digits_cnn()
    out = [("digits CNN (ReLU, degree 27)", cnn, xtr, None)]
    for name, loader, ds, bits in (("LoLa Fashion-MNIST", lambda: load_lola("fashion"),
                                    "fashion", None),
                                   ("LeNet-5 Fashion-MNIST", load_lenet, "fashion", 12)):
        try:
            x = load(ds)[0]
        except DatasetUnavailable as exc:
            print(f"skipping {name}: {exc}", flush=True)
            continue
        out.append((name, loader(), x[:1024], bits))
    return out


def _key_mib(params) -> float:
    from veil.compiler.plan import keyswitch_cost

    towers = keyswitch_cost(params.mult_depth, params.scaling_bits, params.first_mod_bits,
                            params.num_large_digits)
    return 2 * towers * params.ring_dim * 8 / 2**20   # two polynomials per digit


def main() -> int:
    import veil
    from harness import write_results

    rows = []
    for name, model, cal, bits in _models():
        plans = {lay: veil.compile(model, cal, layout=lay, precision_bits=bits).result.plan
                 for lay in ("latency", "throughput")}
        for layer in plans["latency"].dense:
            grid, flat = plans["latency"].dense[layer], plans["throughput"].dense[layer]
            rows.append({"model": name, "layer": layer,
                         "diagonals": [len(flat.diagonals), len(grid.diagonals)],
                         "rotations": [flat.rotation_count(), grid.rotation_count()],
                         "periods": [[flat.in_period, flat.out_period],
                                     [grid.in_period, grid.out_period]]})
        keys = [len(plans[lay].rotations) for lay in ("throughput", "latency")]
        mib = _key_mib(plans["latency"].params)
        rows.append({"model": name, "layer": "all (rotation keys)", "keys": keys,
                     "key_mib": [k * mib for k in keys]})
        print(rows[-1], flush=True)
    lines = ["| model | layer | diagonals compact -> planned | rotations compact -> planned "
             "| rotation keys compact -> planned (MiB) |", "|---|---|---|---|---|"]
    for r in rows:
        if "keys" in r:
            lines.append(f"| {r['model']} | {r['layer']} | | | {r['keys'][0]} -> "
                         f"{r['keys'][1]} ({r['key_mib'][0]:.0f} -> {r['key_mib'][1]:.0f}) |")
        else:
            lines.append(f"| {r['model']} | {r['layer']} | {r['diagonals'][0]} -> "
                         f"{r['diagonals'][1]} | {r['rotations'][0]:.1f} -> "
                         f"{r['rotations'][1]:.1f} | |")
    return write_results(ROOT / "bench" / "results", "layouts", rows,
                         time.strftime("%Y-%m-%d %H:%M:%S"),
                         ["`python bench/layouts.py`; compact = every value in slots 0..n-1 "
                          "(`layout=\"throughput\"`, no im2col); planned = the latency "
                          "layout; rotations count a hoisted baby step as half; key MiB "
                          "from the parameters (the latency plan's ring, scale and digits)."
                          , "", *lines])


if __name__ == "__main__":
    raise SystemExit(main())
