"""The floor cost of sealing, for ``bench/tee_digits.py``: the plaintext baseline plus the
four AES-256-GCM calls a sealed request makes (the client encrypts the request, the
server decrypts it and encrypts the answer, the client decrypts that), under one fixed
key and nonce, and nothing else: no channels, headers, sequence numbers or replay checks.

INSECURE by construction (a fixed key and a repeated nonce): it only measures what any
AES-GCM sealing of these messages costs. Run as ``python -m tee_floor EXPORT_DIR`` with
``bench/`` on the path; it prints ``... listening on HOST:PORT``.
"""
from __future__ import annotations

import sys

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.backends.sockets import pack_arrays
from veil.backends.tee import PlaintextClient, net
from veil.backends.tee.bundle import load_model
from veil.backends.tee.service import PlaintextServer, _arrays, _chunks

_AEAD, _NONCE = AESGCM(b"\x00" * 32), b"\x00" * 12


class FloorServer(PlaintextServer):
    def _handle(self, kind: int, body) -> tuple:
        if kind != net.PLAIN_REQUEST:
            return super()._handle(kind, body)
        kind, answer = super()._handle(kind, _AEAD.decrypt(_NONCE, body, None))
        return kind, _AEAD.encrypt(_NONCE, answer, None)


class FloorClient(PlaintextClient):
    """:class:`PlaintextClient` with the client's two AES-GCM calls added."""

    def infer(self, xs) -> np.ndarray:
        request = _AEAD.encrypt(_NONCE, pack_arrays({"x": self._checked(xs)}), None)
        answer = self.call(net.PLAIN_REQUEST, request, net.PLAIN_RESULT)
        return _arrays(_AEAD.decrypt(_NONCE, answer, None), "y")

    def infer_batch(self, xs, batch_size: int = 64, depth: int = 2) -> np.ndarray:
        outs: list[np.ndarray] = []
        self.stream(net.PLAIN_REQUEST, (_AEAD.encrypt(_NONCE, pack_arrays({"x": c}), None)
                                        for c in _chunks(self._checked(xs), batch_size)),
                    net.PLAIN_RESULT,
                    lambda body: outs.append(_arrays(_AEAD.decrypt(_NONCE, body, None), "y")),
                    depth)
        return np.concatenate(outs)


if __name__ == "__main__":
    srv = FloorServer(load_model(sys.argv[1]), ("127.0.0.1", 0), 60.0)
    print("tee-floor (INSECURE: fixed key, benchmarks only) listening on %s:%d" % srv.address,
          flush=True)
    srv.serve_forever()
