"""HPKE sealing of requests and responses (RFC 9180 through ``cryptography``).

Suites (mode base, one-shot ``Suite.encrypt`` / ``decrypt``):

- ``x25519`` (default): DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM;
- ``mlkem768-x25519``: the ML-KEM-768 + X25519 hybrid KEM (post-quantum), same KDF/AEAD.

A request is ``header || HPKE(pk, response_secret || body, info = LABEL || header)``:
the header (channel id, sequence number, suite) travels in the clear so the enclave can
refuse replays before decrypting, and it is bound to the ciphertext through ``info``
(changing any byte of it makes decryption fail).

Response key. RFC 9180 derives response keys with the context's ``Export`` (as Oblivious
HTTP does, RFC 9458 Sec. 4.4), but ``cryptography``'s one-shot HPKE API exposes no
context, so no exporter. The equivalent here: the client puts a fresh 32-byte
``response_secret`` (from ``secrets``) inside the sealed request; only the holder of the
attested private key can read it. The enclave picks a random 32-byte response nonce and
derives ``key || nonce = HKDF-SHA256(ikm=response_secret, salt=enc || response_nonce,
info=RESPONSE_LABEL)`` (44 bytes), then AES-256-GCM-seals the answer with the request
header as associated data. As with an exported secret, the key is known only to this
client and this enclave, is fresh per request (new secret) and per response (new nonce),
and binds the answer to the request (``enc`` and the header), so a response cannot be
replayed onto another request.

Every failure to open a sealed message raises one :class:`DecryptionError` with the same
text; the reason is logged at debug level only.
"""
from __future__ import annotations

import json
import logging
import secrets
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ...errors import DecryptionError, ReplayError, SerializationError

log = logging.getLogger("veil.tee")

SUITES = {
    "x25519": hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    "mlkem768-x25519": hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256,
                                  hpke.AEAD.AES_256_GCM),
}
_ENC_LEN = {"x25519": hpke.KEM.X25519.enc_length(),
            "mlkem768-x25519": hpke.KEM.MLKEM768_X25519.enc_length()}
DEFAULT_SUITE = "x25519"
REQUEST_LABEL = b"veil/tee/request/v1\x00"
RESPONSE_LABEL = b"veil/tee/response/v1"
SECRET_LEN = 32
_OPAQUE = "the sealed message could not be opened"
_HEAD = struct.Struct(">H")
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _suite(name: str) -> hpke.Suite:
    try:
        return SUITES[name]
    except (KeyError, TypeError):
        raise SerializationError(f"unknown HPKE suite {name!r}; one of "
                                 f"{', '.join(SUITES)}") from None


class EnclaveKeys:
    """The enclave's HPKE private keys, one per suite, made at start in memory.

    There is deliberately no way to serialize them: they live and die with the process.
    """

    def __init__(self) -> None:
        x = x25519.X25519PrivateKey.generate()
        m, hx = mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
        self._private = {"x25519": x, "mlkem768-x25519": hpke.MLKEM768X25519PrivateKey(m, hx)}
        # the hybrid public key has no byte encoding of its own: ML-KEM key || X25519 key
        self.public = {
            "x25519": x.public_key().public_bytes(*_RAW),
            "mlkem768-x25519": (m.public_key().public_bytes(*_RAW)
                                + hx.public_key().public_bytes(*_RAW)),
        }

    def __repr__(self) -> str:
        return "EnclaveKeys(<private keys in process memory only>)"

    def open(self, suite: str, sealed: bytes, info: bytes) -> bytes:
        """HPKE-open ``sealed``; any failure is the one opaque :class:`DecryptionError`."""
        try:
            return _suite(suite).decrypt(sealed, self._private[suite], info=info)
        except (InvalidTag, ValueError, TypeError, KeyError, SerializationError) as exc:
            log.debug("open failed: %r", exc)
            raise DecryptionError(_OPAQUE) from None


def public_key(suite: str, raw: bytes):
    """The HPKE public key object of ``suite`` from its bytes in the evidence."""
    _suite(suite)
    try:
        if suite == "x25519":
            return x25519.X25519PublicKey.from_public_bytes(raw)
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(raw[:-32]),
            x25519.X25519PublicKey.from_public_bytes(raw[-32:]))
    except ValueError as exc:
        raise SerializationError(f"malformed {suite} public key: {exc}") from None


def seal(suite: str, key, plaintext: bytes, info: bytes) -> bytes:
    """HPKE base-mode seal to ``key`` (from :func:`public_key`): ``enc || ciphertext``."""
    return _suite(suite).encrypt(plaintext, key, info=info)


# -- requests and responses ---------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    """The clear part of a sealed request: which channel, which sequence number."""

    channel: bytes
    seq: int
    suite: str

    def encode(self) -> bytes:
        return json.dumps({"channel": self.channel.hex(), "seq": self.seq,
                           "suite": self.suite}, sort_keys=True,
                          separators=(",", ":")).encode()


def seal_request(header: Header, key, body: bytes) -> tuple[bytes, bytes]:
    """Client: (wire bytes, response secret) for ``body`` sealed under ``header``."""
    secret = secrets.token_bytes(SECRET_LEN)
    head = header.encode()
    sealed = seal(header.suite, key, secret + body, REQUEST_LABEL + head)
    return _HEAD.pack(len(head)) + head + sealed, secret


def read_header(message: bytes) -> tuple[Header, bytes, bytes]:
    """Enclave: (header, its raw bytes, sealed part) of a request, without decrypting."""
    try:
        (n,) = _HEAD.unpack_from(message)
        raw = bytes(message[2:2 + n])
        data = json.loads(raw.decode())
        header = Header(bytes.fromhex(data["channel"]), int(data["seq"]), str(data["suite"]))
        _suite(header.suite)
        if raw != header.encode() or header.seq < 1:
            raise ValueError("non-canonical header")
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError,
            AttributeError) as exc:
        raise SerializationError(f"malformed sealed request header: {exc}") from None
    return header, raw, bytes(message[2 + n:])


def open_request(keys: EnclaveKeys, header: Header, raw_header: bytes,
                 sealed: bytes) -> tuple[bytes, bytes]:
    """Enclave: (response secret, body); raises the opaque :class:`DecryptionError`."""
    plain = keys.open(header.suite, sealed, REQUEST_LABEL + raw_header)
    if len(plain) < SECRET_LEN:
        raise DecryptionError(_OPAQUE)
    return plain[:SECRET_LEN], plain[SECRET_LEN:]


def _response_aead(secret: bytes, enc: bytes, response_nonce: bytes) -> tuple[AESGCM, bytes]:
    okm = HKDF(hashes.SHA256(), 44, salt=enc + response_nonce,
               info=RESPONSE_LABEL).derive(secret)
    return AESGCM(okm[:32]), okm[32:]


def seal_response(secret: bytes, header: Header, raw_header: bytes, sealed_request: bytes,
                  body: bytes) -> bytes:
    """Enclave: ``response_nonce || AES-256-GCM(body, aad=header)`` under the derived key."""
    response_nonce = secrets.token_bytes(32)
    aead, nonce = _response_aead(secret, sealed_request[:_ENC_LEN[header.suite]],
                                 response_nonce)
    return response_nonce + aead.encrypt(nonce, body, raw_header)


def open_response(secret: bytes, request: bytes, message: bytes) -> bytes:
    """Client: open the enclave's answer to ``request`` (the wire bytes it sent)."""
    header, raw, sealed = read_header(request)
    try:
        aead, nonce = _response_aead(secret, sealed[:_ENC_LEN[header.suite]], message[:32])
        return aead.decrypt(nonce, message[32:], raw)
    except (InvalidTag, ValueError) as exc:
        log.debug("response open failed: %r", exc)
        raise DecryptionError(_OPAQUE) from None


# -- replay -------------------------------------------------------------------------------
class ReplayWindow:
    """Sequence numbers seen on one channel (the sliding window of RFC 4303 Sec. 3.4.3).

    A number is accepted once, if it is above ``highest - size``; numbers may arrive out
    of order within the window (concurrent requests on one channel).
    """

    def __init__(self, size: int = 1024) -> None:
        self.size, self.highest = size, 0
        self._seen: set[int] = set()

    def check(self, seq: int) -> None:
        """Raise :class:`ReplayError` if ``seq`` was used or is below the window."""
        if seq <= self.highest - self.size or seq in self._seen:
            raise ReplayError(f"sequence number {seq} was already used on this channel "
                              "(replayed request)")

    def commit(self, seq: int) -> None:
        """Check and record ``seq`` (callers hold the channel's lock)."""
        self.check(seq)
        self._seen.add(seq)
        if seq > self.highest:
            self.highest = seq
            if len(self._seen) > 2 * self.size:       # prune now and then, not per request
                self._seen = {s for s in self._seen if s > seq - self.size}
