"""The child processes of one comparison, and their peak memory.

``veil.deploy.processes.Processes`` starts and stops every server of a comparison
(enclave, plaintext baseline, MPC roles, the HE server of ``he_server.py``); this module
finds the children's pids and roles and reads each one's peak resident set (``VmHWM``)
before it is stopped.
"""
from __future__ import annotations

import psutil

from .._proc import peak_rss_bytes  # noqa: F401 (re-exported: callers import it here)


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
    if args[0] == "veil.deploy.he_server":
        return "he-server"
    return args[0]
