"""Pseudorandom ring elements from a CSPRNG: ChaCha20 keystreams (``cryptography``).

Every generator is keyed by 32 bytes from ``secrets`` (or a seed the dealer shares with
one party, so that party's material can be expanded locally instead of sent). numpy's
random generators are never used for anything a party or the dealer keeps secret.
"""
from __future__ import annotations

import secrets

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32


class Prg:
    """A ChaCha20 keystream read as little-endian uint64 words or bits."""

    def __init__(self, seed: bytes | None = None) -> None:
        self.seed = secrets.token_bytes(SEED_BYTES) if seed is None else bytes(seed)
        if len(self.seed) != SEED_BYTES:
            raise ValueError(f"a PRG seed is {SEED_BYTES} bytes")
        # A fresh key per generator, so the all-zero nonce is never reused under a key.
        self._stream = Cipher(algorithms.ChaCha20(self.seed, bytes(16)), mode=None).encryptor()

    def bytes(self, n: int) -> bytes:
        return self._stream.update(bytes(n))

    def uint64(self, shape) -> np.ndarray:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.bytes(8 * n), dtype="<u8").astype(np.uint64).reshape(shape)

    def bits(self, shape) -> np.ndarray:
        return (self.uint64(shape) & np.uint64(1)).astype(bool)
