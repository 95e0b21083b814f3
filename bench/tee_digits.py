"""Benchmark: sealed (TEE) inference vs the same model served in plaintext.

Per model (digits MLP and CNN), starts as separate processes on loopback: the
key-release service, the enclave (``veil tee-serve``, INSECURE software attester; its
bundle is encrypted and its key released at start) and the plaintext baseline
(``veil tee-serve --plaintext-baseline``: same process, framing, TCP and model path,
nothing sealed). Then, alternating the two so that load on the machine hits both alike:

- single-image latency (median of N) and the added latency of sealing;
- batches of 64: images/s and the throughput ratio sealed / plaintext;
- both HPKE suites (X25519 and the ML-KEM-768 + X25519 hybrid);
- the one-time cost of fetching and verifying evidence.

It also times the inference engines available to the enclave on the same inputs: the
IR interpreter on the traced graph, on the compiled graph (batch norms and affine
chains folded: what the enclave runs) and onnxruntime on the torch model's ONNX export
when onnxruntime is importable (it is not a veil dependency).

Writes bench/results/tee_digits.{json,md}. Usage: python bench/tee_digits.py [--n N]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
# one BLAS thread here and in each server: with several processes on 2 cores, OpenBLAS's
# spinning worker threads stall small products by milliseconds (numpy is not loaded yet)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

TARGETS = {"added_ms": 1.0, "batch64_ratio": 0.9}


def _median_us(fn, x, n: int) -> float:
    import numpy as np

    fn(x)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return 1e6 * float(np.median(times))


def _engines(model, graph, xte, n: int) -> dict:
    """Microseconds per call of each engine, one image and 64."""
    import numpy as np
    import torch

    from veil.backends.tee.bundle import compile_for_tee
    from veil.ir import interpreter

    compiled = compile_for_tee(graph)
    out = {}
    for b in (1, 64):
        x = xte[:b].astype(np.float64)
        out[f"interpreter_traced_{b}_us"] = _median_us(lambda v: interpreter.run(graph, v), x, n)
        out[f"interpreter_compiled_{b}_us"] = _median_us(
            lambda v: interpreter.run(compiled, v), x, n)
    try:
        import onnxruntime as ort
    except ImportError:
        out["onnxruntime"] = "not installed"
        return out
    buf = io.BytesIO()
    torch.onnx.export(model, torch.as_tensor(xte[:1]), buf, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    out["onnxruntime"] = ort.__version__
    for b in (1, 64):
        out[f"onnxruntime_{b}_us"] = _median_us(lambda v: sess.run(None, {"x": v}),
                                                xte[:b].astype(np.float32), n)
    return out


def _measure(name: str, model, xte, yte, n: int) -> dict:
    import numpy as np
    import torch
    from harness import start_veil

    from veil.backends.tee import (PlaintextClient, Policy, SoftwareAttester, TEEClient,
                                   TrustedAttester, export_model)
    from veil.frontend import to_graph

    graph = to_graph(model, xte.shape[1:])
    x = xte.astype(np.float64)
    with torch.no_grad():
        want = model(torch.as_tensor(xte)).numpy()
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        ex = export_model(graph, f"{tmp}/export", f"{tmp}/keys")
        export_model(graph, f"{tmp}/plain")
        SoftwareAttester.create(f"{tmp}/att")
        policy = Policy(frozenset({ex.measurement}), (TrustedAttester.load(f"{tmp}/att"),),
                        allow_insecure=True).save(f"{tmp}/policy.json")
        try:
            krs, (kr,) = start_veil(["tee-key-release", "--keys", f"{tmp}/keys", "--policy",
                                     str(policy)])
            procs.append(krs)
            enclave, (ea,) = start_veil(["tee-serve", f"{tmp}/export", "--attester-key",
                                         f"{tmp}/att", "--key-release", f"{kr[0]}:{kr[1]}"])
            procs.append(enclave)
            plain, (pa,) = start_veil(["tee-serve", f"{tmp}/plain", "--plaintext-baseline"])
            procs.append(plain)
            pol = Policy.load(policy)
            clients = {"plain": PlaintextClient(pa, 60.0),
                       "x25519": TEEClient(ea, pol, suite="x25519"),
                       "mlkem768-x25519": TEEClient(ea, pol, suite="mlkem768-x25519")}
            t = time.perf_counter()
            clients["x25519"].attest()
            attest_ms = 1e3 * (time.perf_counter() - t)
            outs = {k: c.infer(x) for k, c in clients.items()}          # all 360, warm-up
            single = {k: [] for k in clients}
            batch = {k: [] for k in clients}
            for i in range(n):                      # alternate, so load hits all alike
                for k, c in clients.items():
                    t = time.perf_counter()
                    c.infer(x[i % len(x):i % len(x) + 1])
                    single[k].append(time.perf_counter() - t)
            for i in range(max(n // 5, 10)):
                lo = (64 * i) % (len(x) - 64)
                for k, c in clients.items():
                    t = time.perf_counter()
                    c.infer(x[lo:lo + 64])
                    batch[k].append(time.perf_counter() - t)
            for c in clients.values():
                c.close()
        finally:
            for p in procs:
                p.kill()
                p.wait()
    med = {k: float(np.median(v)) for k, v in single.items()}
    bmed = {k: float(np.median(v)) for k, v in batch.items()}
    row = {"model": name, "n_single": n, "n_batch": len(batch["plain"]),
           "accuracy": float(np.mean(outs["x25519"].argmax(1) == yte)),
           "max_abs_error_vs_torch": float(np.abs(outs["x25519"] - want).max()),
           "sealed_equals_plaintext_server": bool(np.array_equal(outs["x25519"],
                                                                 outs["plain"])),
           "attest_ms": attest_ms, "plain_ms": 1e3 * med["plain"],
           "plain_batch64_per_s": 64 / bmed["plain"]}
    for suite in ("x25519", "mlkem768-x25519"):
        row[f"{suite}_ms"] = 1e3 * med[suite]
        row[f"{suite}_added_ms"] = 1e3 * (med[suite] - med["plain"])
        row[f"{suite}_batch64_per_s"] = 64 / bmed[suite]
        row[f"{suite}_batch64_ratio"] = bmed["plain"] / bmed[suite]
    row["engines"] = _engines(model, graph, xte, 300)
    return row


def _engine_cells(e: dict) -> str:
    ort = (f"{e['onnxruntime_1_us']:.0f} / {e['onnxruntime_64_us']:.0f}"
           if "onnxruntime_1_us" in e else "not installed")
    return (f"{e['interpreter_traced_1_us']:.0f} / {e['interpreter_traced_64_us']:.0f} | "
            f"{e['interpreter_compiled_1_us']:.0f} / {e['interpreter_compiled_64_us']:.0f} | "
            f"{ort}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=300, help="single-image requests per server")
    args = ap.parse_args(argv)
    from harness import write_results
    from models import trained_digits_cnn, trained_digits_mlp

    rows = []
    for name, train in (("digits MLP", trained_digits_mlp), ("digits CNN", trained_digits_cnn)):
        model, (_, xte, _, yte) = train()
        rows.append(_measure(name, model.eval(), xte, yte, args.n))
        print(rows[-1], flush=True)
    head = ["model", "suite", "plaintext ms", "sealed ms", "added ms (target <= 1)",
            "batch 64: plaintext / sealed images/s", "throughput ratio (target >= 0.9)",
            "evidence fetch + verify ms (once)", "accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for suite in ("x25519", "mlkem768-x25519"):
            lines.append(
                f"| {r['model']} | {suite} | {r['plain_ms']:.3f} | {r[suite + '_ms']:.3f} | "
                f"{r[suite + '_added_ms']:.3f} | {r['plain_batch64_per_s']:.0f} / "
                f"{r[suite + '_batch64_per_s']:.0f} | {r[suite + '_batch64_ratio']:.2f} | "
                f"{r['attest_ms']:.1f} | {r['accuracy']:.4f} |")
    eng = ["| model | interpreter, traced graph (1 / 64 images, us) | interpreter, "
           "compiled graph (enclave) | onnxruntime (float32, 1 thread) |", "|---|---|---|---|"]
    eng += [f"| {r['model']} | {_engine_cells(r['engines'])} |" for r in rows]
    return write_results(ROOT / "bench" / "results", "tee_digits", rows,
                         time.strftime("%Y-%m-%d %H:%M:%S"),
                         ["`python bench/tee_digits.py`; enclave (INSECURE software "
                          "attester), plaintext baseline and key release as processes on "
                          "loopback, 2 cores, one BLAS thread each; the client alternates between servers; "
                          "medians." + (" Sealed answers equal the plaintext server's "
                                        "bit for bit." if all(
                                            r["sealed_equals_plaintext_server"]
                                            for r in rows) else ""), "", *lines, "", "Inference engines (median us per call):",
                          "", *eng])


if __name__ == "__main__":
    raise SystemExit(main())
