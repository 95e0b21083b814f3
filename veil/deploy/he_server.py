"""A minimal HE server process: ciphertexts over loopback TCP, for
``CompiledModel.run(mode="he")`` (:class:`veil.deploy.local.LocalHE`) and ``veil compare``.

    python -m veil.deploy.he_server SERVER_BUNDLE [--listen HOST:PORT] [--timeout S]
                                   [--keys FILE]

prints ``veil-he server listening on HOST:PORT`` once it accepts connections. It holds
the server bundle only (no key material). Per connection (one client session), in
length-prefixed frames (``backends/sockets.py``), each answer starting with a status
byte (0: ok, 1: error followed by a JSON ``{"error": ...}``):

1. the client sends its evaluation keys (a ``wire`` envelope); the server opens a
   session with them and answers ``{"session_s": seconds}`` as JSON;
2. then each frame is one input ciphertext; the answer is the output ciphertext.

With ``--keys FILE`` (a key file ``EvaluationKeys.save`` wrote: a bootstrapped model's
keys are several GiB, more than a frame holds) the server opens that one session at
start, mapping the file rather than reading it, and every connection skips step 1.

Wrong or tampered bytes fail in ``wire``/``deploy`` with a typed ``VeilError``, which is
returned as an error frame; the connection then closes. Nothing is unpickled. This is a
local and measurement fixture, not a service: ``veil serve`` is the HTTP service.

It imports OpenFHE and not torch, and its launcher (``deploy.processes``) sets
``GOMP_SPINCOUNT``: its OpenMP runtime has veil's spin setting whatever the process
that started it imported first (see ``deploy/local.py``).
"""
from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time

from ..backends import sockets
from ..errors import EngineError, VeilError

log = logging.getLogger("veil.deploy.he_server")

OK, ERROR = b"\x00", b"\x01"


def _error(exc: Exception) -> bytes:
    return ERROR + json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()


def read_reply(reply) -> bytes:
    """A client's side of an answer: its payload, or EngineError with the server's
    reason when the status byte says it failed."""
    if reply[:1] == OK:
        return bytes(reply[1:])
    try:
        why = json.loads(bytes(reply[1:]))["error"]
    except (ValueError, KeyError, TypeError):
        why = "a malformed error"
    raise EngineError(f"HE server: {why}")


def serve_connection(server, sock: socket.socket, session=None) -> None:
    """Steps 1-2 of the module docstring for one client (step 2 only with a
    ``session`` opened at start from ``--keys``)."""
    if session is not None:
        _serve_ciphertexts(session, sock)
        sock.close()
        return
    try:
        keys = sockets.recv_frame(sock, idle=True)
        t = time.perf_counter()
        session = server.open_session(keys)
    except VeilError as exc:
        sockets.send_frame(sock, _error(exc))
        sock.close()
        return
    except sockets.TransportError:
        sock.close()
        return
    try:
        sockets.send_frame(sock, OK, json.dumps({"session_s": time.perf_counter() - t})
                           .encode())
        _serve_ciphertexts(session, sock)
    finally:
        session.close()
        sock.close()


def _serve_ciphertexts(session, sock: socket.socket) -> None:
    """Step 2 until the client leaves or sends bytes that fail."""
    try:
        while True:
            ct = sockets.recv_buffer(sock, idle=True)
            try:
                out = session.run(bytes(ct))
            except VeilError as exc:
                sockets.send_frame(sock, _error(exc))
                return
            sockets.send_frame(sock, OK, out)
    except sockets.TransportError as exc:      # the client left (normal end of a session)
        log.debug("connection closed: %s", exc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m veil.deploy.he_server",
                                 description="HE server on loopback (run, compare)")
    ap.add_argument("bundle", help="server bundle folder (export's he/server)")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per frame")
    ap.add_argument("--keys", help="evaluation key file: one session for every connection")
    ap.add_argument("--key-cache-gib", type=float, default=None,
                    help="rotation keys a bootstrapped model's session holds at once, in "
                         "GiB (default 3; the others are loaded from the key file when "
                         "a layer needs them)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from .keys import EvaluationKeys
    from .server import ModelServer

    server = ModelServer(args.bundle, key_cache_bytes=None if args.key_cache_gib is None
                         else int(args.key_cache_gib * (1 << 30)))
    session = server.open_session(EvaluationKeys.load(args.keys)) if args.keys else None
    listener = sockets.listen(sockets.parse_address(args.listen))
    print("veil-he server listening on %s:%d" % listener.getsockname()[:2], flush=True)
    sockets.accept_forever(listener, args.timeout,
                           lambda s: serve_connection(server, s, session))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
