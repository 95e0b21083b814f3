"""The processes behind the HTTP service's TEE and MPC modes.

``veil serve`` fronts them; it does not compute in them. For each export with the
``tee`` mode it starts an enclave (``veil tee-serve EXPORT/tee``) or connects to a
running one; for each export with the ``mpc`` mode it starts the dealer, party 1 and
party 0 (``veil mpc-dealer`` / ``mpc-node``) or connects to running parties. Each child
logs to ``LOG_DIR/<model>-<role>.log`` and is stopped when the service stops.

Starting all three MPC roles on one machine is for development and benchmarks: the
point of MPC is that party 0, party 1 and the dealer are run by parties that do not
collude, on their own machines. ``connect_mpc`` is the production form.
"""
from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ..backends.sockets import parse_address
from ..deploy.export import ExportInfo
from ..errors import VeilError

START_TIMEOUT_S = 60.0


try:            # looked up here, not in the forked child (no dlopen between fork and exec)
    _PRCTL = ctypes.CDLL(None).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it when its parent dies, so even
    a service killed with SIGKILL leaves no enclave or party behind."""
    _PRCTL(1, signal.SIGTERM)                  # PR_SET_PDEATHSIG


class ProcessError(VeilError):
    """A child process (enclave, MPC party or dealer) failed to start."""


def _text(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


class Processes:
    """Starts veil server processes and stops them all on :meth:`close` (also when a
    later start fails, so nothing is left running)."""

    def __init__(self, log_dir: str | os.PathLike, link=None) -> None:
        """``link(address) -> address``: how one process (or a client) reaches another's
        address; the default is directly, ``veil compare --wan`` puts a slow link there."""
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.link = link or (lambda address: tuple(address))
        self._procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], lines: int = 1,
              timeout: float = START_TIMEOUT_S, module: str = "veil") -> list[tuple[str, int]]:
        """Run ``python -m MODULE ARGS`` (a veil server) and return the addresses of the
        first ``lines`` ``... listening on HOST:PORT`` lines it prints."""
        log = open(self.log_dir / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen([sys.executable, "-m", module, *args],
                                    stdout=subprocess.PIPE, stderr=log, text=True,
                                    preexec_fn=_die_with_parent if _PRCTL else None)
        finally:
            log.close()
        self._procs.append(proc)
        got: queue.SimpleQueue = queue.SimpleQueue()

        def read() -> None:
            for line in proc.stdout:
                got.put(line)
            got.put(None)
        threading.Thread(target=read, daemon=True).start()
        out = []
        for _ in range(lines):
            try:
                line = got.get(timeout=timeout)
            except queue.Empty:
                line = None
            if not line or " on " not in line:
                raise ProcessError(f"{name} did not start (see {self.log_dir / name}.log)")
            out.append(parse_address(line.split()[-1]))
        return out

    def tee(self, info: ExportInfo, *, attester: str = "software",
            attester_key: str | os.PathLike | None = None,
            key_release: str | None = None) -> dict:
        """Start the enclave of ``info``'s TEE bundle: ``{"enclave": "HOST:PORT"}``."""
        args = ["tee-serve", str(info.path("tee")), "--attester", attester]
        if attester_key is not None:
            args += ["--attester-key", str(attester_key)]
        if key_release is not None:
            args += ["--key-release", str(key_release)]
        (enclave,) = self.start(f"{info.name}-enclave", args)
        return {"enclave": _text(self.link(enclave))}

    def mpc(self, info: ExportInfo, keys: str | os.PathLike, *, frac_bits: int = 20,
            cmp: str = "circuit", timeout: float | None = None) -> dict:
        """Start the dealer, party 1 and party 0 for ``info``'s MPC model (``timeout``:
        seconds per message, the parties' default when None)."""
        model = str(info.path("mpc"))
        wait = [] if timeout is None else ["--timeout", str(timeout)]
        (dealer,) = self.start(f"{info.name}-dealer", ["mpc-dealer", "--keys", str(keys),
                                                       *wait])
        common = ["--keys", str(keys), "--model", model, "--dealer",
                  _text(self.link(dealer)), "--frac-bits", str(frac_bits), "--cmp", cmp,
                  *wait]
        party1, peer = self.start(f"{info.name}-party1", ["mpc-node", "--party", "1",
                                                          *common], lines=2)
        (party0,) = self.start(f"{info.name}-party0", ["mpc-node", "--party", "0", *common,
                                                       "--peer", _text(self.link(peer))])
        return connect_mpc(self.link(party0), self.link(party1), keys, frac_bits=frac_bits,
                           dealer=dealer)

    def close(self) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs.clear()

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect_tee(enclave: str | tuple[str, int]) -> dict:
    """An enclave someone else runs."""
    return {"enclave": _text(parse_address(enclave))}


def connect_mpc(party0, party1, keys: str | os.PathLike, *, frac_bits: int = 20,
                dealer=None) -> dict:
    """Parties someone else runs (addresses as ``HOST:PORT`` or tuples); ``keys`` is the
    folder with the deployment's ``public.json``, to authenticate party 0."""
    conv = (lambda a: _text(parse_address(a)))
    out = {"party0": conv(party0), "party1": conv(party1), "frac_bits": int(frac_bits),
           "keys": str(keys)}
    if dealer is not None:
        out["dealer"] = conv(dealer)
    return out
