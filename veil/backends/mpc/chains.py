"""Masked chains: straight-line arithmetic whose products cost no opening.

A faithful truncation's result is t = P + s w - h with P and s public once the masked
value u^ is opened and h, w dealt (``protocols._faithful``): the parties hold the
value as a public part plus a mask the dealer knows up to the public s
(``ring.open_truncation``). Two such values
multiply locally, given the dealt cross products of their masks (the masked wires of
ABY2.0, Patra et al., USENIX Security 2021; SPDZ's function-dependent preprocessing),
so a chain of products and truncations opens only its truncations. The two chains
here: a tail's degree-12 correction polynomial ("tpoly", ``evaluator._tail``) and
softmax's exponential ("texp", ``nonlinear._softmax``). Each is one material step,
elementwise, so its material streams in chunks like any other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .prg import Prg
from .ring import ZERO as _ZERO, Channel, open_truncation, open_value
from .ring import ring_mask as _ring_mask


#: Masked chains (:class:`Chain`): per chain, its truncations as (ring width, shift)
#: and the products of two truncated values it takes, as index pairs into them (index
#: len(truncs): the chain's Beaver-square input, when it has one).
#: - "tpoly", a tail's degree-12 polynomial (:func:`tail_poly`): z (from 2 t / bound at
#:   2f bits), z^2, z^3 and z^4 (below 1 in the band: a 48-bit ring), and z^4 q_2(z) at
#:   3f bits; the products z z, z^2 z, z^2 z^2 and z^4 times z, z^2, z^3, z^4 and the
#:   fifth.
#: - "texp", softmax's exponential (:func:`exp_chain`): u^2 (u = 1 + d/256 at f + 8 bits)
#:   truncated to ``EXP_BITS``, six more squarings there (``EXP_RING`` bits: every power
#:   stays below 2), u^256, and u^256 times the correction 1 + d^2/512, back to f bits;
#:   the squares, u^256 u^2 and u^256 d (d = the square's opening plus its mask a).
EXP_HALVINGS = 8
EXP_BITS = 26
EXP_RING = 56


def chain_spec(name: str, frac_bits: int) -> tuple[tuple, tuple, bool]:
    """(truncations, pairs, has a Beaver square) of chain ``name`` at f bits."""
    f = frac_bits
    if name == "tpoly":
        return (((48, f),) * 4 + ((64, f),),
                ((0, 0), (1, 0), (1, 1), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4)), False)
    if name == "texp":
        first = 2 * (f + EXP_HALVINGS) - EXP_BITS
        truncs = ((64, first),) + ((EXP_RING, EXP_BITS),) * (EXP_HALVINGS - 1) \
            + ((64, 2 * EXP_BITS - f),)
        squares = tuple((i, i) for i in range(EXP_HALVINGS - 1))
        last, beaver = EXP_HALVINGS - 1, len(truncs)      # u^256; the input d
        return truncs, squares + ((last, 0), (last, beaver)), True
    raise ValueError(f"unknown chain {name!r}")


CHAINS = ("tpoly", "texp")


def _pair_words(pairs: tuple, k: int) -> list[tuple[int, tuple[str, ...]]]:
    """Where each pair's dealt cross products start in a chain's ``cross`` rows, and
    which they are: a square (i, i) needs h_i^2 and h_i w_i only (w_i^2 is w_i
    2^(width-shift), local); a product with the Beaver input (w = 0) h_i h and w_i h;
    any other pair all four."""
    out, at = [], 0
    for i, j in pairs:
        names = (("hh", "hw") if i == j else ("hh", "wh") if j == k
                 else ("hh", "hw", "wh", "ww"))
        out.append((at, names))
        at += len(names)
    return out


@dataclass(frozen=True)
class ChainMaterial:
    """One party's share of a masked chain's material: for each truncation the mask r,
    h = r' >> shift and w = msb(r') 2^(width - shift) on its ring (rows of ``r``,
    ``h``, ``w``); for each pair (i, j) shares of h_i h_j, h_i w_j, w_i h_j and w_i w_j
    (``cross``, one row per word that :func:`_pair_words` lists); and, for a chain that
    starts with a Beaver square, its mask ``a`` and ``c`` = a^2 (the mask is the last
    index of the pairs, as h = -a, w = 0)."""

    name: str
    r: np.ndarray
    h: np.ndarray
    w: np.ndarray
    cross: np.ndarray
    a: np.ndarray | None = None
    c: np.ndarray | None = None


def chain_material(name: str, n: int, frac_bits: int, prg: Prg
                   ) -> tuple[ChainMaterial, ChainMaterial]:
    """Both parties' material for ``n`` runs of chain ``name`` (:data:`CHAINS`)."""
    truncs, pairs, beaver = chain_spec(name, frac_bits)
    k = len(truncs)
    r, (r0, r1) = prg.root_u64((k, n))
    h = np.empty((k + 1, n), np.uint64)
    w = np.zeros((k + 1, n), np.uint64)
    for i, (width, shift) in enumerate(truncs):
        low, top = _ring_mask(r[i], width)
        h[i] = low >> np.uint64(shift)
        w[i] = top << np.uint64(width - shift)
    sq = ((None, None), (None, None))
    if beaver:
        a, (a0, a1) = prg.root_u64(n)
        c0, c1 = prg.split_u64(a * a)
        h[k] = _ZERO - a
        sq = ((a0, c0), (a1, c1))
    words = _pair_words(pairs, k)
    cross = np.empty((sum(len(names) for _, names in words), n), np.uint64)
    for (i, j), (at, names) in zip(pairs, words):
        for q, word in enumerate(names):
            cross[at + q] = (h[i] if word[0] == "h" else w[i]) * \
                (h[j] if word[1] == "h" else w[j])
    (h0, h1), (w0, w1) = prg.split_u64(h[:k]), prg.split_u64(w[:k])
    c0, c1 = prg.split_u64(cross)
    return (ChainMaterial(name, r0, h0, w0, c0, *sq[0]),
            ChainMaterial(name, r1, h1, w1, c1, *sq[1]))


class Chain:
    """One party's masked chain (``ChainMaterial``): values held as a public part P and
    a masked part L, the value being P + L (party 0 adds P).

    A faithful truncation's result is t = P + s w - h with P and s public once u^ is
    opened and h, w dealt (``_faithful``), so L = s w - h is known to the dealer up to
    the public s: the wires of ABY2.0 (Patra et al., USENIX Security 2021), or SPDZ's
    function-dependent preprocessing. The product of two such values is local:
    t_i t_j = P_i P_j + P_i L_j + P_j L_i + L_i L_j with
    L_i L_j = s_i s_j w_i w_j - s_i w_i h_j - s_j h_i w_j + h_i h_j from the dealt cross
    products, exactly the product a Beaver triple would give, with no opening. A chain
    opens only its truncations."""

    def __init__(self, ch: Channel, party: int, m: ChainMaterial, frac_bits: int) -> None:
        self.ch, self.party, self.m = ch, party, m
        self.truncs, self.pairs, _ = chain_spec(m.name, frac_bits)
        self.words = dict(zip(self.pairs, _pair_words(self.pairs, len(self.truncs))))
        self.vals: dict[int, tuple] = {}

    def const(self, c) -> np.uint64:
        return c if self.party == 0 else _ZERO

    def trunc(self, vals: np.ndarray, first: int) -> None:
        """Truncate the rows of ``vals`` as truncations first, first + 1, ... (one
        opening; they share a ring)."""
        width, shift = self.truncs[first]
        rows = slice(first, first + vals.shape[0])
        p, s = open_truncation(self.ch, self.party, vals, self.m.r[rows], width, shift)
        for k in range(vals.shape[0]):
            i = first + k
            low = np.multiply(s[k], self.m.w[i])
            low -= self.m.h[i]
            self.vals[i] = (p[k], s[k], low)

    def square_input(self, x: np.ndarray) -> np.ndarray:
        """x^2 by the chain's Beaver square (one opening of U = x - a); x = U + a then
        joins the chain as value len(truncs) (P = U, L = a)."""
        a, c = self.m.a, self.m.c
        u = open_value(self.ch, x - a)
        self.vals[len(self.truncs)] = (u, _ZERO, a)
        out = c + np.uint64(2) * u * a
        return out + u * u if self.party == 0 else out

    def val(self, i: int) -> np.ndarray:
        p, _, low = self.vals[i]
        return low + p if self.party == 0 else low

    def prod(self, i: int, j: int) -> np.ndarray:
        (pi, si, li), (pj, sj, lj) = self.vals[i], self.vals[j]
        at, names = self.words[(i, j)]
        got = dict(zip(names, self.m.cross[at:at + len(names)]))
        hh = got["hh"]
        if i == j:                          # w_i^2 = w_i 2^(width - shift)
            width, shift = self.truncs[i]
            hw = wh = got["hw"]
            ww = self.m.w[i] << np.uint64(width - shift)
        elif j == len(self.truncs):          # the Beaver input: w = 0, s = 0
            wh, hw, ww = got["wh"], _ZERO, _ZERO
        else:
            hw, wh, ww = got["hw"], got["wh"], got["ww"]
        # in place: a chain's products are most of its work (every temporary is a
        # fresh page-faulted array at these sizes)
        out = np.multiply(pi, lj)
        tmp = np.multiply(pj, li)
        out += tmp
        out += hh
        if ww is not _ZERO:
            np.multiply(si, sj, out=tmp)
            tmp *= ww
            out += tmp
        np.multiply(si, wh, out=tmp)
        out -= tmp
        if hw is not _ZERO:
            np.multiply(sj, hw, out=tmp)
            out -= tmp
        if self.party == 0:
            np.multiply(pi, pj, out=tmp)
            out += tmp
        return out


def tail_poly(ch: Channel, party: int, y: np.ndarray, m: ChainMaterial,
              c_f: np.ndarray, c_2f: np.ndarray, frac_bits: int) -> np.ndarray:
    """Shares of p(z) at 3f bits, z = y / 2^f - 1 (y at 2f bits), for the degree-12
    polynomial with coefficients c (ring constants at f bits in ``c_f``, at 2f in
    ``c_2f``): Paterson and Stockmeyer's evaluation of ``evaluator._tail`` as a masked
    chain ("tpoly"), four openings (z; z^2; z^3 and z^4; z^4 q_2(z)) where Beaver
    products opened eight values more."""
    c = Chain(ch, party, m, frac_bits)
    one = np.uint64(1) << np.uint64(frac_bits)
    c.trunc(y[None], 0)                                           # t0 = z + 1
    z = c.val(0) - c.const(one)
    c.trunc((c.prod(0, 0) - np.uint64(2) * one * c.val(0) + c.const(one * one))[None], 1)
    c.trunc(np.stack([c.prod(1, 0) - one * c.val(1), c.prod(1, 1)]), 2)   # z^3, z^4
    powers = (None, z, c.val(1), c.val(2))

    def piece(j: int) -> np.ndarray:                  # q_j(z) at 2f bits, locally
        out = np.full(y.shape, c.const(c_2f[4 * j]), np.uint64)
        for k in range(1, 4):
            out += c_f[4 * j + k] * powers[k]
        return out

    def times_z4(j: int) -> np.ndarray:               # z^4 q_j(z) at 3f bits
        out = c_2f[4 * j] * c.val(3) + c_f[4 * j + 1] * (c.prod(3, 0) - one * c.val(3))
        return out + c_f[4 * j + 2] * c.prod(3, 1) + c_f[4 * j + 3] * c.prod(3, 2)

    c.trunc((times_z4(2) + c_f[12] * c.prod(3, 3))[None], 4)     # z^4 (q_2 + c_12 z^4)
    # p = q_0 + z^4 (q_1 + z^4 q_2) at 3f bits
    return piece(0) * one + times_z4(1) + c.prod(3, 4)


def exp_chain(ch: Channel, party: int, d: np.ndarray, m: ChainMaterial, frac_bits: int
              ) -> np.ndarray:
    """Shares of exp(d) ~ (1 + d/256)^256 (1 + d^2/512) at f bits for d <= 2^-1 (f
    bits, clamped at -256): the chain "texp", ten openings (the square of
    u = 1 + d/256, eight truncations of the squarings, the last one's product with the
    correction) where the squarings as Beaver products and a product took eleven; the
    correction 1 + d^2/512 = 128 u^2 - 127 - d is linear in values the chain holds."""
    f, big = frac_bits, EXP_BITS
    c = Chain(ch, party, m, frac_bits)
    u = d + c.const(np.uint64(1) << np.uint64(f + EXP_HALVINGS))   # 1 + d/256 at f + 8
    c.trunc(c.square_input(u)[None], 0)                          # u^2 at 26 bits
    for i in range(1, EXP_HALVINGS):                             # u^4 .. u^256
        c.trunc(c.prod(i - 1, i - 1)[None], i)
    last, dv = EXP_HALVINGS - 1, len(c.truncs)
    # (u^256)(128 u^2 - 127 - d) at 52 bits: d = U + a - 2^(f+8) as the chain holds u
    lift = np.uint64(1 << (big - f))
    d_term = c.prod(last, dv) - (np.uint64(1) << np.uint64(f + EXP_HALVINGS)) * c.val(last)
    e = np.uint64(128) * c.prod(last, 0) \
        - (np.uint64(127) << np.uint64(big)) * c.val(last) - lift * d_term
    c.trunc(e[None], EXP_HALVINGS)
    return c.val(EXP_HALVINGS)


def chain_arrays(m: ChainMaterial) -> dict[str, np.ndarray]:
    """A chain's material as named arrays (``protocols.material_arrays``)."""
    out = {"r": m.r, "h": m.h, "w": m.w, "cross": m.cross}
    if m.a is not None:
        out["a"], out["c"] = m.a, m.c
    return out


def chain_from_arrays(name: str, get: Callable[[str], np.ndarray | None]) -> ChainMaterial:
    """Inverse of :func:`chain_arrays` (``get(key)``: the array or None), every shape
    checked against the chain's spec; ValueError otherwise."""
    truncs, pairs, beaver = chain_spec(name, 20)      # the shapes do not depend on f
    r, h, w, cross = (get(k) for k in ("r", "h", "w", "cross"))
    if r is None or h is None or w is None or cross is None:
        raise ValueError("incomplete masked chain material")
    mat = ChainMaterial(name, r, h, w, cross, get("a"), get("c"))
    k, n = len(truncs), r.shape[-1]
    if (r.shape != (k, n) or h.shape != (k, n) or w.shape != (k, n)
            or cross.shape != (sum(len(x) for _, x in _pair_words(pairs, k)), n)
            or (mat.a is None) == beaver or (mat.c is None) == beaver
            or (beaver and not mat.a.shape == mat.c.shape == (n,))):
        raise ValueError("bad masked chain material")
    return mat
