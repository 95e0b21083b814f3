"""Pseudorandom ring elements from a CSPRNG: ChaCha20 keystreams (``cryptography``).

Every generator is keyed by 32 bytes from ``secrets`` (or a seed the dealer shares with
one party, so that party's material can be expanded locally instead of sent). numpy's
random generators are never used for anything a party or the dealer keeps secret.

The keystream is written straight into the array it is returned in, a block of
``_BLOCK`` bytes at a time from one zero buffer (``update_into``): ~3x faster than
``update(bytes(n))`` and a copy, which allocate and fault in two more buffers of the
full size (``bench/mpc_zoo.py`` profiles showed the dealer and party 0 spending most of
their time there). The stream is the same either way, so seeds stay compatible.
"""
from __future__ import annotations

import secrets

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
_BLOCK = 1 << 20
_ZEROS = bytes(_BLOCK)
_SLACK = 64          # update_into wants room for one cipher block beyond the input


class Prg:
    """A ChaCha20 keystream read as little-endian uint64 words, bytes or bits."""

    def __init__(self, seed: bytes | None = None, zero_shares: bool = False) -> None:
        """``zero_shares``: :meth:`share_uint64` and :meth:`share_uint8` give zeros, so
        material generators put the whole secret in party 1's half. Only for material
        whose party-0 half is replaced by a seeded one afterwards
        (``protocols.seed_circuit_arrays``, which re-randomises every share): the draws
        it would overwrite are then not made at all."""
        self.zero_shares = bool(zero_shares)
        self.seed = secrets.token_bytes(SEED_BYTES) if seed is None else bytes(seed)
        if len(self.seed) != SEED_BYTES:
            raise ValueError(f"a PRG seed is {SEED_BYTES} bytes")
        # A fresh key per generator, so the all-zero nonce is never reused under a key.
        self._stream = Cipher(algorithms.ChaCha20(self.seed, bytes(16)), mode=None).encryptor()

    def _fill(self, n: int) -> np.ndarray:
        """n keystream bytes in a fresh uint8 array (with ``_SLACK`` spare bytes after)."""
        out = np.empty(n + _SLACK, np.uint8)
        view = memoryview(out)
        for at in range(0, n, _BLOCK):
            size = min(_BLOCK, n - at)
            self._stream.update_into(_ZEROS[:size] if size < _BLOCK else _ZEROS,
                                     view[at:at + size + _SLACK])
        return out[:n]

    def uint8(self, shape) -> np.ndarray:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return self._fill(int(np.prod(shape, dtype=np.int64))).reshape(shape)

    def uint64(self, shape) -> np.ndarray:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = int(np.prod(shape, dtype=np.int64))
        return self._fill(8 * n).view("<u8").view(np.uint64).reshape(shape)

    def bits(self, shape) -> np.ndarray:
        return (self.uint64(shape) & np.uint64(1)).astype(bool)

    def share_uint64(self, shape) -> np.ndarray:
        """The random half of an additive sharing (zeros with ``zero_shares``)."""
        return np.zeros(shape, np.uint64) if self.zero_shares else self.uint64(shape)

    def share_uint8(self, shape) -> np.ndarray:
        """The random half of an XOR sharing of packed bits (zeros with ``zero_shares``)."""
        return np.zeros(shape, np.uint8) if self.zero_shares else self.uint8(shape)
