"""One HE worker process: ``python -m veil.service.he_worker --fd N --index K ...``.

Started by :class:`veil.service.workers.HEWorkers`, never by hand. It loads the
``ModelServer`` of each ``--export NAME=FOLDER`` (a served model's name and its
server-bundle folder; two models may share a model id, e.g. one compile exported with
plaintext and with encrypted weights, so requests name the model), keeps its own
:class:`~veil.service.sessions.LoadedSessions` (``--memory-budget`` bytes), and serves
one request at a time over the socket inherited as file descriptor ``N``: frames of
``veil.wire`` envelopes (see :mod:`veil.service.workers`). Its first message says it
is ready (or why it could not load). It exits when that socket closes, and Linux
terminates it when the service dies (``PR_SET_PDEATHSIG``).

Requests (header field ``op``; every request names its ``session`` and may list
sessions to ``forget`` first):

* ``open``: load the evaluation keys in the file ``keys`` (a finished upload) for a new
  session, refusing keys of another model than ``model_id``;
  (for a model with encrypted weights OpenFHE checks them and drops them again: the
  session loads them with the model owner's weights);
* ``weights``: load the session from its key file ``keys`` with the model owner's
  encrypted weights in the file ``weights`` (an upload), replacing a loaded copy:
  OpenFHE checks them, and they must be for this model and this session's client;
* ``infer``: part ``ct`` -> part ``ct``; ``infer-batch``: parts ``0..n-1`` -> the same.
  A session that is not loaded is loaded from its key file ``keys`` first, with the
  encrypted weights in the file ``weights`` when the header names one.

Test seam: when the environment variable ``VEIL_TEST_HE_WORKER_FAULTS`` holds a token
(only tests set it, on the service's own environment; no request can), a request part
or uploaded key file containing ``<token>:segv``, ``:abort``, ``:exit`` or ``:hang``
makes the worker fail that way, so tests can crash a worker on demand. Off by default.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path

from ..backends.sockets import TransportError, recv_buffer, send_frame
from ..errors import (KeyMismatchError, MissingKeyError, NotFoundError, SerializationError,
                      VeilError)
from ..wire import pack, unpack
from .store import NO_SESSION
from .workers import REPLY_KIND, REQUEST_KIND, error_header

log = logging.getLogger("veil.service.he_worker")
FAULTS_ENV = "VEIL_TEST_HE_WORKER_FAULTS"


class Worker:
    """The model servers and loaded sessions of one worker process."""

    def __init__(self, exports: list[str], memory_budget: int,
                 faults: str | None = None) -> None:
        from ..deploy.bundle import ServerBundle
        from ..deploy.server import ModelServer      # imports OpenFHE: only here
        from .sessions import LoadedSessions

        self.servers = {}
        for spec in exports:
            name, _, directory = spec.partition("=")     # names have no "="
            server = ModelServer(ServerBundle.load(directory))
            self.servers[name or server.bundle.model_id] = server
        self.loaded = LoadedSessions(memory_budget, self._refuse,
                                     lambda keys, ns: ModelServer.native_tag(keys.tag, ns))
        self._faults = faults.encode() if faults else None

    @staticmethod
    def _refuse(keys, namespace):
        raise NotFoundError(NO_SESSION)     # every request passes its model's opener

    def _open(self, model: str, keys, namespace: str | None, weights: bytes | None = None):
        server = self.servers.get(model)
        if server is None or server.bundle.model_id != keys.model_id:
            raise NotFoundError(NO_SESSION)
        if server.bundle.weights == "encrypted" and weights is None:
            raise MissingKeyError(
                "this model's weights are encrypted and its owner has not uploaded them for "
                "this session yet: send the model owner this session's weights request "
                "(`veil weights-request`), who uploads them (`veil owner upload-weights`)")
        return server.open_session(keys, namespace=namespace, weights=weights)

    def _opener(self, model: str, weights: str | None):
        """What loads a session of ``model``: with the encrypted weights in the file
        ``weights`` when given."""
        return lambda keys, namespace: self._open(
            model, keys, namespace, None if weights is None else _read(weights))

    def handle(self, header: dict, parts: dict[str, bytes]) -> tuple[dict, dict[str, bytes]]:
        for sid in header.get("forget") or []:
            self.loaded.discard(str(sid))
        op, sid = header.get("op"), str(header.get("session"))
        # the API client: its keys get their own OpenFHE tag (see ModelServer.native_tag)
        owner = header.get("owner")
        owner = str(owner) if owner is not None else None
        if self._faults:
            self._fault_seam(parts)
        model = str(header.get("model", ""))
        if op == "open":
            self._open_session(sid, str(header["keys"]), str(header["model_id"]), model,
                               owner)
            return {"ok": True}, {}
        keys = _key_loader(str(header["keys"]))
        weights = header.get("weights")
        opener = self._opener(model, str(weights) if weights is not None else None)
        if op == "weights":
            if weights is None:
                raise SerializationError("a weights request names no weights file")
            self.loaded.discard(sid)        # loaded with no (or older) weights
            self.loaded.run(sid, keys, lambda session: None, owner, opener)
            return {"ok": True}, {}
        if op == "infer":
            return {"ok": True}, {"ct": self.loaded.run(
                sid, keys, lambda s: s.run(parts["ct"]), owner, opener)}
        if op == "infer-batch":
            cts = [parts[str(i)] for i in range(len(parts))]
            outs = self.loaded.run(sid, keys, lambda s: s.run_batch(cts), owner, opener)
            return {"ok": True}, {str(i): out for i, out in enumerate(outs)}
        raise SerializationError(f"unknown worker request {op!r}")

    def _open_session(self, sid: str, path: str, model_id: str, name: str,
                      owner: str | None) -> None:
        if self._faults:
            self._fault_seam({"keys": Path(path).read_bytes()})
        keys = _key_loader(path, upload=True)()
        if keys.model_id != model_id:
            raise KeyMismatchError(f"these evaluation keys were generated for another model "
                                   f"than {name!r}: generate them from its client bundle")
        server = self.servers.get(name)
        if server is not None and server.bundle.weights == "encrypted":
            server.check_keys(keys)     # sessions load them with the owner's weights
            return
        self.loaded.run(sid, lambda: keys, lambda session: None, owner,   # OpenFHE loads them
                        self._opener(name, None))

    def _fault_seam(self, parts: dict[str, bytes]) -> None:
        for part in parts.values():
            for action in ("segv", "abort", "exit", "hang"):
                if self._faults + b":" + action.encode() in part:
                    log.warning("test seam: %s", action)
                    if action == "segv":
                        os.kill(os.getpid(), signal.SIGSEGV)
                    elif action == "abort":
                        os.abort()
                    elif action == "exit":
                        os._exit(3)
                    time.sleep(3600)


def _key_loader(path: str, upload: bool = False):
    """``() -> EvaluationKeys`` from the file at ``path`` (a session's, or an upload)."""
    from ..deploy.keys import EvaluationKeys

    def load():
        # mapped, not read: a bootstrapped model's keys are 17 GB, and a session copies
        # out only the parts it checks and decodes
        try:
            if upload and os.stat(path).st_size == 0:
                raise SerializationError("the body is empty: send "
                                         "ModelClient.evaluation_keys()")
            return EvaluationKeys.load(path)
        except FileNotFoundError:
            raise NotFoundError(NO_SESSION) from None
    return load


def _read(path: str) -> bytes:
    """The bytes of a session's (or an upload's) encrypted weights file."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFoundError(NO_SESSION) from None


def serve(sock: socket.socket, worker: Worker) -> None:
    """Answer requests until the parent closes the socket."""
    while True:
        try:
            blob = recv_buffer(sock, idle=True)
        except TransportError:
            return
        try:
            header, parts = unpack(blob, REQUEST_KIND)
            del blob
            head, out = worker.handle(header, parts)
        except VeilError as exc:
            head, out = error_header(exc), {}
        except Exception as exc:    # a bug or the binding: logged here, 500 in the parent
            log.exception("request failed")
            head, out = error_header(exc), {}
        try:
            send_frame(sock, pack(REPLY_KIND, out, head))
        except TransportError:
            return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m veil.service.he_worker")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--export", action="append", default=[],
                    help="NAME=FOLDER: a served model's name and server bundle folder")
    ap.add_argument("--memory-budget", type=int, required=True)
    args = ap.parse_args(argv)
    return run_worker(
        f"he-worker-{args.index}", args.fd,
        lambda: Worker(args.export, args.memory_budget, os.environ.get(FAULTS_ENV)),
        close=lambda worker: worker.loaded.close())


def run_worker(name: str, fd: int, make, *, ready=None, close=None) -> int:
    """A worker process's life: no core files, fault tracebacks on, SIGINT left to the
    service, ``make()`` the worker (its failure reported to the service, which refuses
    to start), say it is ready, run ``ready(worker)`` if given, :func:`serve`, then
    ``close(worker)``."""
    logging.basicConfig(level="WARNING", stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {name}: %(message)s")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # a crash leaves no core file
    faulthandler.enable()                   # a native fault logs where it happened
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # the service decides when to stop
    sock = socket.socket(fileno=fd)
    try:
        worker = make()
    except Exception as exc:    # reported to the service, which refuses to start
        log.exception("loading failed")
        send_frame(sock, pack(REPLY_KIND, {}, error_header(exc)))
        return 1
    send_frame(sock, pack(REPLY_KIND, {}, {"ok": True, "pid": os.getpid()}))
    if ready is not None:
        ready(worker)
    try:
        serve(sock, worker)
    finally:
        if close is not None:
            close(worker)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
