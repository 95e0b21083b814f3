"""The server processes behind the TEE and MPC modes, supervised.

One launcher for every caller: ``CompiledModel.run(mode="tee"|"mpc")`` (through
``deploy/local.py``), ``veil serve`` and ``veil compare``. ``veil serve`` fronts them;
it does not compute in them. For each export with the
``tee`` mode it starts an enclave (``veil tee-serve EXPORT/tee``) or connects to a
running one; for each export with the ``mpc`` mode it starts the dealer, party 1 and
party 0 (``veil mpc-dealer`` / ``mpc-node``) or connects to running parties. Each child
logs to ``LOG_DIR/<model>-<role>.log`` and is stopped when the service stops.

Supervision: a watcher thread per child waits for it; when it dies it is started again
on the same addresses (so the service's pooled connections and the other MPC roles
reconnect to where they always did), after a backoff of 0.2 s that doubles up to 5 s
and falls back to 0.2 s once a child has stayed up 10 s. :meth:`Child.state` is
``"ok"``, ``"down"`` (dead, waiting for its restart), ``"restarting"`` (started, not
yet listening), ``"stopped"`` (SIGSTOPped: its ``/proc`` state is ``T``) or, after
:meth:`Processes.close`, ``"down"``. ``tee()`` and ``mpc()`` return them under
``"children"`` (``"<model>-enclave"``, ``"<model>-dealer"``, ``"<model>-party0"``,
``"<model>-party1"``); the routes register them in ``ServiceContext.children``, so
``/v1/health`` says ``degraded`` and requests that need a child fail fast with 503.
An enclave that is started again has new keys: its clients attest again (the SDK's
TEE client does so when its channel is gone).

Starting all three MPC roles on one machine is for development and benchmarks: the
point of MPC is that party 0, party 1 and the dealer are run by parties that do not
collude, on their own machines. ``connect_mpc`` is the production form.
"""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from ..backends.sockets import parse_address
from ..errors import ProcessError
from .export import ExportInfo

log = logging.getLogger("veil.deploy.processes")

START_TIMEOUT_S = 60.0
RESTART_MIN_S, RESTART_MAX_S = 0.2, 5.0     # backoff between restarts of one child
STABLE_S = 10.0                              # up this long: the backoff starts over


try:            # looked up here, not in the forked child (no dlopen between fork and exec)
    _PRCTL = ctypes.CDLL(None).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it when its parent dies, so even
    a service killed with SIGKILL leaves no enclave or party behind. (Linux ties this to
    the thread that started the child: a restarted child's watcher thread lives as long
    as the child.)"""
    _PRCTL(1, signal.SIGTERM)                  # PR_SET_PDEATHSIG


def _tail(path: Path, limit: int = 2000) -> str:
    """The last ``limit`` bytes of a child's log (its stderr), for an error message."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            text = fh.read().decode(errors="replace").strip()
    except OSError:
        return ""
    return f"; its stderr ends:\n{text}" if text else ""


def _text(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


# libgomp's spin before an idle OpenMP thread sleeps; read once, when the runtime loads
# (see backends/he/openfhe_native.py). The user's own setting wins.
GOMP_SPINCOUNT = "1000"


def _child_env() -> dict[str, str]:
    """The servers run single-threaded BLAS (``veil.cli`` would otherwise start itself
    again to set it, doubling the time a restart takes), and OpenMP with veil's spin
    setting (an HE server's OpenFHE reads it when it loads, whatever the process that
    started it had loaded first)."""
    return {**os.environ,
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1"),
            "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", GOMP_SPINCOUNT)}


def proc_state(pid: int) -> str:
    """The one-letter state of ``pid`` in ``/proc`` (``R``, ``S``, ``T`` ...; ``?`` when
    unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return stat[stat.rindex(b")") + 2:][:1].decode() or "?"
    except (OSError, ValueError):
        return "?"


class Child:
    """One server process, restarted when it dies (see the module docstring)."""

    def __init__(self, owner: "Processes", name: str, args: list[str], lines: int,
                 timeout: float, module: str, listen_flags: tuple[str, ...]) -> None:
        self.owner, self.name, self.args, self.lines = owner, name, list(args), lines
        self.timeout, self.module, self.listen_flags = timeout, module, listen_flags
        self.addresses: list[tuple[str, int]] = []
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = 0.0
        self._state = "restarting"
        self._backoff = RESTART_MIN_S

    # one start ----------------------------------------------------------------------
    def launch(self) -> list[tuple[str, int]]:
        """Start the process (on the addresses it had, after the first start) and return
        the addresses of its first ``lines`` ``... on HOST:PORT`` lines."""
        args = list(self.args)
        if self.addresses:
            for flag, address in zip(self.listen_flags, self.addresses):
                args += [flag, _text(address)]
        log_file = open(self.owner.log_dir / f"{self.name}.log", "ab")
        try:
            with self.owner._lock:
                if self.owner._closing:
                    raise ProcessError(f"{self.name}: the service is stopping")
                proc = subprocess.Popen([sys.executable, "-m", self.module, *args],
                                        stdout=subprocess.PIPE, stderr=log_file, text=True,
                                        env=_child_env(),
                                        preexec_fn=_die_with_parent if _PRCTL else None)
                self.proc = proc
        finally:
            log_file.close()
        got: queue.SimpleQueue = queue.SimpleQueue()

        def read() -> None:           # drains stdout for the child's whole life
            for line in proc.stdout:
                got.put(line)
            got.put(None)
        threading.Thread(target=read, daemon=True).start()
        out = []
        for _ in range(self.lines):
            try:
                line = got.get(timeout=self.timeout)
            except queue.Empty:
                line = None
            if not line or " on " not in line:
                proc.kill()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                raise ProcessError(f"{self.name} did not start (see "
                                   f"{self.owner.log_dir / self.name}.log)"
                                   + _tail(self.owner.log_dir / f"{self.name}.log"))
            out.append(parse_address(line.split()[-1]))
        if self.addresses and out != self.addresses:
            proc.kill()
            raise ProcessError(f"{self.name} came back on {out}, not {self.addresses}")
        self.addresses = out
        self.started_at = time.monotonic()
        self._state = "ok"
        return out

    # supervision --------------------------------------------------------------------
    def watch(self) -> None:
        """Start the watcher thread (after the first successful launch)."""
        threading.Thread(target=self._watch, name=f"watch-{self.name}", daemon=True).start()

    def _watch(self) -> None:
        while True:
            proc = self.proc
            code = proc.wait()
            if self.owner._closing:
                return
            if time.monotonic() - self.started_at >= STABLE_S:
                self._backoff = RESTART_MIN_S
            log.warning("%s exited (status %s): starting it again in %.1f s", self.name,
                        code, self._backoff)
            self._state = "down"
            while True:
                if self.owner._stopping.wait(self._backoff):
                    return
                self._backoff = min(self._backoff * 2, RESTART_MAX_S)
                self._state = "restarting"
                try:
                    self.launch()
                except (ProcessError, OSError) as exc:
                    log.warning("%s: restart failed: %s", self.name, exc)
                    self._state = "down"
                    if self.proc is not None and self.proc is not proc:
                        self.proc.wait()
                    continue
                self.restarts += 1
                log.warning("%s is back (restart %d)", self.name, self.restarts)
                break

    def state(self) -> str:
        """``"ok"``, ``"down"``, ``"restarting"`` or ``"stopped"`` (SIGSTOPped)."""
        if self.owner._closing:
            return "down"
        state, proc = self._state, self.proc
        if state == "ok":
            if proc is None or proc.returncode is not None:
                return "down"
            now = proc_state(proc.pid)     # not poll(): the watcher may be in wait()
            if now in ("T", "t"):
                return "stopped"
            if now in ("Z", "X", "?"):     # dead, not yet reaped by the watcher
                return "down"
        return state

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()

    def reap(self) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class Processes:
    """Starts veil server processes, restarts them when they die (``supervise``), and
    stops them all on :meth:`close` (also when a later start fails, so nothing is left
    running)."""

    def __init__(self, log_dir: str | os.PathLike, link=None, supervise: bool = True) -> None:
        """``link(address) -> address``: how one process (or a client) reaches another's
        address; the default is directly, ``veil compare --wan`` puts a slow link there.
        ``supervise=False``: a child that dies stays dead."""
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.link = link or (lambda address: tuple(address))
        self.supervise = supervise
        self.children: dict[str, Child] = {}          # by name: the latest of that name
        self._all: list[Child] = []                    # every child started, for close()
        self._lock = threading.Lock()
        self._closing = False
        self._stopping = threading.Event()

    def start(self, name: str, args: list[str], lines: int = 1,
              timeout: float = START_TIMEOUT_S, module: str = "veil",
              listen_flags: tuple[str, ...] = ()) -> list[tuple[str, int]]:
        """Run ``python -m MODULE ARGS`` (a veil server) and return the addresses of the
        first ``lines`` ``... listening on HOST:PORT`` lines it prints. With
        ``listen_flags`` (one flag per announced address, e.g. ``("--listen",)``) the
        child is supervised: restarted on the same addresses when it dies."""
        child = Child(self, name, args, lines, timeout, module, tuple(listen_flags))
        self.children[name] = child
        self._all.append(child)
        out = child.launch()
        if self.supervise and len(listen_flags) == lines:
            child.watch()
        return out

    def state(self, name: str) -> Callable[[], str]:
        """The state function of the child ``name`` (for ``ServiceContext.children``)."""
        return self.children[name].state

    def restarts(self, name: str) -> Callable[[], int]:
        """How often the child ``name`` was started again (for the service's metrics)."""
        child = self.children[name]
        return lambda: child.restarts

    def tee(self, info: ExportInfo, *, attester: str = "software",
            attester_key: str | os.PathLike | None = None,
            key_release: str | None = None, host: str = "127.0.0.1",
            threads: int | None = None, parallel: int | None = None) -> dict:
        """Start the enclave of ``info``'s TEE bundle, listening on ``host`` (a free
        port), its model runtime on ``threads`` threads per run and ``parallel`` runs at
        once (None: the enclave's defaults, ``veil tee-serve --threads/--parallel``):
        ``{"enclave": "HOST:PORT", "children": {"<model>-enclave": state}}``."""
        args = ["tee-serve", str(info.path("tee")), "--attester", attester,
                "--listen", f"[{host}]:0" if ":" in host else f"{host}:0"]
        for flag, value in (("--threads", threads), ("--parallel", parallel)):
            if value is not None:
                args += [flag, str(int(value))]
        if attester_key is not None:
            args += ["--attester-key", str(attester_key)]
        if key_release is not None:
            args += ["--key-release", str(key_release)]
        name = f"{info.name}-enclave"
        (enclave,) = self.start(name, args, listen_flags=("--listen",))
        return {"enclave": _text(self.link(enclave)), "children": {name: self.state(name)},
                "restarts": {name: self.restarts(name)}}

    def mpc(self, info: ExportInfo, keys: str | os.PathLike, *, frac_bits: int = 20,
            cmp: str = "circuit", timeout: float | None = None,
            spool: str | os.PathLike | None = None) -> dict:
        """Start the dealer, party 1 and party 0 for ``info``'s MPC model (``timeout``:
        seconds per message, the parties' default when None; ``spool``: a directory
        under which each party keeps a material set ahead, ``mpc-node --spool``)."""
        model = str(info.path("mpc"))
        wait = [] if timeout is None else ["--timeout", str(timeout)]
        names = {role: f"{info.name}-{role}" for role in ("dealer", "party0", "party1")}
        (dealer,) = self.start(names["dealer"], ["mpc-dealer", "--keys", str(keys), *wait],
                               listen_flags=("--listen",))
        common = ["--keys", str(keys), "--model", model, "--dealer",
                  _text(self.link(dealer)), "--frac-bits", str(frac_bits), "--cmp", cmp,
                  *wait]
        def spooled(party: str) -> list[str]:
            return [] if spool is None else ["--spool", str(Path(spool) / party)]

        party1, peer = self.start(names["party1"], ["mpc-node", "--party", "1", *common,
                                                    *spooled("party1")],
                                  lines=2, listen_flags=("--listen", "--peer-listen"))
        (party0,) = self.start(names["party0"], ["mpc-node", "--party", "0", *common,
                                                 *spooled("party0"),
                                                 "--peer", _text(self.link(peer))],
                               listen_flags=("--listen",))
        out = connect_mpc(self.link(party0), self.link(party1), keys, frac_bits=frac_bits,
                          dealer=dealer)
        out["children"] = {name: self.state(name) for name in names.values()}
        out["restarts"] = {name: self.restarts(name) for name in names.values()}
        return out

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self._stopping.set()
        for child in self._all:
            child.stop()
        for child in self._all:
            child.reap()
        self._all.clear()
        self.children.clear()

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
    folder with the deployment's ``public.json`` and ``ticket.key`` (the service signs
    the tickets party 1 asks clients for), to authenticate party 0."""
    conv = (lambda a: _text(parse_address(a)))
    out = {"party0": conv(party0), "party1": conv(party1), "frac_bits": int(frac_bits),
           "keys": str(keys)}
    if dealer is not None:
        out["dealer"] = conv(dealer)
    return out
