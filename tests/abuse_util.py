"""Helpers of the abuse and fuzz tests: a real `veil serve` process tree, its health and
memory seen from outside, and envelopes rebuilt around mutated OpenFHE bytes.

Everything here goes through the public surface: the ``veil`` CLI, HTTP, the SDK.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from veil.wire import pack, unpack

ROOT = Path(__file__).resolve().parents[1]
READY = "veil-serve listening on "
OCT = {"Content-Type": "application/octet-stream"}
CT_KIND, KEYS_KIND = "veil-ciphertext", "veil-evaluation-keys"
GENEROUS = ("--rate", "100000", "--burst", "100000", "--max-sessions", "100000",
            "--max-uploads", "1000", "--max-concurrent", "1000", "--max-channels", "100000")


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    e.setdefault("OPENBLAS_NUM_THREADS", "1")
    return e


def veil(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m veil ARGS`` with this worktree's veil."""
    return subprocess.run([sys.executable, "-m", "veil", *map(str, args)], env=env(),
                          capture_output=True, text=True, check=check, timeout=timeout)


def create_key(store: Path, name: str, *limits: str) -> str:
    """``veil keys create NAME --store DIR [limits]``; prints the API key."""
    return veil("keys", "create", name, "--store", store, *limits).stdout.strip()


def serve_args() -> list[str]:
    """Flags every test service gets: insecure test exports are allowed explicitly."""
    return ["--allow-insecure"]


def three_mode_export(root: Path, name: str = "lin"):
    """The smallest model exported for he, tee and mpc under ``root/name``, with the
    INSECURE software attester (``root/att``), MPC role keys (``root/mpc-keys``) and a
    TEE policy that trusts them (``root/policy.json``); returns the export info."""
    from veil.backends.mpc import transport
    from veil.backends.tee import SoftwareAttester

    info = smallest_he_export(root / name, name, modes=("he", "tee", "mpc"))
    SoftwareAttester.create(root / "att")
    transport.setup(root / "mpc-keys")
    veil("tee-policy", info.path("tee"), "--attester", root / "att", "--allow-insecure",
         "--out", root / "policy.json")
    return info


class Served:
    """``veil serve`` on 127.0.0.1:0 (it starts the enclave and MPC parties itself)."""

    def __init__(self, exports, store: Path, *extra: str, timeout: float = 120) -> None:
        self.argv = [sys.executable, "-m", "veil", "serve", *map(str, exports), "--store",
                     str(store), "--listen", "127.0.0.1:0", *map(str, extra)]
        self.store = Path(store)
        self.timeout = timeout
        self.starts = 0
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.starts += 1
        self.log = self.store.parent / f"serve-{os.urandom(4).hex()}.log"
        self._err = open(self.log, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, env=env())
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(self.timeout)
        if not line or not line[0].startswith(READY):
            self.stop(kill=True)
            raise RuntimeError(f"veil serve did not start: {line!r}\n"
                               f"{self.log.read_text(errors='replace')[-3000:]}")
        self.url = line[0][len(READY):].strip()
        self.pid = self.proc.pid
        self._health = httpx.Client(base_url=self.url)     # one connection, reused

    def restart(self) -> None:
        self.stop(kill=True)
        self.start()

    def stop(self, kill: bool = False) -> None:
        if getattr(self, "_health", None) is not None:
            self._health.close()
            self._health = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._err.close()

    def exit_reason(self) -> str | None:
        """None while running; else 'signal SIGABRT' or 'exit 1' (and the log's tail)."""
        rc = self.proc.poll()
        if rc is None:
            return None
        import signal
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
        return how

    def alive(self, timeout: float = 15.0) -> bool:
        """The process runs and ``GET /v1/health`` answers 200."""
        if self.proc.poll() is not None:
            return False
        try:
            return self._health.get("/v1/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def rss(self, children: bool = False) -> int:
        """Resident bytes of the service process (and its children when asked)."""
        try:
            p = psutil.Process(self.pid)
            procs = [p, *p.children(recursive=True)] if children else [p]
            return sum(q.memory_info().rss for q in procs if q.is_running())
        except psutil.Error:
            return 0


class RSSWatch:
    """Polls the service's RSS; kills the service past ``kill_over`` bytes above the
    baseline (a test must not take this shared machine's memory with it)."""

    def __init__(self, served: Served, kill_over: int = 1500 << 20, every: float = 0.02):
        self.served, self.kill_over, self.every = served, kill_over, every
        self.base = served.rss()
        self.peak = self.base
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.served.rss()
            self.peak = max(self.peak, rss)
            if rss - self.base > self.kill_over and self.served.proc.poll() is None:
                self.killed = True
                self.served.proc.kill()
            time.sleep(self.every)

    @property
    def growth(self) -> int:
        return self.peak - self.base

    def __enter__(self) -> "RSSWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def repack(blob: bytes, kind: str, part: str, data: bytes) -> bytes:
    """The envelope ``blob`` with ``part`` replaced, digests recomputed, same meta."""
    header, parts = unpack(blob, kind)
    parts[part] = data
    return pack(kind, parts, {k: v for k, v in header.items() if k not in ("kind", "parts")})


def flip(data: bytes, i: int, how: str = "xor") -> bytes:
    """``data`` with byte ``i`` xor 0xFF (``how="xor"``) or +1 mod 256 (``"inc"``)."""
    b = bytearray(data)
    b[i] = b[i] ^ 0xFF if how == "xor" else (b[i] + 1) & 0xFF
    return bytes(b)


def vector_length_offsets(data: bytes, ring_dim: int) -> list[int]:
    """Offsets of the little-endian u64 counts that precede coefficient vectors: equal to
    the ring dimension and followed, ``8 * ring_dim`` bytes (+ a short header) later, by
    the next one. OpenFHE's cereal binary writes each DCRT tower that way."""
    hits = [i for i in range(len(data) - 8)
            if struct.unpack_from("<Q", data, i)[0] == ring_dim]
    span = 8 * ring_dim
    return [a for a, b in zip(hits, hits[1:]) if span < b - a < span + 256]


def set_u64(data: bytes, at: int, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into("<Q", b, at, value)
    return bytes(b)


def post(http: httpx.Client, path: str, body: bytes, *, retries: int = 20) -> httpx.Response:
    """POST octets; a 429 is waited out (Retry-After, at most 5 s) and retried."""
    for _ in range(retries):
        r = http.post(path, content=body, headers=OCT)
        if r.status_code != 429:
            return r
        time.sleep(min(5.0, float(r.headers.get("retry-after", "1") or 1)))
    return r


def json_error(r: httpx.Response) -> str | None:
    """The ``error.code`` of a JSON error body, or None if the body is not one."""
    try:
        body = r.json()
        return body["error"]["code"] if isinstance(body["error"]["code"], str) else None
    except (ValueError, KeyError, TypeError):
        return None


def smallest_he_export(directory: Path, name: str, modes=("he",)):
    """The smallest HE model: one Linear(4, 2) under insecure test parameters (ring 4096,
    two towers); its first 2 KB hold the same OpenFHE headers as any model's."""
    import numpy as np
    import torch

    import veil
    from veil.model import export_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    calib = np.random.default_rng(0).uniform(-1, 1, (64, 4))
    compiled = veil.compile(model, calib, insecure_test_params=True)
    return export_model(model, calib, directory, name=name, modes=modes, compiled=compiled)
