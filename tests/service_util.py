"""Helpers of the service tests: tiny exports and a real server process on loopback."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
READY = "veil-serve listening on "


def tiny_model(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def tiny_export(directory: Path, name: str, seed: int = 0, modes=("he",)):
    """(torch model, compiled model, calibration data) of an export at ``directory``."""
    import veil
    from veil.model import export_model

    model = tiny_model(seed)
    calib = np.random.default_rng(seed).uniform(-1, 1, (64, 4))
    compiled = veil.compile(model, calib, insecure_test_params=True)
    export_model(model, calib, directory, name=name, modes=modes, compiled=compiled)
    return model, compiled, calib


def ready_url(server, what: str, timeout: float, tail: int | None = None) -> str:
    """The URL of ``server.proc``'s ready line on stdout, waiting up to ``timeout`` s;
    otherwise ``server.stop()`` and RuntimeError with (the tail of) ``server.log``."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(server.proc.stdout.readline()),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or not line[0].startswith(READY):
        server.stop()
        log = server.log.read_text()
        raise RuntimeError(f"{what} did not start: {line!r}\n"
                           f"{log if tail is None else log[-tail:]}")
    return line[0][len(READY):].strip()


class ServerProcess:
    """``python -m veil.service`` on 127.0.0.1:0; stderr goes to a file checked later.
    The tiny exports use insecure test parameters, so it passes ``--allow-insecure``."""

    def __init__(self, exports: list[Path], store: Path, *extra: str, timeout: float = 60):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.log = store.parent / f"server-{os.urandom(4).hex()}.log"
        self._err = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "veil.service", *map(str, exports), "--store", str(store),
             "--listen", "127.0.0.1:0", "--allow-insecure", *extra],
            stdout=subprocess.PIPE, stderr=self._err, text=True, env=env)
        self.url = ready_url(self, "server", timeout)

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(20)
        self._err.close()

    def errors(self) -> str:
        """Tracebacks and error logs the server wrote (should be none)."""
        text = self.log.read_text(errors="replace")
        return "\n".join(line for line in text.splitlines()
                         if "Traceback" in line or " ERROR " in line or "crashed" in line)
