"""Child processes of one comparison, and their peak memory.

``veil.service.processes.Processes`` starts the enclave and the MPC roles; this module
starts the two servers it does not know (the HE server of ``he_server.py`` and the
TEE plaintext baseline), finds every child's pid, and reads each one's peak resident
set (``VmHWM``) before it is stopped. ``Children.close`` stops what it started, also on
errors and Ctrl-C (it is a context manager).
"""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from ..errors import VeilError

START_TIMEOUT_S = 60.0


class ChildError(VeilError):
    """A measurement server did not start (its log file says why)."""


def peak_rss_bytes(pid: int | str = "self") -> int:
    """The resident-set high-water mark (``VmHWM``) of a process, 0 when unknown.

    Not getrusage's ru_maxrss: Linux carries that across exec."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0: writing 5 to
    ``clear_refs``), so that the next reading is the peak of what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def veil_children() -> dict[int, list[str]]:
    """Live children of this process that run ``python -m veil...``: pid -> argv."""
    out = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
            if child.status() != psutil.STATUS_ZOMBIE and "-m" in cmd and \
                    cmd[cmd.index("-m") + 1].startswith("veil"):
                out[child.pid] = cmd
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return out


def role_of(cmd: list[str]) -> str:
    """A short role name for a child's argv (``party0``, ``dealer``, ``enclave``...)."""
    args = cmd[cmd.index("-m") + 1:]
    if "mpc-node" in args:
        return f"party{args[args.index('--party') + 1]}"
    if "mpc-dealer" in args:
        return "dealer"
    if "tee-serve" in args:
        return "plaintext-server" if "--plaintext-baseline" in args else "enclave"
    if args[0] == "veil.compare.he_server":
        return "he-server"
    return args[0]


class Children:
    """Starts ``python -m MODULE ARGS`` servers and stops them all on :meth:`close`."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[subprocess.Popen] = []

    def start(self, name: str, module: str, args: list[str],
              env: dict | None = None) -> tuple[str, int]:
        """Start the server and return the address of its ``... listening on H:P`` line."""
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", module, *args],
                                    stdout=subprocess.PIPE, stderr=log, text=True,
                                    env=env)
        self._procs.append(proc)
        lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()),
                         daemon=True).start()
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            line = ""
        if " on " not in line:
            raise ChildError(f"{name} did not start (see {self.log_dir / name}.log)")
        host, _, port = line.split()[-1].rpartition(":")
        return host, int(port)

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

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
