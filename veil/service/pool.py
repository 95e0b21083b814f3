"""Connections from the service to the backends it fronts (an enclave, MPC party 0).

A backend that is down must cost a request little: the pool asks ``check()`` (the
supervised child's state, when the service started it) before using a connection and
fails at once with :class:`UnavailableError` naming the backend; a connection that sat
idle is tested (a peer that restarted has closed it) before it carries a request, so
the first request after a restart does not fail on a stale connection; new connections
are dialled with a short connect timeout (``CONNECT_TIMEOUT_S``), separate from the
time an answer may take; while an answer is awaited (``wait_answer``), ``check()`` is
asked every ``WATCH_S``, so a backend that fails mid-request fails that request too.
"""
from __future__ import annotations

import queue
import select
import socket
import time
from typing import Callable, Generic, TypeVar

from ..backends.sockets import TransportError
from ..errors import UnavailableError

Conn = TypeVar("Conn")
T = TypeVar("T")

CONNECT_TIMEOUT_S = 1.0
WATCH_S = 0.5                   # how often a request in flight asks check()


def dial(address: tuple[str, int], timeout: float,
         connect_timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """A TCP connection to ``address``: at most ``connect_timeout`` to connect, then
    ``timeout`` per read or write."""
    sock = socket.create_connection(address, timeout=min(connect_timeout, timeout))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    return sock


def _stale(conn) -> bool:
    """True when an idle connection has something to read: the peer closed it (or
    sent what nobody asked for); either way it must not carry the next request."""
    sock = getattr(conn, "sock", conn)
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _discard(conn) -> None:
    """Close a connection that failed, if one was made; a failure to close it is
    swallowed, so the error that made it fail is the one the caller sees."""
    if conn is None:
        return
    try:
        conn.close()
    except Exception:          # the original error matters, not this one
        pass


class ConnectionPool(Generic[Conn]):
    """Up to ``size`` idle connections to one backend, each used for one request and its
    answer at a time. A connection that failed or saw an error is closed, never reused;
    an unreachable backend is :class:`UnavailableError` (HTTP 503).

    ``check()``, when given, raises UnavailableError (or returns) before each call: the
    service's view of a supervised child (down, restarting, SIGSTOPped)."""

    def __init__(self, name: str, connect: Callable[[], Conn], size: int = 8,
                 check: Callable[[], None] | None = None) -> None:
        self.name, self._connect, self._check = name, connect, check
        self._idle: queue.LifoQueue = queue.LifoQueue(size)

    def _take(self):
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return None
            if not _stale(conn):
                return conn
            _discard(conn)

    def wait_answer(self, conn, timeout: float | None = None) -> None:
        """Wait until ``conn`` has an answer to read, asking ``check()`` every
        ``WATCH_S`` meanwhile: a backend that dies or is SIGSTOPped while a request is in
        flight fails that request within a moment (UnavailableError), instead of holding
        it (and its slot) for the whole answer timeout."""
        sock = getattr(conn, "sock", conn)
        if timeout is None:
            timeout = sock.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TransportError("timed out waiting for the answer")
            step = WATCH_S if left is None else min(WATCH_S, left)
            try:
                readable, _, _ = select.select([sock], [], [], step)
            except (OSError, ValueError) as exc:
                raise TransportError(f"link failed: {exc}") from None
            if readable:
                return
            self.ready()

    def ready(self) -> None:
        """UnavailableError now if ``check()`` says the backend is not ok."""
        if self._check is not None:
            self._check()

    def call(self, exchange: Callable[[Conn], T]) -> T:
        self.ready()
        conn = self._take()
        try:
            if conn is None:
                conn = self._connect()
            out = exchange(conn)
        except (TransportError, OSError) as exc:
            _discard(conn)
            raise UnavailableError(f"{self.name} is unreachable: {exc}") from None
        except BaseException:
            _discard(conn)
            raise
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            conn.close()
        return out

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
