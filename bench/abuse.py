"""Benchmark: honest clients' latency while one API key abuses the service (issue 14).

One `veil serve` process on loopback serves the digits MLP for he, tee and mpc (it starts
the enclave, dealer and parties itself: one process tree). Honest clients are threads in
this process, each with its own `veil.Client`, spread over 4 honest API keys and the
three modes, each predicting one input at a time. Two runs of ``--seconds`` each, same
process tree:

1. unloaded: the honest clients only;
2. loaded: the same, plus one abusive key doing, all at once, slow bodies (8
   connections sending 1 byte/s to HE, TEE and MPC routes), a flood of HE sessions (its
   real evaluation keys uploaded again and again), a flood of TEE channels (evidence
   requests) and orphan MPC shares (party 0's share through the service with no partner,
   party 1's straight to party 1 with no party-0 share).

Reported: per key and per mode p50/p95 latency, status counts per key, the number of
5xx answers, peak RSS of the service and its children (psutil), disk used in the store
against ``--disk-budget``. Targets, printed with pass/fail: zero 5xx; the honest p95 of
each mode loaded within 2x of unloaded; peak memory within the memory budget (plus the
tree's unloaded baseline); store disk within the disk budget; the service up at the end.
A missing feature (a flag the CLI lacks, a dead service) is recorded as a failure in the
table, never a crash of the benchmark.

Writes bench/results/abuse.{json,md}. Usage:
    python bench/abuse.py [--seconds 30] [--clients 64]
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

MODES = ("he", "tee", "mpc")
HONEST_KEYS = 4
DISK_BUDGET = 3 << 30
MEMORY_BUDGET = 2 << 30
GENEROUS = ("--rate", "1000", "--burst", "1000", "--max-concurrent", "64",
            "--max-sessions", "16", "--max-channels", "1024")


def _veil(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "veil", *map(str, args)], check=check,
                          capture_output=True, text=True)


def _supports(command: str, flag: str, _cache={}) -> bool:
    """Whether ``veil COMMAND --help`` lists ``flag`` (``command`` may have words)."""
    if command not in _cache:
        _cache[command] = _veil(*command.split(), "--help", check=False).stdout
    return flag in _cache[command]


def _key(store: Path, name: str, *limits: str) -> str:
    opts = [a for i, a in enumerate(limits) if _supports("keys create", limits[i - i % 2])]
    return _veil("keys", "create", name, "--store", store, *opts).stdout.strip()


class Recorder:
    """Latencies and outcomes by (key, mode); thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lat: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.errors: Counter = Counter()

    def add(self, key: str, mode: str, seconds: float | None, status) -> None:
        with self.lock:
            if seconds is not None:
                self.lat[(key, mode)].append(seconds)
            self.status[key][str(status)] += 1

    def error(self, text: str) -> None:
        with self.lock:
            self.errors[text[:160]] += 1

    def fivexx(self) -> int:
        return sum(n for c in self.status.values() for s, n in c.items()
                   if s.isdigit() and int(s) >= 500)


def _status_of(exc: Exception):
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status
    return "timeout" if "did not answer in time" in str(exc) else type(exc).__name__


def _pct(xs: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(xs, q)) * 1e3 if xs else None


class Monitor:
    """Peak RSS of the service tree and disk used by the store, sampled every 0.25 s."""

    def __init__(self, pid: int, store: Path) -> None:
        self.pid, self.store = pid, store
        self.peak_rss = self.peak_disk = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        import psutil

        try:
            p = psutil.Process(self.pid)
            return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
        except psutil.Error:
            return 0

    def disk(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.store):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
                except OSError:
                    pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self.rss())
            self.peak_disk = max(self.peak_disk, self.disk())
            time.sleep(0.25)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def honest_run(clients, x, seconds: float, rec: Recorder) -> None:
    stop = time.monotonic() + seconds

    def work(i, key, mode, client):
        j = i
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                client.predict(x[j % len(x)])
                rec.add(key, mode, time.perf_counter() - t0, 200)
            except Exception as exc:          # every outcome is counted, none hidden
                rec.add(key, mode, time.perf_counter() - t0, _status_of(exc))
                rec.error(f"{key}/{mode}: {exc!r}")
                time.sleep(0.2)
            j += len(clients)

    threads = [threading.Thread(target=work, args=(i, *c), daemon=True)
               for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 180)


# -- the abusive key ------------------------------------------------------------------

def _slow_body(url, path, token, stop, rec):
    host, port = url.split("//")[1].rsplit(":", 1)
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                           f"{token}\r\nContent-Type: application/octet-stream\r\n"
                           "Content-Length: 1000000\r\n\r\n").encode())
                s.settimeout(1.0)
                answer = b""
                while not stop.is_set():
                    s.sendall(b"\0")
                    try:
                        answer = s.recv(4096)
                        break
                    except socket.timeout:
                        continue
                code = answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") \
                    else "closed"
                rec.add("abuser", "slow-body", time.monotonic() - t0, code)
        except OSError as exc:
            rec.add("abuser", "slow-body", None, type(exc).__name__)
            time.sleep(0.5)


def _post_loop(http, path, body_fn, mode, stop, rec, cleanup=None, pause=0.0):
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            r = http.post(path, content=body_fn(), headers={
                "Content-Type": "application/json" if mode == "tee-channel"
                else "application/octet-stream"})
            rec.add("abuser", mode, time.monotonic() - t0, r.status_code)
            if cleanup and r.status_code == 201:
                cleanup(r)
            if r.status_code == 429:
                time.sleep(min(2.0, float(r.headers.get("retry-after", 1) or 1)))
        except Exception as exc:
            rec.add("abuser", mode, None, type(exc).__name__)
            time.sleep(0.5)
        time.sleep(pause)


def _orphans_to_party1(url, token, mpc_keys, key_dir, stop, rec):
    """Party 1 gets a share whose party-0 half never comes: the SDK's own MPC request
    (ticket and all, where the service issues tickets) with its post to party 0
    dropped."""
    import numpy as np

    from veil.sdk import Client

    class Orphaned(Exception):       # not an OSError or VeilError: nothing catches it
        pass

    client = None
    while client is None and not stop.is_set():     # a rate-limited key waits its turn
        try:
            client = Client(url, "digits", "mpc", api_key=token, key_dir=key_dir,
                            mpc_keys=mpc_keys, timeout=30)
        except Exception as exc:
            rec.add("abuser", "mpc-orphan-p1", None, f"setup: {_status_of(exc)}")
            time.sleep(min(5.0, float(getattr(exc, "retry_after", None) or 1.0)))
    if client is None:
        return
    original = client._call

    def call(method, path, **kw):
        if path.endswith("/mpc/share"):
            raise Orphaned
        return original(method, path, **kw)

    client._call = call
    shape = client.mode.input_shape
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            client.predict(np.zeros(shape))
        except Orphaned:
            rec.add("abuser", "mpc-orphan-p1", time.monotonic() - t0, "sent")
        except Exception as exc:
            status = _status_of(exc)
            rec.add("abuser", "mpc-orphan-p1", time.monotonic() - t0, status)
            time.sleep(0.5)
        try:
            client.mode.close()          # drop the link: the next orphan dials again
        except Exception:
            pass
        time.sleep(0.05)
    client.close()


def abuse(url, token, d: Path, info, stop, rec) -> list[threading.Thread]:
    import httpx
    import numpy as np

    from veil.backends.sockets import pack_arrays
    from veil.deploy import ClientBundle, ModelClient

    http = httpx.Client(base_url=url, timeout=120,
                        headers={"Authorization": f"Bearer {token}"})
    mc = ModelClient(ClientBundle.load(info.path("he") / "client"))
    mc.keygen()
    keys = mc.evaluation_keys()
    r = http.post("/v1/models/digits/he/sessions", content=keys,
                  headers={"Content-Type": "application/octet-stream"})
    sid = r.json().get("session", "0" * 32) if r.status_code == 201 else "0" * 32
    shape = tuple(info.input_shape)

    def orphan_share():
        return bytes(pack_arrays({"request_id": np.frombuffer(secrets.token_bytes(16),
                                                              np.uint8),
                                  "share": np.zeros((1, *shape), np.uint64),
                                  "frac_bits": np.array([20], np.uint64)}))

    def nonce():
        import base64
        import json
        return json.dumps({"nonce": base64.urlsafe_b64encode(secrets.token_bytes(16))
                           .decode().rstrip("=")}).encode()

    jobs = [*[(_slow_body, (url, path, token, stop, rec)) for path in (
                f"/v1/he/sessions/{sid}/infer", f"/v1/he/sessions/{sid}/infer",
                f"/v1/he/sessions/{sid}/infer", "/v1/models/digits/tee/infer",
                "/v1/models/digits/tee/infer", "/v1/models/digits/tee/infer",
                "/v1/models/digits/mpc/share", "/v1/models/digits/mpc/share")],
            (_post_loop, (http, "/v1/models/digits/he/sessions", lambda: keys,
                          "he-session-flood", stop, rec)),
            (_post_loop, (http, "/v1/models/digits/tee/evidence", nonce, "tee-channel",
                          stop, rec)),
            (_post_loop, (http, "/v1/models/digits/mpc/share", orphan_share, "mpc-orphan-p0",
                          stop, rec)),
            (_post_loop, (http, "/v1/models/digits/mpc/share", orphan_share, "mpc-orphan-p0",
                          stop, rec)),
            (_orphans_to_party1, (url, token, d / "mpc-keys", d / "sdk-abuser", stop, rec))]
    threads = [threading.Thread(target=fn, args=args, daemon=True) for fn, args in jobs]
    for t in threads:
        t.start()
    return threads


# -- report ---------------------------------------------------------------------------

def summarize(rec: Recorder) -> dict:
    rows = []
    for (key, mode), xs in sorted(rec.lat.items()):
        rows.append({"key": key, "mode": mode, "n": len(xs), "p50_ms": _pct(xs, 50),
                     "p95_ms": _pct(xs, 95)})
    by_mode = defaultdict(list)
    for (key, mode), xs in rec.lat.items():
        if key != "abuser":
            by_mode[mode] += xs
    return {"rows": rows, "honest": {m: {"n": len(xs), "p50_ms": _pct(xs, 50),
                                         "p95_ms": _pct(xs, 95)} for m, xs in by_mode.items()},
            "status": {k: dict(c) for k, c in rec.status.items()}, "fivexx": rec.fivexx(),
            "errors": dict(rec.errors.most_common(12))}


def _f(v):
    return "-" if v is None else f"{v:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="per run (unloaded, loaded)")
    ap.add_argument("--clients", type=int, default=64, help="honest client threads")
    args = ap.parse_args(argv)

    import httpx
    from harness import write_results
    from models import trained_digits_mlp

    from veil.backends.mpc import transport
    from veil.backends.tee import SoftwareAttester
    from veil.model import export_model
    from veil.sdk import Client

    model, (xtr, xte, _, _) = trained_digits_mlp()
    x = xte.astype("float64")
    tmp = Path(tempfile.mkdtemp(prefix="veil-abuse-"))
    d, proc, result = tmp, None, {"features": {}, "failures": []}
    try:
        info = export_model(model.eval(), xtr, d / "digits", modes=MODES)
        SoftwareAttester.create(d / "att")
        transport.setup(d / "mpc-keys")
        _veil("tee-policy", info.path("tee"), "--attester", d / "att", "--allow-insecure",
              "--out", d / "policy.json")
        store = d / "store"
        for flag in ("--rate", "--max-sessions", "--max-channels"):
            result["features"][f"keys create {flag}"] = _supports("keys create", flag)
        for flag in ("--header-timeout", "--body-timeout", "--max-inflight-he",
                     "--he-workers"):
            result["features"][f"serve {flag}"] = _supports("serve", flag)
        honest = [_key(store, f"honest-{k}", *GENEROUS) for k in range(HONEST_KEYS)]
        abuser = _key(store, "abuser")       # the service's default limits apply
        extra = [a for flag, v in (("--header-timeout", "5"), ("--body-timeout", "10"))
                 if _supports("serve", flag) for a in (flag, v)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "veil", "serve", str(d / "digits"), "--store", str(store),
             "--listen", "127.0.0.1:0", "--tee-attester-key", str(d / "att"), "--mpc-keys",
             str(d / "mpc-keys"), "--disk-budget", str(DISK_BUDGET), "--memory-budget",
             str(MEMORY_BUDGET), *extra],
            stdout=subprocess.PIPE, stderr=open(d / "serve.log", "wb"), text=True)
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"veil serve did not start: {(d / 'serve.log').read_text()}")
        url = line.split()[-1]
        options = {"he": {}, "tee": {"policy": d / "policy.json"},
                   "mpc": {"mpc_keys": d / "mpc-keys"}}
        clients = []
        for i in range(args.clients):
            k, mode = i % HONEST_KEYS, MODES[i % len(MODES)]
            c = Client(url, "digits", mode, api_key=honest[k], key_dir=d / f"sdk-{k}",
                       **options[mode])
            c.predict(x[0])                       # keys uploaded, channels attested
            clients.append((f"honest-{k}", mode, c))
        mon = Monitor(proc.pid, store)
        base_rss = mon.rss()
        runs = {}
        for name in ("unloaded", "loaded"):
            rec, stop = Recorder(), threading.Event()
            with mon:
                abusers = abuse(url, abuser, d, info, stop, rec) if name == "loaded" else []
                honest_run(clients, x, args.seconds, rec)
                stop.set()
                for t in abusers:
                    t.join(30)
            runs[name] = {**summarize(rec), "peak_rss": mon.peak_rss,
                          "peak_disk": mon.peak_disk}
            print(name, runs[name]["honest"], runs[name]["fivexx"], flush=True)
            mon = Monitor(proc.pid, store)
        try:
            alive = proc.poll() is None and httpx.get(f"{url}/v1/health",
                                                      timeout=10).status_code == 200
        except httpx.HTTPError:
            alive = False
        for _, _, c in clients:
            try:
                c.close()
            except Exception:
                pass
        result.update(runs=runs, base_rss=base_rss, alive=alive,
                      exit=proc.poll(), seconds=args.seconds, clients=args.clients,
                      disk_budget=DISK_BUDGET, memory_budget=MEMORY_BUDGET)
    except Exception as exc:                 # a broken setup is a result, not a crash
        result["failures"].append(f"benchmark stopped: {exc!r}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log = (d / "serve.log").read_text(errors="replace") if (d / "serve.log").exists() \
            else ""
        result["serve_log_tail"] = log[-2000:]
        shutil.rmtree(tmp, ignore_errors=True)
    return write_results(ROOT / "bench" / "results", "abuse", result,
                         time.strftime("%Y-%m-%d %H:%M:%S"), report(result, args))


def targets(r: dict) -> list[tuple[str, bool, str]]:
    if "runs" not in r:
        return [("benchmark ran", False, "; ".join(r["failures"]))]
    un, lo = r["runs"]["unloaded"], r["runs"]["loaded"]
    out = [("zero 5xx (both runs)", un["fivexx"] + lo["fivexx"] == 0,
            f"{un['fivexx']} + {lo['fivexx']}")]
    for mode in MODES:
        a, b = un["honest"].get(mode, {}), lo["honest"].get(mode, {})
        ok = bool(a.get("p95_ms") and b.get("p95_ms") and b["p95_ms"] <= 2 * a["p95_ms"])
        out.append((f"honest {mode} p95 loaded <= 2x unloaded", ok,
                    f"{_f(b.get('p95_ms'))} vs {_f(a.get('p95_ms'))} ms"))
    errors = sum(n for run in (un, lo) for k, c in run["status"].items() if k != "abuser"
                 for s, n in c.items() if s != "200")
    out.append(("honest requests all succeed", errors == 0, f"{errors} failed"))
    mem_cap = r["memory_budget"] + r["base_rss"]
    out.append(("peak RSS (tree) <= memory budget + unloaded baseline",
                lo["peak_rss"] <= mem_cap,
                f"{lo['peak_rss'] >> 20} MiB vs {mem_cap >> 20} MiB"))
    out.append(("store disk <= disk budget", lo["peak_disk"] <= r["disk_budget"],
                f"{lo['peak_disk'] >> 20} MiB vs {r['disk_budget'] >> 20} MiB"))
    out.append(("service up at the end", bool(r["alive"]), f"exit {r['exit']}"))
    for feature, present in r["features"].items():
        if not present:
            out.append((f"feature `veil {feature}`", False, "absent from --help"))
    return out


def report(r: dict, args) -> list[str]:
    lines = [f"`python bench/abuse.py --seconds {args.seconds:g} --clients {args.clients}`: "
             "digits MLP (he, tee, mpc), one `veil serve` tree on loopback, 2 cores shared "
             f"by everything. {HONEST_KEYS} honest keys, clients spread over them and the "
             "modes; one abusive key (8 slow bodies, HE session flood, TEE channel flood, "
             "orphan MPC shares to party 0 and party 1) in the loaded run only. Disk budget "
             f"{DISK_BUDGET >> 20} MiB, memory budget {MEMORY_BUDGET >> 20} MiB.", "",
             "## Targets", "", "| target | pass | measured |", "|---|---|---|"]
    for name, ok, measured in targets(r):
        lines.append(f"| {name} | {'PASS' if ok else 'FAIL'} | {measured} |")
    for name in ("unloaded", "loaded"):
        run = r.get("runs", {}).get(name)
        if not run:
            continue
        lines += ["", f"## {name}: latency by key and mode (ms)", "",
                  "| key | mode | n | p50 | p95 |", "|---|---|---|---|---|"]
        for row in run["rows"]:
            lines.append(f"| {row['key']} | {row['mode']} | {row['n']} | "
                         f"{_f(row['p50_ms'])} | {_f(row['p95_ms'])} |")
        lines += ["", "| key | status counts |", "|---|---|"]
        for key, c in sorted(run["status"].items()):
            lines.append(f"| {key} | {', '.join(f'{s}: {n}' for s, n in sorted(c.items()))} |")
        lines += ["", f"5xx: {run['fivexx']}; peak RSS of the tree {run['peak_rss'] >> 20} MiB"
                  f" (unloaded baseline {r['base_rss'] >> 20} MiB); peak store disk "
                  f"{run['peak_disk'] >> 20} MiB"]
        if run["errors"]:
            lines += ["", "Most frequent errors:", ""]
            lines += [f"- {n} x `{e}`" for e, n in run["errors"].items()]
    for f in r["failures"]:
        lines += ["", f"FAILURE: {f}"]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
