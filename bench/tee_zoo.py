"""Benchmark: sealed (TEE) inference at 224x224 — ResNet-18 and MobileNetV2.

For each model (``torchvision.models.X(weights=None).eval()``, converted with
``veil.frontend.to_graph``; MobileNetV2 through this script's own module walker when the
frontend on this branch cannot convert grouped convolutions):

1. Runtimes, in-process, each in a fresh worker process on the same exported bundle
   (so its peak RSS is its own): the numpy interpreter (float64, the "before"), torch
   (float32 and float64) and onnxruntime (float32), ``threads`` intra-op threads:
   median latency at batch 1 and 8, throughput at batch 8, the worker's peak RSS, and
   the largest error vs the float64 interpreter on the same inputs.
2. Servers, as separate processes on loopback: the enclave (``veil tee-serve``,
   INSECURE software attester, X25519 suite) and the plaintext baseline (``veil
   tee-serve --plaintext-baseline``), both running the bundle's runtime with
   ``--threads``: per-request latency at batch 1 (including sealing and TCP), one batch
   of 8 at a time (images/s), a stream of batches of 8 with 2 in flight (the SDK's
   ``infer_batch``), and the enclave's RSS. Servers are visited in blocks of requests in
   a random order each round; ratios are medians over rounds of the paired times.
   Done for the chosen runtime and, with fewer requests, for the interpreter (before).

Targets (issue 15): enclave latency <= 1.1x plaintext at batch 1 (ResNet-18), and
throughput ratio >= 0.9 for batches.

Writes bench/results/tee_zoo.{json,md}. Usage:
    python bench/tee_zoo.py [--models resnet18,mobilenet_v2] [--threads 2] [--n 20]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

TARGETS = {"latency_ratio_max": 1.1, "throughput_ratio_min": 0.9}
RUNTIMES = [("interpreter", "float64"), ("torch", "float32"), ("torch", "float64"),
            ("onnxruntime", "float32")]
CHOSEN = ("onnxruntime", "float32")
SHAPE = (3, 224, 224)


# -- graphs -------------------------------------------------------------------------------

def _walk(b, mod, x: str, nn) -> str:
    """IR nodes for a torchvision MobileNetV2 submodule (Conv2d, BatchNorm2d, ReLU6, ReLU,
    Dropout, Sequential, InvertedResidual)."""
    import numpy as np
    from veil.ir import Op

    if isinstance(mod, nn.Sequential):
        for m in mod:
            x = _walk(b, m, x, nn)
        return x
    if type(mod).__name__ == "InvertedResidual":
        y = _walk(b, mod.conv, x, nn)
        return b.add(Op.ADD, [x, y]) if mod.use_res_connect else y
    if isinstance(mod, nn.Conv2d):
        w = mod.weight.detach().double().numpy()
        bias = mod.bias.detach().double().numpy() if mod.bias is not None else np.zeros(len(w))
        return b.add(Op.CONV2D, [x], {"stride": mod.stride, "padding": mod.padding,
                                      "dilation": mod.dilation, "groups": mod.groups},
                     {"weight": w, "bias": bias})
    if isinstance(mod, nn.BatchNorm2d):
        scale = (mod.weight / (mod.running_var + mod.eps).sqrt()).detach().double().numpy()
        shift = (mod.bias.detach().double().numpy()
                 - mod.running_mean.detach().double().numpy() * scale)
        return b.add(Op.BATCHNORM, [x], {}, {"scale": scale, "shift": shift})
    if isinstance(mod, nn.ReLU6):
        return b.add(Op.CLIP, [x], {"lo": 0.0, "hi": 6.0})
    if isinstance(mod, nn.ReLU):
        return b.add(Op.RELU, [x])
    if isinstance(mod, nn.Dropout):
        return x
    raise TypeError(f"no IR mapping for {type(mod).__name__}")


class _Builder:
    def __init__(self, shape):
        from veil.ir import Op, make_node

        self.nodes = [make_node("x", Op.INPUT, [], [], {"shape": shape})]

    def add(self, op, inputs, attrs=None, params=None) -> str:
        from veil.ir import make_node

        shapes = {n.name: n.shape for n in self.nodes}
        name = f"n{len(self.nodes)}"
        self.nodes.append(make_node(name, op, inputs, [shapes[i] for i in inputs],
                                    attrs, params))
        return name


def _mobilenet_v2_graph(model):
    """MobileNetV2 as IR, walking torchvision's modules (features, pool, classifier)."""
    from torch import nn
    from veil.ir import Graph, Op

    b = _Builder(SHAPE)
    x = _walk(b, model.features, "x", nn)
    x = b.add(Op.RESHAPE, [b.add(Op.GLOBALAVGPOOL, [x])], {"shape": (1280,)})
    fc = model.classifier[1]
    b.add(Op.LINEAR, [x], {}, {"weight": fc.weight.detach().double().numpy(),
                               "bias": fc.bias.detach().double().numpy()})
    return Graph(tuple(b.nodes), b.nodes[-1].name)


def _graph(name: str):
    """(torch model, IR graph, how it was converted)."""
    import torch
    import torchvision
    from veil.errors import UnsupportedOperation
    from veil.frontend import to_graph

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    try:
        return model, to_graph(model, SHAPE), "veil.frontend.to_graph"
    except UnsupportedOperation as exc:
        if name != "mobilenet_v2":
            raise
        return model, _mobilenet_v2_graph(model), f"bench walker ({str(exc)[:60]}...)"


# -- runtime workers ------------------------------------------------------------------------

def _median(fn, reps: int) -> float:
    import numpy as np

    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ``ru_maxrss`` it starts anew
    at exec, so the parent's memory before the fork is not counted)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _worker(bundle_dir: str, runtime: str, dtype: str, threads: int, reps: int) -> dict:
    """One runtime on one bundle, in this (fresh) process; prints nothing but the JSON."""
    import numpy as np
    from veil.backends.tee import bundle
    from veil.backends.tee.executor import RuntimeSpec, make_executor

    graph = bundle.load_model(bundle_dir)
    t = time.perf_counter()
    run = make_executor(graph, RuntimeSpec(runtime, dtype), threads)
    build_s = time.perf_counter() - t
    x = np.load(Path(bundle_dir) / "inputs.npy")
    out = {"runtime": runtime, "dtype": dtype, "threads": threads, "build_s": build_s}
    for batch in (1, 8):
        xb = x[:batch]
        out[f"batch{batch}_ms"] = 1e3 * _median(lambda: run(xb), reps if batch == 1
                                                else max(1, reps // 2))
    out["batch8_per_s"] = 8e3 / out["batch8_ms"]
    np.save(Path(bundle_dir) / f"out-{runtime}-{dtype}.npy", run(x[:8]))
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _runtimes(bundle_dir: Path, threads: int, reps: dict) -> list[dict]:
    import numpy as np

    rows = []
    for runtime, dtype in RUNTIMES:
        cmd = [sys.executable, __file__, "--worker", str(bundle_dir), runtime, dtype,
               str(threads), str(reps[runtime])]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads),
                                       OPENBLAS_NUM_THREADS=str(threads)))
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ref = np.load(bundle_dir / "out-interpreter-float64.npy")
    scale = float(np.abs(ref).max())
    for r in rows:
        got = np.load(bundle_dir / f"out-{r['runtime']}-{r['dtype']}.npy")
        r["max_abs_error"] = float(np.abs(got - ref).max())
        r["max_rel_error"] = r["max_abs_error"] / scale
    return rows


# -- servers ---------------------------------------------------------------------------------

def _start(args: list[str]):
    proc = subprocess.Popen([sys.executable, "-m", "veil", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"veil {' '.join(args)} did not start")
    host, port = line.split()[-1].rsplit(":", 1)
    return proc, (host, int(port))


def _interleaved(clients: dict, run, rounds: int, block: int) -> dict[str, list[float]]:
    """Seconds per ``run(client)``: ``rounds`` rounds, in each a block of ``block``
    calls per client, the clients in a fresh random order every round."""
    rng = random.Random(0)
    times = {k: [] for k in clients}
    order = list(clients)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            for _ in range(block):
                t = time.perf_counter()
                run(clients[k])
                times[k].append(time.perf_counter() - t)
    return times


def _paired(times: dict, block: int, num: str, den: str) -> list[float]:
    """Quartiles over rounds of sum(num's times) / sum(den's times) in the same round."""
    import numpy as np

    a, b = (np.add.reduceat(np.asarray(times[k]), np.arange(0, len(times[k]), block))
            for k in (num, den))
    return [float(q) for q in np.percentile(a / b, [25, 50, 75])]


def _servers(graph, tmp: Path, x, runtime: tuple[str, str], threads: int, n: int,
             stream_images: int = 32) -> dict:
    import numpy as np
    import psutil
    from veil.backends.tee import (PlaintextClient, Policy, SoftwareAttester, TEEClient,
                                   TrustedAttester, export_model)
    from veil.backends.tee.executor import RuntimeSpec

    d = tmp / f"serve-{runtime[0]}"
    ex = export_model(graph, d / "export", runtime=RuntimeSpec(*runtime))
    SoftwareAttester.create(d / "att")
    policy = Policy(frozenset({ex.measurement}), (TrustedAttester.load(d / "att"),),
                    allow_insecure=True)
    procs = []
    try:
        enclave, ea = _start(["tee-serve", str(ex.directory), "--attester-key",
                              str(d / "att"), "--threads", str(threads), "--timeout", "600"])
        procs.append(enclave)
        base, pa = _start(["tee-serve", str(ex.directory), "--plaintext-baseline",
                           "--threads", str(threads), "--timeout", "600"])
        procs.append(base)
        clients = {"plain": PlaintextClient(pa, 600.0),
                   "enclave": TEEClient(ea, policy, timeout=600.0)}
        outs = {k: c.infer(x[:8]) for k, c in clients.items()}      # warm-up, attestation
        block = 5 if n >= 10 else 1
        single = _interleaved(clients, lambda c: c.infer(x[:1]), max(1, n // block), block)
        batch = _interleaved(clients, lambda c: c.infer(x[:8]), max(1, n // (2 * block)),
                             block)
        xs = np.concatenate([x] * 4)[:stream_images]
        stream = _interleaved(clients, lambda c: c.infer_batch(xs, batch_size=8, depth=2),
                              max(1, n // 10), 1)
        status = clients["enclave"].status()
        rss = {"enclave_rss_mb": psutil.Process(enclave.pid).memory_info().rss / 2**20,
               "plain_rss_mb": psutil.Process(base.pid).memory_info().rss / 2**20}
        for c in clients.values():
            c.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    med = {k: float(np.median(v)) for k, v in single.items()}
    bmed = {k: float(np.median(v)) for k, v in batch.items()}
    smed = {k: float(np.median(v)) for k, v in stream.items()}
    lat = _paired(single, block, "enclave", "plain")
    thr = _paired(batch, block, "plain", "enclave")
    sthr = _paired(stream, 1, "plain", "enclave")
    return {"runtime": status["runtime"], "n_single": len(single["plain"]),
            "n_batch8": len(batch["plain"]), "n_stream": len(stream["plain"]),
            "sealed_equals_plaintext": bool(np.array_equal(outs["plain"], outs["enclave"])),
            "plain_ms": 1e3 * med["plain"], "enclave_ms": 1e3 * med["enclave"],
            "latency_ratio": lat[1], "latency_ratio_iqr": [lat[0], lat[2]],
            "plain_batch8_per_s": 8 / bmed["plain"], "enclave_batch8_per_s": 8 / bmed["enclave"],
            "batch8_ratio": thr[1], "batch8_ratio_iqr": [thr[0], thr[2]],
            "stream_images": stream_images,
            "plain_stream_per_s": stream_images / smed["plain"],
            "enclave_stream_per_s": stream_images / smed["enclave"],
            "stream_ratio": sthr[1], "stream_ratio_iqr": [sthr[0], sthr[2]], **rss}


def _sealing_ms(x, reps: int = 20) -> dict:
    """Milliseconds of CPU that sealing adds to one request of 1 and of 8 images (both
    sides, one process, no sockets): client seals, enclave opens and seals the 1000
    logits, client opens; minus packing and unpacking the same arrays unsealed."""
    import secrets

    import numpy as np
    from veil.backends.sockets import pack_arrays, unpack_arrays
    from veil.backends.tee import seal

    keys = seal.ChannelKeys(secrets.token_bytes(32), secrets.token_bytes(32), b"h" * 25)
    out = {}
    for batch in (1, 8):
        xb, y = x[:batch], np.zeros((batch, 1000))

        def plain():
            unpack_arrays(pack_arrays({"x": xb}))
            unpack_arrays(pack_arrays({"y": y}))

        def sealed():
            raw = seal.Header(b"c" * 16, 1, "x25519").encode()
            got, raw, body = seal.read_header(keys.seal(True, 1, raw, pack_arrays({"x": xb})))
            unpack_arrays(keys.decrypt(True, got.seq, raw, body))
            reply = keys.encrypt(False, got.seq, raw, pack_arrays({"y": y}))
            unpack_arrays(keys.decrypt(False, seal.header_seq(raw), raw, reply))

        out[f"batch{batch}_added_ms"] = 1e3 * (_median(sealed, reps) - _median(plain, reps))
        out[f"batch{batch}_request_mb"] = len(pack_arrays({"x": xb})) / 2**20
    return out


def _model(name: str, tmp: Path, threads: int, n: int, skip_before: bool) -> dict:
    import numpy as np
    import torch
    from veil.backends.tee import export_model
    from veil.backends.tee.executor import RuntimeSpec

    model, graph, how = _graph(name)
    x = np.random.default_rng(0).normal(size=(8, *SHAPE))
    with torch.no_grad():
        torch_out = model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    d = tmp / name
    export_model(graph, d / "bundle", runtime=RuntimeSpec("interpreter", "float64"))
    np.save(d / "bundle" / "inputs.npy", x)
    reps = {"interpreter": 2, "torch": 5, "onnxruntime": 10}
    runtimes = _runtimes(d / "bundle", threads, reps)
    ref = np.load(d / "bundle" / "out-interpreter-float64.npy")
    row = {"model": name, "converted_by": how, "nodes": len(graph.nodes),
           "graph_vs_torch_max_abs": float(np.abs(ref - torch_out).max()),
           "runtimes": runtimes, "servers": {}}
    row["sealing"] = _sealing_ms(x)
    row["servers"]["chosen"] = _servers(graph, d, x, CHOSEN, threads, n)
    print(row["servers"]["chosen"], flush=True)
    if not skip_before:
        row["servers"]["before"] = _servers(graph, d, x, ("interpreter", "float64"),
                                            threads, 2, stream_images=16)
        print(row["servers"]["before"], flush=True)
    return row


def _md(rows: list[dict], threads: int, load: list[float]) -> list[str]:
    lines = [
        f"`python bench/tee_zoo.py`; torchvision models with random weights (weights=None), "
        f"inputs N(0, 1) of 3x224x224; {threads} intra-op threads per runtime; this machine "
        f"has {os.cpu_count()} cores shared with other work (5-minute load average "
        f"{min(load):.1f}-{max(load):.1f} during the run), so absolute times drift within and "
        "between runs; ratios are paired within rounds. The interpreter rows of the "
        "server table (the before) rest on 1-2 requests each: their ratios are noise, "
        "their times are what matters.", "",
        "## Runtimes (in-process, one fresh worker process each)", "",
        "| model | runtime | dtype | batch 1 ms | batch 8 ms | batch 8 images/s | "
        "peak RSS MB | max abs error vs float64 interpreter (relative to max abs output) |",
        "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for e in r["runtimes"]:
            lines.append(f"| {r['model']} | {e['runtime']} | {e['dtype']} | "
                         f"{e['batch1_ms']:.1f} | {e['batch8_ms']:.1f} | "
                         f"{e['batch8_per_s']:.2f} | {e['peak_rss_mb']:.0f} | "
                         f"{e['max_abs_error']:.2e} ({e['max_rel_error']:.1e}) |")
    lines += ["", "## Enclave vs plaintext server (separate processes, loopback)", "",
              "Latency ratio: enclave / plaintext per request at batch 1, sealing and TCP "
              f"included (target <= {TARGETS['latency_ratio_max']}). Throughput ratios: "
              f"enclave / plaintext images/s (target >= {TARGETS['throughput_ratio_min']}). "
              "Medians over rounds of paired times, interquartile range in brackets.", "",
              "| model | runtime | plaintext ms | enclave ms | latency ratio | batch 8 one at "
              "a time: plaintext / enclave images/s | ratio | stream of batches of 8, 2 in "
              "flight: plaintext / enclave images/s | ratio | enclave RSS MB | plaintext "
              "RSS MB | requests (1 / 8 / stream) |", "|---|---|---|---|---|---|---|---|---|"
              "---|---|---|"]
    for r in rows:
        for label, s in r["servers"].items():
            rt = f"{s['runtime']['name']} {s['runtime']['version']} ({label})"
            lines.append(
                f"| {r['model']} | {rt} | {s['plain_ms']:.1f} | {s['enclave_ms']:.1f} | "
                f"{s['latency_ratio']:.3f} [{s['latency_ratio_iqr'][0]:.3f}-"
                f"{s['latency_ratio_iqr'][1]:.3f}] | {s['plain_batch8_per_s']:.2f} / "
                f"{s['enclave_batch8_per_s']:.2f} | {s['batch8_ratio']:.3f} | "
                f"{s['plain_stream_per_s']:.2f} / {s['enclave_stream_per_s']:.2f} | "
                f"{s['stream_ratio']:.3f} | {s['enclave_rss_mb']:.0f} | "
                f"{s['plain_rss_mb']:.0f} | {s['n_single']} / {s['n_batch8']} / "
                f"{s['n_stream']} |")
    lines += ["", "Targets (chosen runtime): " + "; ".join(
        f"{r['model']}: latency ratio {s['latency_ratio']:.3f} "
        f"({'met' if s['latency_ratio'] <= TARGETS['latency_ratio_max'] else 'NOT met'}), "
        f"batch-8 throughput ratio {s['batch8_ratio']:.3f} / stream {s['stream_ratio']:.3f} "
        f"({'met' if min(s['batch8_ratio'], s['stream_ratio']) >= TARGETS['throughput_ratio_min'] else 'NOT met'})"
        for r in rows for s in [r["servers"]["chosen"]]) + "."]
    lines += ["", "CPU that sealing adds per request (client and enclave, one process, no "
              "sockets; the inputs travel as float64): " + "; ".join(
                  f"{r['model']}: {r['sealing']['batch1_added_ms']:.2f} ms for 1 image "
                  f"({r['sealing']['batch1_request_mb']:.1f} MiB), "
                  f"{r['sealing']['batch8_added_ms']:.2f} ms for 8" for r in rows) + "."]
    lines += ["", "Conversion: " + "; ".join(
        f"{r['model']}: {r['converted_by']}, {r['nodes']} nodes, graph vs torch float32 "
        f"max abs {r['graph_vs_torch_max_abs']:.1e}" for r in rows) + ".",
        "Sealed answers equal the plaintext server's bit for bit: "
        + ", ".join(f"{r['model']} {k}: {s['sealed_equals_plaintext']}"
                    for r in rows for k, s in r["servers"].items()) + "."]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=20, help="single requests per server")
    ap.add_argument("--skip-before", action="store_true",
                    help="do not serve with the interpreter (slow)")
    ap.add_argument("--worker", nargs=5, metavar=("BUNDLE", "RUNTIME", "DTYPE", "THREADS",
                                                  "REPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        b, rt, dt, th, reps = args.worker
        print(json.dumps(_worker(b, rt, dt, int(th), int(reps))))
        return 0
    from harness import write_results

    rows, load = [], [os.getloadavg()[1]]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(_model(name, Path(tmp), args.threads, args.n, args.skip_before))
            load.append(os.getloadavg()[1])
    data = {"targets": TARGETS, "threads": args.threads, "cpus": os.cpu_count(),
            "load_avg_5min": load, "rows": rows}
    return write_results(ROOT / "bench" / "results", "tee_zoo", data,
                         time.strftime("%Y-%m-%d %H:%M:%S"), _md(rows, args.threads, load))


if __name__ == "__main__":
    raise SystemExit(main())
