"""The client library: :class:`TEEClient` (sealed, attested) and :class:`PlaintextClient`
(the INSECURE baseline's), over one :class:`_Connection` each.

:class:`TEEClient` fetches evidence with a fresh nonce, verifies it against its
:class:`~veil.backends.tee.attest.Policy` and sends nothing when that fails; seals each
batch to the attested key with the next sequence number and opens the answer. Evidence
is re-fetched when it ages past the policy or the channel is gone.
"""
from __future__ import annotations

import json
import queue
import secrets
import socket
import threading
import time

import numpy as np

from ...errors import DecryptionError, InputError, SerializationError, SessionError
from .. import sockets
from ..sockets import TransportError, pack_arrays, unpack_arrays
from . import net, seal
from .attest import Evidence, Policy, b64, unb64, verify_evidence
from .server import _arrays

DEFAULT_BATCH, DEFAULT_DEPTH = 64, 2


def _chunks(xs: np.ndarray, batch_size: int) -> list[np.ndarray]:
    if not 1 <= int(batch_size) <= net.MAX_BATCH:
        raise InputError(f"batch_size must be 1 to {net.MAX_BATCH}, not {batch_size}")
    return [xs[i:i + int(batch_size)] for i in range(0, len(xs), int(batch_size))]


class _Connection:
    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self.address, self.timeout = tuple(address), timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _connected(self) -> socket.socket:
        if self._sock is None:
            self._sock = sockets.dial(self.address, self.timeout)
        return self._sock

    def call(self, kind: int, payload: bytes, wanted: int) -> bytes:
        with self._lock:
            sock = self._connected()
            try:
                return net.call(sock, kind, payload, wanted)
            except (TransportError, OSError):
                self.close()
                raise

    def stream(self, kind: int, payloads, wanted: int, on_reply, depth: int) -> None:
        """Send ``payloads`` (an iterable, consumed on a sender thread) with up to
        ``depth`` requests in flight on this connection, and hand each answer's body to
        ``on_reply`` in order. The server then never waits for the client between
        requests, and the client's work overlaps the server's. Any failure closes the
        connection (answers still in flight are dropped) and is raised here."""
        if depth < 1:
            raise InputError(f"depth must be at least 1, not {depth}")
        with self._lock:
            sock = self._connected()
            slots, sent = threading.Semaphore(depth), queue.SimpleQueue()
            stop = threading.Event()

            def sender() -> None:
                try:
                    for payload in payloads:
                        slots.acquire()
                        if stop.is_set():
                            return
                        net.send(sock, kind, payload)
                        sent.put(True)
                    sent.put(None)
                except BaseException as exc:        # handed to the receiving thread
                    sent.put(exc)

            thread = threading.Thread(target=sender, daemon=True)
            thread.start()
            try:
                while (item := sent.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    reply_kind, body = net.recv(sock)
                    slots.release()
                    on_reply(net.expect(reply_kind, body, wanted))
            except BaseException:
                stop.set()
                slots.release()
                self.close()
                raise
            finally:
                thread.join()

    def status(self) -> dict:
        return sockets.json_object(self.call(net.STATUS_REQUEST, b"", net.STATUS))

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)       # wakes a blocked sender
            except OSError:
                pass
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PlaintextClient(_Connection):
    """Client of the INSECURE plaintext baseline (benchmarks): :class:`TEEClient` without
    attestation and sealing. It checks inputs the same way before sending, so that the
    difference between the two measures sealing and nothing else."""

    _shape: tuple[int, ...] | None = None

    def _checked(self, xs) -> np.ndarray:
        if self._shape is None:
            self._shape = tuple(self.status()["input_shape"])
        return net.check_inputs(xs, self._shape, max_batch=None)

    def infer(self, xs) -> np.ndarray:
        xs = self._checked(xs)
        if len(xs) > net.MAX_BATCH:
            raise InputError(f"batches hold 1 to {net.MAX_BATCH} inputs, not {len(xs)}: "
                             "use infer_batch")
        return _arrays(self.call(net.PLAIN_REQUEST, pack_arrays({"x": xs}),
                                 net.PLAIN_RESULT), "y")

    def infer_batch(self, xs, batch_size: int = DEFAULT_BATCH,
                    depth: int = DEFAULT_DEPTH) -> np.ndarray:
        """:meth:`infer` over batches of ``batch_size``, ``depth`` of them in flight."""
        outs: list[np.ndarray] = []
        self.stream(net.PLAIN_REQUEST, (pack_arrays({"x": c}) for c in _chunks(
            self._checked(xs), batch_size)), net.PLAIN_RESULT,
            lambda body: outs.append(_arrays(body, "y")), depth)
        return np.concatenate(outs)


class TEEClient(_Connection):
    """Sends sealed batches to an attested enclave; see the module docstring.

    Args:
        address: the enclave's (or its host relay's) address.
        policy: what evidence to accept.
        suite: ``"x25519"`` (default) or ``"mlkem768-x25519"`` (post-quantum hybrid).
        clock: seconds since the epoch (a test seam for freshness).
    """

    def __init__(self, address: tuple[str, int], policy: Policy, *,
                 suite: str = seal.DEFAULT_SUITE, timeout: float = 30.0, clock=time.time) -> None:
        super().__init__(address, timeout)
        seal._suite(suite)
        self.policy, self.suite, self.clock = policy, suite, clock
        self.evidence: Evidence | None = None
        self._keys: seal.ChannelKeys | None = None
        self._channel = b""
        self._shapes: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        self._seq = 0

    def attest(self) -> Evidence:
        """Fetch and verify fresh evidence; opens a new channel.

        Raises:
            AttestationError, PolicyError, EvidenceExpiredError: the evidence is refused;
                the client then holds no key and sends nothing.
        """
        self.evidence = self._keys = None
        nonce = secrets.token_bytes(32)
        token = self.call(net.EVIDENCE_REQUEST, json.dumps({"nonce": b64(nonce)}).encode(),
                          net.EVIDENCE)
        try:
            text = token.decode()
        except UnicodeDecodeError:
            raise SerializationError("the evidence is not text") from None
        evidence = verify_evidence(text, self.policy, nonce, self.clock())
        try:
            self._channel = unb64(evidence.claims["channel"])
            self._shapes = (tuple(evidence.claims["model"]["input_shape"]),
                            tuple(evidence.claims["model"]["output_shape"]))
            key = seal.public_key(self.suite, evidence.public_key(self.suite))
        except (KeyError, TypeError) as exc:
            raise SerializationError(f"the evidence lacks a claim: {exc}") from None
        message, keys = seal.open_channel(seal.Header(self._channel, 0, self.suite), key)
        self.call(net.OPEN, message, net.OPENED)
        self.evidence, self._keys, self._seq = evidence, keys, 0
        return evidence

    def _fresh(self) -> bool:
        if self.evidence is None:
            return False
        now = self.clock()
        return now < self.evidence.expires_at and \
            now - self.evidence.issued_at <= self.policy.max_age_s

    def _checked(self, xs) -> np.ndarray:
        if not self._fresh():
            self.attest()
        return net.check_inputs(xs, self._shapes[0], max_batch=None)

    def infer(self, xs) -> np.ndarray:
        """Outputs (n, *output_shape) for a batch ``xs`` of shape (n, *input_shape).

        Raises:
            InputError: wrong shape or non-finite values (checked here, and again in
                the enclave).
            AttestationError / PolicyError / EvidenceExpiredError: nothing was sent.
            DecryptionError: a sealed message failed to open (opaque by design).
            ReplayError, SessionError: the enclave refused the request unopened.
        """
        xs = self._checked(xs)
        if len(xs) > net.MAX_BATCH:
            raise InputError(f"batches hold 1 to {net.MAX_BATCH} inputs, not {len(xs)}: "
                             "use infer_batch")
        try:
            return self._sealed(xs)
        except SessionError:        # the enclave dropped the channel: attest again, once
            self.attest()
            return self._sealed(xs)

    def infer_batch(self, xs, batch_size: int = DEFAULT_BATCH,
                    depth: int = DEFAULT_DEPTH) -> np.ndarray:
        """Outputs for any number of inputs, sent as sealed batches of ``batch_size``
        with ``depth`` of them in flight on one connection (sequence numbers in order;
        the enclave's replay window accepts them). Raises as :meth:`infer`."""
        chunks = _chunks(self._checked(xs), batch_size)
        try:
            return self._sealed_stream(chunks, depth)
        except SessionError:
            self.attest()
            return self._sealed_stream(chunks, depth)

    def _request(self, xs: np.ndarray) -> tuple[bytes, bytearray]:
        """(the clear header, the whole sealed message) of the next request."""
        self._seq += 1
        raw = seal.Header(self._channel, self._seq, self.suite).encode()
        return raw, self._keys.seal(True, self._seq, raw, pack_arrays({"x": xs}))

    def _answer(self, raw: bytes, n: int, reply) -> np.ndarray:
        """The outputs in ``reply``, the answer to the request whose header is ``raw``."""
        if reply[:seal.HEADER_LEN] != raw:
            raise DecryptionError("the sealed message could not be opened")
        answer = unpack_arrays(self._keys.decrypt(
            False, seal.header_seq(raw), raw, memoryview(reply)[seal.HEADER_LEN:]))
        if "error" in answer:
            net.raise_error(answer["error"].tobytes())
        ys = answer.get("y")
        if ys is None or ys.shape != (n, *self._shapes[1]):
            raise DecryptionError("the sealed message could not be opened")
        return ys

    def _sealed(self, xs: np.ndarray) -> np.ndarray:
        raw, message = self._request(xs)
        return self._answer(raw, len(xs), self.call(net.REQUEST, message, net.RESULT))

    def _sealed_stream(self, chunks: list[np.ndarray], depth: int) -> np.ndarray:
        pending: queue.SimpleQueue = queue.SimpleQueue()     # (raw header, n) in order
        outs: list[np.ndarray] = []

        def requests():
            for c in chunks:
                raw, message = self._request(c)
                pending.put((raw, len(c)))
                yield message

        self.stream(net.REQUEST, requests(), net.RESULT,
                    lambda reply: outs.append(self._answer(*pending.get(), reply)), depth)
        return np.concatenate(outs)
