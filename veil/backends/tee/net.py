"""Messages between TEE clients, the enclave and the key-release service.

Plain length-prefixed frames (``backends/sockets.py``): a 4-byte big-endian length
checked against a limit before reading, then a version byte, a kind byte and the
payload. No transport encryption: everything that matters inside is
HPKE-sealed or signed, and the host that relays these frames is untrusted anyway.

Refusals travel as ``ERROR`` frames with a code and a message; codes map back to the
typed errors of ``veil.errors`` on the receiving side. A refusal in the clear never
describes plaintext: errors found after decryption are sealed into the response.
"""
from __future__ import annotations

import json
import socket

import numpy as np

from ...errors import (AttestationError, DecryptionError, EvidenceExpiredError, InputError,
                       KeyReleaseError, PolicyError, ReplayError, SerializationError,
                       SessionError, TEEError)
from ..inputs import check_batch
from ..sockets import TransportError, json_object, recv_buffer, send_frame

VERSION = 1
EVIDENCE_REQUEST, EVIDENCE, REQUEST, RESULT, ERROR, STATUS_REQUEST, STATUS = range(1, 8)
PLAIN_REQUEST, PLAIN_RESULT = 8, 9
OPEN, OPENED = 10, 11
CLOSE, CLOSED = 12, 13          # the host drops a channel (its client's cap, see service)
KR_HELLO, KR_NONCE, KR_EVIDENCE, KR_KEY = 16, 17, 18, 19

MAX_BATCH = 4096
MAX_MESSAGE = 64 << 20
# most specific first: the first class an error is an instance of gives its code
_CODES = (("expired", EvidenceExpiredError), ("policy", PolicyError),
          ("attestation", AttestationError), ("sealed", DecryptionError),
          ("replay", ReplayError), ("session", SessionError),
          ("key-release", KeyReleaseError), ("input", InputError),
          ("malformed", SerializationError), ("transport", TransportError),
          ("refused", TEEError))


def send(sock: socket.socket, kind: int, *payload) -> None:
    """One message whose body is the concatenation of ``payload`` (sent without joining)."""
    send_frame(sock, bytes([VERSION, kind]), *payload)


def recv(sock: socket.socket, limit: int = MAX_MESSAGE,
         idle: bool = False) -> tuple[int, bytearray]:
    """One message; ``idle`` waits as long as needed for it to start. The body is the
    receive buffer itself (dropping its first bytes moves no data)."""
    frame = recv_buffer(sock, limit, idle)
    if len(frame) < 2 or frame[0] != VERSION:
        raise TransportError("the peer speaks another TEE protocol version")
    kind = frame[1]
    del frame[:2]
    return kind, frame


def error_body(exc: Exception) -> bytes:
    code = next((c for c, cls in _CODES if isinstance(exc, cls)), "refused")
    return json.dumps({"code": code, "error": str(exc)}).encode()


def raise_error(body: bytes) -> None:
    """Raise the typed error an ``ERROR`` body describes."""
    msg = json_object(body)
    cls = dict(_CODES).get(msg.get("code"), TEEError)
    raise cls(str(msg.get("error", "refused")))


def expect(kind: int, body: bytes, wanted: int) -> bytes:
    """``body`` if the message is of kind ``wanted``; the typed error for ``ERROR``."""
    if kind == ERROR:
        raise_error(body)
    if kind != wanted:
        raise TransportError(f"unexpected message kind {kind} (expected {wanted})")
    return body


def check_inputs(xs, input_shape: tuple[int, ...], max_batch: int | None = MAX_BATCH) -> np.ndarray:
    """:func:`~veil.backends.inputs.check_batch` with the TEE's largest batch."""
    return check_batch(xs, input_shape, max_batch)


def call(sock: socket.socket, kind: int, payload: bytes, wanted: int) -> bytes:
    """Send one message and return the answer's body (typed error on ``ERROR``)."""
    send(sock, kind, payload)
    reply_kind, body = recv(sock)
    return expect(reply_kind, body, wanted)

