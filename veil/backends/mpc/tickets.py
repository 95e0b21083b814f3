"""Tickets: party 1 takes a client's share only for a request someone authorized.

Party 1 has no API keys and cannot tell clients apart on its own: without tickets,
anyone with the deployment's ``public.json`` could fill its table of pending shares.
So each share carries a ticket, ``HMAC-SHA256`` under a key that ``veil mpc-setup``
writes as ``ticket.key`` (0600) next to the role keys, over the request id, the
client's tag and an expiry. The HTTP service (the front of party 0) issues tickets to
its authenticated clients (``POST /v1/models/{name}/mpc/ticket``), party 0 to clients
that reach it directly; party 1 verifies them and bounds its pending shares per client
tag. The key is shared by party 0's side (party 0, the service) and party 1; the dealer
never needs it.

Wire form (57 bytes): version (1), expiry (big-endian uint64, Unix seconds), client tag
(16 bytes), MAC (32 bytes). A ticket names a request id; it is not a secret (it rides
inside the client's encrypted link) and proves only that party 0's side let this
client make this request.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import time
from pathlib import Path

from ..._files import write_private
from ...errors import KeyMaterialError, TicketError

TICKET_KEY = "ticket.key"
TICKET_TTL_S = 60
TICKET_LEN = 57
VERSION = 1
_LABEL = b"veil/mpc/ticket/v1"
_HEAD = struct.Struct(">BQ16s")


def write_key(directory: str | os.PathLike) -> Path:
    """Create ``ticket.key`` (32 CSPRNG bytes, mode 0600) in ``directory``."""
    path = Path(directory) / TICKET_KEY
    write_private(path, secrets.token_bytes(32))
    return path


def load_key(directory: str | os.PathLike) -> bytes:
    path = Path(directory) / TICKET_KEY
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise KeyMaterialError(f"no MPC ticket key at {path} ({exc.strerror}): "
                               "`veil mpc-setup DIR` writes one") from None
    if len(key) != 32:
        raise KeyMaterialError(f"{path} is not a 32-byte ticket key")
    return key


def client_tag(client: str) -> bytes:
    """16 bytes that name a client to party 1 (its API key id, hashed)."""
    return hashlib.sha256(b"veil/mpc/client\0" + client.encode()).digest()[:16]


def _mac(key: bytes, head: bytes, request_id: bytes) -> bytes:
    return hmac.new(key, _LABEL + head + bytes(request_id), hashlib.sha256).digest()


def issue(key: bytes, request_id: bytes, client: str, ttl: float = TICKET_TTL_S,
          now: float | None = None) -> bytes:
    """A ticket for request ``request_id`` (16 bytes) of ``client``."""
    if len(request_id) != 16:
        raise TicketError("a request id is 16 bytes")
    expires = int((time.time() if now is None else now) + ttl)
    head = _HEAD.pack(VERSION, expires, client_tag(client))
    return head + _mac(key, head, request_id)


def verify(key: bytes, ticket: bytes, request_id: bytes, now: float | None = None) -> bytes:
    """The client tag of a valid ticket for ``request_id``; TicketError otherwise."""
    ticket = bytes(ticket)
    if len(ticket) != TICKET_LEN:
        raise TicketError("this party takes shares only with a ticket from the service "
                          "(POST /v1/models/{name}/mpc/ticket)")
    head, mac = ticket[:_HEAD.size], ticket[_HEAD.size:]
    version, expires, tag = _HEAD.unpack(head)
    if version != VERSION or not hmac.compare_digest(mac, _mac(key, head, request_id)):
        raise TicketError("the ticket is not valid for this request")
    if expires < (time.time() if now is None else now):
        raise TicketError("the ticket has expired: ask for a fresh one")
    return tag
