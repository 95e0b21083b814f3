"""The MPC client library: share an input between the two parties, reconstruct their
answer."""
from __future__ import annotations

import json
import os
import secrets
import select
import time
from dataclasses import dataclass

import numpy as np

from ...errors import InputError, VeilError
from .. import sockets as so
from ..inputs import check_batch
from . import protocols as pr
from . import transport as tp
from .fixed import FRAC_BITS, decode, encode
from .prg import Prg
from .wire import (CLIENT_REQUEST, CLIENT_RESULT, ERROR, MAX_INPUTS, TICKET,
                   TICKET_REQUEST, MpcError)

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
                 party0_call=None, ticket_call=None, encoder=None) -> None:
        """``party0_call(body) -> body`` and ``ticket_call(request_id) -> ticket``:
        reach party 0 and get party 1's tickets through whoever fronts party 0 (the
        HTTP service); without them, both come from party 0's own link. ``encoder``
        turns a checked batch into the lowered model's input before it is shared
        (``compiler.passes.encode_input``: token ids one-hot encoded)."""
        self.identity = tp.Identity.load(keys_dir, None)
        self.addresses = (party0, party1)
        self.input_shape, self.timeout = tuple(input_shape), timeout
        self.frac_bits = int(frac_bits)
        self._encoder = encoder
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
        if self._encoder is not None:
            xs = self._encoder(xs)
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

