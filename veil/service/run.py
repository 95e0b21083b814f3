"""Run the service: bind the socket, announce the address, serve with uvicorn.

``serve`` binds the listening socket itself, so ``port=0`` picks a free port and the
announced address is the real one. It writes exactly one line,
``veil-serve listening on http://HOST:PORT``, to stdout once the server accepts
connections (scripts and tests wait for it); everything else goes to logging.
One uvicorn worker: the HE sessions live in this service's HE worker processes
(``veil.service.workers``), which it supervises.

Before it binds, ``serve`` refuses exports with insecure test parameters unless
``config.allow_insecure``. At start it writes to stderr what it serves (each model, its
modes, the HE model id and inputs per ciphertext, the TEE measurement) and, when an
export has insecure parameters or a caller says so (``insecure_notes``: enclaves vouched
for by the software attester), a line starting ``INSECURE:``. It appends the JSON-lines
request log and the ``veil`` loggers' records to ``STORE/logs/service.log``
(:mod:`veil.service.observe`); with ``metrics_listen`` it serves Prometheus metrics at
``http://HOST:PORT/metrics`` on that address only (no API key: keep it private); with
``tls_cert`` and ``tls_key`` (PEM files) it serves HTTPS and announces ``https://``.
Connections use
:func:`header_timeout_protocol`: uvicorn's h11 protocol, plus a timer that closes a
connection whose request headers are not complete ``header_timeout_s`` after it opened
or after the first byte of a keep-alive request (h11 alone waits forever); uvicorn's
keep-alive timer still closes idle connections between requests.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TextIO

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import ServiceConfig, create_app, refuse_insecure
from .observe import ACCESS, file_handler, serve_metrics

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


def url_of(sock: socket.socket, scheme: str = "http") -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def summary(ctx, notes: list[str] = ()) -> list[str]:
    """The lines ``serve`` writes to stderr at start: one per model with its modes, then
    one ``INSECURE:`` line per reason (the exports' and ``notes``)."""
    lines = []
    for info in ctx.models.values():
        modes = []
        for mode in info.modes:
            entry = info.index.get(mode) or {}
            if mode == "he" and "model_id" in entry:
                modes.append(f"he (model id {entry['model_id']}, "
                             f"{entry.get('lanes', '?')} inputs per ciphertext)")
            elif mode == "tee" and "measurement" in entry:
                modes.append(f"tee (measurement {entry['measurement']})")
            else:
                modes.append(mode)
        lines.append(f"serving {info.name}: {', '.join(modes)}")
    for name, info in (ctx.search_info() if ctx.search_info else {}).items():
        lines.append(f"serving index {name}: {info['count']} documents of {info['dim']} "
                     f"dimensions in {info['blocks']} blocks"
                     + (f", {info['clusters']} clusters" if info["clustered"] else ""))
    lines += [f"INSECURE: {reason}" for reason in [*ctx.insecure, *notes]]
    return lines


@contextmanager
def _service_log(log_dir):
    """Records of the ``veil`` loggers and the request log, as JSON lines in
    ``log_dir/service.log``, while the service runs; the request log goes only there
    (not to stderr)."""
    handler = file_handler(log_dir)
    root, access = logging.getLogger("veil"), logging.getLogger(ACCESS)
    saved = access.level, access.propagate
    root.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    access.addHandler(handler)
    try:
        yield
    finally:
        access.removeHandler(handler)
        access.setLevel(saved[0])
        access.propagate = saved[1]
        root.removeHandler(handler)
        handler.close()


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


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol closing connections whose headers take over ``seconds``."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm()      # a request has begun: its headers are on the clock
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Between requests uvicorn's keep-alive timer applies; a pipelined request
            # already buffered was handled just now and re-armed the timer if partial.
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000, *,
          out: TextIO | None = None, metrics_listen: tuple[str, int] | None = None,
          tls_cert: str | None = None, tls_key: str | None = None,
          insecure_notes: list[str] = ()) -> None:
    """Serve ``config`` on ``host:port`` until SIGINT/SIGTERM (``port=0``: any free port).

    Raises BundleError for unreadable exports, InsecureParametersError for insecure
    exports without ``config.allow_insecure``, InputError for one of ``tls_cert`` /
    ``tls_key`` without the other, and OSError if an address is taken or a TLS file
    unreadable, before anything is announced."""
    if bool(tls_cert) != bool(tls_key):
        from ..errors import InputError

        raise InputError("TLS needs both --tls-cert and --tls-key (PEM files)")
    app = create_app(config)
    ctx = app.state.veil
    with ExitStack() as stack:
        stack.callback(ctx.close)
        refuse_insecure(ctx.insecure, config.allow_insecure)
        sock = bind(host, port)
        stack.callback(sock.close)
        uv = uvicorn.Config(app, log_level="warning", lifespan="on", workers=1,
                            timeout_graceful_shutdown=10, ssl_certfile=tls_cert,
                            ssl_keyfile=tls_key,
                            http=header_timeout_protocol(config.header_timeout_s))
        if tls_cert:
            uv.load()                 # reads the certificate now: a bad file fails here
        err = sys.stderr
        if metrics_listen is not None:
            server, (mhost, mport) = serve_metrics(ctx.metrics.registry, *metrics_listen)
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            err.write(f"veil-serve metrics on http://{mhost}:{mport}/metrics\n")
        for line in summary(ctx, list(insecure_notes)):
            err.write(line + "\n")
        err.flush()
        stack.enter_context(_service_log(Path(config.store_dir) / "logs"))
        _Server(uv, url_of(sock, "https" if tls_cert else "http"),
                out or sys.stdout).run(sockets=[sock])
