"""Masked chains: straight-line arithmetic whose products cost no opening.

A faithful truncation's result is t = P + s w - h with P and s public once the masked
value u^ is opened and h, w dealt (``protocols._faithful``): the parties hold the
value as a public part plus a mask the dealer knows up to the public s
(``ring.open_truncation``). Two such values
multiply locally, given the dealt cross products of their masks (the masked wires of
ABY2.0, Patra et al., USENIX Security 2021; SPDZ's function-dependent preprocessing),
so a chain of products and truncations opens only its truncations. The two chains
here: a tail's degree-12 correction polynomial ("tpoly", ``evaluator._tail``),
softmax's exponential ("texp", ``nonlinear._softmax``: the same polynomial evaluation
for exp(d/2), then one square) and a truncation with its square ("tsq", layer norm's
centered values and their squares from one opening). Each is one material step, elementwise, so its
material streams in chunks like any other.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from .prg import Prg
from .ring import ZERO as _ZERO, Channel, open_truncation, open_value
from .ring import ring_mask as _ring_mask


#: Masked chains (:class:`Chain`): per chain, its truncations as (ring width, shift)
#: and the products of two truncated values it takes, as index pairs into them (index
#: len(truncs): the chain's Beaver-square input, when it has one).
#: - "tpoly", a tail's degree-12 polynomial (:func:`tail_poly`) at c = ``chain_bits(f,
#:   shift)`` fractional bits (the step's shift chooses c; the price of a small c is the
#:   rounding, a few 2^-c, :func:`tail_error` and :func:`exp_error`): z (from z + 1 at f + 8 bits, below 2^(f+9): a 31-bit ring, 4
#:   bytes, shifted by 8 + f - c), z^2, z^3 and z^4 (below 2 at 2c bits for |z| <= 9/8:
#:   a (2c + 3)-bit ring), h = q_1 + z^4 q_2 from 3c bits to c (|h| < 1: a (3c + 3)-bit
#:   ring), and p = q_0 + z^4 h from 2c bits to f (|p| < 2: a (2c + 3)-bit ring; none
#:   when 2c = f); the products z z, z^2 z, z^2 z^2 and z^4 times z, z^2, z^3, z^4 and h.
#: - "texp", softmax's exponential (:func:`exp_chain`): the five truncations and eight
#:   products of "tpoly" for p(z) ~ exp(d/2), but z + 1 from d + 16 at f bits (below
#:   2^25 after the clamp: a 27-bit ring, 4 bytes) by a shift of 3 + f - c; p at 2c
#:   bits truncated to q = ``exp_p_bits`` (c at c = f, else f/2; p < 2: a (2c + 3)-bit
#:   ring), its square p^2 ~ exp(d) from 2q bits to f (p^2 < 4: a (2q + 4)-bit ring;
#:   none when 2q = f); the sixth product p p.
#: - "tsq" (:func:`trunc_square`): one truncation on the 64-bit ring (by f, or by the
#:   step's shift) and the truncated value's square, local.
#: The exponential's domain: d = 8 z - 8 in [EXP_LO, EXP_HI] = [-17, 1], z in
#: [-9/8, 9/8] (a coarse clamp of d at -16 lets d down to -17 through; a coarse row
#: max leaves d up to levels * 2^-4, below 1 up to 2^16 entries a row)
EXP_LO, EXP_HI = -17.0, 1.0
EXP_DEGREE = 12
_TPOLY_TRUNCS = 5
_TPOLY_PAIRS = ((0, 0), (1, 0), (1, 1), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4))


def chain_bits(frac_bits: int, bits: int = 0) -> int:
    """The fractional bits c a "tpoly" or "texp" chain runs at for values at f bits:
    ``bits`` (a step's ``shift``; 0: f), but at least ceil(f / 2) (p at 2c bits is
    truncated to f, or taken as it is when 2c = f) and at most f."""
    return min(frac_bits, max(bits or frac_bits, (frac_bits + 1) // 2))


def exp_p_bits(frac_bits: int, bits: int) -> int:
    """The bits q an exponential chain at c = ``bits`` truncates p to before squaring
    it: c at c = f (p^2 then truncated back to f), ceil(f/2) below, so that p^2 comes
    out at 2q = f bits (f even) with no truncation of its own."""
    return bits if bits >= frac_bits else (frac_bits + 1) // 2


def chain_spec(name: str, frac_bits: int, shift: int = 0) -> tuple[tuple, tuple, bool]:
    """(truncations, pairs, has a Beaver square) of chain ``name`` at f bits (``shift``:
    the "tsq" truncation's when not f; a "tpoly" or "texp" chain's own fractional bits,
    ``chain_bits``)."""
    f = frac_bits
    c = chain_bits(f, shift)
    powers = ((2 * c + 3, c),) * 3                 # z^2, z^3, z^4 (below 2 at 2c bits)
    h = ((3 * c + 3, 2 * c),)                      # |h| < 1 at 3c bits
    last = ((2 * c + 3, 2 * c - f),) if 2 * c > f else ()     # p (tpoly), p^2 (texp)
    if name == "tpoly":
        return ((f + 11, 8 + f - c),) + powers + h + last, _TPOLY_PAIRS, False
    if name == "texp":
        p, q = _TPOLY_TRUNCS, exp_p_bits(f, c)
        square = ((2 * q + 4, 2 * q - f),) if 2 * q > f else ()
        return ((((27, 3 + f - c),) + powers + h + ((2 * c + 3, 2 * c - q),) + square),
                _TPOLY_PAIRS + ((p, p),), False)
    if name == "tsq":
        return ((64, shift or f),), ((0, 0),), False
    raise ValueError(f"unknown chain {name!r}")


@lru_cache(maxsize=None)
def exp_coeffs() -> tuple[float, ...]:
    """p(z) ~ exp((8 z - 8) / 2) = exp(d / 2) on z in [-9/8, 9/8] (d in [EXP_LO,
    EXP_HI]), degree ``EXP_DEGREE``, ascending power-basis coefficients (all below
    0.2): a near-minimax fit (least squares on 2000 Chebyshev nodes, reweighted by the
    error 100 times: Lawson's algorithm), so p(z)^2 is within ``EXP_FIT_ERROR`` of
    exp(d) over the domain (absolute: a softmax row's sum is at least its max entry's
    exp(d) >= 1, so its probabilities err by no more)."""
    k = np.arange(2000)
    half = (EXP_HI - EXP_LO) / 16.0
    z = half * np.cos(np.pi * (k + 0.5) / 2000)
    basis = np.vander(z, EXP_DEGREE + 1, increasing=True)
    target = np.exp(4.0 * z - 4.0)
    w = np.full(z.size, 1.0 / z.size)
    for _ in range(100):
        root = np.sqrt(w)
        c = np.linalg.lstsq(basis * root[:, None], target * root, rcond=None)[0]
        w = w * np.abs(basis @ c - target)
        w /= w.sum()
        np.maximum(w, 1e-200, out=w)
    return tuple(float(v) for v in c)


#: the fit's error max |p(z)^2 - exp(d)| over the domain (1.08e-6 measured on 20001
#: points, 6.5e-7 for d <= 0; ``tests/test_mpc_core.py`` checks it)
EXP_FIT_ERROR = 1.2e-6


def _poly12_float(coeffs, z: np.ndarray, err: np.ndarray) -> np.ndarray:
    """:func:`_poly12` in floats with additive errors ``err`` (5, ...) on its five
    truncated values (z, z^2, z^3, z^4, h): the chain's own arithmetic, for its bound."""
    a = np.asarray(coeffs)
    z1 = z + err[0]
    z2 = z1 * z1 + err[1]
    z3 = z2 * z1 + err[2]
    z4 = z2 * z2 + err[3]
    q = [a[4 * j] + a[4 * j + 1] * z1 + a[4 * j + 2] * z2 + a[4 * j + 3] * z3
         for j in range(3)]
    h = q[1] + z4 * (q[2] + a[12] * z4) + err[4]
    return q[0] + z4 * h


def poly12_error(coeffs, z: np.ndarray, bits: int) -> np.ndarray:
    """A bound, at each z, on |p - p(z)| for :func:`_poly12`'s p at 2c bits (c = ``bits``,
    before any last truncation): each of its five faithful truncations errs by under
    2^-c, moving p by under |dp/dt| 2^-c (the total derivative through the products
    after it, worst signs; central differences of :func:`_poly12_float`, exact for
    these polynomials to rounding), and each coefficient's rounding to c bits by
    2^-(c+1) |z|^k (the constant terms', at 2c bits, by 2^-(2c+1))."""
    z = np.asarray(z, np.float64)
    step, total = 1e-4, np.zeros_like(z)
    for i in range(5):
        e = np.zeros((5,) + z.shape)
        e[i] = step
        total += np.abs(_poly12_float(coeffs, z, e) - _poly12_float(coeffs, z, -e)) \
            / (2 * step)
    powers = sum(np.abs(z) ** k for k in range(13) if k % 4)
    return (total + powers / 2) * 2.0 ** -bits + 3 * 2.0 ** -(2 * bits + 1) \
        + 1e-3 * 2.0 ** -bits          # the differences' own rounding, generously


def tail_error(coeffs, z: np.ndarray, frac_bits: int, bits: int = 0) -> np.ndarray:
    """A bound, at each z, on :func:`tail_poly`'s |p - p(z)| at c = ``chain_bits(f,
    bits)``: :func:`poly12_error`, and p's last truncation to f bits (none at 2c = f)."""
    c = chain_bits(frac_bits, bits)
    return poly12_error(coeffs, z, c) + (2.0 ** -frac_bits if 2 * c > frac_bits else 0.0)


def exp_error(d: np.ndarray, frac_bits: int, bits: int = 0) -> np.ndarray:
    """A bound, at each d, on :func:`exp_chain`'s |e - p(z)^2| at c = ``chain_bits(f,
    bits)``: p errs by under delta = :func:`poly12_error` + 2^-q (its truncation to q =
    ``exp_p_bits`` bits), p^2 by 2 |p| delta + delta^2, and the last truncation to f
    bits by 2^-f (none at 2q = f)."""
    c = chain_bits(frac_bits, bits)
    q = exp_p_bits(frac_bits, c)
    z = np.asarray(d, np.float64) / 8.0 + 1.0
    p = np.abs(np.polynomial.polynomial.polyval(z, exp_coeffs()))
    delta = poly12_error(exp_coeffs(), z, c) + 2.0 ** -q
    return 2 * p * delta + delta * delta + (2.0 ** -frac_bits if 2 * q > frac_bits else 0.0)


CHAINS = ("tpoly", "texp", "tsq")


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


def chain_material(name: str, n: int, frac_bits: int, prg: Prg, shift: int = 0
                   ) -> tuple[ChainMaterial, ChainMaterial]:
    """Both parties' material for ``n`` runs of chain ``name`` (:data:`CHAINS`)."""
    truncs, pairs, beaver = chain_spec(name, frac_bits, shift)
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

    def __init__(self, ch: Channel, party: int, m: ChainMaterial, frac_bits: int,
                 shift: int = 0) -> None:
        # frac_bits: the chain's own c (``chain_bits``) for "tpoly" and "texp", whose
        # values enter and leave at f
        self.ch, self.party, self.m = ch, party, m
        self.frac_bits = frac_bits if m.name == "tsq" else chain_bits(frac_bits, shift)
        self.truncs, self.pairs, _ = chain_spec(m.name, frac_bits, shift)
        if m.r.shape[0] != len(self.truncs):
            raise ValueError(f"masked chain material for {m.r.shape[0]} truncations, "
                             f"where the {m.name} step has {len(self.truncs)}")
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


def _poly12(c: Chain, y: np.ndarray, c_f: np.ndarray, c_2f: np.ndarray) -> np.ndarray:
    """p(z) at 2c bits (c: the chain's bits) on chain ``c``'s first five truncations
    and eight products (the "tpoly" part of a spec), z + 1 = y truncated to c bits by
    the spec's first shift (y at f + 8 bits for "tpoly", at f + 3 for "texp"): Paterson and Stockmeyer's degree-12
    evaluation (``evaluator._tail``), h = q_1 + z^4 q_2 truncated from 3c bits to c
    (c: the chain's bits), so p = q_0 + z^4 h is at 2c (h's rounding moves p by under
    |z|^4 2^-c)."""
    one = np.uint64(1) << np.uint64(c.frac_bits)
    c.trunc(y[None], 0)                                           # t0 = z + 1
    z = c.val(0) - c.const(one)
    c.trunc((c.prod(0, 0) - np.uint64(2) * one * c.val(0) + c.const(one * one))[None], 1)
    c.trunc(np.stack([c.prod(1, 0) - one * c.val(1), c.prod(1, 1)]), 2)   # z^3, z^4
    powers = (None, z, c.val(1), c.val(2))

    def piece(j: int) -> np.ndarray:                  # q_j(z) at 2c bits, locally
        out = np.full(y.shape, c.const(c_2f[4 * j]), np.uint64)
        for k in range(1, 4):
            out += c_f[4 * j + k] * powers[k]
        return out

    def times_z4(j: int) -> np.ndarray:               # z^4 q_j(z) at 3c bits
        out = c_2f[4 * j] * c.val(3) + c_f[4 * j + 1] * (c.prod(3, 0) - one * c.val(3))
        return out + c_f[4 * j + 2] * c.prod(3, 1) + c_f[4 * j + 3] * c.prod(3, 2)

    # h = q_1 + z^4 (q_2 + c_12 z^4) from 3c bits to c
    c.trunc((piece(1) * one + times_z4(2) + c_f[12] * c.prod(3, 3))[None], 4)
    return piece(0) + c.prod(3, 4)                   # p = q_0 + z^4 h at 2c bits


def tail_poly(ch: Channel, party: int, y: np.ndarray, m: ChainMaterial,
              c_f: np.ndarray, c_2f: np.ndarray, frac_bits: int, bits: int = 0
              ) -> np.ndarray:
    """Shares of p(z) at f bits, z + 1 = y at f + 8 bits (|z| <= 1), for the degree-12
    polynomial with coefficients a (ring constants at c = ``chain_bits(f)`` bits in
    ``c_f``, at 2c in ``c_2f``; |p| < 2 for |z| <= 1): Paterson and Stockmeyer's
    evaluation of ``evaluator._tail`` as a masked chain ("tpoly") at c bits, five
    openings (z; z^2; z^3 and z^4; h; p: 4 + 6 + 12 + 8 + 6 bytes at c = f, 4 + 4 + 8 +
    6 + 4 at c = 14, and at c = f/2 four, 4 + 3 + 6 + 5, p being at 2c = f already)
    where Beaver products and a truncation opened nine values more. Error: under
    :func:`tail_error` (z's truncation to c bits, the powers', h's and the
    coefficients' roundings times the polynomial's sensitivities, and p's last
    truncation's 2^-f; ``tests/test_mpc_core.py``)."""
    c = Chain(ch, party, m, frac_bits, bits)
    p = _poly12(c, y, c_f, c_2f)
    if len(c.truncs) == _TPOLY_TRUNCS:                  # 2c = f: p is at f bits
        return p
    c.trunc(p[None], _TPOLY_TRUNCS)
    return c.val(_TPOLY_TRUNCS)


@lru_cache(maxsize=None)
def _exp_ring_coeffs(frac_bits: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(exp_coeffs())
    return tuple(np.round(c * 2.0 ** b).astype(np.int64).astype(np.uint64)
                 for b in (frac_bits, 2 * frac_bits))


def exp_chain(ch: Channel, party: int, d: np.ndarray, m: ChainMaterial, frac_bits: int,
              bits: int = 0) -> np.ndarray:
    """Shares of exp(d) ~ p(z)^2 at f bits for d in [EXP_LO, EXP_HI] (f bits), the
    chain at c = ``chain_bits(f, bits)`` bits: z + 1 = (d + 16) / 8 is d + 16 read at
    f + 3 bits and truncated to c, p(z) ~ exp(d/2) (:func:`exp_coeffs`) the tails'
    degree-12 evaluation (four openings, the first z + 1 on a 27-bit ring), p from 2c
    bits to q = ``exp_p_bits`` and squared, from 2q bits to f (no truncation when
    2q = f): at c = 14, five openings on 27-, 31-, 31 (two)-, 45- and 31-bit rings, 26
    bytes a value (42 at c = f, six openings), where the limit (1 + d/256)^256 took
    eight squarings, ten openings and 73 bytes. Outside the domain the result is
    wrong (the kernels clamp d first).

    Error (``tests/test_mpc_core.py``), with e = exp(d), from the float formula p(z)^2:
    under :func:`exp_error` at each d (p errs by its truncations' and coefficients'
    roundings times their sensitivities and p's own truncation to q bits, p^2 by 2 p
    times that, the last truncation by 2^-f): at c = 14, 7.6e-3 at d = 1 and 3.5e-3
    for d <= 0 (3.9e-3 measured); at c = f, 7.2e-5 and 2.6e-5 (2.7e-5 measured), also
    under 2^(3-f) e + 14 2^-f sqrt(e) + 2^-f, 17 2^-f for d <= 0; from e,
    ``EXP_FIT_ERROR`` more. Softmax's probabilities divide by a row sum of at least 1
    (``tests/test_mpc_transformer.py`` bounds them from these)."""
    f = frac_bits
    c = Chain(ch, party, m, frac_bits, bits)
    c_f, c_2f = _exp_ring_coeffs(c.frac_bits)
    p = _poly12(c, d + c.const(np.uint64(16) << np.uint64(f)), c_f, c_2f)
    c.trunc(p[None], _TPOLY_TRUNCS)                              # p at c bits
    sq = c.prod(_TPOLY_TRUNCS, _TPOLY_TRUNCS)                    # p^2 at 2c bits
    if len(c.truncs) == _TPOLY_TRUNCS + 1:              # 2c = f
        return sq
    c.trunc(sq[None], _TPOLY_TRUNCS + 1)
    return c.val(_TPOLY_TRUNCS + 1)


def trunc_square(ch: Channel, party: int, y: np.ndarray, m: ChainMaterial, frac_bits: int,
                 shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shares of t = y / 2^shift (default f; faithful: floor or floor + 1, |y| < 2^62)
    and of t^2, exact given t, from one opening: the chain "tsq", where a truncation
    and a Beaver square opened twice."""
    c = Chain(ch, party, m, frac_bits, shift)
    c.trunc(y[None], 0)
    return c.val(0), c.prod(0, 0)


def chain_arrays(m: ChainMaterial) -> dict[str, np.ndarray]:
    """A chain's material as named arrays (``protocols.material_arrays``)."""
    out = {"r": m.r, "h": m.h, "w": m.w, "cross": m.cross}
    if m.a is not None:
        out["a"], out["c"] = m.a, m.c
    return out


def chain_from_arrays(name: str, get: Callable[[str], np.ndarray | None]) -> ChainMaterial:
    """Inverse of :func:`chain_arrays` (``get(key)``: the array or None), every shape
    checked against the chain's spec (at any chain bits: with or without the last
    truncation, ``chain_spec``; :class:`Chain` checks the count against its step's);
    ValueError otherwise."""
    r, h, w, cross = (get(k) for k in ("r", "h", "w", "cross"))
    if r is None or h is None or w is None or cross is None:
        raise ValueError("incomplete masked chain material")
    mat = ChainMaterial(name, r, h, w, cross, get("a"), get("c"))
    for bits in (0, 10):                  # the shapes depend on f only through 2c > f
        truncs, pairs, beaver = chain_spec(name, 20, bits)
        k, n = len(truncs), r.shape[-1]
        if not (r.shape != (k, n) or h.shape != (k, n) or w.shape != (k, n)
                or cross.shape != (sum(len(x) for _, x in _pair_words(pairs, k)), n)
                or (mat.a is None) == beaver or (mat.c is None) == beaver
                or (beaver and not mat.a.shape == mat.c.shape == (n,))):
            return mat
    raise ValueError("bad masked chain material")
