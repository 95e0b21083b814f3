"""Benchmark: veil on Ray Serve, 1 and 2 replicas, against today's direct `veil serve`.

Workloads: HE on the digits MLP (no bootstrapping); TEE on the digits MLP and on
torchvision models with random weights at 224x224 (``--tee-models``, default resnet18
and vgg16), one image per request. A local Ray cluster on loopback (a head node and a
worker node, one CPU each, with the README's settings for small nodes unless
``--ray-defaults``: tests/ray_util.py) runs `veil serve --ray` with 1, then 2
replicas of one CPU each (an enclave replica: one model run at a time on one runtime
thread), one workload at a time; the sessions live in a throwaway PostgreSQL store when
PostgreSQL is installed (else the SQLite store). Per workload:

- latency (digits MLP, HE and TEE), one input at a time, alternating between today's
  `veil serve` (HE: one worker process; TEE: the enclave it starts) and Ray with 1
  replica, so a shared machine's load weighs on both alike: p50 / p95 (the difference
  is Ray Serve's ingress and handle hops);
- rounds (``--rounds``, default 3) of: Ray with 1 replica and 2 client threads, Ray
  with 2 replicas and 4 client threads (then the other way round, so the machine's
  drift weighs on both). HE clients each have their own session (their own keys),
  created two at a time so Ray's router spreads them, and send one ciphertext again and
  again (encrypting and decrypting is the client's cost, which would take the
  replicas' cores on this machine); TEE clients predict;
- CPU per request of each part: the client threads (this process), the ingress
  replica, the workers (HE replicas, enclaves), the rest of the machine; how busy its
  cores were, and how much of them the hypervisor took (steal);
- the cores the machine keeps busy with the deployment up and no requests (Ray's own
  processes, idle replicas), over 4 s before each run;
- key reloads per 100 warm requests (the ingress's count of evaluation-key loads before
  and after the timed part);
- a PROJECTION of seed 003's worker table (1, 32, 96 workers) from these numbers, not a
  measurement (see the notes in the output).

Client threads run in this process and take CPU (TEE seals and opens, HTTP) from the
same 2 cores the replicas use: a second replica has only the CPU the rest leaves it.

Writes bench/results/scale.{json,md} (with ``--ray-defaults``: scale_ray_defaults.*). Usage:
    python bench/scale.py [--quick] [--tee-models resnet18,vgg16] [--rounds 3]
        [--only he,tee] [--ray-defaults]
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


TEE_ZOO = ("resnet18", "vgg16", "resnet50", "mobilenet_v2")   # --tee-models choices
SHAPE = (1, 3, 224, 224)


class Workload:
    """One served model of one mode: its export, the client's inputs, its TEE policy."""

    def __init__(self, label: str, mode: str, name: str, export: Path, x, policy=None):
        self.label, self.mode, self.name, self.export = label, mode, name, export
        self.x, self.policy = x, policy


class Setup:
    """The exports (digits MLP for HE and TEE; ``tee_models``, torchvision models with
    random weights at 224x224, for TEE), the software attester, their policies, and an
    API key in each of two stores (Ray's ingress, today's `veil serve`)."""

    def __init__(self, d: Path, tee_models: list[str]) -> None:
        import numpy as np
        from models import trained_digits_mlp

        from veil.backends.tee import SoftwareAttester
        from veil.model import export_model

        model, (xtr, xte, _, _) = trained_digits_mlp()
        x = xte.astype(np.float64)
        self.d = d
        SoftwareAttester.create(d / "att")
        export_model(model.eval(), xtr, d / "digits-he", name="digits", modes=("he",))
        export_model(model.eval(), xtr, d / "digits-tee", name="digits", modes=("tee",))
        self.workloads = {"he": Workload("digits MLP", "he", "digits", d / "digits-he", x),
                          "tee": Workload("digits MLP", "tee", "digits", d / "digits-tee",
                                          x, self._policy(d / "digits-tee"))}
        images = np.random.default_rng(0).normal(size=(8, *SHAPE[1:])).astype(np.float32)
        for name in tee_models:
            import torch
            import torchvision

            torch.manual_seed(0)
            net = getattr(torchvision.models, name)(weights=None).eval()
            export_model(net, images[:4], d / name, name=name, modes=("tee",))
            self.workloads[name] = Workload(f"{name} 224x224", "tee", name, d / name, images,
                                            self._policy(d / name))
        # one store for Ray's ingress, one for today's `veil serve`; a key in each
        self.keys = {store: _veil("keys", "create", "bench", "--store", d / store,
                                  "--max-concurrent", "64", "--rate", "10000", "--burst",
                                  "10000", "--max-sessions", "64")
                     for store in ("store", "direct-store")}

    def _policy(self, export: Path) -> Path:
        out = export.parent / f"{export.name}-policy.json"
        _veil("tee-policy", export / "tee", "--attester", self.d / "att", "--allow-insecure",
              "--out", out)
        return out

    def client(self, url: str, w: Workload, name: str, store: str = "store"):
        from veil.sdk import Client

        opts = {"policy": w.policy} if w.mode == "tee" else {}
        return Client(url, w.name, w.mode, api_key=self.keys[store],
                      key_dir=self.d / f"sdk-{name}", **opts)


@contextmanager
def _direct(s: Setup, w: Workload):
    """Today's `veil serve` of ``w``'s export (HE: one worker process; TEE: the enclave
    it starts); yields its URL."""
    import ray_util

    extra = ["--he-workers", "1"] if w.mode == "he" else ["--tee-attester-key", s.d / "att"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "veil", "serve", w.export, "--store",
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


def _workers_cpu(w: Workload) -> float:
    """CPU seconds used so far by the processes doing ``w``'s work: its enclaves
    (``veil tee-serve`` of its export) for TEE, the HE replicas for HE."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        line = proc.info["cmdline"] or []
        if (w.mode == "tee" and "tee-serve" in line and str(w.export / "tee") in line) or \
                (w.mode == "he" and line and line[0].startswith("ray::ServeReplica:veil:veil-he")):
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


def _cpu_sample(url: str, w: Workload) -> dict:
    """CPU seconds used so far: by this process (the client threads), the ingress, the
    workers (HE replicas or enclaves), the whole machine (busy time over every core),
    and the time the hypervisor took from the machine's cores (steal)."""
    import psutil

    t = psutil.cpu_times()
    return {"client": time.process_time(), "ingress": _ingress_cpu(url),
            "workers": _workers_cpu(w),
            "machine": t.user + t.nice + t.system + t.irq + t.softirq,
            "steal": getattr(t, "steal", 0.0), "wall": time.perf_counter()}


def _idle_cores(seconds: float) -> float:
    """Cores the machine kept busy over ``seconds`` with the deployment up and no
    requests: Ray's own processes and the idle replicas."""
    import psutil

    def busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq

    b0, w0 = busy(), time.perf_counter()
    time.sleep(seconds)
    return (busy() - b0) / (time.perf_counter() - w0)


def _cpu_split(before: dict, after: dict, requests: int) -> dict:
    """CPU ms per request by part (the rest: Ray's own processes, and whatever else ran
    on the machine), how busy the machine's cores were, and the share stolen."""
    import psutil

    d = {k: after[k] - before[k] for k in before}
    per = {k: 1e3 * d[k] / max(1, requests) for k in ("client", "ingress", "workers",
                                                       "machine")}
    per["rest"] = per["machine"] - per["client"] - per["ingress"] - per["workers"]
    per["machine_busy"] = d["machine"] / (d["wall"] * psutil.cpu_count())
    per["steal"] = d["steal"] / (d["wall"] * psutil.cpu_count())
    return per


def _on_ray(s: Setup, cluster, store: list[str], key: str, replicas: int, n: int,
            seconds: float, latency: bool) -> dict:
    import ray_util

    w = s.workloads[key]
    extra = ["--tee-attester-key", s.d / "att"] if w.mode == "tee" else []
    server = ray_util.RayServe([w.export], s.d / "store", cluster.address,
                               "--replicas", str(replicas), "--replica-cpus", "1",
                               *store, *map(str, extra))
    try:
        row = {"workload": key, "mode": w.mode, "model": w.label, "replicas": replicas}
        if latency:
            with _direct(s, w) as url, \
                    s.client(url, w, f"direct-{key}", "direct-store") as d, \
                    s.client(server.url, w, f"lat-{key}") as r:
                row["direct_latency"], row["latency"] = _paired_latency(d, r, w.x, n)
        row["idle_cores"] = _idle_cores(4.0)
        tag = f"tp-{key}-{replicas}-{os.urandom(3).hex()}"
        clients = _warm(lambda i: s.client(server.url, w, f"{tag}-{i}"), 2 * replicas, w.x)
        loads = _key_loads(server.url) if w.mode == "he" else 0
        steps = _steps(clients, w.x, w.mode)
        before = _cpu_sample(server.url, w)
        row["throughput"] = _throughput(steps, seconds)
        done = row["throughput"]["requests"]
        row["cpu_ms_per_request"] = _cpu_split(before, _cpu_sample(server.url, w), done)
        row["ingress_cpu_ms_per_request"] = row["cpu_ms_per_request"]["ingress"]
        if w.mode == "he":
            row["key_reloads_per_100"] = 100.0 * (_key_loads(server.url) - loads) / max(1, done)
        for c in clients:
            c.close()
        return row
    finally:
        server.stop()


def _speedup(rows: list[dict], key: str) -> dict:
    """1 -> 2 replicas: each round's ratio, and the ratio of the rounds' mean
    throughputs (the rounds run 1, 2 then 2, 1 replicas, so a machine's drift weighs
    on both sides alike)."""
    import numpy as np

    mine = [r for r in rows if r["workload"] == key]
    rounds = sorted({r["round"] for r in mine})
    per = {k: [next(r["throughput"]["per_s"] for r in mine
                    if r["round"] == i and r["replicas"] == k) for i in rounds] for k in (1, 2)}
    one, two = float(np.mean(per[1])), float(np.mean(per[2]))
    return {"one": one, "two": two, "speedup": two / one if one else float("nan"),
            "rounds": [b / a if a else float("nan") for a, b in zip(per[1], per[2])]}


def _projection(rows: list[dict]) -> dict:
    """Seed 003's worker table from the measurements: one replica's throughput x the
    workers x the measured 1 -> 2 efficiency (at most 1); and the one ingress replica's
    ceiling, 1000 / its measured CPU ms per request (one core)."""
    out = {}
    for key in dict.fromkeys(r["workload"] for r in rows):
        sp = _speedup(rows, key)
        t1, eff = sp["one"], min(1.0, sp["speedup"] / 2)
        cpu = max(r["ingress_cpu_ms_per_request"] for r in rows if r["workload"] == key)
        ceiling = 1000.0 / cpu if cpu > 0 else float("inf")
        workers = {w: t1 * w * (eff if w > 1 else 1.0) for w in WORKERS}
        out[key] = {"per_replica_per_s": t1, "efficiency_1_to_2": sp["speedup"] / 2,
                    "speedup_1_to_2": sp["speedup"], "rounds": sp["rounds"],
                    "ingress_cpu_ms_per_request": cpu, "ingress_ceiling_per_s": ceiling,
                    "workers": workers,
                    "one_ingress": {w: min(v, ceiling) for w, v in workers.items()},
                    "ingress_replicas_needed": {w: math.ceil(v / ceiling)
                                                for w, v in workers.items()}}
    return out


def _worker_cost(rows: list[dict], label: dict) -> list[str]:
    """Each workload's workers' CPU per request with 1 and 2 replicas (means over the
    rounds): what sharing the machine's cores cost the replicas themselves."""
    import numpy as np

    out = []
    for key in dict.fromkeys(r["workload"] for r in rows):
        ms = {k: float(np.mean([r["cpu_ms_per_request"]["workers"] for r in rows
                                if r["workload"] == key and r["replicas"] == k]))
              for k in (1, 2)}
        out.append(f"- {label[key]}: the workers' CPU per request, 1 -> 2 replicas: "
                   f"{ms[1]:.2f} -> {ms[2]:.2f} ms ({100 * (ms[2] / ms[1] - 1):+.1f} %)")
    return out


def _table(rows, direct, projection, s: Setup, args) -> list[str]:
    label = {k: f"{w.mode}, {w.label}" for k, w in s.workloads.items()}
    lat = ["| mode | direct veil serve p50 / p95 ms | Ray, 1 replica p50 / p95 ms | "
           "added by Ray (p50) |", "|---|---|---|---|"]
    for key, dm in direct.items():
        one = next(r for r in rows if r["workload"] == key and "latency" in r)["latency"]
        added = one["p50_ms"] - dm["p50_ms"]
        pct = f"{added:+.2f} ms ({100 * added / dm['p50_ms']:+.1f} %)"
        lat.append(f"| {label[key]} | {dm['p50_ms']:.2f} / {dm['p95_ms']:.2f} | "
                   f"{one['p50_ms']:.2f} / {one['p95_ms']:.2f} | {pct} |")
    tp = ["| workload | round | replicas | client threads | inputs/s | p50 / p95 ms | "
          "CPU ms per request: client / ingress / workers / rest | cores busy (stolen) | "
          "cores busy before, idle | key reloads per 100 warm requests | errors |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, c = r["throughput"], r["cpu_ms_per_request"]
        reload = f"{r['key_reloads_per_100']:.2f}" if "key_reloads_per_100" in r else "-"
        tp.append(f"| {label[r['workload']]} | {r['round']} | {r['replicas']} | "
                  f"{t['threads']} | {t['per_s']:.1f} | {t['p50_ms']:.1f} / {t['p95_ms']:.1f} | "
                  f"{c['client']:.2f} / {c['ingress']:.2f} / {c['workers']:.2f} / {c['rest']:.2f} | "
                  f"{100 * c['machine_busy']:.0f} % ({100 * c['steal']:.0f} %) | "
                  f"{r['idle_cores']:.3f} | {reload} | {len(t['errors'])} |")
    speed = [f"- {label[k]}: 1 -> 2 replicas {p['speedup_1_to_2']:.2f}x (rounds: "
             + ", ".join(f"{v:.2f}x" for v in p["rounds"]) + "; target >= 1.8x)"
             for k, p in projection.items()]
    proj = ["| workload | projected | " + " | ".join(f"{w} workers" for w in WORKERS) + " |",
            "|---|---|" + "---|" * len(WORKERS)]
    for key, p in projection.items():
        proj += [f"| {label[key]} | {what} | " + " | ".join(fmt(p[k][w]) for w in WORKERS)
                 + " |" for what, k, fmt in (
                     ("inputs/s, workers alone", "workers", "{:,.0f}".format),
                     ("inputs/s with one ingress", "one_ingress", "{:,.0f}".format),
                     ("ingress replicas needed", "ingress_replicas_needed", str))]
    cpu = [f"- {label[k]}: the ingress used {p['ingress_cpu_ms_per_request']:.2f} ms of CPU "
           f"per request: one ingress replica tops out near "
           f"{p['ingress_ceiling_per_s']:,.0f} requests/s" for k, p in projection.items()]
    zoo = ", ".join(k for k in s.workloads if k not in ("he", "tee"))
    return [
        f"`python bench/scale.py{' --quick' if args.quick else ''}"
        f"{' --tee-models ' + args.tee_models if args.tee_models != DEFAULT_ZOO else ''}`: "
        "HE on the digits MLP (no bootstrapping); TEE on the digits MLP and on "
        f"{zoo or 'no zoo model'} (torchvision, random weights, one 3x224x224 image per "
        "request); a local Ray cluster of two 1-CPU nodes on loopback ("
        f"{'Ray defaults' if args.ray_defaults else 'the README settings for small nodes'}), "
        "replicas of 1 CPU "
        f"(enclaves on one runtime thread); {args.seconds:g} s per throughput run, "
        f"{args.rounds} round(s) per workload (1 then 2 replicas, then 2 then 1). The "
        "machine has 2 cores, shared with the client threads (HE: each replays one "
        "ciphertext, so clients do not encrypt in the timed part) and with other work.", "",
        "## Latency, one input at a time", "", *lat, "",
        "## Throughput", "",
        "CPU per request is measured per process: the client threads (this process), the "
        "ingress replica, the workers (HE replicas; TEE: the enclaves); the rest is "
        "everything else the machine's cores did (Ray's own processes, other work). "
        "Stolen: the share of the cores' time the hypervisor gave to other machines. A "
        "second replica has only the CPU the rest leaves it.", "",
        *tp, "", *speed, "", *_worker_cost(rows, label), "",
        "## PROJECTION of seed 003's worker table (not a measurement)", "",
        "One replica's measured throughput x workers x the measured 1 -> 2 efficiency "
        "(at most 1). It assumes each worker has its own core and that efficiency does "
        "not fall past 2 replicas, which these runs cannot show. veil runs one ingress "
        "replica (its per-key limits and TEE channel table live in it), whose ceiling is "
        "1000 / its measured CPU ms per request; more workers than that ceiling feeds "
        f"need more ingress replicas, which veil does not have yet. Seed 003 claims "
        f"{SEED_CLAIM}.", "", *cpu, "", *proj]


DEFAULT_ZOO = "resnet18,vgg16"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short runs (a check, not numbers)")
    ap.add_argument("--seconds", type=float, default=None, help="per throughput run")
    ap.add_argument("--n", type=int, default=None, help="sequential requests per latency")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds per workload (default 3; --quick 1)")
    ap.add_argument("--tee-models", default=DEFAULT_ZOO,
                    help=f"comma-separated torchvision models served in TEE besides the "
                    f"digits MLP ({', '.join(TEE_ZOO)}; empty: none; default {DEFAULT_ZOO})")
    ap.add_argument("--only", help="comma-separated workloads to run (he, tee, and the "
                    "--tee-models names; default all)")
    ap.add_argument("--ray-defaults", action="store_true", help="start the cluster with "
                    "Ray's defaults, not the README's settings for small nodes")
    args = ap.parse_args(argv)
    args.seconds = args.seconds or (4.0 if args.quick else 20.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    zoo = [m for m in args.tee_models.split(",") if m]
    for m in zoo:
        if m not in TEE_ZOO:
            ap.error(f"--tee-models: {m!r} is not one of {', '.join(TEE_ZOO)}")
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
        s = Setup(Path(tmp), zoo)
        keys = [k for k in s.workloads if not args.only or k in args.only.split(",")]
        store = []
        if pg_util.missing() is None:
            store = ["--store-url", stack.enter_context(pg_util.postgres_server())()]
        cluster = ray_util.RayCluster(cpus=1, workers=1, lean=not args.ray_defaults)
        stack.callback(cluster.stop)
        for key in keys:
            for i in range(args.rounds):
                for replicas in ((1, 2) if i % 2 == 0 else (2, 1)):
                    latency = i == 0 and replicas == 1 and key in ("he", "tee")
                    row = _on_ray(s, cluster, store, key, replicas, n.get(key, 0),
                                  args.seconds, latency)
                    row["round"] = i + 1
                    rows.append(row)
                    print(row, flush=True)
        direct = {r["workload"]: r["direct_latency"] for r in rows if "direct_latency" in r}
        projection = _projection(rows)
        body = _table(rows, direct, projection, s, args)
    data = {"direct": direct, "ray": rows, "projection": projection,
            "ray_settings": "defaults" if args.ray_defaults else {
                "env": ray_util.LEAN_ENV, "args": ray_util.LEAN_ARGS},
            "store": "postgresql" if store else "sqlite", "quick": args.quick,
            "rounds": args.rounds, "tee_models": zoo}
    name = "scale_ray_defaults" if args.ray_defaults else "scale"
    return write_results(ROOT / "bench" / "results", name, data,
                         time.strftime("%Y-%m-%d %H:%M:%S"), body)


if __name__ == "__main__":
    raise SystemExit(main())
