"""Authenticated, encrypted, length-prefixed messages between MPC processes.

Roles (party0, party1, dealer) have static X25519 keys made by ``veil mpc-setup``; each
knows the others' public keys. A link between two roles runs the Noise KK pattern
(Perrin, "The Noise Protocol Framework", rev. 34, Sec. 7.5): both sides send an
ephemeral key, and the session keys come from HKDF-SHA256 over ee, es, se and ss
Diffie-Hellman results and the transcript, so only the two holders of those static keys
can derive them (mutual authentication). A client, which has no static key, runs the NK
pattern instead: it authenticates the party, the party learns nothing about it.
Each direction then has its own AES-256-GCM key with a 64-bit message counter as nonce,
so a replayed, reordered, dropped or altered frame fails to decrypt. AES-GCM rather than
ChaCha20-Poly1305 because the bulk of MPC traffic (the dealer's material, the parties'
openings) is sealed here: with AES-NI/VAES and ``encrypt_into`` a reused buffer, it
seals at ~5 GB/s on this project's machines, where ChaCha20-Poly1305 ``encrypt`` into
fresh memory ran at 0.9 GB/s and dominated the processes' profiles.

Frames on the socket (``backends/sockets.py``): 4-byte big-endian length, then the AEAD
ciphertext. Inside: a version byte, a kind byte, and the payload. Oversized frames are
refused before they are read.
"""
from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..._files import write_private
from ...errors import KeyMaterialError
from ..sockets import LEN, MAX_FRAME, TransportError, recv_buffer, recv_frame, send_frame
from . import tickets

VERSION = 1
ROLES = ("party0", "party1", "dealer")
_PROTOCOL = b"veil/mpc/noise/v1"
_TAG = 16
#: send buffers up to this size are kept for the link's next frame (warm memory seals
#: several times faster than freshly mapped pages); larger frames get their own
_REUSE_MAX = 64 << 20
_COPY_MAX = 1 << 20


def _uninitialised(n: int) -> np.ndarray:
    return np.empty(n, np.uint8)


# -- keys ---------------------------------------------------------------------------------
def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def setup(directory: str | os.PathLike) -> Path:
    """Create one static key per role (private files mode 0600), ``public.json``, and the
    ticket key (``ticket.key``, 0600; see ``tickets.py``) that party 1 and party 0's
    side (party 0, the service) share."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public = {"version": VERSION}
    for role in ROLES:
        key = X25519PrivateKey.generate()
        path = d / f"{role}.key"
        write_private(path, key.private_bytes(serialization.Encoding.Raw,
                                              serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption()))
        public[role] = _raw_public(key.public_key()).hex()
    (d / "public.json").write_text(json.dumps(public, indent=1))
    tickets.write_key(d)
    return d


@dataclass(frozen=True)
class Identity:
    """A role's private key and everyone's public keys; party 0 and party 1 also hold
    the ticket key (``tickets.py``) when their folder has one (party 1 needs it)."""

    role: str
    private: X25519PrivateKey | None
    public: dict[str, bytes]
    ticket_key: bytes | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike, role: str | None) -> "Identity":
        """``role=None`` loads only the public keys (a client)."""
        d = Path(directory)
        try:
            data = json.loads((d / "public.json").read_text())
            public = {r: bytes.fromhex(data[r]) for r in ROLES}
            private = None
            if role is not None:
                if role not in ROLES:
                    raise KeyMaterialError(f"unknown MPC role {role!r}; one of {ROLES}")
                private = X25519PrivateKey.from_private_bytes((d / f"{role}.key").read_bytes())
                if _raw_public(private.public_key()) != public[role]:
                    raise KeyMaterialError(f"{role}.key does not match public.json")
        except (OSError, KeyError, ValueError) as exc:
            raise KeyMaterialError(f"MPC keys in {d} are missing or malformed: {exc}") from exc
        ticket_key = None
        if role in ("party0", "party1") and (d / tickets.TICKET_KEY).exists():
            ticket_key = tickets.load_key(d)
        return cls(role or "client", private, public, ticket_key)


# -- handshake ----------------------------------------------------------------------------
def _hkdf(material: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(hashes.SHA256(), 64, salt=_PROTOCOL, info=transcript).derive(material)
    return okm[:32], okm[32:]


class Link:
    """An established, authenticated session over one socket."""

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes,
                 peer: str) -> None:
        self.sock, self.peer = sock, peer
        self._send, self._recv = AESGCM(send_key), AESGCM(recv_key)
        self._send_n = self._recv_n = 0
        self._plain = self._wire = np.empty(0, np.uint8)     # reused send buffers
        self.bytes_sent = self.bytes_received = 0
        # a party answers one client link from several threads (results, refusals,
        # released orphans): a frame's nonce and its bytes on the socket go together
        self._send_lock = threading.Lock()

    @staticmethod
    def _nonce(n: int) -> bytes:
        return bytes(4) + n.to_bytes(8, "big")

    def send(self, kind: int, payload: bytes) -> None:
        with self._send_lock:
            wire = self._seal(kind, payload)
            send_frame(self.sock, wire[LEN.size:])
            self.bytes_sent += len(wire)

    def exchange(self, kind: int, payload: bytes, limit: int = MAX_FRAME) -> tuple[int, bytes]:
        """Send one frame and receive one, both at once (full duplex, no thread): a round
        costs one trip instead of two, and two large messages cannot deadlock on full
        socket buffers. The socket's timeout bounds the whole exchange."""
        with self._send_lock:
            return self._exchange(kind, payload, limit)

    def _exchange(self, kind: int, payload: bytes, limit: int) -> tuple[int, bytes]:
        out = wire = self._seal(kind, payload)
        timeout = self.sock.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        head, body, got, size = bytearray(), np.empty(0, np.uint8), 0, None
        self.sock.settimeout(0.0)
        try:
            while len(out) or size is None or got < size:
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise TransportError("timed out waiting for the peer")
                readable, writable, _ = select.select([self.sock], [self.sock] if len(out)
                                                      else [], [], wait)
                if writable:
                    out = out[self.sock.send(out[:1 << 22]):]
                if not readable:
                    continue
                if size is None:
                    chunk = self.sock.recv(LEN.size - len(head))
                    if not chunk:
                        raise TransportError("the peer closed the connection")
                    head += chunk
                    if len(head) == LEN.size:
                        (size,) = LEN.unpack(head)
                        if size > limit:
                            raise TransportError(f"frame of {size} bytes exceeds the limit "
                                                 f"of {limit}")
                        body = np.empty(size, np.uint8)
                        view = memoryview(body)
                else:
                    n = self.sock.recv_into(view[got:])
                    if not n:
                        raise TransportError("the peer closed the connection")
                    got += n
        except (BlockingIOError, InterruptedError):
            raise TransportError("link failed: interrupted") from None
        except OSError as exc:
            raise TransportError(f"link failed: {exc}") from None
        finally:
            self.sock.settimeout(timeout)
        self.bytes_sent += len(wire)
        return self._open(body)

    def _buffers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n > _REUSE_MAX:
            return np.empty(2 + n, np.uint8), np.empty(LEN.size + 2 + n + _TAG, np.uint8)
        if self._plain.size < 2 + n:
            size = max(2 + n, 2 * self._plain.size)
            self._plain = np.empty(size, np.uint8)
            self._wire = np.empty(LEN.size + size + _TAG, np.uint8)
        return self._plain, self._wire

    def _seal(self, kind: int, payload) -> memoryview:
        """The frame on the wire (length, then the AEAD of version, kind and payload) as
        a view of this link's send buffer, valid until the next frame (callers hold
        ``_send_lock``). ``payload``: bytes-like, or a tuple of them sent as one
        (copied once, into the buffer)."""
        parts = [memoryview(p).cast("B") for p in
                 (payload if isinstance(payload, tuple) else (payload,))]
        n = sum(len(p) for p in parts)
        plain, wire = self._buffers(n)
        plain[0], plain[1] = VERSION, kind
        at = 2
        for p in parts:
            plain[at:at + len(p)] = np.frombuffer(p, np.uint8)
            at += len(p)
        wire[:LEN.size] = np.frombuffer(LEN.pack(2 + n + _TAG), np.uint8)
        self._send.encrypt_into(self._nonce(self._send_n), memoryview(plain)[:2 + n], None,
                                memoryview(wire)[LEN.size:LEN.size + 2 + n + _TAG])
        self._send_n += 1
        return memoryview(wire)[:LEN.size + 2 + n + _TAG]

    def recv(self, limit: int = MAX_FRAME, idle: bool = False) -> tuple[int, bytes]:
        return self._open(recv_buffer(self.sock, limit, idle, _uninitialised))

    def _open(self, frame: bytes) -> tuple[int, bytes]:
        self.bytes_received += len(frame) + LEN.size
        if len(frame) < _TAG:
            raise TransportError(f"a message from {self.peer} is too short to be a frame")
        plain = np.empty(len(frame) - _TAG, np.uint8)
        try:
            self._recv.decrypt_into(self._nonce(self._recv_n), frame, None, plain)
        except InvalidTag:
            raise TransportError(f"a message from {self.peer} failed authentication "
                                 "(tampered, replayed or out of order)") from None
        self._recv_n += 1
        if len(plain) < 2 or plain[0] != VERSION:
            raise TransportError(f"{self.peer} speaks another protocol version")
        body = memoryview(plain)[2:]
        # control messages as bytes (a copy of little); bulk payloads (arrays) as a view
        return int(plain[1]), bytes(body) if len(body) <= _COPY_MAX else body

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _keys_from(material: bytes, transcript: bytes, initiator: bool) -> tuple[bytes, bytes]:
    k1, k2 = _hkdf(material, transcript)
    return (k1, k2) if initiator else (k2, k1)


def connect(sock: socket.socket, me: Identity, peer_role: str) -> Link:
    """Initiator side. Roles use KK (mutual); a client (no private key) uses NK."""
    peer_static = X25519PublicKey.from_public_bytes(me.public[peer_role])
    e = X25519PrivateKey.generate()
    hello = json.dumps({"from": me.role, "to": peer_role}).encode()
    send_frame(sock, _raw_public(e.public_key()) + hello)
    reply = recv_frame(sock, 1024)
    if len(reply) != 32:
        raise TransportError(f"{peer_role} sent a malformed handshake")
    re = X25519PublicKey.from_public_bytes(reply)
    material = e.exchange(re) + e.exchange(peer_static)
    if me.private is not None:
        material += me.private.exchange(re) + me.private.exchange(peer_static)
    transcript = _raw_public(e.public_key()) + hello + reply
    send_key, recv_key = _keys_from(material, transcript, True)
    link = Link(sock, send_key, recv_key, peer_role)
    link.send(0, b"confirm")           # the first frame proves both sides hold the keys
    kind, body = link.recv(1024)
    if (kind, body) != (0, b"confirm"):
        raise TransportError(f"{peer_role} did not confirm the handshake")
    return link


def accept(sock: socket.socket, me: Identity, allowed: tuple[str, ...]) -> Link:
    """Responder side: accepts the roles in ``allowed`` ("client" for clients)."""
    first = recv_frame(sock, 1024)
    if len(first) < 33:
        raise TransportError("malformed handshake")
    try:
        hello = json.loads(first[32:].decode())
        peer_role = hello["from"]
    except (ValueError, KeyError, UnicodeDecodeError):
        raise TransportError("malformed handshake") from None
    if peer_role not in allowed or hello.get("to") != me.role:
        raise TransportError(f"refused a connection from {peer_role!r}")
    ie = X25519PublicKey.from_public_bytes(first[:32])
    e = X25519PrivateKey.generate()
    send_frame(sock, _raw_public(e.public_key()))
    material = e.exchange(ie) + me.private.exchange(ie)
    if peer_role != "client":
        peer_static = X25519PublicKey.from_public_bytes(me.public[peer_role])
        material += e.exchange(peer_static) + me.private.exchange(peer_static)
    transcript = first + _raw_public(e.public_key())
    send_key, recv_key = _keys_from(material, transcript, False)
    link = Link(sock, send_key, recv_key, peer_role)
    kind, body = link.recv(1024)
    if (kind, body) != (0, b"confirm"):
        raise TransportError(f"{peer_role} did not confirm the handshake")
    link.send(0, b"confirm")
    return link
