"""The server roles on this machine, for ``CompiledModel.run(mode="he"|"tee"|"mpc")``.

:class:`LocalHE` keeps the CKKS client here and starts the HE server
(``python -m veil.deploy.he_server``); :class:`LocalTEE` starts an enclave (``veil
tee-serve``) and attests it with a development policy; :class:`LocalMPC` starts the
dealer and both parties (``veil mpc-dealer`` / ``mpc-node``) with fresh identities.

Why HE's server is a process too: OpenFHE parallelises with libgomp, which reads
``GOMP_SPINCOUNT`` once, when it loads. torch ships its own ``libgomp.so.1``; imported
first (as in almost every user script) it is the copy OpenFHE binds to, already running
with libgomp's default spin of ~300k iterations, so idle OpenFHE threads spin against
whatever else the machine runs (2x slower with one core busy,
``bench/results/he_import_order.md``). The server process imports OpenFHE and not
torch, with the variable set by the launcher, whatever the user imported first.

All use the one launcher,
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
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..backends import sockets
from ..backends.sockets import parse_address
from ..compiler.targets import lower
from ..errors import ModeError
from ..ir import Graph
from .export import ExportInfo
from .he_server import read_reply
from .processes import Processes

NAME = "local"          # the model's name in the children's names and logs
# most seconds the HE server may take to start: its payload checks (one throwaway key
# generation) and the key load take a minute or two for a bootstrapped model
START_S = 1800.0


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


class _Children:
    """A private folder, the processes started in it (from a keeper thread), and a
    client to them; ``alive``, ``pids`` and ``close`` for every local mode."""

    mode = ""

    def _open(self) -> None:
        self._owner = os.getpid()                 # a forked copy must not stop our children
        self.dir = Path(tempfile.mkdtemp(prefix=f"veil-{self.mode}-"))   # mode 0700
        self.procs = Processes(self.dir / "logs", supervise=False)
        self._stop = threading.Event()
        self._calls = threading.Lock()          # one request at a time on the client's links
        self.client = None

    def alive(self) -> bool:
        """Whether every child is still running (one that died is not restarted)."""
        return bool(self.procs.children) and all(
            c.proc is not None and c.proc.poll() is None for c in self.procs.children.values())

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.procs.children.values() if c.proc is not None]

    def _close_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def close(self) -> None:
        """Stop the children and remove the folder; safe to call more than once. In a
        forked copy of this process (whose exit runs the same finalizers) it does
        nothing: the children and the folder are the parent's."""
        if os.getpid() != self._owner:
            return
        try:
            self._close_client()
        finally:
            self.procs.close()
            self._stop.set()
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Local(_Children, abc.ABC):
    """A mode whose server runs the source graph lowered for it (tee, mpc)."""

    def __init__(self, graph: Graph) -> None:
        lowered, _ = lower(graph, self.mode)      # refuses an unsupported op before any start
        # the caller's inputs (mpc's lowered input may be their one-hot encoding)
        self.input_shape = tuple(graph.input_shape)
        self.output_shape = tuple(graph.output_shape)
        self._open()
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

    def infer_batch(self, xs: np.ndarray) -> np.ndarray:
        """Outputs (n, *output_shape) for inputs (n, *input_shape); callers in several
        threads take turns."""
        with self._calls:
            out = self._infer(xs)
        return out.reshape((len(xs),) + self.output_shape)

    @abc.abstractmethod
    def _infer(self, xs: np.ndarray) -> np.ndarray:
        """``infer_batch`` through this mode's client."""


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
        from ..backends.mpc.service import max_request_batch

        save_model(lowered, directory / "mpc")
        mpc_graph = lower_for_mpc(lowered)
        # requests the parties' default memory budget admits (a 224x224 model: one image)
        # and their request size limit (a transformer's one-hot input: 2 texts of 128)
        self._chunk = min(max_batch(mpc_graph), max_request_batch(mpc_graph.input_shape))
        # token ids one-hot encoded by this client before sharing (a transformer)
        self._encoder = None
        if mpc_graph.input.attrs.get("onehot"):
            from ..compiler.passes import encode_input

            self._encoder = lambda xs: encode_input(mpc_graph, xs)
        self.keys = transport.setup(self.dir / "keys")
        return ExportInfo(directory, NAME, ("mpc",), self.input_shape,
                          tuple(lowered.output_shape), {})

    def _start(self, info: ExportInfo) -> dict:
        return self.procs.mpc(info, self.keys, timeout=120.0)

    def _connect(self, started: dict):
        from ..backends.mpc.service import MpcClient

        return MpcClient(self.keys, parse_address(started["party0"]),
                         parse_address(started["party1"]), self.input_shape,
                         timeout=120.0, frac_bits=started["frac_bits"],
                         encoder=self._encoder)

    def _infer(self, xs: np.ndarray) -> np.ndarray:
        from ..backends.mpc.service import MAX_INPUTS

        step = min(MAX_INPUTS, self._chunk)
        return np.concatenate([self.client.infer(xs[i:i + step]).outputs
                               for i in range(0, len(xs), step)])


# A batch under HE that runs longer than PROGRESS_AFTER_S says how far it got on stderr,
# at most every PROGRESS_EVERY_S (a 16-ciphertext batch of a 10 s model runs minutes);
# shorter batches, the tests' included, print nothing. LocalHE(progress=...) replaces
# the line with a call.
PROGRESS_AFTER_S = 10.0
PROGRESS_EVERY_S = 5.0


class BatchProgress:
    """Counts a batch's ciphertexts as the server answers them: calls
    ``report(done, total, elapsed_s)`` after each when given, else writes one stderr
    line once the batch has run ``after_s`` and then at most every ``every_s``."""

    def __init__(self, total: int, report: Callable[[int, int, float], None] | None = None,
                 *, after_s: float = PROGRESS_AFTER_S, every_s: float = PROGRESS_EVERY_S,
                 stream=None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self._report, self._clock = total, report, clock
        self._after, self._every, self._stream = after_s, every_s, stream
        self._start = clock()
        self._last: float | None = None
        self.done = 0

    def step(self) -> None:
        self.done += 1
        elapsed = self._clock() - self._start
        if self._report is not None:
            self._report(self.done, self.total, elapsed)
            return
        due = self._last is None or elapsed - self._last >= self._every
        if elapsed < self._after or not due:
            return
        self._last = elapsed
        left = elapsed / self.done * (self.total - self.done)
        stream = self._stream or sys.stderr
        stream.write(f"veil he: {self.done}/{self.total} ciphertexts in {elapsed:.0f} s"
                     + (f", ~{left:.0f} s left\n" if self.done < self.total else "\n"))
        stream.flush()


class LocalHE(_Children):
    """The CKKS client in this process and the HE server (``veil.deploy.he_server``) in
    a child, exchanging evaluation keys and ciphertexts over loopback.

    Same interface as :class:`veil.deploy.loopback.Loopback` (``infer``,
    ``infer_batch``, ``timings``, ``close``), plus ``alive`` and ``pids``. The server
    bundle, the evaluation keys (a file the server maps: a bootstrapped model's are
    several GiB) and the logs sit in a private temporary folder, removed on
    :meth:`close`. ``timings.session_s`` includes the server's start. ``progress``
    (``(done, total, elapsed_s)``, per ciphertext) follows a batch; without it a batch
    longer than ``PROGRESS_AFTER_S`` reports on stderr (:class:`BatchProgress`).
    """

    mode = "he"

    def __init__(self, client_bundle, server_bundle, check_range: bool = True, *,
                 timeout_s: float = 24 * 3600.0,
                 progress: Callable[[int, int, float], None] | None = None) -> None:
        from .client import ModelClient         # OpenFHE: loaded for this mode only
        from .loopback import Timings

        self.timings = Timings()
        self.progress = progress
        self._sock = None
        self._open()
        try:
            # keys first, then the server: the two peaks (the client's key generation,
            # the server's template and key loading) never overlap
            self.client = ModelClient(client_bundle, check_range=check_range)
            t0 = time.perf_counter()
            self.client.keygen()
            self.timings.eval_key_bytes = self.client.write_evaluation_keys(
                self.dir / "keys", forget=True)
            t1 = time.perf_counter()
            server_bundle.save(self.dir / "server")
            (address,) = _start_in_keeper(lambda: self.procs.start(
                f"{NAME}-he-server", [str(self.dir / "server"), "--timeout",
                                      str(timeout_s), "--keys", str(self.dir / "keys")],
                module="veil.deploy.he_server", timeout=min(timeout_s, START_S)), self._stop)
            self._sock = sockets.dial(address, timeout_s)
            self.timings.keygen_s, self.timings.session_s = t1 - t0, time.perf_counter() - t1
        except BaseException:
            self.close()
            raise

    def _call(self, payload: bytes) -> bytes:
        """One frame to the server and its answer (``he_server``'s status byte)."""
        sockets.send_frame(self._sock, payload)
        return read_reply(sockets.recv_buffer(self._sock))

    def infer(self, x) -> np.ndarray:
        return self.infer_batch(np.asarray(x)[None])[0]

    def infer_batch(self, xs) -> np.ndarray:
        """Many inputs, ``client.lanes`` per ciphertext; timings are per ciphertext;
        callers in several threads take turns."""
        from .loopback import timed_batch

        with self._calls:
            return timed_batch(self.client, self.timings, xs, self._evaluate)

    def _evaluate(self, cts: list[bytes]) -> list[bytes]:
        progress, outs = BatchProgress(len(cts), self.progress), []
        for ct in cts:
            outs.append(self._call(ct))
            progress.step()
        return outs

    def _close_client(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        super()._close_client()


LOCAL: dict[str, type[_Local]] = {"tee": LocalTEE, "mpc": LocalMPC}


def start(mode: str, graph: Graph) -> _Local:
    """The local processes of ``mode`` (``"tee"`` or ``"mpc"``) for ``graph``."""
    if mode not in LOCAL:
        raise ModeError(f"no local processes for mode {mode!r}; they exist for "
                        f"{', '.join(LOCAL)}")
    return LOCAL[mode](graph)
