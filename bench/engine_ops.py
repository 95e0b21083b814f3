"""Micro-benchmark of the OpenFHE operations veil's engine relies on (ring 2^14, depth 7).

Measures why the engine re-homes deserialized ciphertexts (``EvaluationSession.load``)
and how a rotation compares with hoisted rotations and plaintext products. Also runs the
same rotation loop in two processes at once, with and without GOMP_SPINCOUNT=1000.
Writes bench/results/engine_ops.{json,md}. Usage: python bench/engine_ops.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ms(fn, n: int = 20) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def ops() -> dict:
    import numpy as np
    import openfhe

    from veil.backends.he.openfhe_engine import ClientCrypto, EvaluationSession
    from veil.compiler.plan import select_params

    params, _ = select_params(7, 512)
    client = ClientCrypto(params)
    parts = client.keygen([1, 2, 3, 4])
    with EvaluationSession(params, client.tag, parts, [1, 2, 3, 4]) as s:
        blob = client.encrypt(np.linspace(-1, 1, params.slots))
        raw = openfhe.DeserializeCiphertextString(blob, openfhe.BINARY)
        homed = s.load(blob)
        w = np.full(params.slots, 0.5)
        return {
            "ring_dim": params.ring_dim, "depth": params.mult_depth,
            "EvalAdd, deserialized ciphertext": _ms(lambda: s.cc.EvalAdd(raw, raw)),
            "EvalAdd, re-homed ciphertext": _ms(lambda: s.cc.EvalAdd(homed, homed)),
            "ct x pt, deserialized": _ms(lambda: s.mul_plain(raw, w, ("w",))),
            "ct x pt, re-homed": _ms(lambda: s.mul_plain(homed, w, ("w",))),
            "EvalRotate": _ms(lambda: s.rotate(homed, 1)),
            "4 hoisted rotations": _ms(lambda: s.rotate_hoisted(homed, [1, 2, 3, 4])),
        }


def _rotation_loop_ms(env: dict) -> float:
    code = ("import sys; sys.path.insert(0, %r); from bench.engine_ops import ops; "
            "print(ops()['EvalRotate'])" % str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    return max(float(p.communicate()[0].strip().splitlines()[-1]) for p in procs)


def main() -> int:
    result = {"single process": ops()}
    base = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    result["two processes, EvalRotate ms, GOMP_SPINCOUNT=1000 (veil default)"] = \
        _rotation_loop_ms({**base, "GOMP_SPINCOUNT": "1000"})
    result["two processes, EvalRotate ms, libgomp default spin (300000)"] = \
        _rotation_loop_ms({**base, "GOMP_SPINCOUNT": "300000"})
    lines = ["| measurement | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["single process"].items()
              if isinstance(v, float)]
    lines += [f"| {k} | {v:.2f} |" for k, v in result.items() if isinstance(v, float)]
    sys.path.insert(0, str(ROOT / "examples"))
    from harness import write_results

    return write_results(ROOT / "bench" / "results", "engine_ops", result,
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}, ring "
                         f"{result['single process']['ring_dim']}, depth 7",
                         ["`python bench/engine_ops.py`", "", *lines])


if __name__ == "__main__":
    raise SystemExit(main())
