"""The MPC processes: two parties, a dealer, and the client library.

- Dealer (:class:`Dealer`): accepts party0 and party1 (mutually authenticated links). A
  party asks for material by (session, sequence number, layer, step, chunk); the first
  request of a pair generates both halves from fresh CSPRNG output (party 0's circuit
  material as a seed) and keeps the other half until its party fetches it; each is
  served once, in order, never again. It never sees inputs or outputs.
- Parties (:class:`Party`): party0 connects to party1 and to the dealer, party1 to the
  dealer; both accept clients. For small models each keeps ``PREFETCH`` single-input
  material sets and two for a batch of 64 (both configurable, within ``POOL_LIMIT``
  bytes), fetched in the same order by both (the offline phase, ahead of requests);
  otherwise, and for other batch sizes, the run streams its material from the dealer
  layer by layer, one layer ahead. A model over the memory budget is refused at start
  (``ModelTooLargeError``), a batch over it per request. Party0 orders the requests:
  for each, it tells party1 the request id, the sequence number and which prefetched
  set to use; both run the model on their shares (online phase, over the peer link)
  and return their output share to the client. Any failure (peer or dealer gone,
  timeout, malformed message) fails that request with an error to the client, resets
  the links, and the party serves the next; while a link is being rebuilt, party 0
  refuses new requests at once, naming the role it cannot reach (``"unavailable":
  "party1"`` or ``"dealer"`` in the error), and a dealer that dies ends the session at
  once (no request waits for material that will not come).
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

The code is split by role: ``wire`` (message kinds, limits, the model file, a client
request's checked form), ``dealer``, ``party`` and ``client``; this module keeps every
public name importable from where it always was.
"""
from __future__ import annotations

from .client import MpcAnswer, MpcClient, MpcResult, MpcShares, _closed
from .dealer import Dealer
from .party import Party, _PeerChannel, _Request
from .wire import (CLIENT_REQUEST, input_contract, max_request_batch, CLIENT_RESULT, DEFAULT_TIMEOUT, ERROR, LINK_GRACE_S,
                   MATERIAL, MATERIAL_REQUEST, MAX_CLIENT_BYTES, MAX_INPUTS, MAX_PENDING,
                   MAX_PER_CLIENT, MODEL_FILE, ORPHAN_S, PEER_BEGIN, PEER_DATA, PEER_HAVE,
                   PEER_HELLO, PEER_QUERY, PEER_READY, PREFETCH, QUERY_INTERVAL_S, QUERY_MAX,
                   STALE_TIMEOUTS, SWEEP_S, TICKET, TICKET_REQUEST, MpcError, _Unreachable,
                   load_model, read_client_request, save_model)

__all__ = ["CLIENT_REQUEST", "CLIENT_RESULT", "DEFAULT_TIMEOUT", "ERROR", "LINK_GRACE_S",
           "MATERIAL", "MATERIAL_REQUEST", "MAX_CLIENT_BYTES", "MAX_INPUTS", "MAX_PENDING",
           "MAX_PER_CLIENT", "MODEL_FILE", "ORPHAN_S", "PEER_BEGIN", "PEER_DATA", "PEER_HAVE",
           "PEER_HELLO", "PEER_QUERY", "PEER_READY", "PREFETCH", "QUERY_INTERVAL_S",
           "QUERY_MAX", "STALE_TIMEOUTS", "SWEEP_S", "TICKET", "TICKET_REQUEST", "Dealer",
           "MpcAnswer", "MpcClient", "MpcError", "MpcResult", "MpcShares", "Party",
           "input_contract", "load_model", "max_request_batch", "read_client_request",
           "save_model"]
