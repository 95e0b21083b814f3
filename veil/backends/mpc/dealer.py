"""The dealer process: correlated randomness for the two parties, layer by layer.

It accepts party0 and party1 (mutually authenticated links). A party asks for the
material of (session, sequence number, layer, steps, batch); the first request of a
pair generates both halves from fresh CSPRNG output and keeps the other half until its
party fetches it; a (session, sequence, layer, party) is served once, never again. It
never sees inputs or outputs, and never holds more than the layers the parties have
asked for and not yet both fetched.
"""
from __future__ import annotations

import json
import socket
import threading
import time

from ...errors import InputError, SerializationError, VeilError
from .. import sockets as so
from . import protocols as pr
from . import transport as tp
from .evaluator import Step, dealer_material
from .fixed import FRAC_BITS
from .prg import Prg
from .wire import (DEFAULT_TIMEOUT, ERROR, MATERIAL, MATERIAL_REQUEST, _steps_key, log)

# -- dealer -------------------------------------------------------------------------------
class Dealer:
    """Serves correlated randomness to the two parties; see the module docstring."""

    def __init__(self, identity: tp.Identity, address: tuple[str, int],
                 timeout: float = DEFAULT_TIMEOUT, ttl: float = 120.0) -> None:
        self.identity, self.timeout, self.ttl = identity, timeout, ttl
        self.server = so.listen(address)
        self.address = self.server.getsockname()
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], tuple[str, str, bytes, float]] = {}
        self._last: dict[tuple[str, str], int] = {}    # (session, party) -> last seq served
        self.bytes_sent = 0

    def serve_forever(self) -> None:
        so.accept_forever(self.server, self.timeout, self._serve_link)

    def _serve_link(self, sock: socket.socket) -> None:
        try:
            link = tp.accept(sock, self.identity, ("party0", "party1"))
        except VeilError as exc:
            log.warning("dealer: refused a link: %s", exc)
            sock.close()
            return
        try:
            while True:
                kind, body = link.recv(idle=True)   # parties may stay idle for long
                if kind != MATERIAL_REQUEST:
                    raise SerializationError(f"unexpected message kind {kind}")
                try:
                    link.send(MATERIAL, self._material(link.peer, so.json_object(body)))
                except (VeilError, KeyError, TypeError, ValueError) as exc:
                    link.send(ERROR, json.dumps({"error": str(exc)}).encode())
        except VeilError as exc:
            log.info("dealer: link to %s ended: %s", link.peer, exc)
        finally:
            link.close()

    def _material(self, party: str, req: dict) -> bytes:
        session, seq = str(req["session"]), int(req["seq"])
        steps = [(str(k), int(n)) for k, n in req["steps"]]
        batch, frac = int(req["batch"]), int(req.get("frac_bits", FRAC_BITS))
        cmp = str(req.get("cmp", "circuit"))
        if not 2 <= frac <= 30:
            raise InputError("fractional bits must be in 2..30")
        if not 1 <= batch <= 4096 or sum(n for _, n in steps) * batch > (1 << 24):
            raise InputError("material request too large")
        digest = _steps_key([steps, frac, cmp], batch)
        other = "party1" if party == "party0" else "party0"
        with self._lock:
            if seq <= self._last.get((session, party), 0):
                raise InputError(f"material for session {session} #{seq} was already served "
                                 "to this party; it is never reused")
            now = time.monotonic()
            for k in [k for k, v in self._pending.items() if now - v[3] > self.ttl]:
                del self._pending[k]
            waiting = self._pending.get((session, seq))
            if waiting is not None and waiting[0] == party:
                if waiting[1] != digest:
                    raise InputError("the two parties asked for different material")
                del self._pending[(session, seq)]
                out = waiting[2]
            else:
                m0, m1 = dealer_material([Step(k, n) for k, n in steps], batch, Prg(), frac,
                                         cmp)
                mine, theirs = (m0, m1) if party == "party0" else (m1, m0)
                out = so.pack_arrays(pr.material_arrays(mine))
                self._pending[(session, seq)] = (other, digest,
                                                 so.pack_arrays(pr.material_arrays(theirs)),
                                                 now)
            self._last[(session, party)] = seq
        self.bytes_sent += len(out)
        return out


