"""Benchmark: what the HE worker hop costs (HTTP process -> worker process and back).

Serves the digits MLP (he only) from two `python -m veil.service` processes on loopback:
this tree (OpenFHE in HE worker processes) and ``--base``, another veil tree (e.g. the
commit before the workers: OpenFHE in the HTTP process). One SDK client per service
predicts one input at a time, alternating between the two, so load from anything else on
the machine hits both alike; the median of the paired differences is the hop's cost.

    git archive <base-commit> | tar -x -C /tmp/veil-base
    python bench/he_worker_hop.py --base /tmp/veil-base --n 20

Prints one JSON line; writes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _serve(tree: Path, export: Path, store: Path, extra: list[str]) -> tuple:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.Popen(
        [sys.executable, "-m", "veil.service", str(export), "--store", str(store),
         "--listen", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    return proc, proc.stdout.readline().split()[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True, help="another veil source tree")
    ap.add_argument("--n", type=int, default=20, help="inputs per service")
    ap.add_argument("--extra", default="", help="more flags for this tree's service")
    args = ap.parse_args(argv)

    import numpy as np
    from models import trained_digits_mlp

    from veil.model import export_model
    from veil.sdk import Client
    from veil.service.auth import KeyStore

    model, (xtr, xte, _, _) = trained_digits_mlp()
    x = xte.astype(np.float64)
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        export_model(model.eval(), xtr, d / "digits", modes=("he",))
        clients = {}
        try:
            for name, tree, extra in (("workers", ROOT, args.extra.split()),
                                      ("base", Path(args.base), [])):
                keys = KeyStore(d / name)
                token = keys.create("bench")
                keys.close()
                proc, url = _serve(tree, d / "digits", d / name, extra)
                procs.append(proc)
                clients[name] = Client(url, "digits", "he", api_key=token,
                                       key_dir=d / f"sdk-{name}")
                clients[name].predict(x[0])        # keys uploaded and loaded
            times = {name: [] for name in clients}
            for i in range(args.n):
                for name, client in clients.items():
                    t = time.perf_counter()
                    client.predict(x[i % len(x)])
                    times[name].append(time.perf_counter() - t)
            for c in clients.values():
                c.close()
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(60)
    ms = {k: 1e3 * np.asarray(v) for k, v in times.items()}
    print(json.dumps({"n": args.n, "workers_ms": round(float(np.median(ms["workers"])), 1),
                      "base_ms": round(float(np.median(ms["base"])), 1),
                      "paired_diff_ms": round(float(np.median(ms["workers"] - ms["base"])), 1),
                      "load": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
