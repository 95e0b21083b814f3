"""What the enclave and its plaintext baseline share: a threaded message server that
runs the model with the bundle's runtime (``executor.py``) and answers refusals in the
clear.

Nothing computed from an input reaches the log: the model runs under
``np.errstate(all="ignore")`` (an overflow on an input of 1e308 is not a warning on
stderr), and the enclave seals errors found after decryption (``enclave.py``).
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from contextlib import nullcontext

import numpy as np

from ..._version import __version__
from ...errors import SerializationError, VeilError
from ...ir import Graph
from .. import sockets
from ..sockets import TransportError, unpack_arrays
from . import net
from .executor import RuntimeSpec, make_executor, runtime_version

log = logging.getLogger("veil.tee")

DEFAULT_TIMEOUT = 10.0


def make_room(table: dict, limit: int, expires, now: float) -> None:
    """Before adding to ``table`` (at most ``limit`` entries): drop its expired entries
    (``expires(value)`` is when a value expires), or, if none has, the one that expires
    first."""
    if len(table) >= limit:
        for key in [k for k, v in table.items() if expires(v) <= now] or \
                [min(table, key=lambda k: expires(table[k]))]:
            del table[key]


def _arrays(body: bytes, name: str) -> np.ndarray:
    try:
        return unpack_arrays(body)[name]
    except KeyError:
        raise SerializationError(f"the message has no {name!r} array") from None


class _ModelServer:
    """Accepts connections and serves messages on each until it closes."""

    insecure = True

    def __init__(self, graph: Graph, listen: tuple[str, int], timeout: float,
                 runtime: RuntimeSpec | None = None, threads: int | None = None,
                 parallel: int | None = None) -> None:
        """``threads``: the runtime's threads per model run (None: its default);
        ``parallel``: model runs at once, the others wait their turn (None: one per
        connection). Together they bound the CPUs the server takes, so servers sharing a
        machine (Ray replicas) stay on the cores reserved for them."""
        self.graph, self.timeout = graph, timeout
        self.runtime = runtime or RuntimeSpec()
        # built before listening: a missing runtime or op fails the start, typed
        self.executor = make_executor(graph, self.runtime, threads)
        if parallel is not None and parallel < 1:
            raise VeilError(f"parallel model runs must be >= 1, not {parallel}")
        self._turns = threading.BoundedSemaphore(parallel) if parallel else nullcontext()
        self.server = sockets.listen(listen)
        self.address = self.server.getsockname()
        self._lock = threading.Lock()
        self.counts = {"opened": 0, "served": 0, "refused": 0}

    def serve_forever(self) -> None:
        sockets.accept_forever(self.server, self.timeout, self._serve)

    def _count(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self.counts[name] += 1

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                kind, body = net.recv(sock, net.MAX_MESSAGE, idle=True)
                try:
                    reply_kind, *reply = self._handle(kind, body)
                except VeilError as exc:       # a refusal in the clear: no plaintext in it
                    self._count("refused")
                    log.debug("refused: %s", exc)   # clients can make many
                    reply_kind, reply = net.ERROR, (net.error_body(exc),)
                net.send(sock, reply_kind, *reply)
        except (TransportError, OSError) as exc:
            log.debug("connection ended: %s", exc)
        finally:
            sock.close()

    def _handle(self, kind: int, body: bytes) -> tuple:
        """``(reply kind, *reply body parts)`` for one message."""
        if kind == net.STATUS_REQUEST:
            with self._lock:
                status = dict(self.counts, insecure=self.insecure, veil=__version__,
                              runtime=self._runtime_status())
            status.update(self._status())
            return net.STATUS, json.dumps(status).encode()
        raise SerializationError(f"this server does not take message kind {kind}")

    def _status(self) -> dict:
        return {}

    def _runtime_status(self) -> dict:
        return dict(self.runtime.to_json(), version=runtime_version(self.runtime.name))

    def _infer(self, xs: np.ndarray) -> np.ndarray:
        xs = net.check_inputs(xs, self.graph.input_shape)
        # numpy's floating-point warnings name the operation and go to stderr, a log
        # the host reads: none may be triggered by a sealed input (errstate is per
        # thread/context, so it covers exactly this computation)
        with np.errstate(all="ignore"):
            with self._turns:
                return self.executor(xs)


