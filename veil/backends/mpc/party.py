"""A computing party's process (see ``service``'s module docstring for the protocol
between the parties, the dealer and the clients)."""
from __future__ import annotations

import hashlib
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..._proc import peak_rss_bytes
from ...errors import (InputError, KeyMaterialError, ModelTooLargeError, SerializationError,
                       VeilError)
from ...ir import Graph
from .. import sockets as so
from . import protocols as pr
from . import tickets
from . import transport as tp
from .evaluator import (COMPARISONS, DEFAULT_BUDGET, LAZY_BYTES, Chunked, Program, Step,
                        check_memory, chunk_sizes, evaluate, material_bytes,
                        output_frac_bits, stream_threshold, streams_in_chunks)
from .fixed import FRAC_BITS
from .spool import SpoolSet, check_space
from .wire import (CLIENT_REQUEST, CLIENT_RESULT, DEFAULT_TIMEOUT, ERROR, LINK_GRACE_S,
                   MATERIAL, MATERIAL_REQUEST, MAX_CLIENT_BYTES, MAX_PENDING, MAX_PER_CLIENT,
                   ORPHAN_S, PEER_BEGIN, POOL_LIMIT, PEER_DATA, PEER_HAVE, PEER_HELLO, PEER_QUERY,
                   PEER_READY, PREFETCH, QUERY_INTERVAL_S, QUERY_MAX, STALE_TIMEOUTS,
                   SWEEP_S, TICKET, TICKET_REQUEST, MpcError, _ROLE_TEXT, _Unreachable, log,
                   read_client_request)

# -- parties ------------------------------------------------------------------------------
def _background(fn, *args) -> tuple[threading.Thread, list]:
    """``fn(*args, box)`` started in a daemon thread; it leaves its result (or the
    exception it raised) in ``box``."""
    box: list = []
    thread = threading.Thread(target=fn, args=(*args, box), daemon=True)
    thread.start()
    return thread, box


def _collect(pending: dict, key, fn, *args):
    """The result of ``fn(*args, box)``: from the thread :func:`_background` started for
    ``key`` in ``pending``, or computed here when there is none; raises what it raised."""
    thread, box = pending.pop(key, (None, []))
    if thread is None:
        fn(*args, box)
    else:
        thread.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


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
        kind, body = self.link.exchange(PEER_DATA, so.array_parts(data))
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
                 orphan_s: float = ORPHAN_S, max_per_client: int = MAX_PER_CLIENT,
                 memory_budget: int = DEFAULT_BUDGET, name: str = "the model",
                 lookahead: int = 1, stream_above: int = LAZY_BYTES,
                 spool: str | None = None, spool_sets: int = 1) -> None:
        """``memory_budget``: bytes this process may use; a model whose estimated peak
        (``evaluator.estimate_memory``) exceeds it for one input is refused here
        (ModelTooLargeError) before anything is allocated, and a batch that would
        exceed it is refused per request. Prefetched whole sets (the offline phase run
        ahead) are kept only while they fit in ``POOL_LIMIT`` bytes in all; otherwise,
        and for batch sizes without a pool, material streams from the dealer layer by
        layer as the run reaches each layer, ``lookahead`` layers ahead of it (0: each
        layer fetched only when reached, one layer held); a layer whose material is over
        ``stream_above`` bytes streams chunk by chunk while it runs (``CHUNK`` values
        of a step at a time, one set of rounds per chunk), so a 224x224 layer's
        gigabyte of material is never held at once. ``spool``: a directory where
        ``spool_sets`` whole single-input sets too large for the memory pool are kept
        instead (``spool.py``: the offline phase run ahead on disk; ResourceError when
        they would not fit there)."""
        if party not in (0, 1) or identity.role != f"party{party}":
            raise InputError("party must be 0 or 1 and match the identity's role")
        if cmp not in COMPARISONS or not 2 <= frac_bits <= 30:
            raise InputError(f"comparisons are one of {COMPARISONS}; fractional bits 2..30")
        self.frac_bits, self.cmp = int(frac_bits), cmp
        self.party, self.identity, self.model, self.timeout = party, identity, model, timeout
        self.memory_budget, self.name = int(memory_budget), name
        self.lookahead = max(0, int(lookahead))
        self.stream_above = int(stream_above)
        self._stream_at: dict[int, int] = {}
        self.estimate = check_memory(model, 1, self.memory_budget, frac_bits, cmp, name,
                                     layers_held=1 + self.lookahead,
                                     above=self._streaming(1))
        self.program = Program(model, frac_bits)
        self.layers = self.program.layers
        self.out_bits = output_frac_bits(model, frac_bits)
        per_input = material_bytes([s for layer in self.layers for s in layer.steps], 1,
                                   frac_bits, cmp)
        # single-input sets too large for the memory pool: on disk with a spool,
        # otherwise none (requests stream)
        self._spool_dir = None
        if per_input * prefetch > POOL_LIMIT:
            prefetch = 0
            if spool is not None and spool_sets > 0:
                prefetch = int(spool_sets)
                self._spool_dir = check_space(spool, int(1.05 * per_input * prefetch))
        if per_input * batch_size * prefetch_batch > POOL_LIMIT:
            prefetch_batch = 0
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
        self._pool_targets = {1: int(prefetch)} if prefetch > 0 else {}
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

    def _streaming(self, batch: int) -> int:
        """Layers with more material than this stream chunk by chunk for ``batch``
        inputs: above ``stream_above``, and further down only as far as the budget
        needs (``stream_threshold``). Computed once per batch size: the search runs
        the memory estimate once per candidate, which a request need not repeat."""
        if batch not in self._stream_at:
            self._stream_at[batch] = stream_threshold(
                self.model, batch, self.memory_budget, self.frac_bits, self.cmp,
                1 + self.lookahead, self.stream_above)
        return self._stream_at[batch]

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
        # the material plan as a digest: the hello stays small (the peer reads at most
        # 4 kB before it has checked anything) whatever the number of layers
        steps = json.dumps(self._steps(0, len(self.layers))).encode()
        return {"frac_bits": self.frac_bits, "cmp": self.cmp,
                "steps": hashlib.sha256(steps).hexdigest(),
                "pools": {str(k): v for k, v in sorted(self._pool_targets.items())}}

    def _connect_dealer(self) -> tp.Link:
        while True:
            try:
                return tp.connect(so.dial(self.dealer_addr, self.timeout), self.identity,
                                  "dealer")
            except (OSError, VeilError):
                time.sleep(0.2)

    def _steps(self, start: int, stop: int) -> list:
        return [[s.wire() for s in layer.steps] for layer in self.layers[start:stop]]

    def _material(self, dealer: tp.Link, session: str, seq: int, batch: int,
                  layers: tuple[int, int] | None = None, step: int | None = None,
                  chunk: int = 0, values: int | None = None) -> tuple:
        """Layers ``[start, stop)`` (all by default) of set ``seq``: one material list
        per layer, and the bytes received. With ``step``: chunk ``chunk`` of that
        step of layer ``start``, ``values`` values, as the raw named arrays."""
        start, stop = layers or (0, len(self.layers))
        steps = self._steps(start, stop)
        if step is not None:
            one = self.layers[start].steps[step]
            if one.kind == "matmul":        # whole, its groups for the values asked
                g, m, k, n = one.dims
                steps = [[Step("matmul", int(values), dims=(int(values) // (m * n), m, k, n))
                          .wire()]]
            else:
                steps = [[[steps[0][step][0], int(values)] + steps[0][step][2:]]]
        req = {"session": session, "seq": seq, "batch": batch, "frac_bits": self.frac_bits,
               "cmp": self.cmp, "layer": start, "step": step or 0, "chunk": chunk,
               "steps": steps}
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
            arrays = so.unpack_arrays(body)
            sizes = [int(n) for n in arrays.pop("layer_sizes")]
            if "seed" in arrays:             # party 0's circuit material: expand it
                arrays = pr.expand_seeded(arrays)
            if step is not None:
                return arrays, len(body)
            flat = pr.material_from_arrays(arrays)
            if len(sizes) != stop - start or sum(sizes) != len(flat):
                raise ValueError("the layers do not match the request")
            at, out = 0, []
            for n in sizes:
                out.append(flat[at:at + n])
                at += n
            return out, len(body)
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
            if not self._wait_idle(stop):
                return
            mids[size] += 1
            try:
                if size == 1 and self._spool_dir is not None:
                    item = self._spool_set(dealer, session, mids[size], stop)
                    if item is None:
                        return
                else:
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
            if isinstance(item[0], SpoolSet):        # ready for a request from now on
                log.info("party%d: material set %d spooled: %.0f MiB from the dealer, "
                         "%.0f MiB on disk, %.1f s", self.party, mids[size],
                         item[1] / 2**20, item[0].bytes / 2**20, item[0].took_s)

    def _wait_idle(self, stop: threading.Event) -> bool:
        """Until no request is computing (True), or the session stops (False)."""
        while not self._idle.wait(1.0):
            if stop.is_set():
                return False
        return not stop.is_set()

    def _request_sizes(self, step, batch: int) -> tuple[int, ...]:
        """The values of each dealer request for ``step`` on ``batch`` inputs: a
        ``CHUNK`` each with circuit material, the whole step with DCF keys."""
        total = step.size * batch
        if step.kind == "matmul":           # a matrix triple is not split
            return (total,)
        return chunk_sizes(total) if self.cmp == "circuit" else (total,)

    def _spool_set(self, dealer: tp.Link, session: str, mid: int, stop: threading.Event
                   ) -> tuple[SpoolSet, int] | None:
        """Single-input set ``mid`` written to the spool chunk by chunk, each fetched
        only while no request is computing (None if the session stops meanwhile)."""
        plan = [[self._request_sizes(s, 1) for s in layer.steps] for layer in self.layers]
        chunked = [streams_in_chunks(layer.steps, 1, self.frac_bits, self.cmp,
                                     self._streaming(1)) for layer in self.layers]
        out = SpoolSet(self._spool_dir, plan, chunked)
        t0, received = time.perf_counter(), 0
        for i, steps in enumerate(plan):
            for j, sizes in enumerate(steps):
                parts = []
                for c, values in enumerate(sizes):
                    if not self._wait_idle(stop):
                        return None
                    arrays, n = self._material(dealer, f"{session}/pool1", mid, 1,
                                               (i, i + 1), step=j, chunk=c, values=values)
                    received += n
                    if chunked[i]:
                        out.add(i, j, c, so.pack_arrays(arrays))
                    else:
                        parts.append(arrays)
                if parts:              # read whole: the step's chunks joined now, once
                    out.add(i, j, 0, so.pack_arrays(pr.concat_circuit_arrays(parts)))
                del parts
        out.sync()
        out.took_s = time.perf_counter() - t0
        return out, received

    def _pooled(self, size: int, mid: int | None, wait: bool = True
                ) -> tuple[int | None, tuple[list, int] | None]:
        """Party0: the oldest prefetched set of ``size`` inputs (mid None); party1: set
        ``mid``, dropping older ones party0 skipped. Waits up to the timeout (party0
        without ``wait``: (None, None) at once when there is none)."""
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
                if mid is None and not wait:
                    return None, None
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
                size = int(req.share.shape[0])
                if self._pool_targets.get(size, 0) > 0:
                    # a spooled set is used when one is complete; none is waited for
                    mid, pooled = self._pooled(size, None, wait=not (
                        size == 1 and self._spool_dir is not None))
                peer.send(PEER_BEGIN, json.dumps({"id": rid.hex(), "seq": seq, "mid": mid,
                                                  "batch": size}).encode())
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
        batch = int(req.share.shape[0])
        try:            # both parties refuse the same batches: nothing was exchanged yet
            streaming = self._streaming(batch)
            check_memory(self.model, batch, self.memory_budget, self.frac_bits, self.cmp,
                         self.name, layers_held=1 + self.lookahead, above=streaming)
        except ModelTooLargeError as exc:
            self._fail(req, str(exc))
            return
        stream = {"offline_s": 0.0, "bytes": 0, "layers": 0, "peak": 0}
        ahead: dict[int, tuple[threading.Thread, list]] = {}

        def get(i: int, box: list) -> None:
            """Layer i, one dealer request per step, and with circuit comparisons per
            chunk of ``CHUNK`` values of a step (the dealer holds one chunk)."""
            try:
                items, size = [], 0
                steps = self.layers[i].steps
                if streams_in_chunks(steps, batch, self.frac_bits, self.cmp, streaming):
                    # too big to hold: each step's chunks are fetched as the run
                    # consumes them, one ahead (see load)
                    box.append(([[Chunked(self._request_sizes(s, batch), chunk_loader(i, j))
                                  for j, s in enumerate(steps)]], 0))
                    return
                for j, step in enumerate(steps):
                    parts = []
                    for c, values in enumerate(self._request_sizes(step, batch)):
                        arrays, n = self._material(dealer, f"{session}/stream", seq, 1,
                                                   (i, i + 1), step=j, chunk=c,
                                                   values=values)
                        parts.append(arrays)
                        size += n
                    items += pr.material_from_arrays(pr.concat_circuit_arrays(parts))
                    del parts
                box.append(([items], size))
            except BaseException as exc:        # raised where the layer is needed
                box.append(exc)

        chunks: dict[tuple[int, int, int], tuple[threading.Thread, list]] = {}

        def get_chunk(i: int, j: int, c: int, box: list) -> None:
            try:
                values = self._request_sizes(self.layers[i].steps[j], batch)[c]
                arrays, n = self._material(dealer, f"{session}/stream", seq, 1, (i, i + 1),
                                           step=j, chunk=c, values=values)
                try:
                    (item,) = pr.material_from_arrays(arrays)
                except (KeyError, ValueError, TypeError) as exc:
                    raise MpcError(f"malformed material from the dealer: {exc}") from None
                box.append((item, n))
            except BaseException as exc:        # raised where the chunk is needed
                box.append(exc)

        def after(i: int, j: int, c: int) -> tuple[int, int, int] | None:
            """The chunk the run consumes after (i, j, c) in a streamed layer."""
            steps = self.layers[i].steps
            if c + 1 < len(self._request_sizes(steps[j], batch)):
                return i, j, c + 1
            return (i, j + 1, 0) if j + 1 < len(steps) else None

        def chunk_loader(i: int, j: int):
            def load(c: int):
                """Chunk c, and the next one fetched meanwhile in the background (two
                chunks held: the dealer's work and the transfer overlap the run's);
                after a layer's last chunk, the next layer (``lookahead``)."""
                t = time.perf_counter()
                done = _collect(chunks, (i, j, c), get_chunk, i, j, c)
                nxt = after(i, j, c)
                if self.lookahead and nxt is not None:
                    chunks[nxt] = _background(get_chunk, *nxt)
                elif self.lookahead and i + 1 < len(self.layers) and i + 1 not in ahead:
                    ahead[i + 1] = _background(get, i + 1)
                item, n = done
                stream["offline_s"] += time.perf_counter() - t
                stream["bytes"] += n
                stream["peak"] = max(stream["peak"], n)
                return item
            return load

        def fetch(i: int) -> list:
            """Layer i's material when the run reaches it; with ``lookahead`` the next
            layer is fetched meanwhile in the background (at most 1 + lookahead layers
            held, the finished ones released)."""
            t = time.perf_counter()
            (items,), size = _collect(ahead, i, get, i)
            # a chunked layer's requests come while it runs, each chunk's with the one
            # before it computing (``load``): the dealer serves each party's requests in
            # order, so the next layer is asked for after its last chunk
            chunked = any(isinstance(m, Chunked) for m in items)
            if chunked and self.lookahead and (i, 0, 0) not in chunks:
                chunks[(i, 0, 0)] = _background(get_chunk, i, 0, 0)
            for j in range(i + 1, min(i + 1 + self.lookahead * (not chunked),
                                      len(self.layers))):
                if j not in ahead:
                    ahead[j] = _background(get, j)
            stream["offline_s"] += time.perf_counter() - t
            stream["bytes"] += size
            stream["layers"] += 1
            stream["peak"] = max(stream["peak"], size)
            return items

        try:
            if mid is None:       # no prefetched set: streamed layer by layer
                material, offline_bytes = fetch, 0
            elif self.party == 0:
                material, offline_bytes = pooled
            else:
                material, offline_bytes = self._pooled(batch, mid)[1]
            t1, cpu = time.perf_counter(), time.process_time()
            chan = _PeerChannel(peer, self.party)
            try:
                out = evaluate(self.party, chan, self.program, req.share, material,
                               self.frac_bits)
            finally:
                if isinstance(material, SpoolSet):      # its disk space goes now
                    material.close()
            t2, cpu = time.perf_counter(), time.process_time() - cpu
        except (VeilError, OSError, StopIteration) as exc:
            role = getattr(exc, "role", self._other())
            self._fail(req, f"the inference failed: {exc}", role)
            raise _Unreachable(role, f"request failed: {exc}") from exc
        result = {"share": out, "request_id": np.frombuffer(req.rid, np.uint8),
                  "frac_bits": np.array([self.out_bits], np.uint64),
                  "stats": np.frombuffer(json.dumps({
            "party": self.party, "prefetched": mid is not None, "online_rounds": chan.rounds,
            "online_bytes_sent": chan.bytes_sent,
            "offline_bytes": offline_bytes + stream["bytes"],
            "offline_s": t1 - t0 + stream["offline_s"],
            "online_s": t2 - t1 - stream["offline_s"], "cpu_s": cpu,
            "layers_streamed": stream["layers"],
            "peak_layer_bytes": stream["peak"],
            "max_rss_bytes": peak_rss_bytes(),
            "estimated_bytes": self.estimate["party"]}).encode(), np.uint8)}
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


