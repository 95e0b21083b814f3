"""The MPC processes: two parties, a dealer, and the client library.

- Dealer (:class:`Dealer`): accepts party0 and party1 (mutually authenticated links). A
  party asks for the material of (session, sequence number, steps, batch); the first
  request of a pair generates both halves from fresh CSPRNG output and keeps the other
  half until its party fetches it; a (session, sequence, party) is served once, never
  again. It never sees inputs or outputs.
- Parties (:class:`Party`): party0 connects to party1 and to the dealer, party1 to the
  dealer; both accept clients. In the background each keeps ``PREFETCH`` single-input
  material sets and two for a batch of 64 (both configurable), fetched in the same
  order by both (the offline phase, ahead of requests). Party0 orders the requests: for each, it tells party1 the request id, the
  sequence number and which prefetched set to use (other batch sizes fetch theirs on
  demand); both run the model on their shares (online phase, over the peer link) and
  return their output share to the client. Any failure (peer or dealer gone, timeout,
  malformed message) fails that request with an error to the client, resets the links,
  and the party serves the next; while a link is being rebuilt, party 0 refuses new
  requests at once, naming the role it cannot reach (``"unavailable": "party1"`` or
  ``"dealer"`` in the error), and a dealer that dies ends the session at once (no
  request waits for material that will not come).
- Admission: party 1 takes a share only with a ticket (``tickets.py``) that party 0's
  side issued for that request id and client (the HTTP service for its API clients,
  party 0 for clients that reach it directly, ``TICKET_REQUEST``), and holds at most
  ``max_per_client`` shares per client tag (``MAX_PENDING`` in all). When party 1 has
  no share for a request party 0 begins, it says so at once (``"missing"``) and party 0
  puts the request back, beginning it again only once party 1 confirms it holds the
  other share (``PEER_QUERY`` / ``PEER_HAVE``, asked between requests), so a share
  whose partner never comes costs one round and blocks no one; either party drops it
  after ``orphan_s`` seconds (2 by default) of idle time (time spent computing other
  requests does not count, so honest shares queued behind a long batch are not
  dropped) and tells its client.
- Client (:class:`MpcClient`): shares its input, gets a ticket for the request (from
  ``ticket_call``, the service, or from party 0 over its link), sends one share to each
  party (party 1's with the ticket, first), reconstructs the output from both answers,
  and reports bytes and rounds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import InputError, KeyMaterialError, SerializationError, VeilError
from ...ir import Graph
from ...ir.serialize import graph_from_json, graph_to_json
from .. import sockets as so
from ..inputs import check_batch
from . import protocols as pr
from . import tickets
from . import transport as tp
from .evaluator import (COMPARISONS, Step, dealer_material, evaluate, lower_for_mpc,
                        material_plan, output_frac_bits)
from .fixed import FRAC_BITS, decode, encode
from .prg import Prg

log = logging.getLogger("veil.mpc")

# message kinds
MATERIAL_REQUEST, MATERIAL, ERROR = 1, 2, 3
CLIENT_REQUEST, CLIENT_RESULT = 10, 11
TICKET_REQUEST, TICKET = 12, 13
MAX_INPUTS = 4096               # inputs in one client request
MAX_PENDING = 1024              # client requests a party holds before refusing more
MAX_PER_CLIENT = 32             # shares party 1 holds for one client tag
ORPHAN_S = 2.0                  # idle seconds a share waits for its partner
STALE_TIMEOUTS = 4              # a confirmed request never begun this many timeouts: dropped
QUERY_INTERVAL_S = 0.02         # party 0 asks party 1 about new requests at most this often
QUERY_MAX = 256                 # request ids in one PEER_QUERY
SWEEP_S = 0.1
LINK_GRACE_S = 1.0              # party 0 waits this long for its links before refusing
PEER_HELLO, PEER_BEGIN, PEER_READY, PEER_DATA = 20, 21, 22, 23
PEER_QUERY, PEER_HAVE = 24, 25

_ROLE_TEXT = {"party0": "party 0", "party1": "party 1", "dealer": "the MPC dealer"}

DEFAULT_TIMEOUT = 10.0
# Single-input material sets each party keeps ready (the offline phase, done ahead).
PREFETCH = 8
MAX_CLIENT_BYTES = 64 << 20
MODEL_FILE = "mpc-model"


class MpcError(VeilError):
    """An MPC inference failed (a party or the dealer died, stalled or misbehaved)."""


class _Unreachable(MpcError):
    """A link to another role failed; ``role`` names it (party0, party1, dealer)."""

    def __init__(self, role: str, message: str) -> None:
        super().__init__(message)
        self.role = role


# -- model files --------------------------------------------------------------------------
def save_model(graph: Graph, directory: str | os.PathLike) -> Path:
    """Write the MPC form of ``graph`` (batch norms folded, affine chains as DENSE)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lowered = lower_for_mpc(graph)
    doc, arrays = graph_to_json(lowered)
    np.savez(d / f"{MODEL_FILE}.npz", **arrays)
    (d / f"{MODEL_FILE}.json").write_text(json.dumps({"graph": doc}))
    return d


def load_model(directory: str | os.PathLike) -> Graph:
    d = Path(directory)
    try:
        doc = json.loads((d / f"{MODEL_FILE}.json").read_text())
        with np.load(d / f"{MODEL_FILE}.npz", allow_pickle=False) as z:
            return lower_for_mpc(graph_from_json(doc["graph"], {k: z[k] for k in z.files}))
    except (OSError, KeyError, ValueError) as exc:
        raise SerializationError(f"no readable MPC model in {d}: {exc}") from exc


def read_client_request(body, input_shape: tuple[int, ...],
                        frac_bits: int) -> tuple[bytes, np.ndarray, bytes | None]:
    """(request id, share, ticket or None) of a client's request to a party, checked:
    SerializationError for its form, InputError when it does not fit the model's input
    or the parties' fixed-point scale. Party 0's front (the HTTP service) checks with
    it too."""
    arrays = so.unpack_arrays(body)
    try:
        rid, share, frac = arrays["request_id"], arrays["share"], arrays["frac_bits"]
    except KeyError as exc:
        raise SerializationError(f"a party request lacks {exc}") from None
    ticket = arrays.get("ticket")
    if set(arrays) - {"ticket"} != {"request_id", "share", "frac_bits"} or \
            rid.dtype != np.uint8 or rid.shape != (16,) or frac.dtype != np.uint64 or \
            frac.shape != (1,) or (ticket is not None and (
                ticket.dtype != np.uint8 or ticket.shape != (tickets.TICKET_LEN,))):
        raise SerializationError("a party request is request_id (16 bytes), share, "
                                 "frac_bits and, for party 1, its ticket")
    if share.dtype != np.uint64 or share.shape[1:] != tuple(input_shape) or \
            not 1 <= share.shape[0] <= MAX_INPUTS:
        raise InputError(f"the share has shape {share.shape}; this model takes (n, "
                         f"{', '.join(map(str, input_shape))}) with 1 <= n <= {MAX_INPUTS}")
    if int(frac[0]) != frac_bits:
        raise InputError(f"inputs must be encoded with {frac_bits} fractional bits, "
                         f"not {int(frac[0])}")
    return bytes(rid), share, None if ticket is None else bytes(ticket)


def _steps_key(steps, batch: int) -> str:
    return hashlib.sha256(json.dumps([steps, batch]).encode()).hexdigest()


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


# -- parties ------------------------------------------------------------------------------
class _PeerChannel:
    """The online phase's channel over the peer link: both parties send and receive at
    once (``Link.exchange``)."""

    def __init__(self, link: tp.Link, party: int) -> None:
        self.link, self.party = link, party
        self.rounds = 0
        self.bytes_sent = 0

    def exchange(self, data: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(data)
        before = self.link.bytes_sent
        kind, body = self.link.exchange(PEER_DATA, so.pack_array(data))
        self.bytes_sent += self.link.bytes_sent - before
        if kind != PEER_DATA:
            raise MpcError(f"unexpected message kind {kind} from the other party")
        peer = so.unpack_array(body)
        if peer.shape != data.shape or peer.dtype != data.dtype:
            raise MpcError("the other party sent a message of the wrong shape")
        self.rounds += 1
        return peer


@dataclass
class _Request:
    link: tp.Link
    share: np.ndarray
    arrived: float
    rid: bytes = b""
    tag: bytes = b""            # the client's tag from its ticket (party 1)
    confirmed: bool = False     # both parties hold a share of it
    tried: bool = False         # party 0 began it once and party 1 had no share
    idle_age: float = 0.0       # seconds waited while the party was not computing


class Party:
    """One of the two computing servers; see the module docstring."""

    def __init__(self, party: int, identity: tp.Identity, model: Graph,
                 listen: tuple[str, int], dealer: tuple[str, int],
                 peer: tuple[str, int] | None = None, peer_listen: tuple[str, int] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, prefetch: int = PREFETCH,
                 frac_bits: int = FRAC_BITS, cmp: str = "circuit",
                 batch_size: int = 64, prefetch_batch: int = 2,
                 orphan_s: float = ORPHAN_S, max_per_client: int = MAX_PER_CLIENT) -> None:
        if party not in (0, 1) or identity.role != f"party{party}":
            raise InputError("party must be 0 or 1 and match the identity's role")
        if cmp not in COMPARISONS or not 2 <= frac_bits <= 30:
            raise InputError(f"comparisons are one of {COMPARISONS}; fractional bits 2..30")
        self.frac_bits, self.cmp = int(frac_bits), cmp
        self.party, self.identity, self.model, self.timeout = party, identity, model, timeout
        self.steps = material_plan(model)
        self.dealer_addr, self.peer_addr = dealer, peer
        self.clients = so.listen(listen)
        self.address = self.clients.getsockname()
        self.peer_server = so.listen(peer_listen) if party == 1 else None
        self.peer_address = self.peer_server.getsockname() if self.peer_server else None
        self.orphan_s, self.max_per_client = float(orphan_s), int(max_per_client)
        if party == 1 and identity.ticket_key is None:
            raise KeyMaterialError("party 1 needs the ticket key (ticket.key of "
                                   "`veil mpc-setup`) to admit clients' shares")
        self._requests: dict[bytes, _Request] = {}
        self._per_client: dict[bytes, int] = {}
        self._cond = threading.Condition()
        self._order: list[bytes] = []
        # party 0: the role whose link is being rebuilt (requests are refused meanwhile)
        self._down: str | None = self._other()
        self._broken: str | None = None       # why the current session must end
        self.served = 0
        # pooled batch size -> how many sets to keep -> {material id: (material, bytes)}
        self._pool_targets = {1: int(prefetch)}
        if batch_size > 1 and prefetch_batch > 0:
            self._pool_targets[int(batch_size)] = int(prefetch_batch)
        self._pool: dict[int, dict[int, tuple[list, int]]] = {z: {} for z in
                                                              self._pool_targets}
        self._pool_cond = threading.Condition()
        # set while no request is being computed: the offline phase (prefetching) runs
        # then, so it never takes CPU from an online phase on a small machine
        self._idle = threading.Event()
        self._idle.set()
        self._dealer_lock = threading.Lock()

    # client side -------------------------------------------------------------------
    def _other(self) -> str:
        return "party1" if self.party == 0 else "party0"

    def _client(self, sock: socket.socket) -> None:
        """One client's link: requests, one after another, until it closes. Each is
        queued for the protocol loop, which answers on the same link."""
        try:
            link = tp.accept(sock, self.identity, ("client",))
        except VeilError as exc:
            log.info("party%d: refused a client: %s", self.party, exc)
            sock.close()
            return
        direct = "direct:" + secrets.token_hex(8)      # party 0's own clients, per link
        while True:
            try:
                kind, body = link.recv(MAX_CLIENT_BYTES, idle=True)
            except VeilError:                         # gone, or a broken frame
                link.close()
                return
            if kind == TICKET_REQUEST and self.party == 0:
                self._ticket(link, body, direct)
                continue
            try:
                if kind != CLIENT_REQUEST:
                    raise SerializationError(f"unexpected message kind {kind}")
                rid, share, ticket = read_client_request(body, self.model.input_shape,
                                                         self.frac_bits)
                tag = b""
                if self.party == 1:
                    if ticket is None:
                        raise tickets.TicketError("party 1 takes a share only with a ticket "
                                                  "from the service")
                    tag = tickets.verify(self.identity.ticket_key, ticket, rid)
            except VeilError as exc:
                # debug: a flood of refused shares must not fill the log on disk
                log.debug("party%d: refused a request: %s", self.party, exc)
                self._reply_error(link, None, str(exc))
                continue
            refusal, down = None, None
            with self._cond:
                if self.party == 0 and self._down is not None:   # links (re)forming
                    self._cond.wait_for(lambda: self._down is None, LINK_GRACE_S)
                    down = self._down
                if down is not None:
                    refusal = f"{_ROLE_TEXT[down]} is unreachable; try again shortly"
                elif rid in self._requests:
                    refusal = "this request id is in use"
                elif len(self._requests) >= MAX_PENDING:
                    refusal = f"party{self.party} holds {MAX_PENDING} requests already; " \
                              "try again later"
                elif self.party == 1 and self._per_client.get(tag, 0) >= self.max_per_client:
                    refusal = f"party 1 holds {self.max_per_client} shares of this client " \
                              "already; send their other shares or wait"
                else:
                    self._requests[rid] = _Request(link, share, time.monotonic(), tag=tag)
                    self._per_client[tag] = self._per_client.get(tag, 0) + 1
                    self._order.append(rid)
                    self._cond.notify_all()
            if refusal is not None:
                self._reply_error(link, rid, refusal, down)

    def _ticket(self, link: tp.Link, body: bytes, client: str) -> None:
        """Party 0: a ticket for a client that reaches it directly (no service)."""
        try:
            if self.identity.ticket_key is None:
                raise tickets.TicketError("party 0 has no ticket key (ticket.key)")
            link.send(TICKET, tickets.issue(self.identity.ticket_key, bytes(body), client))
        except VeilError as exc:
            self._reply_error(link, None, str(exc))

    def _remove(self, rid: bytes) -> _Request:
        """Take ``rid`` out of the table (caller holds ``_cond``)."""
        req = self._requests.pop(rid)
        req.rid = rid
        if rid in self._order:
            self._order.remove(rid)
        left = self._per_client.get(req.tag, 1) - 1
        if left > 0:
            self._per_client[req.tag] = left
        else:
            self._per_client.pop(req.tag, None)
        return req

    def _drop_stale(self, idle_dt: float = 0.0) -> list[tuple[bytes, "_Request"]]:
        """Age unconfirmed requests by ``idle_dt`` (seconds the party spent not
        computing) and drop those past ``orphan_s``: their other share never came.
        Confirmed requests never begun within STALE_TIMEOUTS x the timeout go too.
        Caller holds ``_cond``; the clients are answered after it is released."""
        limit = time.monotonic() - STALE_TIMEOUTS * self.timeout
        stale = []
        for rid, r in list(self._requests.items()):
            if not r.confirmed:
                r.idle_age += idle_dt
            if (not r.confirmed and r.idle_age >= self.orphan_s) or r.arrived < limit:
                stale.append((rid, self._remove(rid)))
        return stale

    def _sweep_forever(self) -> None:
        """Release orphan shares every SWEEP_S seconds (their clients get an error)."""
        last = time.monotonic()
        while True:
            time.sleep(SWEEP_S)
            now = time.monotonic()
            idle_dt, last = (now - last if self._idle.is_set() else 0.0), now
            with self._cond:
                stale = self._drop_stale(idle_dt)
            for rid, req in stale:
                self._reply_error(req.link, rid, "the other party never received the other "
                                  "share of this request (send both shares)")

    def _answer_query(self, body: bytes) -> bytes:
        """Party 1: which of the request ids party 0 holds are here too (they are then
        confirmed: no longer orphans)."""
        try:
            ids = [bytes.fromhex(h) for h in so.json_object(body)["ids"][:QUERY_MAX]]
        except (KeyError, TypeError, ValueError) as exc:
            raise MpcError(f"party0 sent a malformed query: {exc}") from None
        have = []
        with self._cond:
            for rid in ids:
                req = self._requests.get(rid)
                if req is not None:
                    req.confirmed = True
                    have.append(rid.hex())
        return json.dumps({"ids": have}).encode()

    def _requeue(self, rid: bytes, req: _Request) -> None:
        """Party 0: put back a request party 1 had no share for (it stays in arrival
        order, tried; only party 1's confirmation brings it forward again)."""
        req.tried = True
        with self._cond:
            self._requests[rid] = req
            self._per_client[req.tag] = self._per_client.get(req.tag, 0) + 1
            self._order.append(rid)
            self._order.sort(key=lambda r: self._requests[r].arrived)

    def _next(self, peer: tp.Link) -> tuple[bytes, _Request]:
        """Party 0: the oldest request that party 1 confirmed holding or that was never
        tried (an honest client's share is at party 1 before party 0's arrives, so
        PEER_BEGIN finds it: no extra round). A request party 1 lacked goes back
        (``_requeue``) and is asked about (PEER_QUERY) at most every
        QUERY_INTERVAL_S, between requests; one never confirmed ages out in the
        sweeper, without holding up the others."""
        asked = -1.0
        while True:
            with self._cond:
                if self._broken:
                    raise _Unreachable("dealer", self._broken)
                ready = next((rid for rid in self._order if self._requests[rid].confirmed
                              or not self._requests[rid].tried), None)
                if ready is not None:
                    return ready, self._remove(ready)
                unknown = [rid for rid in self._order
                           if not self._requests[rid].confirmed][:QUERY_MAX]
                wait = QUERY_INTERVAL_S - (time.monotonic() - asked)
                if not unknown or wait > 0:
                    self._cond.wait(wait if unknown else 0.5)
                    continue
            asked = time.monotonic()
            peer.send(PEER_QUERY, json.dumps({"ids": [r.hex() for r in unknown]}).encode())
            kind, body = peer.recv()
            if kind != PEER_HAVE:
                raise MpcError(f"unexpected message kind {kind} from party1")
            try:
                have = {bytes.fromhex(h) for h in so.json_object(body)["ids"]}
            except (KeyError, TypeError, ValueError) as exc:
                raise MpcError(f"party1 sent a malformed answer: {exc}") from None
            with self._cond:
                for rid in have:
                    if rid in self._requests:
                        self._requests[rid].confirmed = True

    def _take(self, rid: bytes) -> tuple[bytes, _Request]:
        """Party 1: the request party 0 named (it confirmed it before); MpcError if it
        is gone (dropped meanwhile)."""
        with self._cond:
            if rid not in self._requests:
                raise MpcError("the client's share for this request never arrived")
            return rid, self._remove(rid)

    def _fail_all(self, role: str) -> None:
        """Party 0 after its session ended: its queued requests cannot be served."""
        with self._cond:
            dropped = [(rid, self._remove(rid)) for rid in list(self._requests)]
        for rid, req in dropped:
            self._reply_error(req.link, rid, f"{_ROLE_TEXT[role]} is unreachable", role)

    # peer and dealer links ----------------------------------------------------------
    def _connect_peer(self) -> tuple[tp.Link, str]:
        if self.party == 0:
            while True:
                try:
                    link = tp.connect(so.dial(self.peer_addr, self.timeout), self.identity,
                                      "party1")
                    break
                except (OSError, VeilError):
                    time.sleep(0.2)
            session = secrets.token_hex(16)
            link.send(PEER_HELLO, json.dumps({"session": session, **self._config()}).encode())
            return link, session
        sock, _ = self.peer_server.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout)
        link = tp.accept(sock, self.identity, ("party0",))
        kind, body = link.recv(4096)
        if kind != PEER_HELLO:
            raise MpcError("party0 did not open a session")
        hello = so.json_object(body)
        if {k: hello.get(k) for k in self._config()} != self._config():
            link.close()
            raise MpcError(f"party0 runs {hello}, party1 {self._config()}: same model, "
                           "fractional bits and comparisons needed")
        return link, str(hello["session"])

    def _config(self) -> dict:
        return {"frac_bits": self.frac_bits, "cmp": self.cmp,
                "steps": [[s.kind, s.size] for s in self.steps],
                "pools": {str(k): v for k, v in sorted(self._pool_targets.items())}}

    def _connect_dealer(self) -> tp.Link:
        while True:
            try:
                return tp.connect(so.dial(self.dealer_addr, self.timeout), self.identity,
                                  "dealer")
            except (OSError, VeilError):
                time.sleep(0.2)

    def _material(self, dealer: tp.Link, session: str, seq: int, batch: int) -> tuple[list, int]:
        req = {"session": session, "seq": seq, "batch": batch, "frac_bits": self.frac_bits,
               "cmp": self.cmp, "steps": [[s.kind, s.size] for s in self.steps]}
        with self._dealer_lock:     # the prefetch thread shares this link
            try:
                dealer.send(MATERIAL_REQUEST, json.dumps(req).encode())
                kind, body = dealer.recv()
            except (VeilError, OSError) as exc:
                raise _Unreachable("dealer", f"the dealer is unreachable: {exc}") from None
        if kind == ERROR:
            raise MpcError(f"the dealer refused: {so.json_object(body).get('error')}")
        if kind != MATERIAL:
            raise MpcError(f"unexpected message kind {kind} from the dealer")
        try:
            return pr.material_from_arrays(so.unpack_arrays(body)), len(body)
        except (KeyError, ValueError, TypeError) as exc:
            raise MpcError(f"malformed material from the dealer: {exc}") from None

    def serve_forever(self) -> None:
        threading.Thread(target=so.accept_forever, args=(self.clients, self.timeout,
                                                       self._client), daemon=True).start()
        threading.Thread(target=self._sweep_forever, daemon=True).start()
        while True:                 # _down names what is missing (the peer at first)
            try:
                peer, session = self._connect_peer()
            except (OSError, VeilError) as exc:
                log.info("party%d: peer handshake failed: %s", self.party, exc)
                continue
            peer.sock.settimeout(self.timeout)
            self._down = "dealer"
            dealer = self._connect_dealer()
            with self._cond:
                self._broken = None
                self._down = None
                self._cond.notify_all()
            stop = threading.Event()
            with self._pool_cond:
                for pool in self._pool.values():
                    pool.clear()
            filler = threading.Thread(target=self._prefetch,
                                      args=(dealer, session, stop, peer), daemon=True)
            filler.start()
            seq = 0
            try:
                while True:
                    seq += 1
                    try:
                        self._one(peer, dealer, session, seq)
                    finally:
                        self._idle.set()
            except (VeilError, OSError) as exc:
                # Any failure ends this session: both links are rebuilt, the other party
                # sees the peer link close and does the same, and a fresh session id
                # means no dealer material is ever reused.
                role = getattr(exc, "role", self._other())
                self._down = role
                log.info("party%d: session reset: %s", self.party, exc)
                stop.set()
                peer.close()
                dealer.close()
                if self.party == 0:
                    self._fail_all(role)
                else:                   # party 0 forgot them: they age as orphans again
                    with self._cond:
                        for req in self._requests.values():
                            req.confirmed = False
                with self._pool_cond:
                    self._pool_cond.notify_all()
                filler.join(self.timeout)

    def _prefetch(self, dealer: tp.Link, session: str, stop: threading.Event,
                  peer: tp.Link) -> None:
        """Keep material ready for each pooled batch size (``prefetch`` sets for single
        inputs, ``prefetch_batch`` sets of ``batch_size`` inputs), ids 1, 2, 3, ... per
        size in order; both parties fetch the same ids, so party0 can name the one to
        use. Single inputs are topped up first."""
        mids = {size: 0 for size in self._pool}
        while not stop.is_set():
            with self._pool_cond:
                while not stop.is_set():
                    size = next((z for z, want in self._pool_targets.items()
                                 if len(self._pool[z]) < want), None)
                    if size is not None:
                        break
                    self._pool_cond.wait(1.0)
            while not self._idle.wait(1.0):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            mids[size] += 1
            try:
                item = self._material(dealer, f"{session}/pool{size}", mids[size], size)
            except (VeilError, OSError) as exc:
                if stop.is_set():
                    return
                # the session cannot go on without the dealer: end it now (both parties
                # see the peer link close), not when a request times out waiting
                log.info("party%d: prefetch stopped, ending the session: %s", self.party,
                         exc)
                with self._cond:
                    self._broken = f"the dealer is unreachable: {exc}"
                    self._cond.notify_all()
                try:
                    peer.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            with self._pool_cond:
                self._pool[size][mids[size]] = item
                self._pool_cond.notify_all()

    def _pooled(self, size: int, mid: int | None) -> tuple[int, tuple[list, int]]:
        """Party0: the oldest prefetched set of ``size`` inputs (mid None); party1: set
        ``mid``, dropping older ones party0 skipped. Waits up to the timeout."""
        deadline = time.monotonic() + self.timeout
        pool = self._pool[size]
        with self._pool_cond:
            while True:
                if mid is None and pool:
                    mid = min(pool)
                if mid is not None and mid in pool:
                    for old in [k for k in pool if k < mid]:
                        del pool[old]
                    item = pool.pop(mid)
                    self._pool_cond.notify_all()
                    self._idle.clear()
                    return mid, item
                self._idle.set()               # what we wait for is fetched in the background
                left = deadline - time.monotonic()
                if self._broken:
                    raise _Unreachable("dealer", self._broken)
                if left <= 0:
                    raise _Unreachable("dealer", "no dealer material arrived in time")
                self._pool_cond.wait(min(left, 0.5))

    def _one(self, peer: tp.Link, dealer: tp.Link, session: str, seq: int) -> None:
        """One request end to end; raises (after failing the client) on any link error."""
        mid = None
        if self.party == 0:
            rid, req = self._next(peer)
            self._idle.clear()
            t0 = time.perf_counter()
            pooled = None
            try:
                if self._pool_targets.get(req.share.shape[0], 0) > 0:
                    mid, pooled = self._pooled(req.share.shape[0], None)
                peer.send(PEER_BEGIN, json.dumps({"id": rid.hex(), "seq": seq, "mid": mid,
                                                  "batch": int(req.share.shape[0])}).encode())
                kind, body = peer.recv()
            except (VeilError, OSError) as exc:
                role = getattr(exc, "role", "party1")
                self._fail(req, f"the inference failed: {exc}", role)   # at once
                raise
        else:
            while True:                             # any time, but then the whole frame
                kind, body = peer.recv(idle=True)
                if kind != PEER_QUERY:
                    break
                peer.send(PEER_HAVE, self._answer_query(body))
            if kind != PEER_BEGIN:
                raise MpcError(f"unexpected message kind {kind} from party0")
            msg = so.json_object(body)
            if int(msg["seq"]) != seq:
                raise MpcError("the parties disagree on the sequence number")
            mid = None if msg.get("mid") is None else int(msg["mid"])
            self._idle.clear()
            t0 = time.perf_counter()
            try:
                rid, req = self._take(bytes.fromhex(msg["id"]))
            except MpcError as exc:
                peer.send(PEER_READY, json.dumps({"ok": False, "missing": True,
                                                  "error": str(exc)}).encode())
                return
        # both sides agree the request exists before either spends material on it
        if self.party == 1:
            ok = int(req.share.shape[0]) == int(msg["batch"])
            peer.send(PEER_READY, json.dumps({"ok": ok}).encode())
            if not ok:
                self._fail(req, "the two shares have different batch sizes")
                return
        else:
            status = so.json_object(body) if kind == PEER_READY else {"ok": False}
            if status.get("missing") and not req.confirmed:
                # party 1 has no share for it (yet): back in the queue, asked about
                # later; the next request goes first (no head-of-line wait)
                if pooled is not None:
                    with self._pool_cond:
                        self._pool[int(req.share.shape[0])][mid] = pooled
                        self._pool_cond.notify_all()
                self._requeue(rid, req)
                return
            if not status.get("ok"):
                self._fail(req, status.get("error", "party1 could not take the request"))
                return
        try:
            if mid is None:       # a batch: its material is made now, in its own namespace
                material, offline_bytes = self._material(dealer, f"{session}/batch", seq,
                                                         req.share.shape[0])
            elif self.party == 0:
                material, offline_bytes = pooled
            else:
                material, offline_bytes = self._pooled(int(req.share.shape[0]), mid)[1]
            t1 = time.perf_counter()
            chan = _PeerChannel(peer, self.party)
            out = evaluate(self.party, chan, self.model, req.share, material, self.frac_bits)
            t2 = time.perf_counter()
        except (VeilError, OSError, StopIteration) as exc:
            role = getattr(exc, "role", self._other())
            self._fail(req, f"the inference failed: {exc}", role)
            raise _Unreachable(role, f"request failed: {exc}") from exc
        result = {"share": out, "request_id": np.frombuffer(req.rid, np.uint8), "frac_bits": np.array(
                      [output_frac_bits(self.model, self.frac_bits)], np.uint64),
                  "stats": np.frombuffer(json.dumps({
            "party": self.party, "prefetched": mid is not None, "online_rounds": chan.rounds,
            "online_bytes_sent": chan.bytes_sent, "offline_bytes": offline_bytes,
            "offline_s": t1 - t0, "online_s": t2 - t1}).encode(), np.uint8)}
        try:
            req.link.send(CLIENT_RESULT, so.pack_arrays(result))
        except VeilError:
            req.link.close()                       # the client left; nothing to undo
        self.served += 1

    def _fail(self, req: _Request, message: str, role: str | None = None) -> None:
        self._reply_error(req.link, req.rid, message, role)

    @staticmethod
    def _reply_error(link: tp.Link, rid: bytes | None, message: str,
                     role: str | None = None) -> None:
        """An ERROR to a client; ``role``: the role this party could not reach (the
        service answers 503 naming it)."""
        body = {"error": message, "request_id": rid.hex() if rid else None}
        if role is not None:
            body["unavailable"] = role
        try:
            link.send(ERROR, json.dumps(body).encode())
        except VeilError:
            link.close()


# -- client -------------------------------------------------------------------------------
def _closed(link: tp.Link) -> bool:
    """True when an idle link has something to read: its party closed it (nothing else
    arrives unasked)."""
    try:
        readable, _, _ = select.select([link.sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


@dataclass
class MpcResult:
    outputs: np.ndarray
    stats: list[dict]
    latency_s: float
    client_bytes_sent: int
    client_bytes_received: int


class MpcClient:
    """Shares inputs between the two parties and reconstructs their answers. Keeps one
    authenticated link to each party across requests (reopened after any failure);
    use it as a context manager or call :meth:`close`."""

    def __init__(self, keys_dir: str | os.PathLike, party0: tuple[str, int] | None,
                 party1: tuple[str, int], input_shape: tuple[int, ...],
                 timeout: float = 30.0, frac_bits: int = FRAC_BITS,
                 party0_call=None, ticket_call=None) -> None:
        """``party0_call(body) -> body`` and ``ticket_call(request_id) -> ticket``:
        reach party 0 and get party 1's tickets through whoever fronts party 0 (the
        HTTP service); without them, both come from party 0's own link."""
        self.identity = tp.Identity.load(keys_dir, None)
        self.addresses = (party0, party1)
        self.input_shape, self.timeout = tuple(input_shape), timeout
        self.frac_bits = int(frac_bits)
        # party 0 through someone who fronts it (the HTTP service): request body in,
        # party 0's CLIENT_RESULT body out; party 1 always over its own link
        self._party0_call, self._ticket_call = party0_call, ticket_call
        if party0_call is None and party0 is None:
            raise InputError("give party 0's address or a party0_call that reaches it")
        if party0_call is not None and ticket_call is None:
            raise InputError("with party0_call, give a ticket_call too (party 1 takes "
                             "shares only with a ticket from party 0's side)")
        self._links: list[tp.Link] | None = None

    def _connect(self) -> list[tp.Link]:
        if self._links is not None and any(_closed(link) for link in self._links):
            self.close()            # a party restarted: its end of the link is gone
        if self._links is None:
            links = []
            try:
                for p in ((1,) if self._party0_call else (0, 1)):
                    links.append(tp.connect(so.dial(self.addresses[p], self.timeout),
                                            self.identity, f"party{p}"))
            except BaseException:
                for link in links:
                    link.close()
                raise
            self._links = links
        return self._links

    def close(self) -> None:
        for link in self._links or []:
            link.close()
        self._links = None

    def __enter__(self) -> "MpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def infer(self, xs) -> MpcResult:
        """Outputs for a batch ``xs`` of shape (n, *input_shape)."""
        start = time.perf_counter()
        answer = self.send(self.share(xs))
        return MpcResult(self.reconstruct(answer), answer.stats,
                         time.perf_counter() - start, answer.bytes_sent,
                         answer.bytes_received)

    def share(self, xs) -> "MpcShares":
        """Split a batch (n, *input_shape) into the two parties' shares, locally."""
        xs = check_batch(xs, self.input_shape, MAX_INPUTS)
        s0, s1 = pr.share(encode(xs, self.frac_bits), Prg())
        return MpcShares(secrets.token_bytes(16), (s0, s1), self.frac_bits, len(xs))

    def _ticket(self, links: list[tp.Link], rid: bytes) -> bytes:
        if self._ticket_call is not None:
            return bytes(self._ticket_call(rid))
        links[0].send(TICKET_REQUEST, rid)          # party 0, directly
        kind, body = links[0].recv()
        if kind == ERROR:
            raise MpcError(f"party0: {so.json_object(body).get('error')}")
        if kind != TICKET:
            raise MpcError(f"party0 sent message kind {kind}")
        return bytes(body)

    def send(self, shares: "MpcShares") -> "MpcAnswer":
        """Send each share to its party; their output shares (each alone reveals nothing)."""
        rid = shares.request_id
        results = [None, None]
        try:
            links = self._connect()
            ticket = np.frombuffer(self._ticket(links, rid), np.uint8)
            bodies = [so.pack_arrays({"request_id": np.frombuffer(rid, np.uint8),
                                      "share": share,
                                      "frac_bits": np.array([shares.frac_bits], np.uint64),
                                      **({"ticket": ticket} if p == 1 else {})})
                      for p, share in enumerate(shares.shares)]
            before = [(link.bytes_sent, link.bytes_received) for link in links]
            parties = list(range(2 - len(links), 2))       # [1] when party 0 is fronted
            for p, link in zip(parties, links):    # party 1 first: party 0 waits for it
                link.send(CLIENT_REQUEST, bodies[p])
            replies = {}
            if self._party0_call is not None:
                replies[0] = (CLIENT_RESULT, self._party0_call(bytes(bodies[0])))
            for p, link in zip(parties, links):
                replies[p] = link.recv()
            for p in (0, 1):
                kind, body = replies[p]
                if kind == ERROR:
                    raise MpcError(f"party{p}: {so.json_object(body).get('error')}")
                if kind != CLIENT_RESULT:
                    raise MpcError(f"party{p} sent message kind {kind}")
                results[p] = so.unpack_arrays(body)
                if bytes(results[p]["request_id"]) != rid:
                    raise MpcError(f"party{p} answered another request")
            sent = sum(link.bytes_sent - b[0] for link, b in zip(links, before))
            received = sum(link.bytes_received - b[1] for link, b in zip(links, before))
            if self._party0_call is not None:
                sent, received = sent + len(bodies[0]), received + len(replies[0][1])
        except (so.TransportError, OSError, KeyError) as exc:
            self.close()
            raise MpcError(f"the inference failed: {exc}") from None
        except VeilError:
            self.close()        # a late answer to this request must not meet the next
            raise
        bits = {int(r["frac_bits"][0]) for r in results}
        if len(bits) != 1 or not 0 < min(bits) < 64:
            raise MpcError("the parties disagree on the output's fixed-point scale")
        stats = [json.loads(bytes(r["stats"]).decode()) for r in results]
        return MpcAnswer((results[0]["share"], results[1]["share"]), bits.pop(), shares.n,
                         stats, sent, received)

    @staticmethod
    def reconstruct(answer: "MpcAnswer") -> np.ndarray:
        """The outputs: the sum of the two output shares, decoded from fixed point."""
        out = decode(pr.reconstruct(*answer.shares), answer.frac_bits)
        if len(out) != answer.n:
            raise MpcError(f"the parties answered {len(out)} outputs for {answer.n} inputs")
        return out


@dataclass
class MpcShares:
    """A batch split into two additive shares; each alone is uniformly random."""

    request_id: bytes
    shares: tuple[np.ndarray, np.ndarray]
    frac_bits: int
    n: int


@dataclass
class MpcAnswer:
    """The parties' output shares of one request, with their statistics."""

    shares: tuple[np.ndarray, np.ndarray]
    frac_bits: int
    n: int
    stats: list[dict]
    bytes_sent: int
    bytes_received: int
