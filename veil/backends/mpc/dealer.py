"""The dealer process: correlated randomness for the two parties, layer by layer.

It accepts party0 and party1 (mutually authenticated links). A party asks for the
material of (session, sequence number, layer, step, steps, batch): a whole prefetched
set, or, streaming, one step of one layer; the first request of a pair generates both
halves from fresh CSPRNG output and keeps the other half until its party fetches it;
a (session, sequence, layer, step, chunk, party) is served once, never again. A half
left unfetched for ``ttl`` seconds is dropped and, asked for later, refused: a fresh
pair would not match the half the other party already used. It never sees inputs or
outputs, and holds only what the parties asked for and have not both fetched: a chunk
or two of a step while streaming, at most ``PENDING_LIMIT`` bytes per session while
parties prefetch whole sets at their own pace (the one ahead waits).
"""
from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np

from ...errors import InputError, SerializationError, VeilError
from .. import sockets as so
from . import protocols as pr
from . import transport as tp
from ...errors import ModelTooLargeError
from .evaluator import (BASE_BYTES, COMPARISONS, DEFAULT_BUDGET, Step, dealer_material,
                        material_bytes)
from .fixed import FRAC_BITS
from .prg import Deal, Prg
from .wire import DEFAULT_TIMEOUT, ERROR, MATERIAL, MATERIAL_REQUEST, _steps_key, log


#: Bytes of halves the dealer keeps in one session (a set's key) for a party that has not
#: fetched them yet before the other party's next request there waits (both parties
#: prefetching a spooled set run at their own pace; this keeps the faster one at most
#: this far ahead).
PENDING_LIMIT = 256 << 20


class Dealer:
    """Serves correlated randomness to the two parties; see the module docstring."""

    def __init__(self, identity: tp.Identity, address: tuple[str, int],
                 timeout: float = DEFAULT_TIMEOUT, ttl: float = 120.0,
                 memory_budget: int = DEFAULT_BUDGET) -> None:
        self.identity, self.timeout, self.ttl = identity, timeout, ttl
        self.memory_budget = int(memory_budget)
        self.server = so.listen(address)
        self.address = self.server.getsockname()
        self._lock = threading.Lock()
        self._fetched = threading.Condition(self._lock)
        self._pending: dict[tuple, tuple[str, str, bytes, float]] = {}
        # halves dropped unfetched (ttl): asked for later, they are refused, never
        # generated afresh (that half would not match the one its pair already used)
        self._expired: dict[tuple, None] = {}
        # (session, party) -> last (seq, layer, step, chunk) served
        self._last: dict[tuple[str, str], tuple[int, ...]] = {}
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

    def _pending_bytes(self, session: str) -> int:
        return sum(len(v[2]) for k, v in self._pending.items() if k[0] == session)

    def _expire(self) -> None:
        """Drop halves unfetched for ``ttl`` seconds (a party gone), remembering their
        keys (the last 65536)."""
        now = time.monotonic()
        for k in [k for k, v in self._pending.items() if now - v[3] > self.ttl]:
            del self._pending[k]
            self._expired[k] = None
        while len(self._expired) > 65536:
            del self._expired[next(iter(self._expired))]

    def _material(self, party: str, req: dict) -> bytes:
        """Layers ``layer, layer + 1, ...`` of set ``seq`` (``steps``: one list of
        [kind, size] per layer), or step ``step`` of one layer; a request is served
        once per party, in increasing (seq, layer, step) order."""
        session, seq, first = str(req["session"]), int(req["seq"]), int(req.get("layer", 0))
        part = (int(req.get("step", 0)), int(req.get("chunk", 0)))
        layers = [[Step.from_wire(item) for item in layer] for layer in req["steps"]]
        batch, frac = int(req["batch"]), int(req.get("frac_bits", FRAC_BITS))
        cmp = str(req.get("cmp", "circuit"))
        if not 2 <= frac <= 30 or cmp not in COMPARISONS:
            raise InputError(f"fractional bits must be in 2..30, comparisons one of "
                             f"{COMPARISONS}")
        flat = [s for layer in layers for s in layer]
        if not 1 <= batch <= 4096 or sum(s.size for s in flat) * batch > (1 << 24):
            raise InputError("material request too large")
        need = BASE_BYTES + 6 * material_bytes(flat, batch, frac, cmp)
        if need > self.memory_budget:
            raise ModelTooLargeError(
                f"this layer's material needs an estimated {need / 2**20:.0f} MiB in the "
                f"dealer, over its memory budget of {self.memory_budget / 2**20:.0f} MiB; "
                "send smaller batches or raise --memory-budget")
        digest = _steps_key([req["steps"], frac, cmp], batch)
        other = "party1" if party == "party0" else "party0"
        key = (session, seq, first, *part)
        with self._lock:
            if (seq, first, *part) <= self._last.get((session, party), (0, -1, -1, -1)):
                raise InputError(f"material for session {session} #{seq} layer {first} "
                                 f"step {part} was already served to this party; it is "
                                 "never reused")
            self._expire()
            if key in self._expired:
                raise InputError(f"material for session {session} #{seq} layer {first} "
                                 f"step {part} expired before this party fetched it")
            waiting = self._pending.get(key)
            # a party running ahead of the other (prefetching a spooled set) waits while
            # the halves it left in this session are over PENDING_LIMIT bytes
            deadline = time.monotonic() + self.ttl
            while waiting is None and self._pending_bytes(session) > PENDING_LIMIT:
                if not self._fetched.wait(max(0.0, deadline - time.monotonic())):
                    raise InputError("the other party has not fetched its material for "
                                     f"{self.ttl:.0f} s")
                waiting = self._pending.get(key)
            now = time.monotonic()
            if waiting is not None and waiting[0] == party:
                if waiting[1] != digest:
                    raise InputError("the two parties asked for different material")
                del self._pending[key]
                self._fetched.notify_all()
                out = waiting[2]
            else:
                sets: list[list] = [[], []]
                # circuit material: each party's random halves come from a seed
                # (prg.Deal); DCF keys are not shares and travel whole
                prg = Deal() if cmp == "circuit" else Prg()
                for layer in layers:
                    m0, m1 = dealer_material(layer, batch, prg, frac, cmp)
                    sets[0].extend(m0)
                    sets[1].extend(m1)
                    del m0, m1
                sizes = np.array([len(layer) for layer in layers], np.uint64)
                me = 0 if party == "party0" else 1
                halves = [pr.material_arrays(sets[0]), pr.material_arrays(sets[1])]
                sets = [[], []]
                if cmp == "circuit":
                    halves = [pr.seeded_arrays(prg, b, halves[b]) for b in (0, 1)]
                    del prg
                # pack one half at a time and drop its arrays
                theirs = so.pack_arrays({**halves[1 - me], "layer_sizes": sizes})
                halves[1 - me] = {}
                out = so.pack_arrays({**halves[me], "layer_sizes": sizes})
                halves[me] = {}
                self._pending[key] = (other, digest, theirs, now)
            self._last[(session, party)] = (seq, first, *part)
        self.bytes_sent += len(out)
        return out
