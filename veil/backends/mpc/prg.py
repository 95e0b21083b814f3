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

    def __init__(self, seed: bytes | None = None) -> None:
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

    # the sharing interface of material generators (:class:`Deal` implements it too)
    def root_u64(self, shape) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """A uniformly random secret and its additive shares."""
        value = self.uint64(shape)
        return value, self.split_u64(value)

    def root_bits(self, shape) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Uniformly random packed bits and their XOR shares."""
        value = self.uint8(shape)
        return value, self.split_bits(value)

    def split_u64(self, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Additive shares (value - r, r) of a secret the generator computed."""
        r = self.uint64(np.shape(value))
        return np.asarray(value, dtype=np.uint64) - r, r

    def split_bits(self, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """XOR shares of packed bits the generator computed."""
        r = self.uint8(np.shape(value))
        return value ^ r, r


class Deal:
    """The dealer's randomness with both parties' halves drawn from seeds it shares with
    each of them (the usual seed compression of dealer-model preprocessing). A random
    secret (a mask, a triple's a and b,
    a daBit) is defined as the sum (or XOR) of one draw from each party's stream, so
    neither half needs sending; a secret the dealer computes from others (a product,
    r >> f, a mask's bit rows) takes party 0's half from party 0's stream and sends
    party 1 the difference. Party 0 then receives nothing but its seed and the list of
    its draws, party 1 its seed, its draws and the computed halves (:meth:`compress`,
    ``protocols.expand_seeded``): a Beaver triple costs party 1 one word instead of
    three. Each stream is a fresh ChaCha20 key; a party learns its own stream only."""

    def __init__(self) -> None:
        self.prgs = (Prg(), Prg())
        self.drawn: tuple[list, list] = ([], [])

    def _draw(self, party: int, shape, bits: bool) -> np.ndarray:
        prg = self.prgs[party]
        out = prg.uint8(shape) if bits else prg.uint64(shape)
        self.drawn[party].append(out)
        return out

    def root_u64(self, shape):
        s0, s1 = self._draw(0, shape, False), self._draw(1, shape, False)
        return s0 + s1, (s0, s1)

    def root_bits(self, shape):
        s0, s1 = self._draw(0, shape, True), self._draw(1, shape, True)
        return s0 ^ s1, (s0, s1)

    def split_u64(self, value):
        s0 = self._draw(0, np.shape(value), False)
        return s0, np.asarray(value, dtype=np.uint64) - s0

    def split_bits(self, value):
        s0 = self._draw(0, np.shape(value), True)
        return s0, value ^ s0

    def compress(self, party: int, arrays: dict[str, np.ndarray]
                 ) -> tuple[bytes, list, dict[str, np.ndarray]]:
        """Party ``party``'s named material as (its seed, its draws in order as
        [key, shape, dtype], the arrays it must be sent). A draw that is not in
        ``arrays`` is listed under an empty key (the party draws and drops it)."""
        names = {id(a): k for k, a in arrays.items()}
        skeleton, drawn = [], set()
        for a in self.drawn[party]:
            key = names.get(id(a), "")
            skeleton.append([key, list(a.shape), a.dtype.str])
            drawn.add(key)
        sent = {k: a for k, a in arrays.items() if k not in drawn}
        return self.prgs[party].seed, skeleton, sent
