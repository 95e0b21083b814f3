"""Benchmark: veil on Ray Serve, 1 and 2 replicas, against today's direct `veil serve`.

The digits MLP (no bootstrapping) exported twice, once for HE and once for TEE. A local
Ray cluster on loopback (a head node and a worker node, one CPU each: tests/ray_util.py)
runs `veil serve --ray` with 1, then 2 replicas of one CPU each, one mode at a time;
the sessions live in a throwaway PostgreSQL store when PostgreSQL is installed (else the
SQLite store). Per mode:

- latency, one input at a time, alternating between today's `veil serve` (HE: one
  worker process; TEE: the enclave it starts) and Ray with 1 replica, so a shared
  machine's load weighs on both alike: p50 / p95 (the difference is Ray Serve's proxy,
  ingress and handle hops);
- Ray, 1 replica: throughput with 2 client threads;
- Ray, 2 replicas: throughput with 4 client threads. HE clients each have their own
  session (their own keys), created two at a time so Ray's router spreads them, and
  send one ciphertext again and again (encrypting and decrypting is the client's cost,
  which would take the replicas' cores on this machine); TEE clients predict;
- key reloads per 100 warm requests (the ingress's count of evaluation-key loads before
  and after the timed part);
- a PROJECTION of seed 003's worker table (1, 32, 96 workers) from these numbers, not a
  measurement (see the notes in the output).

Client threads run in this process and take CPU (TEE seals and opens, HTTP) from the
same 2 cores the replicas use: scaling is understated on such a machine.

Writes bench/results/scale.{json,md}. Usage: python bench/scale.py [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))     # ray_util, pg_util, service_util
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

WORKERS = (1, 32, 96)          # seed 003's table
SEED_CLAIM = "100,000 inferences/s on 96 cores"


def _veil(*args) -> str:
    return subprocess.run([sys.executable, "-m", "veil", *map(str, args)], check=True,
                          capture_output=True, text=True).stdout.strip()


def _pct(times: list[float], q: float) -> float:
    import numpy as np

    return 1e3 * float(np.percentile(times, q)) if times else float("nan")


def _latency(client, x, n: int) -> dict:
    client.predict(x[0])                  # keys, session, attestation: not timed
    times = []
    for i in range(n):
        t = time.perf_counter()
        client.predict(x[i % len(x)])
        times.append(time.perf_counter() - t)
    return {"n": n, "p50_ms": _pct(times, 50), "p95_ms": _pct(times, 95)}


def _steps(clients, x, mode: str) -> list:
    """One request of each client, as the timed loop sends it. TEE: predict (sealing is
    cheap, and each request needs its own sequence number). HE: the client's ciphertext
    of one input, encrypted once and sent again and again (its answer checked once), so
    the client threads' encryption and decryption, the client's cost, do not take the
    replicas' cores on a 2-core machine."""
    if mode != "he":
        return [lambda i, c=c: c.predict(x[i % len(x)]) for c in clients]
    import numpy as np

    steps = []
    for c in clients:
        payload = c.encrypt(x[0])
        if not np.allclose(c.decrypt(c.infer(payload)), c.predict(x[0]), atol=1e-3):
            raise RuntimeError("the replayed ciphertext's answer is wrong")
        steps.append(lambda i, c=c, payload=payload: c.infer(payload))
    return steps


def _throughput(steps, seconds: float) -> dict:
    """Requests per second with one thread per step function, one request at a time."""
    counts, times, errors = [0] * len(steps), [], []
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def work(i: int) -> None:
        j = i
        try:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                steps[i](j)
                with lock:
                    times.append(time.perf_counter() - t)
                counts[i] += 1
                j += len(steps)
        except Exception as exc:          # reported in the table, never hidden
            errors.append(repr(exc)[:300])
    t0 = time.perf_counter()
    pool = [threading.Thread(target=work, args=(i,)) for i in range(len(steps))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"threads": len(steps), "per_s": sum(counts) / elapsed,
            "requests": sum(counts), "p50_ms": _pct(times, 50), "p95_ms": _pct(times, 95),
            "errors": errors}


def _warm(make, count: int, x) -> list:
    """``count`` clients, each with its first request done, two at a time (HE: each
    pair's uploads are in flight together, so Ray's router puts them on different
    replicas)."""
    clients = [make(i) for i in range(count)]
    for k in range(0, count, 2):
        pair = [threading.Thread(target=c.predict, args=(x[0],)) for c in clients[k:k + 2]]
        for t in pair:
            t.start()
        for t in pair:
            t.join()
    return clients


def _ingress_cpu(url: str) -> float:
    """CPU seconds used so far by the process serving ``url`` (the ingress replica)."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            t = psutil.Process(conn.pid).cpu_times()
            return t.user + t.system
    return float("nan")


def _key_loads(url: str) -> int:
    import httpx

    return int(httpx.get(url + "/v1/health", timeout=30).json()["stats"]["he_key_loads"])


class Setup:
    def __init__(self, d: Path) -> None:
        import numpy as np
        from models import trained_digits_mlp

        from veil.backends.tee import SoftwareAttester
        from veil.model import export_model

        model, (xtr, xte, _, _) = trained_digits_mlp()
        self.x = xte.astype(np.float64)
        self.d = d
        export_model(model.eval(), xtr, d / "digits-he", name="digits", modes=("he",))
        tee = export_model(model.eval(), xtr, d / "digits-tee", name="digits", modes=("tee",))
        SoftwareAttester.create(d / "att")
        _veil("tee-policy", tee.path("tee"), "--attester", d / "att", "--allow-insecure",
              "--out", d / "policy.json")
        # one store for Ray's ingress, one for today's `veil serve`; a key in each
        self.keys = {store: _veil("keys", "create", "bench", "--store", d / store,
                                  "--max-concurrent", "64", "--rate", "10000", "--burst",
                                  "10000", "--max-sessions", "64")
                     for store in ("store", "direct-store")}

    def client(self, url: str, mode: str, name: str, store: str = "store"):
        from veil.sdk import Client

        opts = {"policy": self.d / "policy.json"} if mode == "tee" else {}
        return Client(url, "digits", mode, api_key=self.keys[store],
                      key_dir=self.d / f"sdk-{name}", **opts)

    def export(self, mode: str) -> Path:
        return self.d / f"digits-{mode}"


@contextmanager
def _direct(s: Setup, mode: str):
    """Today's `veil serve` of ``mode``'s export (HE: one worker process; TEE: the
    enclave it starts); yields its URL."""
    import ray_util

    extra = ["--he-workers", "1"] if mode == "he" else ["--tee-attester-key", s.d / "att"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "veil", "serve", s.export(mode), "--store",
         s.d / "direct-store", "--listen", "127.0.0.1:0", *map(str, extra)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ray_util._env())
    try:
        yield proc.stdout.readline().split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _paired_latency(direct, ray, x, n: int) -> tuple[dict, dict]:
    """One input at a time, alternating between the direct service and Ray, so the
    load of a shared machine weighs on both alike."""
    direct.predict(x[0])
    ray.predict(x[0])
    times: dict[str, list[float]] = {"direct": [], "ray": []}
    for i in range(n):
        for name, client in (("direct", direct), ("ray", ray))[::1 if i % 2 else -1]:
            t = time.perf_counter()
            client.predict(x[i % len(x)])
            times[name].append(time.perf_counter() - t)
    return tuple({"n": n, "p50_ms": _pct(times[k], 50), "p95_ms": _pct(times[k], 95)}
                 for k in ("direct", "ray"))


def _on_ray(s: Setup, cluster, store: list[str], mode: str, replicas: int, n: int,
            seconds: float) -> dict:
    import ray_util

    extra = ["--tee-attester-key", s.d / "att"] if mode == "tee" else []
    server = ray_util.RayServe([s.export(mode)], s.d / "store", cluster.address,
                               "--replicas", str(replicas), "--replica-cpus", "1",
                               *store, *map(str, extra))
    try:
        row = {"mode": mode, "replicas": replicas}
        if replicas == 1:
            with _direct(s, mode) as url, \
                    s.client(url, mode, f"direct-{mode}", "direct-store") as d, \
                    s.client(server.url, mode, f"lat-{mode}") as r:
                row["direct_latency"], row["latency"] = _paired_latency(d, r, s.x, n)
        clients = _warm(lambda i: s.client(server.url, mode, f"tp-{mode}-{replicas}-{i}"),
                        2 * replicas, s.x)
        loads = _key_loads(server.url) if mode == "he" else 0
        cpu = _ingress_cpu(server.url)
        row["throughput"] = _throughput(_steps(clients, s.x, mode), seconds)
        row["ingress_cpu_ms_per_request"] = 1e3 * (_ingress_cpu(server.url) - cpu) / max(
            1, row["throughput"]["requests"])
        if mode == "he":
            done = row["throughput"]["requests"]
            row["key_reloads_per_100"] = 100.0 * (_key_loads(server.url) - loads) / max(1, done)
        for c in clients:
            c.close()
        return row
    finally:
        server.stop()


def _projection(rows: list[dict]) -> dict:
    """Seed 003's worker table from the measurements: one replica's throughput x the
    workers x the measured 1 -> 2 efficiency (at most 1); and the one ingress replica's
    ceiling, 1000 / its measured CPU ms per request (one core)."""
    out = {}
    for mode in ("he", "tee"):
        one = next(r for r in rows if r["mode"] == mode and r["replicas"] == 1)
        two = next(r for r in rows if r["mode"] == mode and r["replicas"] == 2)
        t1, t2 = one["throughput"]["per_s"], two["throughput"]["per_s"]
        eff = min(1.0, t2 / (2 * t1)) if t1 else float("nan")
        cpu = max(one["ingress_cpu_ms_per_request"], two["ingress_cpu_ms_per_request"])
        ceiling = 1000.0 / cpu if cpu > 0 else float("inf")
        workers = {w: t1 * w * (eff if w > 1 else 1.0) for w in WORKERS}
        out[mode] = {"per_replica_per_s": t1, "efficiency_1_to_2": t2 / (2 * t1),
                     "ingress_cpu_ms_per_request": cpu, "ingress_ceiling_per_s": ceiling,
                     "workers": workers,
                     "one_ingress": {w: min(v, ceiling) for w, v in workers.items()},
                     "ingress_replicas_needed": {w: math.ceil(v / ceiling)
                                                 for w, v in workers.items()}}
    return out


def _table(rows, direct, projection, args) -> list[str]:
    lat = ["| mode | direct veil serve p50 / p95 ms | Ray, 1 replica p50 / p95 ms | "
           "added by Ray (p50) |", "|---|---|---|---|"]
    for mode in ("he", "tee"):
        one = next(r for r in rows if r["mode"] == mode and r["replicas"] == 1)["latency"]
        dm = direct[mode]
        added = one["p50_ms"] - dm["p50_ms"]
        pct = f"{added:+.2f} ms ({100 * added / dm['p50_ms']:+.1f} %)"
        lat.append(f"| {mode} | {dm['p50_ms']:.2f} / {dm['p95_ms']:.2f} | "
                   f"{one['p50_ms']:.2f} / {one['p95_ms']:.2f} | {pct} |")
    tp = ["| mode | replicas | client threads | inputs/s | p50 / p95 ms | key reloads "
          "per 100 warm requests | errors |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["throughput"]
        reload = f"{r['key_reloads_per_100']:.2f}" if "key_reloads_per_100" in r else "-"
        tp.append(f"| {r['mode']} | {r['replicas']} | {t['threads']} | {t['per_s']:.1f} | "
                  f"{t['p50_ms']:.1f} / {t['p95_ms']:.1f} | {reload} | {len(t['errors'])} |")
    speed = []
    for mode in ("he", "tee"):
        p = projection[mode]
        speed.append(f"- {mode}: 1 -> 2 replicas {2 * p['efficiency_1_to_2']:.2f}x "
                     "(target >= 1.8x)")
    proj = ["| mode | projected | " + " | ".join(f"{w} workers" for w in WORKERS) + " |",
            "|---|---|" + "---|" * len(WORKERS)]
    for mode in ("he", "tee"):
        p = projection[mode]
        proj += [f"| {mode} | {what} | " + " | ".join(fmt(p[key][w]) for w in WORKERS) + " |"
                 for what, key, fmt in (
                     ("inputs/s, workers alone", "workers", "{:,.0f}".format),
                     ("inputs/s with one ingress", "one_ingress", "{:,.0f}".format),
                     ("ingress replicas needed", "ingress_replicas_needed", str))]
    cpu = [f"- {mode}: the ingress used {projection[mode]['ingress_cpu_ms_per_request']:.2f}"
           f" ms of CPU per request: one ingress replica tops out near "
           f"{projection[mode]['ingress_ceiling_per_s']:,.0f} requests/s"
           for mode in ("he", "tee")]
    return [
        f"`python bench/scale.py{' --quick' if args.quick else ''}`: digits MLP (HE: no "
        "bootstrapping), a local Ray cluster of two 1-CPU nodes on loopback, replicas of "
        f"1 CPU; {args.seconds:g} s per throughput run. The machine has 2 cores, shared "
        "with the client threads (HE throughput: each replays one ciphertext, so clients do not "
        "encrypt in the timed part) and with other work: "
        "numbers are noisy and scaling is understated.", "",
        "## Latency, one input at a time", "", *lat, "",
        "## Throughput", "", *tp, "", *speed, "",
        "## PROJECTION of seed 003's worker table (not a measurement)", "",
        "One replica's measured throughput x workers x the measured 1 -> 2 efficiency "
        "(at most 1). It assumes each worker has its own core and that efficiency does "
        "not fall past 2 replicas, which these runs cannot show. veil runs one ingress "
        "replica (its per-key limits and TEE channel table live in it), whose ceiling is "
        "1000 / its measured CPU ms per request; more workers than that ceiling feeds "
        f"need more ingress replicas, which veil does not have yet. Seed 003 claims "
        f"{SEED_CLAIM}.", "", *cpu, "", *proj]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short runs (a check, not numbers)")
    ap.add_argument("--seconds", type=float, default=None, help="per throughput run")
    ap.add_argument("--n", type=int, default=None, help="sequential requests per latency")
    args = ap.parse_args(argv)
    args.seconds = args.seconds or (4.0 if args.quick else 20.0)
    n = {"he": args.n or (10 if args.quick else 60), "tee": args.n or (50 if args.quick else 400)}

    import pg_util
    import ray_util
    from harness import write_results

    why = ray_util.missing()
    if why:
        print(f"bench/scale.py: {why}", file=sys.stderr)
        return 1
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        s = Setup(Path(tmp))
        store = []
        if pg_util.missing() is None:
            store = ["--store-url", stack.enter_context(pg_util.postgres_server())()]
        cluster = ray_util.RayCluster(cpus=1, workers=1)
        stack.callback(cluster.stop)
        for mode in ("he", "tee"):
            for replicas in (1, 2):
                rows.append(_on_ray(s, cluster, store, mode, replicas, n[mode],
                                    args.seconds))
                print(rows[-1], flush=True)
    direct = {r["mode"]: r["direct_latency"] for r in rows if "direct_latency" in r}
    projection = _projection(rows)
    data = {"direct": direct, "ray": rows, "projection": projection,
            "store": "postgresql" if store else "sqlite", "quick": args.quick}
    return write_results(ROOT / "bench" / "results", "scale", data,
                         time.strftime("%Y-%m-%d %H:%M:%S"),
                         _table(rows, direct, projection, args))


if __name__ == "__main__":
    raise SystemExit(main())
