"""Authenticated, encrypted, length-prefixed messages between MPC processes.

Roles (party0, party1, dealer) have static X25519 keys made by ``veil mpc-setup``; each
knows the others' public keys. A link between two roles runs the Noise KK pattern
(Perrin, "The Noise Protocol Framework", rev. 34, Sec. 7.5): both sides send an
ephemeral key, and the session keys come from HKDF-SHA256 over ee, es, se and ss
Diffie-Hellman results and the transcript, so only the two holders of those static keys
can derive them (mutual authentication). A client, which has no static key, runs the NK
pattern instead: it authenticates the party, the party learns nothing about it.
Each direction then has its own ChaCha20-Poly1305 key with a 64-bit message counter as
nonce, so a replayed, reordered, dropped or altered frame fails to decrypt.

Frames on the socket: 4-byte big-endian length, then the AEAD ciphertext. Inside: a
version byte, a kind byte, and the payload; arrays travel as dtype, shape and raw bytes
(never pickles). Oversized frames are refused before they are read.
"""
from __future__ import annotations

import json
import os
import select
import socket
import time
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ...errors import KeyMaterialError, SerializationError, VeilError

VERSION = 1
ROLES = ("party0", "party1", "dealer")
MAX_FRAME = 1 << 30          # 1 GiB: far above any message veil sends
_PROTOCOL = b"veil/mpc/noise/v1"
_LEN = struct.Struct(">I")


class TransportError(VeilError):
    """The link failed: peer gone, timed out, or sent something that did not authenticate."""


# -- keys ---------------------------------------------------------------------------------
def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def setup(directory: str | os.PathLike) -> Path:
    """Create one static key per role (private files mode 0600) and ``public.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public = {"version": VERSION}
    for role in ROLES:
        key = X25519PrivateKey.generate()
        path = d / f"{role}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.Raw,
                                       serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption()))
        public[role] = _raw_public(key.public_key()).hex()
    (d / "public.json").write_text(json.dumps(public, indent=1))
    return d


@dataclass(frozen=True)
class Identity:
    """A role's private key and everyone's public keys."""

    role: str
    private: X25519PrivateKey | None
    public: dict[str, bytes]

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
        return cls(role or "client", private, public)


# -- handshake ----------------------------------------------------------------------------
def _hkdf(material: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(hashes.SHA256(), 64, salt=_PROTOCOL, info=transcript).derive(material)
    return okm[:32], okm[32:]


def _send_raw(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except socket.timeout:
            raise TransportError("timed out waiting for the peer") from None
        except OSError as exc:
            raise TransportError(f"link failed: {exc}") from None
        if not chunk:
            raise TransportError("the peer closed the connection")
        buf += chunk
    return bytes(buf)


def _recv_raw(sock: socket.socket, limit: int = MAX_FRAME, idle: bool = False) -> bytes:
    """One frame. With ``idle``, wait as long as it takes for a frame to start, but
    once it has, the socket's timeout applies to the rest: a peer that sends half a
    frame (or a corrupted length) cannot hold the reader forever."""
    if idle:
        timeout = sock.gettimeout()
        sock.settimeout(None)
        try:
            first = _recv_exact(sock, 1)
        finally:
            sock.settimeout(timeout)
        head = first + _recv_exact(sock, _LEN.size - 1)
    else:
        head = _recv_exact(sock, _LEN.size)
    (n,) = _LEN.unpack(head)
    if n > limit:
        raise TransportError(f"frame of {n} bytes exceeds the limit of {limit}")
    return _recv_exact(sock, n)


class Link:
    """An established, authenticated session over one socket."""

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes,
                 peer: str) -> None:
        self.sock, self.peer = sock, peer
        self._send, self._recv = ChaCha20Poly1305(send_key), ChaCha20Poly1305(recv_key)
        self._send_n = self._recv_n = 0
        self.bytes_sent = self.bytes_received = 0

    @staticmethod
    def _nonce(n: int) -> bytes:
        return bytes(4) + n.to_bytes(8, "big")

    def send(self, kind: int, payload: bytes) -> None:
        frame = self._seal(kind, payload)
        _send_raw(self.sock, frame)
        self.bytes_sent += len(frame) + _LEN.size

    def exchange(self, kind: int, payload: bytes, limit: int = MAX_FRAME) -> tuple[int, bytes]:
        """Send one frame and receive one, both at once (full duplex, no thread): a round
        costs one trip instead of two, and two large messages cannot deadlock on full
        socket buffers. The socket's timeout bounds the whole exchange."""
        frame = self._seal(kind, payload)
        out = memoryview(_LEN.pack(len(frame)) + frame)
        timeout = self.sock.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        head, body, got, size = bytearray(), bytearray(), 0, None
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
                    chunk = self.sock.recv(_LEN.size - len(head))
                    if not chunk:
                        raise TransportError("the peer closed the connection")
                    head += chunk
                    if len(head) == _LEN.size:
                        (size,) = _LEN.unpack(head)
                        if size > limit:
                            raise TransportError(f"frame of {size} bytes exceeds the limit "
                                                 f"of {limit}")
                        body = bytearray(size)
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
        self.bytes_sent += len(frame) + _LEN.size
        return self._open(body)

    def _seal(self, kind: int, payload: bytes) -> bytes:
        frame = self._send.encrypt(self._nonce(self._send_n), bytes([VERSION, kind]) + payload,
                                   None)
        self._send_n += 1
        return frame

    def recv(self, limit: int = MAX_FRAME, idle: bool = False) -> tuple[int, bytes]:
        return self._open(_recv_raw(self.sock, limit, idle))

    def _open(self, frame: bytes) -> tuple[int, bytes]:
        self.bytes_received += len(frame) + _LEN.size
        try:
            plain = self._recv.decrypt(self._nonce(self._recv_n), frame, None)
        except InvalidTag:
            raise TransportError(f"a message from {self.peer} failed authentication "
                                 "(tampered, replayed or out of order)") from None
        self._recv_n += 1
        if len(plain) < 2 or plain[0] != VERSION:
            raise TransportError(f"{self.peer} speaks another protocol version")
        return plain[1], plain[2:]

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
    _send_raw(sock, _raw_public(e.public_key()) + hello)
    reply = _recv_raw(sock, 1024)
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
    first = _recv_raw(sock, 1024)
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
    _send_raw(sock, _raw_public(e.public_key()))
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


# -- arrays -------------------------------------------------------------------------------
_DTYPES = {"u8": np.dtype("<u8"), "u1": np.dtype("u1"), "f8": np.dtype("<f8")}


def pack_array(a: np.ndarray) -> bytes:
    code = next((k for k, v in _DTYPES.items() if v == a.dtype.newbyteorder("<")
                 or v == a.dtype), None)
    if code is None:
        raise SerializationError(f"arrays of {a.dtype} do not travel between parties")
    head = json.dumps({"dtype": code, "shape": list(a.shape)}).encode()
    return _LEN.pack(len(head)) + head + np.ascontiguousarray(a, _DTYPES[code]).tobytes()


def unpack_array(data: bytes) -> np.ndarray:
    try:
        (n,) = _LEN.unpack(data[:4])
        head = json.loads(data[4:4 + n].decode())
        dtype, shape = _DTYPES[head["dtype"]], tuple(int(s) for s in head["shape"])
        body = data[4 + n:]
        if any(s < 0 for s in shape) or len(body) != dtype.itemsize * int(np.prod(shape)):
            raise ValueError("size mismatch")
        # a read-only view when the wire order is the machine's (no copy of big messages)
        return np.frombuffer(body, dtype=dtype).reshape(shape).astype(
            dtype.newbyteorder("="), copy=False)
    except (ValueError, KeyError, UnicodeDecodeError, struct.error) as exc:
        raise SerializationError(f"malformed array message: {exc}") from None


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays as one message (a JSON index, then each array's bytes)."""
    parts = {k: pack_array(np.asarray(v)) for k, v in arrays.items()}
    index = json.dumps({k: len(v) for k, v in parts.items()}).encode()
    return _LEN.pack(len(index)) + index + b"".join(parts.values())


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    try:
        (n,) = _LEN.unpack(data[:4])
        index = json.loads(data[4:4 + n].decode())
        out, at = {}, 4 + n
        for key, size in index.items():
            out[str(key)] = unpack_array(data[at:at + int(size)])
            at += int(size)
        if at != len(data):
            raise ValueError("trailing bytes")
        return out
    except (ValueError, AttributeError, UnicodeDecodeError, struct.error) as exc:
        raise SerializationError(f"malformed message: {exc}") from None
