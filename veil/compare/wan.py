"""A wide-area link emulated in user space: TCP relays that add delay and cap bandwidth.

The issue's recipe is network namespaces behind ``tc netem``; the kernels of these
machines have no ``netem`` queueing discipline, so ``veil compare --wan RTT,MBIT`` puts
a relay on every connection between processes instead (client to each server, party to
party, parties to dealer). Each direction of a relayed connection is a link of its own:
a chunk read at time t leaves when the link is free and its bits are serialized at the
given rate, and arrives half a round trip later. Chunks keep their order; TCP's own
flow control still applies at both ends. It models latency and bandwidth, not loss or
jitter, and costs the machine some CPU (two threads per relayed connection).
"""
from __future__ import annotations

import queue
import socket
import threading
import time

CHUNK = 1 << 16


class Wan:
    """Relays with ``rtt_ms`` round trip and ``mbit`` per direction; :meth:`close` stops
    them. Use :meth:`relay` as the ``link`` hook of ``deploy.processes.Processes``."""

    def __init__(self, rtt_ms: float, mbit: float) -> None:
        if rtt_ms < 0 or mbit <= 0:
            raise ValueError("the round trip must be >= 0 ms and the rate > 0 Mbit/s")
        self.rtt_ms, self.mbit = float(rtt_ms), float(mbit)
        self.one_way_s, self.bytes_per_s = rtt_ms / 2000.0, mbit * 1e6 / 8
        self._servers: list[socket.socket] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"{self.rtt_ms:g} ms RTT, {self.mbit:g} Mbit/s"

    def relay(self, target: tuple[str, int]) -> tuple[str, int]:
        """A local address whose connections reach ``target`` across the emulated link."""
        server = socket.create_server(("127.0.0.1", 0))
        with self._lock:
            self._servers.append(server)
        threading.Thread(target=self._accept, args=(server, tuple(target)),
                         daemon=True).start()
        return server.getsockname()

    def _accept(self, server: socket.socket, target: tuple[str, int]) -> None:
        while True:
            try:
                near, _ = server.accept()
            except OSError:               # closed
                return
            try:
                far = socket.create_connection(target)
            except OSError:
                near.close()
                continue
            for s in (near, far):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [near, far]
            for src, dst in ((near, far), (far, near)):
                due: queue.SimpleQueue = queue.SimpleQueue()
                threading.Thread(target=self._read, args=(src, due), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, due), daemon=True).start()

    def _read(self, src: socket.socket, due: queue.SimpleQueue) -> None:
        free_at = 0.0
        while True:
            try:
                chunk = src.recv(CHUNK)
            except OSError:
                chunk = b""
            now = time.monotonic()
            start = max(now, free_at)
            free_at = start + len(chunk) / self.bytes_per_s
            due.put((free_at + self.one_way_s, chunk))
            if not chunk:
                return

    @staticmethod
    def _write(dst: socket.socket, due: queue.SimpleQueue) -> None:
        while True:
            at, chunk = due.get()
            wait = at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not chunk:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(chunk)
            except OSError:
                return

    def close(self) -> None:
        with self._lock:
            for s in self._servers + self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)     # wakes a thread blocked on it
                except OSError:
                    pass
                s.close()
            self._servers, self._socks = [], []

    def __enter__(self) -> "Wan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
