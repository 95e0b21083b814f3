"""The enclave process, its plaintext baseline, and the client library.

Enclave (:class:`Enclave`, ``veil tee-serve``):

1. At start: make the HPKE key pairs (in memory only), compute the measurement of this
   code and the bundle, and, for an encrypted bundle, obtain the model key through key
   release (``keyrelease.py``) before loading the model.
2. ``EVIDENCE_REQUEST {"nonce"}``: open a new channel (a random id chosen here, so no
   one else can pick or reset it) that lives until the evidence expires, and answer with
   a token signed by the attester over the nonce, the channel, the HPKE public keys,
   the measurement and the model's shapes.
3. ``OPEN``: the client's HPKE-sealed channel secret keys the channel, once
   (``seal.py``).
4. ``CLOSE`` (16-byte channel id): forget a channel. The host may ask: it can drop any
   message anyway, and the service uses it to keep each client within its own cap of
   channels, so that one client cannot push others' channels out of this table.
5. ``REQUEST``: refuse an unknown, expired or unkeyed channel, or a sequence number
   already used, before decrypting; open it (one opaque error on failure); record the
   sequence number; run the model; seal the answer (or the input's error, which may
   describe the input, so it is sealed too) under the channel's response key.

The enclave answers every refusal and keeps serving; counters (``STATUS``) show how
many requests were opened, served and refused. Nothing computed from a sealed input
reaches its log: the model runs under ``np.errstate(all="ignore")`` (an overflow on an
input of 1e308 is not a warning on stderr), and errors after decryption are sealed.

Plaintext baseline (:class:`PlaintextServer`, ``veil tee-serve --plaintext-baseline``):
the same process, framing and model path without attestation or sealing, INSECURE,
for measuring what sealing costs (``bench/tee_digits.py``).

Client (:class:`TEEClient`): fetches evidence with a fresh nonce, verifies it against
its :class:`~veil.backends.tee.attest.Policy` and sends nothing when that fails; seals
each batch to the attested key with the next sequence number and opens the answer.
Evidence is re-fetched when it ages past the policy or the channel is gone.
"""
from __future__ import annotations

import json
import logging
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..._version import __version__
from ...errors import (DecryptionError, InputError, SerializationError, SessionError,
                       TEEError, VeilError)
from ...ir import Graph, interpreter
from .. import sockets
from ..sockets import TransportError, pack_arrays, unpack_arrays
from . import net, seal
from .attest import PROFILE, Attester, Evidence, Policy, b64, unb64, verify_evidence
from .bundle import load_model, measure, read_manifest
from .keyrelease import fetch_model_key

log = logging.getLogger("veil.tee")

DEFAULT_TIMEOUT = 10.0
EVIDENCE_TTL_S = 300
MAX_CHANNELS = 4096


def make_room(table: dict, limit: int, expires, now: float) -> None:
    """Before adding to ``table`` (at most ``limit`` entries): drop its expired entries
    (``expires(value)`` is when a value expires), or, if none has, the one that expires
    first."""
    if len(table) >= limit:
        for key in [k for k, v in table.items() if expires(v) <= now] or \
                [min(table, key=lambda k: expires(table[k]))]:
            del table[key]


def _arrays(body: bytes, name: str) -> np.ndarray:
    try:
        return unpack_arrays(body)[name]
    except KeyError:
        raise SerializationError(f"the message has no {name!r} array") from None


class _ModelServer:
    """Accepts connections and serves messages on each until it closes."""

    insecure = True

    def __init__(self, graph: Graph, listen: tuple[str, int], timeout: float) -> None:
        self.graph, self.timeout = graph, timeout
        self.server = sockets.listen(listen)
        self.address = self.server.getsockname()
        self._lock = threading.Lock()
        self.counts = {"opened": 0, "served": 0, "refused": 0}

    def serve_forever(self) -> None:
        sockets.accept_forever(self.server, self.timeout, self._serve)

    def _count(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self.counts[name] += 1

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                kind, body = net.recv(sock, net.MAX_MESSAGE, idle=True)
                try:
                    reply_kind, *reply = self._handle(kind, body)
                except VeilError as exc:       # a refusal in the clear: no plaintext in it
                    self._count("refused")
                    log.debug("refused: %s", exc)   # clients can make many
                    reply_kind, reply = net.ERROR, (net.error_body(exc),)
                net.send(sock, reply_kind, *reply)
        except (TransportError, OSError) as exc:
            log.debug("connection ended: %s", exc)
        finally:
            sock.close()

    def _handle(self, kind: int, body: bytes) -> tuple:
        """``(reply kind, *reply body parts)`` for one message."""
        if kind == net.STATUS_REQUEST:
            with self._lock:
                status = dict(self.counts, insecure=self.insecure, veil=__version__)
            status.update(self._status())
            return net.STATUS, json.dumps(status).encode()
        raise SerializationError(f"this server does not take message kind {kind}")

    def _status(self) -> dict:
        return {}

    def _infer(self, xs: np.ndarray) -> np.ndarray:
        xs = net.check_inputs(xs, self.graph.input_shape)
        # numpy's floating-point warnings name the operation and go to stderr, a log
        # the host reads: none may be triggered by a sealed input (errstate is per
        # thread/context, so it covers exactly this computation)
        with np.errstate(all="ignore"):
            return interpreter.run(self.graph, xs)


class PlaintextServer(_ModelServer):
    """INSECURE baseline: the same model over the same framing, unsealed."""

    def _handle(self, kind: int, body: bytes) -> tuple:
        if kind != net.PLAIN_REQUEST:
            return super()._handle(kind, body)
        ys = self._infer(_arrays(body, "x"))
        self._count("served")
        return net.PLAIN_RESULT, pack_arrays({"y": ys})

    def _status(self) -> dict:
        return {"mode": "plaintext-baseline", "input_shape": list(self.graph.input_shape)}


@dataclass
class _Channel:
    expires: float
    keys: seal.ChannelKeys | None = None
    window: seal.ReplayWindow = field(default_factory=seal.ReplayWindow)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Enclave(_ModelServer):
    """The sealed-inference server; see the module docstring."""

    def __init__(self, export_dir: str, attester: Attester, listen: tuple[str, int],
                 key_release: tuple[str, int] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, evidence_ttl: int = EVIDENCE_TTL_S) -> None:
        self.attester, self.evidence_ttl = attester, int(evidence_ttl)
        self.insecure = bool(attester.insecure)
        self.keys = seal.EnclaveKeys()
        self.measurement = measure(export_dir)
        manifest = read_manifest(export_dir)
        model_key = None
        if manifest["encrypted"]:
            if key_release is None:
                raise TEEError("the bundle is encrypted: give the key-release service's "
                               "address (--key-release HOST:PORT)")
            model_key = fetch_model_key(key_release, manifest["key_id"], self.keys,
                                        self._token_for, timeout)
        super().__init__(load_model(export_dir, model_key), listen, timeout)
        self._channels: dict[bytes, _Channel] = {}

    def _token_for(self, nonce: bytes, channel: bytes | None = None) -> str:
        now = int(time.time())
        claims = {"eat_profile": PROFILE, "eat_nonce": b64(nonce), "iat": now,
                  "exp": now + self.evidence_ttl, "measurement": self.measurement,
                  "veil_version": __version__,
                  "hpke": {s: b64(k) for s, k in self.keys.public.items()}}
        if channel is not None:       # a client's evidence (key release has no model yet)
            claims["channel"] = b64(channel)
            claims["model"] = {"input_shape": list(self.graph.input_shape),
                               "output_shape": list(self.graph.output_shape),
                               "max_batch": net.MAX_BATCH}
        return self.attester.attest(claims)

    def _handle(self, kind: int, body: bytes) -> tuple:
        if kind == net.REQUEST:
            return (net.RESULT, *self._sealed(body))
        if kind == net.EVIDENCE_REQUEST:
            return net.EVIDENCE, self._evidence(body)
        if kind == net.OPEN:
            return net.OPENED, self._open(body)
        if kind == net.CLOSE:
            return net.CLOSED, self._close(body)
        return super()._handle(kind, body)

    def _status(self) -> dict:
        with self._lock:
            channels = len(self._channels)
        return {"mode": "enclave", "attester": self.attester.kind,
                "measurement": self.measurement, "channels": channels}

    def _evidence(self, body: bytes) -> bytes:
        try:
            nonce = unb64(str(sockets.json_object(body)["nonce"]))
        except (KeyError, VeilError):
            raise SerializationError("an evidence request carries {\"nonce\": base64url}") \
                from None
        if not 16 <= len(nonce) <= 64:
            raise SerializationError("the nonce must be 16 to 64 bytes")
        channel = secrets.token_bytes(16)
        with self._lock:
            now = time.time()
            make_room(self._channels, MAX_CHANNELS, lambda ch: ch.expires, now)
            self._channels[channel] = _Channel(now + self.evidence_ttl)
        return self._token_for(nonce, channel).encode()

    def _close(self, body: bytes) -> bytes:
        if len(body) != 16:
            raise SerializationError("a CLOSE message is a 16-byte channel id")
        with self._lock:
            self._channels.pop(bytes(body), None)
        return b""

    def _channel(self, header: seal.Header) -> _Channel:
        channel = self._channels.get(header.channel)     # one atomic read; writers lock
        if channel is None or channel.expires <= time.time():
            raise SessionError("unknown or expired channel: fetch fresh evidence")
        return channel

    def _open(self, body: bytes) -> bytes:
        header, raw, sealed = seal.read_header(body)
        channel = self._channel(header)
        if channel.keys is not None:
            raise SessionError("this channel is keyed already: fetch fresh evidence")
        keys = seal.accept_channel(self.keys, header, raw, sealed)
        with channel.lock:
            if channel.keys is not None:
                raise SessionError("this channel is keyed already: fetch fresh evidence")
            channel.keys = keys
        return b""

    def _sealed(self, body: bytes) -> tuple[bytes, bytes]:
        """The answer's clear header (the request's) and its sealed body."""
        header, raw, sealed = seal.read_header(body)
        channel, seq = self._channel(header), header.seq
        keys, window = channel.keys, channel.window
        if keys is None or seq < 1:
            raise SessionError("the channel is not keyed: send its OPEN message first")
        with channel.lock:
            window.check(seq)                   # a replay is refused unopened
        plain = keys.decrypt(True, seq, raw, sealed)
        with channel.lock:
            window.commit(seq)                  # two copies racing: one wins
        try:
            answer = pack_arrays({"y": self._infer(_arrays(plain, "x"))})
            self._count("opened", "served")
        except VeilError as exc:        # may describe the input: sealed, never in the clear
            self._count("opened")
            answer = pack_arrays({"error": np.frombuffer(net.error_body(exc), np.uint8)})
        return raw, keys.encrypt(False, seq, raw, answer)


# -- clients ------------------------------------------------------------------------------
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
        return net.check_inputs(xs, self._shape, max_batch=1 << 62)

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
        return net.check_inputs(xs, self._shapes[0], max_batch=1 << 62)

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
