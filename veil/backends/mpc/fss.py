"""Distributed comparison functions (DCF): function secret sharing of x -> beta * [x < alpha].

The construction is Fig. 1 of Boyle, Chandran, Gilboa, Gupta, Ishai, Kumar and Rathee,
"Function Secret Sharing for Mixed-Mode and Fixed-Point Secure Computation"
(EUROCRYPT 2021): a GGM-style tree over the ``bits`` input bits, most significant first,
with one correction word per level (seed, payload, two control bits) and a final one.
``gen`` (the dealer) returns two keys; ``evaluate(b, key_b, x)`` returns party b's
additive share in Z_(2^64), and the two shares add up to ``beta`` when x < alpha
(unsigned, on ``bits`` bits) and to 0 otherwise. Each key alone is pseudorandom.

The length-doubling PRG is fixed-key AES-128 in the Matyas-Meyer-Oseas mode,
G_i(s) = AES_k(s xor i) xor s xor i for i = 0..2+k (the standard choice of FSS
implementations; see Guo, Katz, Wang and Yu, S&P 2020, on fixed-key hashing), read as
s_L (128) | t_L (1 of 64) | s_R | t_R | v_L (64 k) | v_R (64 k). The payload beta may
be a vector of k ring elements (one tree, k outputs: Boyle et al., Sec. 3).

Everything is vectorised over a batch of n comparisons: seeds are (n, 2) uint64 arrays.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .prg import Prg

# The fixed AES key is public (part of the PRG's definition), not a secret.
_FIXED_KEY = hashlib.sha256(b"veil/mpc/fss/prg/v1").digest()[:16]
_AES = Cipher(algorithms.AES(_FIXED_KEY), modes.ECB())
_ONE = np.uint64(1)


def _expand(seeds: np.ndarray, k: int = 1) -> tuple[np.ndarray, ...]:
    """G(s) for (n, 2) seeds with k payload words per side:
    (s_L, v_L (n, k), t_L, s_R, v_R (n, k), t_R), from 3 + k MMO blocks."""
    n, blocks = seeds.shape[0], 3 + k
    x = np.repeat(seeds[:, None, :], blocks, axis=1)
    x[:, :, 0] ^= np.arange(blocks, dtype=np.uint64)
    enc = _AES.encryptor()
    raw = enc.update(x.astype("<u8").tobytes()) + enc.finalize()
    w = (np.frombuffer(raw, dtype="<u8").astype(np.uint64).reshape(n, blocks, 2)
         ^ x).reshape(n, 2 * blocks)
    return (w[:, 0:2].copy(), w[:, 6:6 + k].copy(), (w[:, 2] & _ONE).astype(bool),
            w[:, 3:5].copy(), w[:, 6 + k:6 + 2 * k].copy(), (w[:, 5] & _ONE).astype(bool))


def _neg_if(flag: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(-1)^flag * v in Z_(2^64)."""
    return np.where(flag, np.uint64(0) - v, v)


@dataclass(frozen=True)
class DcfKey:
    """One party's key: its root seed and the correction words both keys share."""

    seed: np.ndarray        # (n, 2) uint64
    cw_seed: np.ndarray     # (bits, n, 2) uint64
    cw_value: np.ndarray    # (bits, n, k) uint64
    cw_t: np.ndarray        # (bits, n, 2) bool: t_CW^L, t_CW^R
    cw_last: np.ndarray     # (n, k) uint64

    @property
    def bits(self) -> int:
        return self.cw_value.shape[0]

    def nbytes(self) -> int:
        """Size on the wire (control bits packed)."""
        return (self.seed.nbytes + self.cw_seed.nbytes + self.cw_value.nbytes
                + (self.cw_t.size + 7) // 8 + self.cw_last.nbytes)


def gen(alpha: np.ndarray, beta: np.ndarray, bits: int, prg: Prg) -> tuple[DcfKey, DcfKey]:
    """Keys for x -> beta * [x < alpha] on ``bits``-bit unsigned inputs (vectorised).
    ``beta`` is (n,) or (n, k): k payload words share one tree."""
    alpha = np.asarray(alpha, dtype=np.uint64)
    beta = np.asarray(beta, dtype=np.uint64)
    beta = beta[:, None] if beta.ndim == 1 else beta
    n, k = beta.shape
    s = [prg.uint64((n, 2)), prg.uint64((n, 2))]
    root = [s[0].copy(), s[1].copy()]
    t = [np.zeros(n, bool), np.ones(n, bool)]
    v_alpha = np.zeros((n, k), np.uint64)
    cw_seed = np.zeros((bits, n, 2), np.uint64)
    cw_value = np.zeros((bits, n, k), np.uint64)
    cw_t = np.zeros((bits, n, 2), bool)
    zero = np.uint64(0)
    for i in range(bits):
        a = ((alpha >> np.uint64(bits - 1 - i)) & _ONE).astype(bool)
        a2 = a[:, None]
        g = [_expand(s[0], k), _expand(s[1], k)]
        # a = 0: keep L, lose R; a = 1: keep R, lose L
        s_lose = [np.where(a2, gb[0], gb[3]) for gb in g]
        s_keep = [np.where(a2, gb[3], gb[0]) for gb in g]
        v_lose = [np.where(a2, gb[1], gb[4]) for gb in g]
        v_keep = [np.where(a2, gb[4], gb[1]) for gb in g]
        t_keep = [np.where(a, gb[5], gb[2]) for gb in g]
        neg = t[1][:, None]
        s_cw = s_lose[0] ^ s_lose[1]
        v_cw = _neg_if(neg, v_lose[1] - v_lose[0] - v_alpha)
        v_cw = v_cw + np.where(a2, _neg_if(neg, beta), zero)      # lose = L
        v_alpha = v_alpha - v_keep[1] + v_keep[0] + _neg_if(neg, v_cw)
        t_cw_l = g[0][2] ^ g[1][2] ^ a ^ True
        t_cw_r = g[0][5] ^ g[1][5] ^ a
        t_cw_keep = np.where(a, t_cw_r, t_cw_l)
        cw_seed[i], cw_value[i] = s_cw, v_cw
        cw_t[i, :, 0], cw_t[i, :, 1] = t_cw_l, t_cw_r
        for b in (0, 1):
            s[b] = s_keep[b] ^ np.where(t[b][:, None], s_cw, zero)
            t[b] = t_keep[b] ^ (t[b] & t_cw_keep)
    # Convert(s) for a k-word group: the seed's first word, then its PRG for more words
    last = [_convert(s[b], k) for b in (0, 1)]
    cw_last = _neg_if(t[1][:, None], last[1] - last[0] - v_alpha)
    return tuple(DcfKey(root[b], cw_seed, cw_value, cw_t, cw_last) for b in (0, 1))


def _convert(seed: np.ndarray, k: int) -> np.ndarray:
    """Convert(s) into k ring words: s's first word, and more from G(s) when k > 1."""
    if k == 1:
        return seed[:, :1].copy()
    return _expand(seed, k)[1]


def evaluate(party: int, key: DcfKey, x: np.ndarray) -> np.ndarray:
    """Party ``party``'s share of beta * [x < alpha] for public ``x`` (low ``bits`` bits);
    shape (n,) for a scalar payload, (n, k) for a vector one."""
    x = np.asarray(x, dtype=np.uint64)
    bits, k = key.bits, key.cw_value.shape[2]
    n = x.shape[0]
    s = key.seed
    t = np.full(n, bool(party))
    out = np.zeros((n, k), np.uint64)
    zero = np.uint64(0)
    neg = bool(party)
    for i in range(bits):
        s_l, v_l, t_l, s_r, v_r, t_r = _expand(s, k)
        fix = np.where(t[:, None], key.cw_seed[i], zero)
        s_l, s_r = s_l ^ fix, s_r ^ fix
        t_l = t_l ^ (t & key.cw_t[i, :, 0])
        t_r = t_r ^ (t & key.cw_t[i, :, 1])
        xi = ((x >> np.uint64(bits - 1 - i)) & _ONE).astype(bool)
        v = np.where(xi[:, None], v_r, v_l) + np.where(t[:, None], key.cw_value[i], zero)
        out = out - v if neg else out + v
        s = np.where(xi[:, None], s_r, s_l)
        t = np.where(xi, t_r, t_l)
    last = _convert(s, k) + np.where(t[:, None], key.cw_last, zero)
    out = out - last if neg else out + last
    return out[:, 0] if k == 1 else out
