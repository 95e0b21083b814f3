"""HPKE sealing of requests and responses (RFC 9180 through ``cryptography``).

Suites (mode base, one-shot ``Suite.encrypt`` / ``decrypt``):

- ``x25519`` (default): DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM;
- ``mlkem768-x25519``: the ML-KEM-768 + X25519 hybrid KEM (post-quantum), same KDF/AEAD.

Channels. ``cryptography``'s HPKE is one-shot: ``Suite.encrypt`` / ``decrypt`` with no
context object, so neither RFC 9180's sequence-numbered context (Sec. 5.2) nor its
secret export (Sec. 5.3) is available. The equivalent built here:

1. The client (after verifying the evidence) sends one keying message: header
   (channel id, ``seq`` 0, suite) in the clear, then HPKE-seal of a fresh 32-byte
   channel secret (from ``secrets``) to the attested key, ``info = OPEN_LABEL || header``.
   Only the holder of the attested private key can read the secret; the header is bound
   through ``info`` (changing a byte makes decryption fail).
2. Both sides derive the channel's context with HKDF-SHA256 (ikm: the secret; salt: the
   HPKE ``enc``; info: a label and the keying header): an AES-256-GCM key and a 12-byte
   base nonce per direction (:class:`ChannelKeys`).
3. Request ``seq`` (1, 2, ...) is sealed with the client-to-enclave key and nonce
   ``base XOR seq`` (the HPKE context's nonce rule), with its clear header
   (channel id, ``seq``, suite) as associated data; its response with the
   enclave-to-client key (the "exported" response key) under the same ``seq``. A
   response therefore opens only as the answer to its own request.

Soundness: the secret is uniformly random and confidential under HPKE's IND-CCA2
security, exactly the role of the context's key-schedule secret; keys and nonces are
never reused because the client never repeats a ``seq`` and the enclave accepts each
``seq`` once (:class:`ReplayWindow`) and answers only accepted ones. Per request this
costs two AES-GCM operations per side instead of an HPKE encapsulation and
decapsulation (``bench/results/tee_digits.md``).

Every failure to open a sealed message raises one :class:`DecryptionError` with the same
text; the reason is logged at debug level only.
"""
from __future__ import annotations

import logging
import secrets
import struct
from typing import NamedTuple

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
OPEN_LABEL = b"veil/tee/channel/v1\x00"
CONTEXT_LABEL = b"veil/tee/context/v1\x00"
SECRET_LEN = 32
_OPAQUE = "the sealed message could not be opened"
_HEADER = struct.Struct(">16sQB")
HEADER_LEN = _HEADER.size
_TAG = 16                       # AES-GCM tag bytes
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


# -- channels -----------------------------------------------------------------------------
_SUITE_IDS = {name: i for i, name in enumerate(SUITES, start=1)}
_SUITE_NAMES = {i: name for name, i in _SUITE_IDS.items()}


class Header(NamedTuple):
    """The clear part of a message on a channel: which channel, which sequence number
    (0 for the message that keys the channel), and the suite that keyed it. On the wire:
    16-byte channel id, 8-byte big-endian sequence number, 1-byte suite id."""

    channel: bytes
    seq: int
    suite: str

    def encode(self) -> bytes:
        return _HEADER.pack(self.channel, self.seq, _SUITE_IDS[self.suite])


def header_seq(raw: bytes) -> int:
    """The sequence number in a message's raw clear header."""
    return _HEADER.unpack_from(raw)[1]


def read_header(message) -> tuple[Header, bytes, memoryview]:
    """(header, its raw bytes, a view of the sealed rest) of a message (bytes-like),
    without decrypting or copying."""
    try:
        channel, seq, suite = _HEADER.unpack_from(message)
        header = Header(channel, seq, _SUITE_NAMES[suite])
    except (struct.error, KeyError, TypeError) as exc:
        raise SerializationError(f"malformed sealed message header: {exc!r}") from None
    if seq >= 2 ** 63:
        raise SerializationError("sequence number out of range")
    raw = bytes(message[:_HEADER.size])
    return header, raw, memoryview(message)[_HEADER.size:]


class ChannelKeys:
    """Both directions' AES-256-GCM keys and base nonces of one channel.

    Derived with HKDF-SHA256 from the 32-byte channel secret (salt: the HPKE ``enc``;
    info: a label and the keying header); the nonce of message ``seq`` is the base nonce
    XOR ``seq``, as in an HPKE context (RFC 9180 Sec. 5.2). A message's clear header
    (its raw bytes) is the associated data.
    """

    def __init__(self, secret: bytes, enc: bytes, raw_header: bytes) -> None:
        okm = HKDF(hashes.SHA256(), 88, salt=enc,
                   info=CONTEXT_LABEL + raw_header).derive(secret)
        self._aead = {True: (AESGCM(okm[:32]), int.from_bytes(okm[32:44], "big")),
                      False: (AESGCM(okm[44:76]), int.from_bytes(okm[76:], "big"))}

    def _cipher(self, up: bool, seq: int) -> tuple[AESGCM, bytes]:
        """Direction ``up``'s AEAD and the nonce of its message ``seq``."""
        aead, base = self._aead[up]
        return aead, (base ^ seq).to_bytes(12, "big")

    def encrypt(self, up: bool, seq: int, raw: bytes, body) -> bytes:
        """AES-GCM of ``body`` (ciphertext and tag) as message ``seq`` of direction ``up``
        (client to enclave), bound to the clear header ``raw``."""
        aead, nonce = self._cipher(up, seq)
        return aead.encrypt(nonce, body, raw)

    def decrypt(self, up: bool, seq: int, raw: bytes, sealed) -> bytes:
        """The inverse of :meth:`encrypt`; the one opaque error on any failure."""
        aead, nonce = self._cipher(up, seq)
        try:
            return aead.decrypt(nonce, sealed, raw)
        except (InvalidTag, ValueError) as exc:
            log.debug("open failed: %r", exc)
            raise DecryptionError(_OPAQUE) from None

    def seal(self, up: bool, seq: int, raw: bytes, body) -> bytearray:
        """The whole message ``raw || encrypt(...)``, encrypted into one buffer."""
        aead, nonce = self._cipher(up, seq)
        out = bytearray(len(raw) + len(body) + _TAG)
        out[:len(raw)] = raw
        aead.encrypt_into(nonce, body, raw, memoryview(out)[len(raw):])
        return out


def open_channel(header: Header, key) -> tuple[bytes, ChannelKeys]:
    """Client: the keying message (HPKE-sealed channel secret) and the channel's keys."""
    secret = secrets.token_bytes(SECRET_LEN)
    raw = header.encode()
    sealed = seal(header.suite, key, secret, OPEN_LABEL + raw)
    return raw + sealed, ChannelKeys(secret, sealed[:_ENC_LEN[header.suite]], raw)


def accept_channel(keys: EnclaveKeys, header: Header, raw: bytes, sealed) -> ChannelKeys:
    """Enclave: the channel's keys from a keying message (opaque error on failure)."""
    sealed = bytes(sealed)                      # small; the HPKE API takes bytes only
    secret = keys.open(header.suite, sealed, OPEN_LABEL + raw)
    if len(secret) != SECRET_LEN or header.seq != 0:
        raise DecryptionError(_OPAQUE)
    return ChannelKeys(secret, sealed[:_ENC_LEN[header.suite]], raw)


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
