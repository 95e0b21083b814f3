"""Party-side two-party protocols on additive shares over Z_(2^64), and the dealer's
material for them.

Each protocol runs at party ``b`` (0 or 1) on its share and talks to the other party
through a :class:`Channel` (one ``exchange`` = one round: both send, both receive).
Constructions:

- Beaver multiplication (Beaver, CRYPTO 1991): open x - a and y - b for a dealer triple
  c = a * b; elementwise and, with matrix triples, matrix products.
- Exact truncation with one round (the DCF-based shift of Boyle et al., EUROCRYPT 2021,
  Sec. 5): open x^ = x + r; then x >> f = (x^ >> f) - (r >> f) - [x^ mod 2^f < r mod 2^f]
  + 2^(64 - f) [x^ < r], two DCFs; a 2^63 offset makes the shift arithmetic. The
  parties' evaluator uses it for every dense layer: it never fails, unlike the
  probabilistic local truncation (Mohassel and Zhang, "SecureML", S&P 2017, Thm. 1),
  which is kept for reference and fails with probability 2^(l_x + 1 - 64) per value.
- Sign (DReLU) from one distributed comparison function (Boyle et al., EUROCRYPT 2021):
  open x^ = x + r for a dealer mask r; then msb(x) = msb(x^) xor msb(r) xor
  [x^ mod 2^63 < r mod 2^63], and the dealer's DCF key with payload 1 - 2 msb(r) plus a
  share of msb(r) turns the bracket into shares of msb(r) xor [...] without another
  round. ReLU(x) = x * DReLU(x) with one Beaver product: two rounds, 24 bytes sent per
  value per party.
- With the comparisons as binary circuits instead (``circuit``, the default: more rounds
  but a fraction of the computation and about 1/40 of the dealer's material, which is
  what bounds throughput on a fast network), three choices keep the material small:
  * Faithful truncation with one opening and no comparison (the bounded-input
    truncation of SecureML's analysis made exact in its wrap: Mohassel and Zhang, S&P
    2017, Thm. 1; the "1-bit error" of Cheetah, Huang et al., USENIX Security 2022,
    and SIRNN's truncation with a known most significant bit, Rathee et al., S&P
    2021): for u = y + 2^62 in [0, 2^63) (|y| < 2^62) and the opening u^ = u + r,
    u + r wraps 2^64 exactly when msb(u^) = 0 and msb(r) = 1, so
    (u^ >> f) - (r >> f) + 2^(64-f) (1 - msb(u^)) msb(r) = floor(u / 2^f) + c with the
    low carry c in {0, 1}: an error below one unit in the last place, and
    E[c] = (u mod 2^f) / 2^f makes it unbiased (stochastic rounding). One round and
    three words of material per value, where the exact truncation takes a 63-bit and
    an f-bit comparison.
  * Comparisons on the bits the values need (l = ``CMP_BITS`` ring bits: the sign of
    x is bit l - 1 of x mod 2^l when |x| < 2^(l-1), as in CrypTFlow2's millionaires'
    on l bits, Rathee et al., CCS 2020, and SecureNN's MSB extraction, Wagh et al.,
    PETS 2019), and without the lowest ``CMP_DROP`` = k of them: bits k .. l-2 of
    x^ and r go through the tree, which drops the borrow out of bit k - 1; the sign
    comes out wrong only for x in [-2^k, 0) ring units (it says x >= 0), so a ReLU or
    a max errs by less than 2^k units there and is exact elsewhere.
  * The tree's result stays XOR-shared and one more round turns it into arithmetic
    shares or multiplies a value by it (a multiplexer from a daBit, Rotaru and Wood,
    INDOCRYPT 2019): the dealer shares a random bit rho both ways and the products
    v rho it can form; opening e = b xor rho gives v b = e v + (1 - 2e) v rho. For
    ReLU v is the compared value itself, masked by the same r (v rho = x^ rho - r rho,
    no second opening); after a truncation, v rho follows from the dealer's r >> f
    and wrap shares times rho. A ReLU is one opening, a three-round tree (l - 1 - k =
    32 bits, from the dealer's tables of 4-bit blocks: ``circuit``) and the
    multiplexer: five rounds; fused with the truncation before it, still five. A
    clip to [lo, hi] runs the trees for both thresholds on the same opening and
    finishes in one round too: the band bit is their XOR.
- Narrow openings, for values whose range a kernel knows: shares mod 2^64 are shares
  mod 2^w too, so a truncation of |y| < 2^(w-2) opens u^ = y + 2^(w-2) + r mod 2^w
  (ceil(w / 8) bytes, not 8) and lifts back exactly with the same wrap rule on the
  w-bit ring (``ring.open_truncation``; the masked chains' truncations use it, the ring
  extension of Cheetah's and SIRNN's mixed bitwidths, Huang et al., USENIX Security
  2022; Rathee et al., S&P 2021). A comparison opens x + r mod 2^l, and a ReLU lifts x
  back by the same rule (f = 0) for its multiplexer, one more dealt word
  (2^l msb_l(r') rho). Kernels choose l, and how many low bits the tree may leave out
  (a coarse comparison is exact but within 2^k of its threshold, which is all a row
  max or a band edge needs): ``evaluator.Step``'s width and drop.
- Max pooling as max(a, b) = b + ReLU(a - b), in a tree over the window.
BOUNDS (circuit): a truncation input needs |y| < 2^62 ring units (2^22 real at 2f = 40
fractional bits); a comparison input -2^(l-1) <= x < 2^(l-1) - 2^k ring units (about
+-2^15 real at f = 20); within them results are exact up to the one-unit truncation and
the 2^k comparison band above.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from . import chains, circuit, fss
from .fixed import FRAC_BITS
from .prg import Prg
from .ring import ZERO as _ZERO, Channel, offset_w as _offset_w, open_value
from .ring import open_truncation, ring_mask as _ring_mask
_LOW63 = np.uint64((1 << 63) - 1)
_SHIFT63 = np.uint64(63)

#: l, the ring bits of the circuit comparisons (ReLU, sign, max pooling, selections): a
#: comparison input must satisfy |x| < 2^(l-1) in ring units (|x| < 2^(l-1-f) = 2^15
#: real at f = 20); outside, the sign is that of x mod 2^l (wrong whenever bit l-1 of x
#: differs from the sign). The zoo models' largest comparison input is below 2^8 real
#: (``bench/mpc_zoo.py`` records it), so 36 leaves a margin of 2^7. Max pooling's
#: padding constant needs |x| < 2^(l-2). A comparison after a truncation, on the 2f-bit
#: value, uses l + f bits and drops k + f.
CMP_BITS = 36
#: k, the low bits the circuit comparisons leave out: the sign is wrong (says >= 0) for
#: x in [-2^k, 0) ring units only, 2^-17 real at f = 20; l - 1 - k = 32 bits go through
#: the tree, three rounds.
CMP_DROP = 3
#: The faithful truncation's offset: its input must satisfy |y| < 2^62 ring units.
_OFF62 = np.uint64(1 << 62)


def share(x: np.ndarray, prg: Prg) -> tuple[np.ndarray, np.ndarray]:
    """Additive shares of ring elements: (x - r, r) with r from a CSPRNG (with a
    ``prg.Deal``, party 0's half from its stream)."""
    return prg.split_u64(x)


def reconstruct(s0: np.ndarray, s1: np.ndarray) -> np.ndarray:
    return np.asarray(s0, dtype=np.uint64) + np.asarray(s1, dtype=np.uint64)


# -- dealer material ----------------------------------------------------------------------
@dataclass(frozen=True)
class Triple:
    """One party's share of a Beaver triple c = a * b (elementwise or matrix)."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray


@dataclass(frozen=True)
class Square:
    """One party's share of a square pair: a random a and c = a^2; ``xa``, when set,
    a second operand's Beaver triple (b, a b) riding on the same a (x y and x^2 from
    one opening of x - a and y - b)."""

    a: np.ndarray
    c: np.ndarray
    xa: Triple | None = None


@dataclass(frozen=True)
class SignMaterial:
    """One party's share of the mask r, its DCF key, and its share of msb(r)."""

    r: np.ndarray
    key: fss.DcfKey
    rho: np.ndarray


@dataclass(frozen=True)
class TruncMaterial:
    """One party's share of the mask r and of r >> f, and the two DCF keys."""

    r: np.ndarray
    r_high: np.ndarray
    low: fss.DcfKey      # [x^ mod 2^f < r mod 2^f]
    wrap: fss.DcfKey     # 2^(64 - f) [x^ < r]


@dataclass(frozen=True)
class TruncReluMaterial:
    """Truncation and sign from one opening: an f-bit DCF for the low carry and one
    63-bit DCF with three payloads (sign, and the wrap for either public top bit)."""

    r: np.ndarray
    r_high: np.ndarray
    rho: np.ndarray          # msb(r)
    rho_wrap: np.ndarray     # msb(r) * 2^(64 - f)
    low: fss.DcfKey
    top: fss.DcfKey
    triple: Triple


@dataclass(frozen=True)
class ReluMaterial:
    sign: SignMaterial
    triple: Triple


@dataclass(frozen=True)
class CircuitTruncMaterial:
    """Faithful truncation: shares of the mask r, of r >> f and of msb(r) 2^(64-f)."""

    r: np.ndarray
    r_high: np.ndarray
    wrap: np.ndarray


#: What a circuit comparison's multiplexer computes: the bit alone ("sign"), the compared
#: value times it ("relu"), another value times it ("select", with the mask a of that
#: value), or the truncated value times it ("trunc_relu"); "clip" and "trunc_clip" add
#: a second tree (the upper threshold, from the same opening) and a second daBit.
CMP_KINDS = ("sign", "relu", "select", "trunc_relu", "clip", "trunc_clip")


@dataclass(frozen=True)
class CircuitCmpMaterial:
    """A comparison from one opening x^ = x + r and what follows it: XOR shares of r's
    bit l-1 (``r_rows``, one packed row), the tree's tables of r's bits k .. l-2 and
    its bit triples, a daBit rho (XOR shares in
    ``rho_row``, arithmetic in ``rho``) and the arithmetic shares of the products with
    rho that ``kind`` needs (``extra``): (r rho,) for "relu" and "clip", (a, a rho) for
    "select", (r_high rho, wrap rho) for "trunc_relu" and "trunc_clip", whose
    truncation shares are in ``trunc``. The clips add a second tree (``tree2``) and a
    second daBit (row 1 of ``rho_row`` and of ``rho``, which are then 2-D)."""

    kind: str
    r: np.ndarray
    r_rows: np.ndarray
    tree: circuit.TreeMaterial
    rho_row: np.ndarray
    rho: np.ndarray
    extra: tuple = ()
    trunc: CircuitTruncMaterial | None = None
    tree2: circuit.TreeMaterial | None = None
    #: the opening's ring bits: 64, or l itself (a narrow comparison: x^ = x + r mod 2^l,
    #: the tree on bits drop .. l - 2; for "relu" the value is lifted back exactly)
    width: int = 64
    drop: int = CMP_DROP

    @property
    def bits(self) -> int:
        """l: the comparison's sign bit is bit l - 1."""
        return self.drop + self.tree.width + 1


def triples(shape, prg: Prg) -> tuple[Triple, Triple]:
    """Elementwise Beaver triples of ``shape`` for the two parties (a and b random
    secrets, c = a b computed: with a ``Deal``, party 1 is sent c's half only)."""
    (a, (a0, a1)), (b, (b0, b1)) = prg.root_u64(shape), prg.root_u64(shape)
    c0, c1 = prg.split_u64(a * b)
    return Triple(a0, b0, c0), Triple(a1, b1, c1)


def squares(shape, prg: Prg, with_product: bool = False) -> tuple[Square, Square]:
    """Square pairs (a random, c = a^2) for both parties; ``with_product``: also b and
    a b for a second operand (see :func:`mul_square`)."""
    a, (a0, a1) = prg.root_u64(shape)
    c0, c1 = prg.split_u64(a * a)
    if not with_product:
        return Square(a0, c0), Square(a1, c1)
    b, (b0, b1) = prg.root_u64(shape)
    ab0, ab1 = prg.split_u64(a * b)
    return Square(a0, c0, Triple(a0, b0, ab0)), Square(a1, c1, Triple(a1, b1, ab1))


def matrix_triples(m: int, k: int, n: int, prg: Prg) -> tuple[Triple, Triple]:
    """Shares of A (m x k), B (k x n) and C = A @ B, for a product with secret weights."""
    a, b = prg.uint64((m, k)), prg.uint64((k, n))
    c = a @ b
    (a0, a1), (b0, b1), (c0, c1) = share(a, prg), share(b, prg), share(c, prg)
    return Triple(a0, b0, c0), Triple(a1, b1, c1)


def batched_matrix_triples(g: int, m: int, k: int, n: int, prg: Prg
                           ) -> tuple[Triple, Triple]:
    """``g`` matrix triples at once: A (g, m, k), B (g, k, n) random, C = A @ B (drawn
    like :func:`triples`, so a ``prg.Deal`` sends party 1 only its half of C)."""
    (a, (a0, a1)), (b, (b0, b1)) = prg.root_u64((g, m, k)), prg.root_u64((g, k, n))
    c0, c1 = prg.split_u64(ring_matmul_shares(a, b))
    return Triple(a0, b0, c0), Triple(a1, b1, c1)


_LIMB = np.uint64(16)
_LIMB_MASK = np.uint64(0xFFFF)


def ring_matmul_shares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x @ y in Z_(2^64) for two uint64 arrays (..., m, k) and (..., k, n), both full
    64-bit (shares, masks): each cut into four 16-bit limbs, the ten limb products that
    land below 2^64 run in float64 BLAS, exact while k 2^32 < 2^53 (k < 2^21). With
    k = 1 (a row scaled by a per-row value, ``nonlinear``) it is a broadcast product."""
    if x.shape[-1] == 1:
        return x * y
    if x.shape[-1] >= 1 << 21:
        return np.matmul(x, y)
    xl = [((x >> (_LIMB * np.uint64(i))) & _LIMB_MASK).astype(np.float64) for i in range(4)]
    yl = [((y >> (_LIMB * np.uint64(j))) & _LIMB_MASK).astype(np.float64) for j in range(4)]
    out = None
    for i in range(4):
        for j in range(4 - i):
            part = np.matmul(xl[i], yl[j]).astype(np.uint64) << (_LIMB * np.uint64(i + j))
            out = part if out is None else out + part
    return out


def sign_material(n: int, prg: Prg) -> tuple[SignMaterial, SignMaterial]:
    r = prg.uint64(n)
    rho = r >> _SHIFT63
    beta = np.uint64(1) - np.uint64(2) * rho
    k0, k1 = fss.gen(r & _LOW63, beta, 63, prg)
    (r0, r1), (p0, p1) = share(r, prg), share(rho, prg)
    return SignMaterial(r0, k0, p0), SignMaterial(r1, k1, p1)


def trunc_material(n: int, frac_bits: int, prg: Prg) -> tuple[TruncMaterial, TruncMaterial]:
    r = prg.uint64(n)
    f = np.uint64(frac_bits)
    low0, low1 = fss.gen(_low_bits(r, frac_bits), np.ones(n, np.uint64), frac_bits, prg)
    wrap0, wrap1 = fss.gen(r, np.full(n, np.uint64(1) << np.uint64(64 - frac_bits)), 64,
                           prg)
    (r0, r1), (h0, h1) = share(r, prg), share(r >> f, prg)
    return TruncMaterial(r0, h0, low0, wrap0), TruncMaterial(r1, h1, low1, wrap1)


def trunc_relu_material(n: int, frac_bits: int, prg: Prg
                        ) -> tuple[TruncReluMaterial, TruncReluMaterial]:
    r = prg.uint64(n)
    f = np.uint64(frac_bits)
    rho = r >> _SHIFT63
    lift = np.uint64(1) << np.uint64(64 - frac_bits)
    low0, low1 = fss.gen(_low_bits(r, frac_bits), np.ones(n, np.uint64), frac_bits, prg)
    beta = np.stack([np.uint64(1) - np.uint64(2) * rho, (np.uint64(1) - rho) * lift,
                     rho * lift], axis=1)
    top0, top1 = fss.gen(r & _LOW63, beta, 63, prg)
    (r0, r1), (h0, h1) = share(r, prg), share(r >> f, prg)
    (p0, p1), (w0, w1) = share(rho, prg), share(rho * lift, prg)
    t0, t1 = triples(n, prg)
    return (TruncReluMaterial(r0, h0, p0, w0, low0, top0, t0),
            TruncReluMaterial(r1, h1, p1, w1, low1, top1, t1))


def relu_material(n: int, prg: Prg) -> tuple[ReluMaterial, ReluMaterial]:
    s0, s1 = sign_material(n, prg)
    t0, t1 = triples(n, prg)
    return ReluMaterial(s0, t0), ReluMaterial(s1, t1)


def circuit_trunc_material(n: int, frac_bits: int, prg: Prg, r=None
                           ) -> tuple[CircuitTruncMaterial, CircuitTruncMaterial]:
    """Faithful truncation by ``frac_bits``: one opening, no comparison. ``r``: the mask
    as (value, (share0, share1)) when a comparison shares it."""
    r, (r0, r1) = prg.root_u64(n) if r is None else r
    lift = np.uint64(1) << np.uint64(64 - frac_bits)
    (h0, h1) = prg.split_u64(r >> np.uint64(frac_bits))
    (w0, w1) = prg.split_u64((r >> _SHIFT63) * lift)
    return CircuitTruncMaterial(r0, h0, w0), CircuitTruncMaterial(r1, h1, w1)


#: the comparison kinds that can open on a narrow ring (``circuit_cmp_material``'s
#: ``bits``): their value is the compared one (lifted back exactly), a constant, or
#: opened on its own
NARROW_KINDS = ("sign", "relu", "select")


def circuit_cmp_material(kind: str, n: int, prg: Prg, frac_bits: int = 0, bits: int = 0,
                         drop: int = 0) -> tuple[CircuitCmpMaterial, CircuitCmpMaterial]:
    """A comparison on ``CMP_BITS`` ring bits less the lowest ``CMP_DROP`` (for
    "trunc_relu": on the 2f-bit value before its truncation by ``frac_bits``, so both
    move up by f) with the multiplexer material ``kind`` needs (:data:`CMP_KINDS`).

    ``bits`` = l (and ``drop`` = k) instead: a narrow comparison (:data:`NARROW_KINDS`)
    that opens x + r mod 2^l (ceil(l / 8) bytes, not 8) and runs the tree on bits
    k .. l - 2; a "relu" then needs |x| < 2^(l-2) to lift x back (one more word: the
    wrap of the l-bit mask times rho)."""
    if kind not in CMP_KINDS:
        raise ValueError(f"unknown comparison kind {kind!r}")
    fused = kind.startswith("trunc_")
    clip = kind.endswith("clip")
    shift = frac_bits if fused else 0
    narrow = bool(bits)
    if narrow and (kind not in NARROW_KINDS or not 16 <= bits <= 63):
        raise ValueError(f"a {kind} comparison cannot open {bits} bits")
    bits, drop = bits or CMP_BITS, drop or CMP_DROP
    if not 1 <= drop <= bits - 3:
        raise ValueError(f"a comparison on {bits} bits cannot leave out {drop}")
    width = bits - 1 - drop
    nb = (n + 7) // 8
    r, r_shares = prg.root_u64(n)
    trunc = (circuit_trunc_material(n, frac_bits, prg, (r, r_shares))
             if fused else (None, None))
    r_bits = circuit.bit_rows(r >> np.uint64(drop + shift), width + 1)
    rows = prg.split_bits(r_bits[width:width + 1])         # bit l - 1 (the tables: the rest)
    tree = circuit.tree_material(width, n, prg, r_bits)
    tree2 = circuit.tree_material(width, n, prg, r_bits) if clip else (None, None)
    rho_row, rho_rows = prg.root_bits((2 if clip else 1, nb))
    rho = np.stack([circuit.row_values(row, n) for row in rho_row])
    first = rho[0]
    extra: list = []
    if kind == "relu" and narrow:
        low, top = _ring_mask(r, bits)
        extra = [prg.split_u64(low * first),
                 prg.split_u64(top * first * (np.uint64(1) << np.uint64(bits)))]
    elif kind in ("relu", "clip"):
        extra = [prg.split_u64(r * first)]
    elif kind == "select":
        a, a_shares = prg.root_u64(n)
        extra = [a_shares, prg.split_u64(a * first)]
    elif fused:
        f = np.uint64(frac_bits)
        lift = np.uint64(1) << np.uint64(64 - frac_bits)
        extra = [prg.split_u64((r >> f) * first),
                 prg.split_u64((r >> _SHIFT63) * lift * first)]
    rho_shares = prg.split_u64(rho if clip else first)
    return tuple(CircuitCmpMaterial(
        kind, r_shares[b], rows[b], tree[b], rho_rows[b], rho_shares[b],
        tuple(e[b] for e in extra), trunc[b], tree2[b], bits if narrow else 64, drop)
        for b in (0, 1))


def circuit_drelu_material(n: int, prg: Prg):
    """Material for the sign [x >= 0] alone, as arithmetic shares (:data:`CMP_BITS`)."""
    return circuit_cmp_material("sign", n, prg)


def circuit_relu_material(n: int, prg: Prg):
    """ReLU material: a comparison and the multiplexer by the compared value."""
    return circuit_cmp_material("relu", n, prg)


# -- protocols (party side) ---------------------------------------------------------------
def mul(ch: Channel, party: int, x: np.ndarray, y: np.ndarray, t: Triple) -> np.ndarray:
    """Shares of x * y (elementwise, no truncation): one round."""
    opened = open_value(ch, np.concatenate([x - t.a, y - t.b]))
    d, e = opened[: x.size], opened[x.size:]
    z = t.c + d * t.b + e * t.a
    return z + d * e if party == 0 else z


def square(ch: Channel, party: int, x: np.ndarray, m: Square) -> np.ndarray:
    """Shares of x^2 (no truncation): one round, half a product's opening (d = x - a;
    x^2 = a^2 + 2 d a + d^2)."""
    d = open_value(ch, x - m.a)
    z = m.c + np.uint64(2) * d * m.a
    return z + d * d if party == 0 else z


def mul_square(ch: Channel, party: int, x: np.ndarray, y: np.ndarray, m: Square
               ) -> tuple[np.ndarray, np.ndarray]:
    """Shares of x y and x^2 in one round, from the openings of x - a and y - b (the
    square reuses d = x - a): three quarters of two products' bytes."""
    t = m.xa
    opened = open_value(ch, np.concatenate([x - t.a, y - t.b]))
    d, e = opened[: x.size], opened[x.size:]
    xy = t.c + d * t.b + e * t.a
    xx = m.c + np.uint64(2) * d * t.a
    if party == 0:
        xy += d * e
        xx += d * d
    return xy, xx


def matmul(ch: Channel, party: int, x: np.ndarray, y: np.ndarray, t: Triple) -> np.ndarray:
    """Shares of X @ Y for shared X (..., m, k) and Y (..., k, n) with a matrix triple of
    the same shapes (Beaver's trick on matrices, as in SecureML, Mohassel and Zhang,
    S&P 2017, Sec. 4.2): one round, opening X - A and Y - B (m k + k n values where the
    elementwise products would open 2 m k n)."""
    opened = open_value(ch, np.concatenate([(x - t.a).ravel(), (y - t.b).ravel()]))
    d = opened[: x.size].reshape(x.shape)
    e = opened[x.size:].reshape(y.shape)
    z = t.c + ring_matmul_shares(d, t.b) + ring_matmul_shares(t.a, e)
    return z + ring_matmul_shares(d, e) if party == 0 else z


def truncate(party: int, x: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Local probabilistic truncation by ``frac_bits`` (SecureML): no communication."""
    f = np.uint64(frac_bits)
    if party == 0:
        return x >> f
    return _ZERO - ((_ZERO - x) >> f)


def truncate_shares(ch: Channel, party: int, x: np.ndarray,
                    m: TruncMaterial | CircuitTruncMaterial, frac_bits: int = FRAC_BITS
                    ) -> np.ndarray:
    """Shares of x / 2^f for two's-complement x, in one round: floor(x / 2^f) exactly
    with DCF material; with circuit material faithfully, floor or floor + 1 with mean
    x / 2^f (the module docstring; needs |x| < 2^62)."""
    if isinstance(m, CircuitTruncMaterial):
        p, s = open_truncation(ch, party, x, m.r, 64, frac_bits)
        out = s * m.wrap - m.r_high
        return out + p if party == 0 else out
    uhat = open_value(ch, _offset(party, x) + m.r)
    low = fss.evaluate(party, m.low, _low_bits(uhat, frac_bits))
    return _shift(party, uhat, fss.evaluate(party, m.wrap, uhat), low, m.r_high, frac_bits)


def rounds_to_floor(m) -> bool:
    """Whether truncating with material ``m`` floors (DCF material; the evaluator adds
    2^(f-1) first to round to nearest) rather than rounding stochastically (circuit)."""
    return isinstance(m, (TruncMaterial, TruncReluMaterial))


def _faithful(party: int, uhat: np.ndarray, m: CircuitTruncMaterial, frac_bits: int
              ) -> np.ndarray:
    """(u^ >> f) - (r >> f) + 2^(64-f) (1 - msb(u^)) msb(r) - (2^62 >> f): shares of
    floor(y / 2^f) + c, c the dropped low carry, from an opening u^ = y + 2^62 + r a
    comparison shares (``ring.open_truncation`` when the truncation opens alone)."""
    out = (np.uint64(1) - (uhat >> _SHIFT63)) * m.wrap - m.r_high
    if party == 0:
        f = np.uint64(frac_bits)
        out += (uhat >> f) - (_OFF62 >> f)
    return out


_BIAS = np.uint64(1 << 63)


def _offset(party: int, x: np.ndarray) -> np.ndarray:
    """Shares of u = x + 2^63: two's-complement order becomes unsigned order."""
    return x + _BIAS if party == 0 else x


def _low_bits(v: np.ndarray, bits: int) -> np.ndarray:
    return v & ((np.uint64(1) << np.uint64(bits)) - np.uint64(1))


def _shift(party: int, uhat: np.ndarray, wrap: np.ndarray, low: np.ndarray,
           r_high: np.ndarray, frac_bits: int) -> np.ndarray:
    """Shares of floor(x / 2^f) from the opened u^ = x + 2^63 + r: (u^ >> f) - (r >> f)
    - [low carry] + 2^(64-f) [wrap], less the 2^(63-f) of the offset."""
    out = wrap - low - r_high
    if party == 0:
        f = np.uint64(frac_bits)
        out = out + (uhat >> f) - (_BIAS >> f)
    return out


def _xor_public(party: int, bit: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Shares of bit xor z for a public 0/1 array ``bit`` and shared bit z."""
    return z - np.uint64(2) * bit * z + (bit if party == 0 else _ZERO)


def trunc_relu(ch: Channel, party: int, y: np.ndarray,
               m: TruncReluMaterial | CircuitCmpMaterial, frac_bits: int = FRAC_BITS
               ) -> np.ndarray:
    """Shares of ReLU(y / 2^f): truncation and sign from one opening of
    u^ = y + offset + r, then a product. DCF material: the exact floor, two rounds.

    With u^ = y + 2^63 + r, w = [u^ < r] (unsigned) = rho + (1 - rho) c' if msb(u^) = 0
    and rho c' if 1, c' = [u^ mod 2^63 < r mod 2^63] and rho = msb(r); the 63-bit DCF
    returns c' times (1 - 2 rho, (1 - rho) 2^(64-f), rho 2^(64-f)); u >> f then follows
    as in :func:`truncate_shares`, and [y >= 0] = msb(u) = msb(u^) xor rho xor c'.
    Circuit material: the faithful truncation and a comparison on bits f + k .. f + l - 1
    of the same opening (offset 2^62, which is 0 mod 2^(f+l)), then the multiplexer by
    the truncated value: five rounds.
    """
    return trunc_and_relu(ch, party, y, m, frac_bits)[1]


def trunc_and_relu(ch: Channel, party: int, y: np.ndarray,
                   m: TruncReluMaterial | CircuitCmpMaterial, frac_bits: int = FRAC_BITS
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Shares of t = y / 2^f and of ReLU(t), both from :func:`trunc_relu`'s one
    opening (the truncation is what its multiplexer multiplies): for a kernel that
    needs the value as well as its ReLU (GELU, SiLU), one opening where a truncation
    and a comparison took two."""
    if isinstance(m, CircuitCmpMaterial):
        uhat = open_value(ch, (y + _OFF62 if party == 0 else y) + m.r)
        trunc = _faithful(party, uhat, m.trunc, frac_bits)
        b = _sign_row(ch, party, uhat, m, m.drop + frac_bits)
        return trunc, _mux(ch, party, b, m, trunc, _trunc_rho(uhat, m, m.rho, frac_bits))
    uhat = open_value(ch, _offset(party, y) + m.r)
    top = uhat >> _SHIFT63
    low = fss.evaluate(party, m.low, _low_bits(uhat, frac_bits))
    words = fss.evaluate(party, m.top, uhat & _LOW63)
    wrap = np.where(top == 0, m.rho_wrap + words[:, 1], words[:, 2])
    trunc = _shift(party, uhat, wrap, low, m.r_high, frac_bits)
    sign = _xor_public(party, top, m.rho + words[:, 0])      # msb(u^) xor rho xor c'
    return trunc, mul(ch, party, trunc, sign, m.triple)


def _trunc_rho(uhat: np.ndarray, m: CircuitCmpMaterial, rho: np.ndarray, frac_bits: int,
               minus: np.uint64 = _ZERO) -> np.ndarray:
    """Shares of (t - minus) rho for the faithful truncation t from the opening u^
    (:func:`_faithful`): its public part times rho's shares, less r_high rho, plus
    (1 - msb(u^)) wrap rho (the dealer's ``extra`` of a fused kind)."""
    f = np.uint64(frac_bits)
    public = (uhat >> f) - (_OFF62 >> f) - minus
    return public * rho - m.extra[0] + (np.uint64(1) - (uhat >> _SHIFT63)) * m.extra[1]


def _sign_row(ch: Channel, party: int, xhat: np.ndarray, m: CircuitCmpMaterial,
              low: int) -> np.ndarray:
    """XOR shares (one packed row) of [x >= 0] from the opening x^ = x + r (x^ may carry
    any offset that is 0 mod 2^(low + width + 1)): bit l-1 of x^ - r is
    x^_(l-1) xor r_(l-1) xor [x^ mod 2^(l-1) < r mod 2^(l-1)], the bracket by the tree on
    bits low .. l-2 (the borrow out of the bits below is left out: see CMP_DROP)."""
    return _sign_rows(ch, party, [xhat], [m.tree], m.r_rows, low)[0]


def _sign_rows(ch: Channel, party: int, publics: list, trees: list, r_rows: np.ndarray,
               low: int) -> list[np.ndarray]:
    """:func:`_sign_row` for several public values c_i = x^ - t_i against the same mask
    (so [x >= t_i]), one tree each, side by side in the same rounds."""
    w = trees[0].width
    rows = [circuit.bit_rows(c >> np.uint64(low), w + 1) for c in publics]
    borrows = circuit.compare(ch, party, [circuit.tree(party, c, t)
                                          for c, t in zip(rows, trees)])
    out = [b ^ r_rows for b in borrows]
    return [o ^ ~c[w:w + 1] for o, c in zip(out, rows)] if party == 0 else out


def _mux(ch: Channel, party: int, b: np.ndarray, m: CircuitCmpMaterial, v: np.ndarray,
         v_rho: np.ndarray, d: np.ndarray | None = None) -> np.ndarray:
    """Shares of v * b for the XOR-shared bit ``b`` (a packed row), given shares of
    v * rho (``v_rho``): open e = b xor rho, then v b = e v + (1 - 2 e) v rho. ``d``,
    when given, is opened in the same round (added to the other party's) and passed to
    ``v_rho`` if that is a function (the "select" kind: v rho = (v - a) rho + a rho)."""
    n = v.size
    e_row = (b ^ m.rho_row).ravel()
    if d is None:
        e = circuit.row_values(e_row ^ ch.exchange(e_row), n)
    else:
        mine = np.concatenate([np.ascontiguousarray(d, dtype=np.uint64).view(np.uint8),
                               e_row])
        theirs = ch.exchange(mine)
        k = d.size * 8
        e = circuit.row_values(e_row ^ theirs[k:], n)
        v_rho = v_rho(d + theirs[:k].view(np.uint64))
    return e * v + (np.uint64(1) - np.uint64(2) * e) * v_rho


def clip(ch: Channel, party: int, x: np.ndarray, lo: np.uint64, hi: np.uint64,
         m: ReluMaterial | TruncReluMaterial | CircuitCmpMaterial,
         frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Shares of min(max(x, lo), hi) for public ring constants lo < hi at f bits; x at f
    bits, or at 2f bits and truncated first ("trunc_clip" material, DCF trunc_relu).

    Circuits: one opening, the trees for [x >= lo] and [x >= hi] side by side, then one
    round for lo + (x - lo) [lo <= x < hi] + (hi - lo) [x >= hi]: the band is the XOR of
    the two bits (x >= hi implies x >= lo), multiplied by x - lo with the first daBit
    (the compared value's own mask again), the upper bit converted with the second:
    five rounds, where two ReLUs took ten. DCFs: lo + ReLU(x - lo) - ReLU(x - hi)
    on both differences at once (with the truncation: each difference truncated, exact
    since lo and hi are whole multiples of 2^f)."""
    n = x.size
    if not isinstance(m, CircuitCmpMaterial):
        if isinstance(m, TruncReluMaterial):
            lift = np.uint64(1) << np.uint64(frac_bits)
            bounds = np.repeat(np.array([lo, hi], np.uint64) * lift, n)
            both = trunc_relu(ch, party, _public_sub(party, np.concatenate([x, x]), bounds),
                              m, frac_bits)
        else:
            bounds = np.repeat(np.array([lo, hi], np.uint64), n)
            both = relu(ch, party, _public_sub(party, np.concatenate([x, x]), bounds), m)
        return both[:n] - both[n:] + (lo if party == 0 else _ZERO)
    fused = m.trunc is not None
    off = x + _OFF62 if fused and party == 0 else x
    xhat = open_value(ch, off + m.r)
    scale = np.uint64(frac_bits) if fused else np.uint64(0)
    low = m.drop + (frac_bits if fused else 0)
    b_lo, b_hi = _sign_rows(ch, party, [xhat - (lo << scale), xhat - (hi << scale)],
                            [m.tree, m.tree2], m.r_rows, low)
    rho0, rho1 = m.rho[0], m.rho[1]
    if fused:
        v = _faithful(party, xhat, m.trunc, frac_bits)
        v_rho = _trunc_rho(xhat, m, rho0, frac_bits, lo)
    else:
        v = x
        v_rho = (xhat - lo) * rho0 - m.extra[0]
    if party == 0:
        v = v - lo
    e_rows = (np.concatenate([b_lo ^ b_hi, b_hi]) ^ m.rho_row)
    opened = e_rows ^ ch.exchange(e_rows)
    e0, e1 = (circuit.row_values(row, n) for row in opened)
    one, two = np.uint64(1), np.uint64(2)
    band = e0 * v + (one - two * e0) * v_rho
    upper = (one - two * e1) * rho1 + (e1 if party == 0 else _ZERO)
    out = band + np.uint64((int(hi) - int(lo)) % (1 << 64)) * upper
    return out + lo if party == 0 else out


def _public_sub(party: int, x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return x - c if party == 0 else x


def drelu(ch: Channel, party: int, x: np.ndarray, m: SignMaterial | CircuitCmpMaterial
          ) -> np.ndarray:
    """Shares of 1 - msb(x), i.e. [x >= 0] for two's-complement x: one round (DCF) or
    five (circuit: opening, three-round tree, conversion; see CMP_BITS and CMP_DROP)."""
    if isinstance(m, CircuitCmpMaterial):
        xhat = open_value(ch, x + m.r, m.width)
        b = _sign_row(ch, party, xhat, m, m.drop)
        one = np.full(x.size, np.uint64(1 if party == 0 else 0))
        return _mux(ch, party, b, m, one, m.rho)
    xhat = open_value(ch, x + m.r)
    top = xhat >> _SHIFT63                                   # public msb(x^)
    z = fss.evaluate(party, m.key, xhat & _LOW63) + m.rho    # msb(r) xor [x^' < r']
    return (np.uint64(1) if party == 0 else _ZERO) - _xor_public(party, top, z)


def select(ch: Channel, party: int, v: np.ndarray, d: np.ndarray,
           m: ReluMaterial | CircuitCmpMaterial) -> np.ndarray:
    """Shares of v * [d >= 0], elementwise (no truncation: the bit has no fractional
    bits): a comparison of d, then a product with v (DCF: a Beaver product; circuit:
    the multiplexer, opening v - a with the bit)."""
    if isinstance(m, CircuitCmpMaterial):
        dhat = open_value(ch, d + m.r, m.width)
        b = _sign_row(ch, party, dhat, m, m.drop)
        a, a_rho = m.extra
        return _mux(ch, party, b, m, v, lambda opened: opened * m.rho + a_rho, v - a)
    return mul(ch, party, v, drelu(ch, party, d, m.sign), m.triple)


def relu(ch: Channel, party: int, x: np.ndarray, m: ReluMaterial | CircuitCmpMaterial
         ) -> np.ndarray:
    """Shares of max(x, 0): two rounds with DCFs (exact), five with circuits (exact
    but for x in [-2^k, 0) ring units, CMP_DROP): the multiplexer by x itself needs no
    second opening, since x rho = x^ rho - r rho."""
    if isinstance(m, CircuitCmpMaterial) and m.width < 64:
        # narrow: u^ = x + 2^(l-2) + r mod 2^l; the sign from c = u^ - 2^(l-2) = x + r
        # (mod 2^l), and x rho = (u^ - 2^(l-2)) rho - r' rho + (1 - msb_l(u^)) 2^l
        # msb_l(r') rho over the integers (the faithful truncation's wrap rule, f = 0)
        off = _offset_w(m.width)
        uhat = open_value(ch, (x + off if party == 0 else x) + m.r, m.width)
        b = _sign_row(ch, party, uhat - off, m, m.drop)
        x_rho = (uhat - off) * m.rho - m.extra[0] \
            + (np.uint64(1) - (uhat >> np.uint64(m.width - 1))) * m.extra[1]
        return _mux(ch, party, b, m, x, x_rho)
    if isinstance(m, CircuitCmpMaterial):
        xhat = open_value(ch, x + m.r)
        b = _sign_row(ch, party, xhat, m, m.drop)
        return _mux(ch, party, b, m, x, xhat * m.rho - m.extra[0])
    sign = drelu(ch, party, x, m.sign)
    return mul(ch, party, x, sign, m.triple)


# -- material on the wire -----------------------------------------------------------------
_CMP_CODES = {"trunc_relu": 5, "relu": 6, "sign": 7, "select": 9, "clip": 10,
              "trunc_clip": 11}
_CMP_KINDS_BY_CODE = {v: k for k, v in _CMP_CODES.items()}
_CMP_EXTRAS = {"trunc_relu": 2, "relu": 1, "sign": 0, "select": 2, "clip": 1,
               "trunc_clip": 2}

def material_arrays(items: list) -> dict[str, np.ndarray]:
    """One party's material list as named arrays (for ``transport.pack_arrays``)."""
    out: dict[str, np.ndarray] = {}

    def key(prefix: str, k: fss.DcfKey) -> None:
        out[f"{prefix}.seed"], out[f"{prefix}.cw_seed"] = k.seed, k.cw_seed
        out[f"{prefix}.cw_value"], out[f"{prefix}.cw_last"] = k.cw_value, k.cw_last
        out[f"{prefix}.cw_t"] = k.cw_t.astype(np.uint8)

    def tree(prefix: str, t: circuit.TreeMaterial) -> None:
        out[f"{prefix}.width"] = np.array([t.width], np.uint64)
        out[f"{prefix}.tables"] = t.tables
        for j, (a, b, c) in enumerate(t.triples):
            out[f"{prefix}.{j}.a"], out[f"{prefix}.{j}.b"], out[f"{prefix}.{j}.c"] = a, b, c

    def triple(prefix: str, t: Triple) -> None:
        out[f"{prefix}.a"], out[f"{prefix}.b"], out[f"{prefix}.c"] = t.a, t.b, t.c

    for i, m in enumerate(items):
        p = f"{i}"
        if isinstance(m, CircuitTruncMaterial):
            out[f"{p}.kind"] = np.array([4], np.uint8)
            out[f"{p}.r"], out[f"{p}.r_high"], out[f"{p}.wrap"] = m.r, m.r_high, m.wrap
        elif isinstance(m, CircuitCmpMaterial):
            out[f"{p}.kind"] = np.array([_CMP_CODES[m.kind]], np.uint8)
            out[f"{p}.r"], out[f"{p}.r_rows"] = m.r, m.r_rows
            out[f"{p}.rho_row"], out[f"{p}.rho"] = m.rho_row, m.rho
            out[f"{p}.width"] = np.array([m.width], np.uint64)
            out[f"{p}.drop"] = np.array([m.drop], np.uint64)
            tree(f"{p}.tree", m.tree)
            for j, e in enumerate(m.extra):
                out[f"{p}.extra{j}"] = e
            if m.trunc is not None:
                out[f"{p}.r_high"], out[f"{p}.wrap"] = m.trunc.r_high, m.trunc.wrap
            if m.tree2 is not None:
                tree(f"{p}.tree2", m.tree2)
        elif isinstance(m, chains.ChainMaterial):
            out[f"{p}.kind"] = np.array([15 + chains.CHAINS.index(m.name)], np.uint8)
            out.update({f"{p}.{k}": v for k, v in chains.chain_arrays(m).items()})
        elif isinstance(m, Square):
            out[f"{p}.kind"] = np.array([12 if m.xa is None else 13], np.uint8)
            out[f"{p}.a"], out[f"{p}.c"] = m.a, m.c
            if m.xa is not None:
                out[f"{p}.b"], out[f"{p}.ab"] = m.xa.b, m.xa.c
        elif isinstance(m, SignMaterial):
            out[f"{p}.kind"] = np.array([8], np.uint8)
            out[f"{p}.r"], out[f"{p}.rho"] = m.r, m.rho
            key(f"{p}.sign", m.key)
        elif isinstance(m, Triple):
            out[f"{p}.kind"] = np.array([0], np.uint8)
            out[f"{p}.a"], out[f"{p}.b"], out[f"{p}.c"] = m.a, m.b, m.c
        elif isinstance(m, TruncMaterial):
            out[f"{p}.kind"] = np.array([1], np.uint8)
            out[f"{p}.r"], out[f"{p}.r_high"] = m.r, m.r_high
            key(f"{p}.low", m.low)
            key(f"{p}.wrap", m.wrap)
        elif isinstance(m, TruncReluMaterial):
            out[f"{p}.kind"] = np.array([3], np.uint8)
            out[f"{p}.r"], out[f"{p}.r_high"] = m.r, m.r_high
            out[f"{p}.rho"], out[f"{p}.rho_wrap"] = m.rho, m.rho_wrap
            key(f"{p}.low", m.low)
            key(f"{p}.top", m.top)
            t = m.triple
            out[f"{p}.a"], out[f"{p}.b"], out[f"{p}.c"] = t.a, t.b, t.c
        elif isinstance(m, ReluMaterial):
            out[f"{p}.kind"] = np.array([2], np.uint8)
            out[f"{p}.r"], out[f"{p}.rho"] = m.sign.r, m.sign.rho
            key(f"{p}.sign", m.sign.key)
            t = m.triple
            out[f"{p}.a"], out[f"{p}.b"], out[f"{p}.c"] = t.a, t.b, t.c
        else:
            raise TypeError(f"unknown material {type(m).__name__}")
    return out


def seeded_arrays(deal, party: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the dealer sends ``party`` of its circuit material ``arrays`` generated
    with ``deal`` (a ``prg.Deal``): its stream's seed, the list of its draws
    ([key, shape, dtype], in order) and the arrays not drawn from it (party 1's halves
    of computed secrets; the public kinds and widths)."""
    seed, skeleton, sent = deal.compress(party, arrays)
    out = dict(sent)
    out["seed"] = np.frombuffer(seed, np.uint8).copy()
    out["skeleton"] = np.frombuffer(json.dumps(skeleton).encode(), np.uint8).copy()
    return out


def expand_seeded(small: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A party's arrays from :func:`seeded_arrays`: its draws regenerated from the seed,
    in order, joined with the arrays it was sent."""
    out = {k: v for k, v in small.items() if k not in ("seed", "skeleton")}
    prg = Prg(bytes(small["seed"]))
    for key, shape, dtype in json.loads(bytes(small["skeleton"]).decode()):
        shape = tuple(int(n) for n in shape)
        if dtype == "<u8":
            a = prg.uint64(shape)
        elif dtype == "|u1":
            a = prg.uint8(shape)
        else:
            raise ValueError("bad dtype in seeded material")
        if key:
            if key in out:
                raise ValueError("seeded material names an array twice")
            out[str(key)] = a
    return out


def concat_circuit_arrays(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Circuit material for consecutive chunks of values (every chunk but the last a
    multiple of 8 values) as one: every array keeps its values, or its packed bit rows,
    on the last axis, so the chunks join there (kinds and widths are shared)."""
    if len(parts) == 1:
        return parts[0]
    return {k: (v if k.endswith((".kind", ".width", ".drop")) else
                np.concatenate([p[k] for p in parts], axis=-1))
            for k, v in parts[0].items()}


def material_from_arrays(arrays: dict[str, np.ndarray]) -> list:
    """Inverse of :func:`material_arrays`; KeyError/ValueError on malformed input."""
    def key(prefix: str) -> fss.DcfKey:
        return fss.DcfKey(arrays[f"{prefix}.seed"], arrays[f"{prefix}.cw_seed"],
                          arrays[f"{prefix}.cw_value"], arrays[f"{prefix}.cw_t"].astype(bool),
                          arrays[f"{prefix}.cw_last"])

    def tree(prefix: str) -> circuit.TreeMaterial:
        width = int(arrays[f"{prefix}.width"][0])
        if not 2 <= width <= 64:
            raise ValueError("bad comparison width")
        levels = tuple((arrays[f"{prefix}.{j}.a"], arrays[f"{prefix}.{j}.b"],
                        arrays[f"{prefix}.{j}.c"])
                       for j in range(len(circuit.level_sizes(width))))
        tables = arrays[f"{prefix}.tables"]
        if tables.ndim != 3 + 1 or tables.shape[:3] != (circuit.blocks(width), 16, 2):
            raise ValueError("bad comparison tables")
        return circuit.TreeMaterial(width, tables, levels)

    def triple(prefix: str) -> Triple:
        return Triple(arrays[f"{prefix}.a"], arrays[f"{prefix}.b"], arrays[f"{prefix}.c"])

    def ring(prefix: str) -> int:
        """A comparison's opening ring bits (64 when absent), checked."""
        width = int(arrays[f"{prefix}.width"][0]) if f"{prefix}.width" in arrays else 64
        if not 16 <= width <= 64:
            raise ValueError("bad ring width")
        return width

    items, i = [], 0
    while f"{i}.kind" in arrays:
        p, kind = f"{i}", int(arrays[f"{i}.kind"][0])
        if kind == 0:
            items.append(Triple(arrays[f"{p}.a"], arrays[f"{p}.b"], arrays[f"{p}.c"]))
        elif kind == 1:
            items.append(TruncMaterial(arrays[f"{p}.r"], arrays[f"{p}.r_high"],
                                       key(f"{p}.low"), key(f"{p}.wrap")))
        elif kind == 3:
            items.append(TruncReluMaterial(
                arrays[f"{p}.r"], arrays[f"{p}.r_high"], arrays[f"{p}.rho"],
                arrays[f"{p}.rho_wrap"], key(f"{p}.low"), key(f"{p}.top"),
                Triple(arrays[f"{p}.a"], arrays[f"{p}.b"], arrays[f"{p}.c"])))
        elif kind == 4:
            items.append(CircuitTruncMaterial(arrays[f"{p}.r"], arrays[f"{p}.r_high"],
                                              arrays[f"{p}.wrap"]))
        elif kind in _CMP_KINDS_BY_CODE:
            name = _CMP_KINDS_BY_CODE[kind]
            width = ring(p)
            count = _CMP_EXTRAS[name] + (1 if name == "relu" and width < 64 else 0)
            extra = tuple(arrays[f"{p}.extra{j}"] for j in range(count))
            drop = int(arrays[f"{p}.drop"][0]) if f"{p}.drop" in arrays else CMP_DROP
            trunc = (CircuitTruncMaterial(arrays[f"{p}.r"], arrays[f"{p}.r_high"],
                                          arrays[f"{p}.wrap"])
                     if name.startswith("trunc_") else None)
            items.append(CircuitCmpMaterial(
                name, arrays[f"{p}.r"], arrays[f"{p}.r_rows"], tree(f"{p}.tree"),
                arrays[f"{p}.rho_row"], arrays[f"{p}.rho"], extra, trunc,
                tree(f"{p}.tree2") if name.endswith("clip") else None, width, drop))
            if not 1 <= drop or items[-1].bits > 64 or (width < 64 and (
                    name not in NARROW_KINDS or items[-1].bits != width)):
                raise ValueError("bad comparison drop or width")
        elif 15 <= kind < 15 + len(chains.CHAINS):
            items.append(chains.chain_from_arrays(
                chains.CHAINS[kind - 15], lambda k: arrays.get(f"{p}.{k}")))
        elif kind in (12, 13):
            a = arrays[f"{p}.a"]
            xa = Triple(a, arrays[f"{p}.b"], arrays[f"{p}.ab"]) if kind == 13 else None
            items.append(Square(a, arrays[f"{p}.c"], xa))
        elif kind == 8:
            items.append(SignMaterial(arrays[f"{p}.r"], key(f"{p}.sign"), arrays[f"{p}.rho"]))
        elif kind == 2:
            items.append(ReluMaterial(
                SignMaterial(arrays[f"{p}.r"], key(f"{p}.sign"), arrays[f"{p}.rho"]),
                Triple(arrays[f"{p}.a"], arrays[f"{p}.b"], arrays[f"{p}.c"])))
        else:
            raise ValueError(f"unknown material kind {kind}")
        i += 1
    return items
