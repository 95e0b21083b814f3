"""Connections from the service to the backends it fronts (an enclave, MPC party 0)."""
from __future__ import annotations

import queue
from typing import Callable, Generic, TypeVar

from ..backends.sockets import TransportError
from ..errors import UnavailableError

Conn = TypeVar("Conn")
T = TypeVar("T")


class ConnectionPool(Generic[Conn]):
    """Up to ``size`` idle connections to one backend, each used for one request and its
    answer at a time. A connection that failed or saw an error is closed, never reused;
    an unreachable backend is :class:`UnavailableError` (HTTP 503)."""

    def __init__(self, name: str, connect: Callable[[], Conn], size: int = 8) -> None:
        self.name, self._connect = name, connect
        self._idle: queue.LifoQueue = queue.LifoQueue(size)

    def call(self, exchange: Callable[[Conn], T]) -> T:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = None
        try:
            if conn is None:
                conn = self._connect()
            out = exchange(conn)
        except (TransportError, OSError) as exc:
            if conn is not None:
                conn.close()
            raise UnavailableError(f"{self.name} is unreachable: {exc}") from None
        except BaseException:
            conn.close()
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
