"""Run the service: bind the socket, announce the address, serve with uvicorn.

``serve`` binds the listening socket itself, so ``port=0`` picks a free port and the
announced address is the real one. It writes exactly one line,
``veil-serve listening on http://HOST:PORT``, to stdout once the server accepts
connections (scripts and tests wait for it); everything else goes to logging.
One worker: sessions live in this process's memory and OpenFHE's maps.
"""
from __future__ import annotations

import socket
import sys
from typing import TextIO

import uvicorn

from .app import ServiceConfig, create_app

READY = "veil-serve listening on"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when ``host`` has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit it: uvicorn writes a response's head and body
        # separately, and with Nagle the body waits for the client's delayed ACK (40 ms)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, url: str, out: TextIO) -> None:
        super().__init__(config)
        self._url, self._out = url, out

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            # The one line a launcher waits for (the brief's contract, not logging).
            self._out.write(f"{READY} {self._url}\n")
            self._out.flush()


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000, *,
          out: TextIO | None = None) -> None:
    """Serve ``config`` on ``host:port`` until SIGINT/SIGTERM (``port=0``: any free port).

    Raises BundleError for unreadable exports and OSError if the address is taken,
    before anything is announced."""
    app = create_app(config)
    sock = bind(host, port)
    try:
        uv = uvicorn.Config(app, log_level="warning", lifespan="on", workers=1,
                            timeout_graceful_shutdown=10)
        _Server(uv, url_of(sock), out or sys.stdout).run(sockets=[sock])
    finally:
        sock.close()
        app.state.veil.close()
