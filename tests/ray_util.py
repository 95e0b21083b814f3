"""A local Ray cluster on loopback for tests and bench/scale.py: a head node and worker
nodes, each a real raylet on this machine, started by Ray's ``ray start --block`` in a
process group of its own and stopped by signalling that group, so nothing is left
running; and ``veil serve --ray`` in front of it."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service_util import ready_url

ROOT = Path(__file__).resolve().parents[1]


def missing() -> str | None:
    """Why a Ray cluster cannot be started here (None when it can)."""
    from importlib.util import find_spec

    if find_spec("ray") is None or find_spec("ray.serve") is None:
        return "Ray Serve is not installed (pip install 'veil[scale]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
               RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="60")
    return env


# The README's settings for small nodes: Ray Serve's controller reconciles every 0.5 s
# (veil does not autoscale), and no log monitor streams worker logs to drivers (veil's
# driver does not take them). Idle, with veil deployed, the 2-core machine kept 0.077
# of a core busy with them and 0.122 without (bench/results/scale*.md).
LEAN_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}
LEAN_ARGS = ["--include-log-monitor=false"]


class RayCluster:
    """``ray start --head`` plus ``workers`` more nodes (``cpus`` each), on loopback;
    ``lean``: with the README's settings for small nodes (``LEAN_ENV``, ``LEAN_ARGS``)."""

    def __init__(self, cpus: float = 1, workers: int = 1, object_store: int = 200 << 20,
                 lean: bool = True):
        self.dir = Path(tempfile.mkdtemp(prefix="veil-ray-"))
        self.port, self.procs = _free_port(), []
        self.address = f"127.0.0.1:{self.port}"
        self._common = [f"--num-cpus={cpus}", f"--object-store-memory={object_store}",
                        "--block", "--disable-usage-stats", *(LEAN_ARGS if lean else [])]
        self._env = {**_env(), **(LEAN_ENV if lean else {})}
        try:
            self._start(["--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                         "--include-dashboard=false",
                         f"--temp-dir={self.dir}"], "head")
            self._wait_nodes(1)
            for _ in range(workers):
                self.add_node()
        except BaseException:
            self.stop()
            raise

    def _start(self, args: list[str], name: str) -> None:
        log = open(self.dir / f"{name}-{len(self.procs)}.log", "wb")
        self.procs.append(subprocess.Popen(
            [_ray(), "start", *args, *self._common], stdout=log, stderr=log,
            env=self._env, start_new_session=True))

    def add_node(self) -> None:
        """Another worker node joins the cluster (and takes replicas Ray places)."""
        n = len(self.procs)
        self._start([f"--address={self.address}", "--node-ip-address=127.0.0.1"], "worker")
        self._wait_nodes(n + 1)

    def _wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a ray node exited: {self.logs()}")
            out = subprocess.run([_ray(), "status", f"--address={self.address}"],
                                 capture_output=True, text=True, env=_env())
            if out.returncode == 0 and out.stdout.count(" node_") >= n:
                return
            time.sleep(1)
        raise RuntimeError(f"ray nodes did not come up: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:]
                         for p in sorted(self.dir.glob("*.log")))

    def stop(self) -> None:
        """Stop every node: SIGTERM to each node's process group, SIGKILL after 20 s."""
        for p in reversed(self.procs):
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p, signal.SIGKILL)
            p.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)      # the group this node's `ray start` leads
    except ProcessLookupError:
        pass


class RayServe:
    """``veil serve EXPORT... --ray ADDRESS`` on 127.0.0.1:0, until :meth:`stop`."""

    def __init__(self, exports: list[Path], store: Path, address: str, *extra: str,
                 env: dict | None = None, timeout: float = 300):
        self.log = store.parent / f"ray-serve-{os.urandom(4).hex()}.log"
        self._err = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "veil", "serve", *map(str, exports), "--store", str(store),
             "--listen", "127.0.0.1:0", "--ray", address, "--allow-insecure", *extra],
            stdout=subprocess.PIPE, stderr=self._err, text=True,
            env={**_env(), **(env or {})}, start_new_session=True)
        self.url = ready_url(self, "veil serve --ray", timeout, tail=4000)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc, signal.SIGKILL)
                self.proc.wait()
        self._err.close()
