"""Benchmark: the digits MLP and CNN under two-party MPC, through real processes.

Starts the dealer and both parties as separate processes on loopback (``python -m veil
mpc-dealer / mpc-node``), then per model: one image at a time (median of N) and a batch
of 64, with the client's end-to-end latency, each phase as the parties measure it
(offline = waiting for the dealer's material, online = the protocol), bytes and rounds
(online: party to party; offline: dealer to each party), and accuracy / agreement with
plain inference. SPU's and CrypTen's figures measured on these machines sit beside.

The parties prefetch material for single images and for batches of 64 in the background
(the offline phase runs ahead of requests): single-image latency and the batch rate are
measured with material ready (the online-only rate in parentheses), and the sustained
rate runs all test images back to back, so the dealer's work is in the loop.

Writes bench/results/mpc_digits.{json,md}. Usage: python bench/mpc_digits.py [--n N]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

PEERS = "SPU 0.9.5: 16-19 ms/image, 112 kB (dealer is a party); CrypTen 0.4.1: 123 ms, 262 kB"
PEER_MS = {"SPU": 16.0, "CrypTen": 123.0}      # best figures measured on these machines
PEER_KB = {"SPU": 112.0, "CrypTen": 262.0}
TARGETS = {"latency_ms": 10.0, "batch64_per_s": 2000.0, "online_kb": 100.0}


def _measure(name, model, xte, yte, n_single: int, cmp: str, n_batch: int = 5) -> dict:
    import numpy as np
    import torch

    from veil.backends.mpc.service import MpcClient, save_model
    from veil.frontend import to_graph
    from veil.service.processes import Processes

    with torch.no_grad():
        plain = model(torch.as_tensor(xte)).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        keys, mdir = f"{tmp}/keys", f"{tmp}/model"
        save_model(to_graph(model, xte.shape[1:]), mdir)
        subprocess.run([sys.executable, "-m", "veil", "mpc-setup", keys], check=True,
                       stdout=subprocess.DEVNULL)
        with Processes(f"{tmp}/logs") as procs:
            (da,) = procs.start("dealer", ["mpc-dealer", "--keys", keys, "--timeout", "60"])
            a1, peer = procs.start("party1", ["mpc-node", "--party", "1", "--keys", keys,
                                              "--model", mdir, "--dealer", f"{da[0]}:{da[1]}",
                                              "--timeout", "60", "--cmp", cmp], lines=2)
            (a0,) = procs.start("party0", ["mpc-node", "--party", "0", "--keys", keys,
                                           "--model", mdir, "--dealer", f"{da[0]}:{da[1]}",
                                           "--peer", f"{peer[0]}:{peer[1]}", "--timeout",
                                           "60", "--cmp", cmp])
            client = MpcClient(keys, a0, a1, xte.shape[1:], timeout=120.0)
            client.infer(xte[:1])                                  # warm-up
            time.sleep(1.0)                   # the offline phase fills the parties' pools
            singles = [client.infer(xte[i:i + 1]) for i in range(n_single)]
            batches = []
            for i in range(n_batch):          # material ready: the offline phase ran ahead
                time.sleep(0.5)
                batches.append(client.infer(xte[64 * i:64 * (i + 1)]))
            # sustained: all test images, 64 at a time back to back, so after the two
            # pooled sets the dealer's work is in the loop
            t0 = time.perf_counter()
            outs = np.concatenate([client.infer(xte[i:i + 64]).outputs
                                   for i in range(0, len(xte), 64)])
            sustained = len(xte) / (time.perf_counter() - t0)
            client.close()

    def phase(results, key):
        return float(np.median([max(s[key] for s in r.stats) for r in results]))

    one = singles[0].stats
    batch_s = float(np.median([b.latency_s for b in batches]))
    batch_online_s = float(np.median([max(s["online_s"] for s in b.stats) for b in batches]))
    acc = float(np.mean(outs.argmax(1) == yte))
    return {
        "model": name, "cmp": cmp, "n_single": n_single, "images": len(xte),
        "accuracy": acc, "plain_accuracy": float(np.mean(plain.argmax(1) == yte)),
        "argmax_agreement": float(np.mean(outs.argmax(1) == plain.argmax(1))),
        "max_logit_error": float(np.abs(outs - plain).max()),
        "latency_ms": 1e3 * float(np.median([r.latency_s for r in singles])),
        "online_ms": 1e3 * phase(singles, "online_s"),
        "offline_ms": 1e3 * phase(singles, "offline_s"),
        "rounds_online": one[0]["online_rounds"],
        "online_kb": sum(s["online_bytes_sent"] for s in one) / 1e3,
        "offline_kb": sum(s["offline_bytes"] for s in one) / 1e3,
        "client_kb": (singles[0].client_bytes_sent + singles[0].client_bytes_received) / 1e3,
        "batch64_ms": 1e3 * batch_s, "batch64_per_s": 64 / batch_s,
        "batch64_online_ms": 1e3 * batch_online_s, "batch64_online_per_s": 64 / batch_online_s,
        "n_batch": n_batch, "sustained_per_s": sustained,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20, help="single-image runs per model")
    args = ap.parse_args(argv)
    from harness import write_results
    from models import trained_digits_cnn, trained_digits_mlp

    rows = []
    for name, train in (("digits MLP", trained_digits_mlp), ("digits CNN", trained_digits_cnn)):
        model, (_, xte, _, yte) = train()
        for cmp in ("circuit", "fss"):
            rows.append(_measure(name, model, xte, yte, args.n, cmp))
            print(rows[-1], flush=True)
    head = ["model", "comparisons", "end-to-end ms (target 10)", "online ms", "offline ms", "rounds",
            "online kB (target 100)", "offline kB", "batch 64 images/s (online only) (target 2000)",
            "sustained images/s, dealer in the loop",
            "accuracy (plain)", "argmax agreement", "max logit error",
            "speed vs SPU / CrypTen (>1: faster)", "online bytes vs SPU / CrypTen (>1: fewer)",
            "peers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['cmp']} | {r['latency_ms']:.1f} | {r['online_ms']:.1f} | "
            f"{r['offline_ms']:.1f} | {r['rounds_online']} | {r['online_kb']:.1f} | "
            f"{r['offline_kb']:.0f} | {r['batch64_per_s']:.0f} "
            f"({r['batch64_online_per_s']:.0f}) | {r['sustained_per_s']:.0f} | "
            f"{r['accuracy']:.4f} "
            f"({r['plain_accuracy']:.4f}) | {r['argmax_agreement']:.4f} | "
            f"{r['max_logit_error']:.1e} | "
            f"{PEER_MS['SPU'] / r['latency_ms']:.2f}x / {PEER_MS['CrypTen'] / r['latency_ms']:.2f}x"
            f" | {PEER_KB['SPU'] / r['online_kb']:.1f}x / "
            f"{PEER_KB['CrypTen'] / r['online_kb']:.1f}x | {PEERS} |")
    return write_results(ROOT / "bench" / "results", "mpc_digits", rows,
                         time.strftime("%Y-%m-%d %H:%M:%S"),
                         ["`python bench/mpc_digits.py`; three processes on loopback, "
                          "2 cores; single images and batches of 64 use dealer material "
                          "prefetched in the offline phase; the sustained rate runs the "
                          "360 test images back to back (dealer in the loop); online kB = "
                          "both parties' party-to-party bytes for one image. circuit: "
                          "comparisons as binary circuits (default); fss: DCF keys.", "",
                          *lines])


if __name__ == "__main__":
    raise SystemExit(main())
