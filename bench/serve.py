"""Benchmark: what the HTTP service costs over talking to each backend directly, and
throughput with 1, 8 and 32 concurrent clients.

One `veil serve` process on loopback serves the digits MLP for he, tee and mpc, in front
of an enclave, a dealer and two parties started here as their own processes. Per mode:

- direct, one input at a time: HE client and server roles in this process (no network),
  TEE client to the enclave's own TCP port, MPC client to the parties;
- through the service with the SDK (`veil.Client`), one input at a time; the difference
  is the service's overhead (MPC: party 0's share goes through the service, party 1's
  straight to party 1);
- throughput through the service with 1, 8 and 32 client threads for a fixed time, each
  thread with its own `veil.Client` (HE: all share one API key and key folder, so one
  evaluation-key upload; TEE: one attested channel each; MPC: links of their own).

Writes bench/results/serve.{json,md}. Usage: python bench/serve.py [--seconds S]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

CONCURRENCY = (1, 8, 32)


def _veil(*args) -> str:
    return subprocess.run([sys.executable, "-m", "veil", *args], check=True,
                          capture_output=True, text=True).stdout


def _median_ms(fn, n: int) -> float:
    import numpy as np

    fn(0)
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def _throughput(make_client, x, threads: int, seconds: float) -> dict:
    """Inputs per second with ``threads`` clients, each predicting one input at a time."""
    clients = [make_client() for _ in range(threads)]
    for c in clients:                 # setup (keys, attestation) outside the timed part
        c.predict(x[0])
    counts, errors = [0] * threads, []
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        j = i
        try:
            while time.perf_counter() < stop:
                clients[i].predict(x[j % len(x)])
                counts[i] += 1
                j += threads
        except Exception as exc:          # reported in the table, never hidden
            errors.append(repr(exc))
    t0 = time.perf_counter()
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.close()
    return {"per_s": sum(counts) / elapsed, "requests": sum(counts), "errors": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=8.0, help="per throughput run")
    ap.add_argument("--n", type=int, default=30, help="single requests per latency row")
    args = ap.parse_args(argv)

    import numpy as np
    from harness import write_results
    from models import trained_digits_mlp

    from veil.backends.mpc import transport
    from veil.backends.mpc.service import MpcClient
    from veil.backends.sockets import parse_address
    from veil.backends.tee import Policy, SoftwareAttester, TEEClient
    from veil.model import export_model
    from veil.deploy.loopback import Loopback
    from veil.deploy.bundle import ClientBundle, ServerBundle
    from veil.sdk import Client
    from veil.service.processes import Processes

    model, (xtr, xte, _, _) = trained_digits_mlp()
    x = xte.astype(np.float64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        info = export_model(model.eval(), xtr, d / "digits", modes=("he", "tee", "mpc"))
        SoftwareAttester.create(d / "att")
        transport.setup(d / "mpc-keys")
        _veil("tee-policy", str(info.path("tee")), "--attester", str(d / "att"),
              "--allow-insecure", "--out", str(d / "policy.json"))
        key = _veil("keys", "create", "bench", "--store", str(d / "store"),
                   "--max-concurrent", "64", "--rate", "10000", "--burst", "10000").strip()
        procs = Processes(d / "logs")
        proc = None
        try:
            tee = procs.tee(info, attester_key=d / "att")
            mpc = procs.mpc(info, d / "mpc-keys")
            proc = subprocess.Popen(
                [sys.executable, "-m", "veil", "serve", str(d / "digits"), "--store",
                 str(d / "store"), "--listen", "127.0.0.1:0", "--tee-enclave", tee["enclave"],
                 "--mpc-keys", str(d / "mpc-keys"),
                 "--mpc-parties", f"{mpc['party0']},{mpc['party1']}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            url = proc.stdout.readline().split()[-1]
            options = {"he": {}, "tee": {"policy": d / "policy.json"},
                       "mpc": {"mpc_keys": d / "mpc-keys"}}

            def sdk(mode):
                return Client(url, "digits", mode, api_key=key, key_dir=d / "sdk",
                              **options[mode])

            # direct clients, no HTTP
            loop = Loopback(ClientBundle.load(info.path("he") / "client"),
                            ServerBundle.load(info.path("he") / "server"))
            tee_direct = TEEClient(parse_address(tee["enclave"]),
                                   Policy.load(d / "policy.json"))
            mpc_direct = MpcClient(d / "mpc-keys", parse_address(mpc["party0"]),
                                   parse_address(mpc["party1"]),
                                   info.input_shape, frac_bits=mpc["frac_bits"])
            direct = {"he": lambda i: loop.infer(x[i % len(x)]),
                      "tee": lambda i: tee_direct.infer(x[i % len(x)][None]),
                      "mpc": lambda i: mpc_direct.infer(x[i % len(x)][None])}
            for mode in ("he", "tee", "mpc"):
                n = max(5, args.n // 3) if mode == "he" else args.n * 10
                client = sdk(mode)
                d_ms = _median_ms(direct[mode], n)
                s_ms = _median_ms(lambda i: client.predict(x[i % len(x)]), n)
                client.close()
                row = {"mode": mode, "n": n, "direct_ms": d_ms, "service_ms": s_ms,
                       "overhead_ms": s_ms - d_ms}
                for c in CONCURRENCY:
                    seconds = args.seconds * (2 if mode == "he" else 1)
                    row[f"clients_{c}"] = _throughput(lambda: sdk(mode), x, c, seconds)
                rows.append(row)
                print(row, flush=True)
            loop.close()
            tee_direct.close()
            mpc_direct.close()
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
            procs.close()
    head = ["mode", "direct ms (no HTTP)", "through the service ms", "service overhead ms",
            *[f"{c} client{'s' if c > 1 else ''}: inputs/s" for c in CONCURRENCY], "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        errs = sum(len(r[f"clients_{c}"]["errors"]) for c in CONCURRENCY)
        lines.append(f"| {r['mode']} | {r['direct_ms']:.2f} | {r['service_ms']:.2f} | "
                     f"{r['overhead_ms']:.2f} | " + " | ".join(
                         f"{r[f'clients_{c}']['per_s']:.1f}" for c in CONCURRENCY)
                     + f" | {errs} |")
    return write_results(ROOT / "bench" / "results", "serve", rows,
                         time.strftime("%Y-%m-%d %H:%M:%S"), [
        "`python bench/serve.py`: digits MLP, one `veil serve` process on loopback (it "
        "starts the enclave, dealer and parties), 2 cores shared by everything. Latency: "
        "medians of one input at a time. Throughput: client threads in this process, "
        f"each predicting one input at a time for {args.seconds:g} s (HE twice as long). "
        "MPC: party 0's share goes through the service, which fronts party 0; party 1's "
        "share goes straight to party 1.",
        "", *lines])


if __name__ == "__main__":
    raise SystemExit(main())
