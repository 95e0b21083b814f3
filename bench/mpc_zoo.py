"""Benchmark: real CNNs under two-party MPC, through real processes, with structure kept.

ResNet-20 (CIFAR, 32x32, defined here) and, with torchvision, resnet18 and mobilenet_v2
at 224x224 (``torchvision.models.X(weights=None)``, eval mode, converted with
``veil.frontend.to_graph``). Per model, one image end to end on loopback with the
dealer as its own process, material streamed layer by layer: online and offline
(waiting for the dealer) ms as the parties measure them, bytes party <-> party and
dealer -> parties, rounds, peak RSS of each process (VmHWM), the estimate the parties
checked against their budget, max logit error relative to the plain logit range,
argmax agreement, and the largest |input| of a comparison in the plain run against the
reduced ring's bound (``protocols.CMP_BITS``). A second section times the ways to convolve uint64 shares in numpy.

CrypTen 0.4.1 measured on these machines: ResNet-18 91.2 s and 3.71 GiB between the
parties, 232 rounds; MobileNetV2 47.0 s, 5.43 GiB; ResNet-20 3.96 s, 91 MiB.

Writes bench/results/mpc_zoo.{json,md}. Usage: python bench/mpc_zoo.py [--models ...]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# one BLAS thread per process (set before numpy loads OpenBLAS): both parties and the
# dealer share these cores, and OpenBLAS threads spinning against each other cost ~10x
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

CRYPTEN = {"resnet20": (3.96, 91 / 1024), "resnet18": (91.2, 3.71),
           "mobilenet_v2": (47.0, 5.43)}          # seconds, GiB between the parties
TARGET_S = {"resnet20": 0.5, "resnet18": 10.0, "mobilenet_v2": 5.0}


def resnet20(num_classes: int = 10):
    """He et al. 2016's CIFAR ResNet-20: 3 stages of 3 basic blocks (16, 32, 64
    channels), projection shortcuts (1x1 conv + BN) where the shape changes."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = nn.Sequential()
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                           nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + self.short(x))

    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def with_running_stats(model, shape, seed: int = 0):
    """Random BN statistics (as a trained network has), so activations keep a
    realistic scale through the residual stages."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
            m.weight.data = torch.rand(m.num_features, generator=g) * 0.5 + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
    return model.eval()


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used since it started."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hwm(pid: int) -> int:
    """Peak resident set (VmHWM) of a live process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def max_comparison_input(graph, x) -> float:
    """The largest |input| of a comparison (ReLU, CLIP, MAXPOOL2D) in the plain run, in
    real terms: the reduced-ring comparisons (``protocols.CMP_BITS``) are exact below
    2^(CMP_BITS - 1 - f) (2^18 for max pooling)."""
    from veil.ir import Op
    from veil.ir.interpreter import run

    values = run(graph, x, trace=True)
    return max((float(np.abs(values[n.inputs[0]]).max()) for n in graph.nodes
                if n.op in (Op.RELU, Op.CLIP, Op.MAXPOOL2D)), default=0.0)


def _wait_for_sets(logs: Path, count: int, timeout: float) -> None:
    """Until both parties' logs say ``count`` material sets were spooled."""
    deadline = time.monotonic() + timeout
    while True:
        done = [sum("spooled" in line for line in
                    (logs / f"party{b}.log").read_text(errors="replace").splitlines())
                for b in (0, 1)]
        if min(done) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the parties spooled {done} sets in {timeout:.0f} s")
        time.sleep(0.5)


def measure(name: str, model, shape, n: int = 1, timeout: float = 600.0,
            spool: bool = False, x: np.ndarray | None = None) -> dict:
    """One model through the dealer and both parties as processes on loopback, ``n``
    single images. ``spool``: the parties keep one set ahead on disk (``--spool``),
    and each timed image waits until both have it (the offline phase done while the
    servers were idle; ``runs_without_a_set`` counts runs that still streamed). ``x``:
    the images (default: standard normal noise, what ``with_running_stats`` calibrates
    on; a model calibrated on photos should get photos)."""
    import torch

    from veil.backends.mpc.evaluator import estimate_memory
    from veil.backends.mpc.service import MpcClient, load_model, save_model
    from veil.compiler.passes import encode_input
    from veil.frontend import to_graph
    from veil.service.processes import Processes

    if x is None:           # the models here are calibrated on such noise
        x = np.random.default_rng(0).normal(size=(n,) + shape).astype(np.float32)
    x = np.asarray(x, np.float32)[:n]
    with torch.no_grad():
        plain = model(torch.as_tensor(x)).numpy()
    t0 = time.perf_counter()
    graph = to_graph(model, shape)
    convert_s = time.perf_counter() - t0
    cmp_max = max_comparison_input(graph, x)
    with tempfile.TemporaryDirectory() as tmp:
        keys, mdir = f"{tmp}/keys", f"{tmp}/model"
        save_model(graph, mdir)
        mpc_graph = load_model(mdir)
        est = estimate_memory(mpc_graph)
        # token ids are one-hot encoded by the client (a transformer's embedding)
        encoder = (lambda xs: encode_input(mpc_graph, xs)) \
            if mpc_graph.input.attrs.get("onehot") else None
        subprocess.run([sys.executable, "-m", "veil", "mpc-setup", keys], check=True,
                       stdout=subprocess.DEVNULL)
        t = str(timeout)
        with Processes(f"{tmp}/logs") as procs:
            (da,) = procs.start("dealer", ["mpc-dealer", "--keys", keys, "--timeout", t])
            def spooled(party):
                return ["--spool", f"{tmp}/spool/{party}"] if spool else []

            a1, peer = procs.start("party1", ["mpc-node", "--party", "1", "--keys", keys,
                                              "--model", mdir, "--dealer", f"{da[0]}:{da[1]}",
                                              "--timeout", t, *spooled("party1")],
                                   lines=2, timeout=300)
            (a0,) = procs.start("party0", ["mpc-node", "--party", "0", "--keys", keys,
                                           "--model", mdir, "--dealer", f"{da[0]}:{da[1]}",
                                           "--peer", f"{peer[0]}:{peer[1]}", "--timeout", t,
                                           *spooled("party0")],
                                timeout=300)
            roles = ("party0", "party1", "dealer")
            cpu0 = {k: _cpu_s(procs.children[k].proc.pid) for k in roles}
            load0 = os.getloadavg()[0]
            unready = 0
            with MpcClient(keys, a0, a1, shape, timeout=timeout, encoder=encoder) as client:
                runs = []
                for i in range(n):
                    if spool:               # both parties have set i + 1 on disk
                        _wait_for_sets(Path(f"{tmp}/logs"), i + 1, timeout)
                    r = client.infer(x[i:i + 1])
                    unready += not all(s["prefetched"] for s in r.stats)
                    runs.append(r)
            rss = {k: _hwm(procs.children[k].proc.pid) for k in roles}
            cpu = {k: (_cpu_s(procs.children[k].proc.pid) - cpu0[k]) / (n + unready)
                   for k in roles}
            load = (load0 + os.getloadavg()[0]) / 2
    out = np.concatenate([r.outputs for r in runs])
    span = float(plain.max() - plain.min())
    st = runs[0].stats
    return {
        "model": name, "input": list(shape), "images": n, "convert_s": convert_s,
        "end_to_end_s": float(np.median([r.latency_s for r in runs])),
        "online_s": float(np.median([max(s["online_s"] for s in r.stats) for r in runs])),
        "party_cpu_s": float(np.median([max(s["cpu_s"] for s in r.stats) for r in runs])),
        "process_cpu_s": cpu, "load_average": load, "spooled": spool,
        "runs_without_a_set": unready,
        "offline_s": float(np.median([max(s["offline_s"] for s in r.stats) for r in runs])),
        "rounds": st[0]["online_rounds"],
        "party_bytes": sum(s["online_bytes_sent"] for s in st),
        "dealer_bytes": sum(s["offline_bytes"] for s in st),
        "layers_streamed": st[0]["layers_streamed"],
        "peak_layer_material_bytes": max(s["peak_layer_bytes"] for s in st),
        "peak_rss_bytes": rss, "estimated_bytes": est,
        "max_logit_error": float(np.abs(out - plain).max()),
        "max_logit_error_rel_range": float(np.abs(out - plain).max()) / span,
        "argmax_agreement": float(np.mean(out.argmax(1) == plain.argmax(1))),
        "min_cosine_to_plain": float(np.min(
            (out * plain).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(plain, axis=1))),
        "outputs": out,            # (not written: callers pop it)
        "max_comparison_input": cmp_max,
    }


def conv_variants(repeat: int = 3) -> list[dict]:
    """One 3x3 convolution of uint64 shares (64 -> 64 channels, 56x56, as in ResNet-18's
    first stage) and one depthwise (96 channels, 112x112, as in MobileNetV2), four ways."""
    from veil.backends.mpc.evaluator import conv_ring, ring_matmul
    from veil.ir import kernels as ref

    rng = np.random.default_rng(0)
    rows = []

    def best(fn):
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t)
        return min(times) * 1e3, res

    x = rng.integers(0, 2 ** 63, size=(1, 64, 56, 56), dtype=np.uint64)
    w = rng.integers(-2 ** 19, 2 ** 19, size=(64, 64, 3, 3))
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))

    def im2col_uint64():
        win = ref.windows(xp, (3, 3), (1, 1))
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(56 * 56, -1)
        return cols @ w.reshape(64, -1).view(np.uint64).T

    def direct_uint64():        # per kernel offset: a (positions x Ci) @ (Ci x Co) product
        out = np.zeros((56 * 56, 64), np.uint64)
        wu = w.view(np.uint64)
        for i in range(3):
            for j in range(3):
                out += xp[0, :, i:i + 56, j:j + 56].reshape(64, -1).T @ wu[:, :, i, j].T
        return out

    def im2col_limbs():
        win = ref.windows(xp, (3, 3), (1, 1))
        return ring_matmul(win.transpose(0, 2, 3, 1, 4, 5).reshape(56 * 56, -1),
                           w.reshape(64, -1))

    ms, ref_out = best(im2col_limbs)
    rows.append({"conv": "3x3 64->64 @56", "method": "im2col + float64 limbs (BLAS)",
                 "ms": ms})
    for label, fn in (("im2col + uint64 matmul (no BLAS)", im2col_uint64),
                      ("direct, 9 uint64 matmuls", direct_uint64)):
        ms, got = best(fn)
        assert np.array_equal(got, ref_out)
        rows.append({"conv": "3x3 64->64 @56", "method": label, "ms": ms})
    xd = rng.integers(0, 2 ** 63, size=(1, 96, 112, 112), dtype=np.uint64)
    wd = rng.integers(-2 ** 19, 2 ** 19, size=(96, 1, 3, 3))
    ms, direct = best(lambda: conv_ring(xd, wd, (1, 1), (1, 1), (1, 1), 96))
    rows.append({"conv": "depthwise 3x3 96 @112", "method": "direct uint64 multiply-add",
                 "ms": ms})

    def grouped_limbs():
        xpd = np.pad(xd, ((0, 0), (0, 0), (1, 1), (1, 1)))
        win = ref.windows(xpd, (3, 3), (1, 1))
        out = np.empty((1, 96, 112, 112), np.uint64)
        for g in range(96):
            cols = win[:, g].reshape(112 * 112, 9)
            out[0, g] = ring_matmul(cols, wd[g].reshape(1, 9)).reshape(112, 112)
        return out

    ms, got = best(grouped_limbs)
    assert np.array_equal(got, direct)
    rows.append({"conv": "depthwise 3x3 96 @112", "method": "per-group im2col + limbs",
                 "ms": ms})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", default=["resnet20", "resnet18", "mobilenet_v2"])
    args = ap.parse_args(argv)
    import torch
    from harness import write_results

    torch.manual_seed(0)
    rows, notes = [], []
    for name in args.models:
        try:
            if name == "resnet20":
                model, shape = with_running_stats(resnet20(), (3, 32, 32)), (3, 32, 32)
            else:
                import torchvision

                model = with_running_stats(getattr(torchvision.models, name)(weights=None),
                                           (3, 224, 224))
                shape = (3, 224, 224)
            row = measure(name, model, shape)
            row.pop("outputs")
            rows.append(row)
            print(rows[-1], flush=True)
        except Exception as exc:                 # reported, not hidden
            notes.append(f"- {name}: not run: {type(exc).__name__}: {exc}".splitlines()[0])
            print(notes[-1], flush=True)
    convs = conv_variants()
    head = ["model", "end-to-end s (target)", "online s", "offline s",
            "CPU s p0/p1/dealer", "load avg", "rounds",
            "party<->party MiB (CrypTen)", "dealer->parties MiB", "peak RSS MiB p0/p1/dealer",
            "estimate MiB party/dealer", "largest layer material MiB",
            "max logit error / range", "argmax agrees", "max abs comparison input (bound)",
            "CrypTen s"]
    from veil.backends.mpc.fixed import FRAC_BITS
    from veil.backends.mpc.protocols import CMP_BITS
    bound = 2.0 ** (CMP_BITS - 2 - FRAC_BITS)     # max pooling's, the tighter one
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cs, cg = CRYPTEN[r["model"]]
        rss, est = r["peak_rss_bytes"], r["estimated_bytes"]
        lines.append(
            f"| {r['model']} {tuple(r['input'])} | {r['end_to_end_s']:.2f} "
            f"({TARGET_S[r['model']]}) | {r['online_s']:.2f} | {r['offline_s']:.2f} | "
            f"{r['process_cpu_s']['party0']:.1f}/{r['process_cpu_s']['party1']:.1f}/"
            f"{r['process_cpu_s']['dealer']:.1f} | {r['load_average']:.0f} | "
            f"{r['rounds']} | {r['party_bytes'] / 2**20:.0f} ({cg * 1024:.0f}) | "
            f"{r['dealer_bytes'] / 2**20:.0f} | {rss['party0'] / 2**20:.0f}/"
            f"{rss['party1'] / 2**20:.0f}/{rss['dealer'] / 2**20:.0f} | "
            f"{est['party'] / 2**20:.0f}/{est['dealer'] / 2**20:.0f} | "
            f"{r['peak_layer_material_bytes'] / 2**20:.1f} | "
            f"{r['max_logit_error_rel_range']:.1e} | {r['argmax_agreement']:.0%} | "
            f"{r['max_comparison_input']:.2f} ({bound:.0f}) | {cs} |")
    lines += ["", *notes, "", "Convolution of uint64 shares in numpy (best of 3):", "",
              "| convolution | method | ms |", "|---|---|---|"]
    lines += [f"| {c['conv']} | {c['method']} | {c['ms']:.1f} |" for c in convs]
    return write_results(ROOT / "bench" / "results", "mpc_zoo",
                         {"models": rows, "conv_variants": convs, "notes": notes},
                         time.strftime("%Y-%m-%d %H:%M:%S"),
                         ["`python bench/mpc_zoo.py`; dealer, party 0 and party 1 as three "
                          "processes on loopback on a 2-core machine shared with other "
                          "jobs (load avg column: runnable jobs at the time; wall times "
                          "stretch with it, the processes' CPU seconds do not); one image; "
                          "material streamed from the dealer layer by layer (offline = time the parties waited for it); random weights "
                          "with random BN statistics; bytes are both directions summed "
                          "over both parties. Comparisons outside truncations run on a "
                          f"{CMP_BITS}-bit ring: exact for inputs below the bound shown "
                          "(protocols.CMP_BITS).", "", *lines])


if __name__ == "__main__":
    raise SystemExit(main())
