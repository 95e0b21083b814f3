"""The floor cost of sealing, for ``bench/tee_digits.py``: the plaintext baseline plus the
four AES-256-GCM calls a sealed request makes (the client encrypts the request, the
server decrypts it and encrypts the answer, the client decrypts that), under one fixed
key and nonce, and nothing else: no channels, headers, sequence numbers or replay checks.

INSECURE by construction (a fixed key and a repeated nonce): it only measures what the
AES-GCM calls of any sealing through ``cryptography`` cost. Run as
``python -m tee_floor EXPORT_DIR`` with ``bench/`` on the path; it prints
``... listening on HOST:PORT``.
"""
from __future__ import annotations

import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.backends.tee import PlaintextClient, PlaintextServer, net
from veil.backends.tee.bundle import load_model

_AEAD, _NONCE = AESGCM(b"\x00" * 32), b"\x00" * 12


class FloorServer(PlaintextServer):
    def _handle(self, kind: int, body) -> tuple:
        if kind != net.PLAIN_REQUEST:
            return super()._handle(kind, body)
        kind, answer = super()._handle(kind, _AEAD.decrypt(_NONCE, body, None))
        return kind, _AEAD.encrypt(_NONCE, answer, None)


class FloorClient(PlaintextClient):
    """:class:`PlaintextClient` with the client's two AES-GCM calls added to its model
    requests (status requests stay in the clear, as the server expects)."""

    def call(self, kind: int, payload, wanted: int) -> bytes:
        if kind != net.PLAIN_REQUEST:
            return super().call(kind, payload, wanted)
        answer = super().call(kind, _AEAD.encrypt(_NONCE, payload, None), wanted)
        return _AEAD.decrypt(_NONCE, answer, None)

    def stream(self, kind: int, payloads, wanted: int, on_reply, depth: int) -> None:
        super().stream(kind, (_AEAD.encrypt(_NONCE, p, None) for p in payloads), wanted,
                       lambda body: on_reply(_AEAD.decrypt(_NONCE, body, None)), depth)


if __name__ == "__main__":
    srv = FloorServer(load_model(sys.argv[1]), ("127.0.0.1", 0), 60.0)
    print("tee-floor (INSECURE: fixed key, benchmarks only) listening on %s:%d" % srv.address,
          flush=True)
    srv.serve_forever()
