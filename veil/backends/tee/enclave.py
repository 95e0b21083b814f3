"""The enclave process (:class:`Enclave`, ``veil tee-serve``): sealed inference.

1. At start: make the HPKE key pairs (in memory only), compute the measurement of this
   code, the model runtime and the bundle, and, for an encrypted bundle, obtain the
   model key through key release (``keyrelease.py``) before loading the model into its
   runtime (``executor.py``).
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
reaches its log (``server.py``); errors after decryption are sealed.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..._version import __version__
from ...errors import SerializationError, SessionError, TEEError, VeilError
from .. import sockets
from ..sockets import pack_arrays
from . import net, seal
from .attest import PROFILE, Attester, b64, unb64
from .bundle import load_model, load_runtime, measure, read_manifest
from .keyrelease import fetch_model_key
from .server import DEFAULT_TIMEOUT, _arrays, _ModelServer, make_room

EVIDENCE_TTL_S = 300
MAX_CHANNELS = 4096


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
                 timeout: float = DEFAULT_TIMEOUT, evidence_ttl: int = EVIDENCE_TTL_S,
                 threads: int | None = None, parallel: int | None = None) -> None:
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
        super().__init__(load_model(export_dir, model_key), listen, timeout,
                         load_runtime(export_dir), threads, parallel)
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

