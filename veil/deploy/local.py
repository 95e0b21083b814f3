"""The TEE and MPC roles on this machine, for ``CompiledModel.run(mode="tee"|"mpc")``.

What ``loopback.py`` is for HE, this is for the two modes whose servers are processes:
:class:`LocalTEE` starts an enclave (``veil tee-serve``) and attests it with a
development policy; :class:`LocalMPC` starts the dealer and both parties (``veil
mpc-dealer`` / ``mpc-node``) with fresh identities. Both use the one launcher,
:class:`veil.deploy.processes.Processes`, on loopback, keep their files (bundle, keys,
logs) in a private temporary folder, and remove processes and folder on :meth:`close`.

Both are for development, tests and notebooks, never a deployment: the enclave is
vouched for by an INSECURE software attester (no TEE hardware), and the three MPC roles
run on one machine for one user, so nothing is hidden from that user.

The children are started from a thread that lives until :meth:`close`: Linux sends a
child its parent-death signal (``PR_SET_PDEATHSIG``, which ``Processes`` sets) when the
*thread* that started it ends, so a child started from a caller's short-lived thread (a
thread pool's worker) would otherwise be stopped with that thread; tied to this one,
they still stop when the interpreter is killed outright.
"""
from __future__ import annotations

import abc
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from ..backends.sockets import parse_address
from ..compiler.targets import lower
from ..errors import ModeError
from ..ir import Graph
from .export import ExportInfo
from .processes import Processes

NAME = "local"          # the model's name in the children's names and logs


def _start_in_keeper(start: Callable[[], dict], stop: threading.Event) -> dict:
    """``start()`` run in a thread that then waits for ``stop`` (see the module
    docstring); its result, or its exception raised here."""
    result: dict = {}
    ready = threading.Event()

    def keep() -> None:
        try:
            result["value"] = start()
        except BaseException as exc:           # handed to the caller below
            result["error"] = exc
        finally:
            ready.set()
        stop.wait()

    threading.Thread(target=keep, name="veil-local-processes", daemon=True).start()
    ready.wait()
    if "error" in result:
        raise result["error"]
    return result["value"]


class _Local(abc.ABC):
    """A private folder, the processes started in it, and a client to them."""

    mode = ""

    def __init__(self, graph: Graph) -> None:
        lowered, _ = lower(graph, self.mode)      # refuses an unsupported op before any start
        self._owner = os.getpid()                 # a forked copy must not stop our children
        self.input_shape = tuple(lowered.input_shape)
        self.dir = Path(tempfile.mkdtemp(prefix=f"veil-{self.mode}-"))   # mode 0700
        self.procs = Processes(self.dir / "logs", supervise=False)
        self._stop = threading.Event()
        self._calls = threading.Lock()          # one request at a time on the client's links
        self.client = None
        try:
            info = self._write(lowered, self.dir / "export")
            self.client = self._connect(_start_in_keeper(lambda: self._start(info),
                                                         self._stop))
        except BaseException:
            self.close()
            raise

    @abc.abstractmethod
    def _write(self, lowered: Graph, directory: Path) -> ExportInfo:
        """The bundle the children serve, and its index."""

    @abc.abstractmethod
    def _start(self, info: ExportInfo) -> dict:
        """Start the children (in the keeper thread); what they announce."""

    @abc.abstractmethod
    def _connect(self, started: dict):
        """A client to the started children."""

    def alive(self) -> bool:
        """Whether every child is still running (one that died is not restarted)."""
        return bool(self.procs.children) and all(
            c.proc is not None and c.proc.poll() is None for c in self.procs.children.values())

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.procs.children.values() if c.proc is not None]

    def infer_batch(self, xs: np.ndarray) -> np.ndarray:
        """Outputs (n, *output_shape) for inputs (n, *input_shape); callers in several
        threads take turns."""
        with self._calls:
            return self._infer(xs)

    @abc.abstractmethod
    def _infer(self, xs: np.ndarray) -> np.ndarray:
        """``infer_batch`` through this mode's client."""

    def close(self) -> None:
        """Stop the children and remove the folder; safe to call more than once. In a
        forked copy of this process (whose exit runs the same finalizers) it does
        nothing: the children and the folder are the parent's."""
        if os.getpid() != self._owner:
            return
        try:
            if self.client is not None:
                self.client.close()
                self.client = None
        finally:
            self.procs.close()
            self._stop.set()
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalTEE(_Local):
    """An enclave process serving ``graph`` (lowered for ``tee``), attested by a fresh
    INSECURE software attester that the client's policy, and only it, trusts."""

    mode = "tee"

    def _write(self, lowered: Graph, directory: Path) -> ExportInfo:
        from ..backends.tee import SoftwareAttester
        from ..backends.tee.bundle import export_model as export_tee

        ex = export_tee(lowered, directory / "tee")
        self.measurement = ex.measurement
        self.attester = SoftwareAttester.create(self.dir / "attester")
        return ExportInfo(directory, NAME, ("tee",), tuple(lowered.input_shape),
                          tuple(lowered.output_shape),
                          {"tee": {"measurement": ex.measurement}})

    def _start(self, info: ExportInfo) -> dict:
        return self.procs.tee(info, attester_key=self.attester)

    def _connect(self, started: dict):
        from ..backends.tee import Policy, TEEClient, TrustedAttester

        policy = Policy(frozenset({self.measurement}), (TrustedAttester.load(self.attester),),
                        allow_insecure=True)
        client = TEEClient(parse_address(started["enclave"]), policy, timeout=120.0)
        try:
            client.attest()
        except BaseException:
            client.close()
            raise
        return client

    def _infer(self, xs: np.ndarray) -> np.ndarray:
        return self.client.infer_batch(xs)


class LocalMPC(_Local):
    """The dealer, party 1 and party 0 computing ``graph`` (lowered for ``mpc``) on
    additive shares, with role identities made for them alone."""

    mode = "mpc"

    def _write(self, lowered: Graph, directory: Path) -> ExportInfo:
        from ..backends.mpc import transport
        from ..backends.mpc.service import save_model

        from ..backends.mpc.evaluator import lower_for_mpc, max_batch

        save_model(lowered, directory / "mpc")
        # requests the parties' default memory budget admits (a 224x224 model: one image)
        self._chunk = max_batch(lower_for_mpc(lowered))
        self.keys = transport.setup(self.dir / "keys")
        return ExportInfo(directory, NAME, ("mpc",), tuple(lowered.input_shape),
                          tuple(lowered.output_shape), {})

    def _start(self, info: ExportInfo) -> dict:
        return self.procs.mpc(info, self.keys, timeout=120.0)

    def _connect(self, started: dict):
        from ..backends.mpc.service import MpcClient

        return MpcClient(self.keys, parse_address(started["party0"]),
                         parse_address(started["party1"]), self.input_shape,
                         timeout=120.0, frac_bits=started["frac_bits"])

    def _infer(self, xs: np.ndarray) -> np.ndarray:
        from ..backends.mpc.service import MAX_INPUTS

        step = min(MAX_INPUTS, self._chunk)
        return np.concatenate([self.client.infer(xs[i:i + step]).outputs
                               for i in range(0, len(xs), step)])


LOCAL: dict[str, type[_Local]] = {"tee": LocalTEE, "mpc": LocalMPC}


def start(mode: str, graph: Graph) -> _Local:
    """The local processes of ``mode`` (``"tee"`` or ``"mpc"``) for ``graph``."""
    if mode not in LOCAL:
        raise ModeError(f"no local processes for mode {mode!r}; they exist for "
                        f"{', '.join(LOCAL)}")
    return LOCAL[mode](graph)
