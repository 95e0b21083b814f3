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
- The same truncation and sign with the comparisons as binary circuits instead of DCFs
  (``circuit``): more rounds (ceil(log2 63) = 6 for the comparison instead of 1) but
  about 1/25 of the computation and 1/15 of the dealer's material, which is what
  bounds throughput on a fast network. ``dealer_material(..., cmp=...)`` picks one;
  the party-side functions follow the material they are given.
- Max pooling as max(a, b) = b + ReLU(a - b), in a tree over the window.
- Circuit comparisons of ReLU, sign and max pooling on a reduced ring (``CMP_BITS``):
  for |x| < 2^(l-1), the sign of x is the top bit of x mod 2^l, and x mod 2^l =
  (x^ - r) mod 2^l for the same 64-bit opening x^ = x + r, so the comparison tree runs
  on l - 1 bits instead of 63: the bit width the values need, as in CrypTFlow2 (Rathee
  et al., CCS 2020, millionaires' on l bits) and Cheetah (Huang et al., USENIX Security
  2022), with the MSB extraction of SecureNN (Wagh et al., PETS 2019). BOUND: a value
  with |x| >= 2^(l-1) (in ring units: 2^(l-1-f) in real terms, 2^19 = 524288 at l = 40,
  f = 20) gets the sign of x mod 2^l, i.e. a wrong sign whenever bit l-1 of x differs
  from its true sign; the truncations keep their exact 63-bit comparison (their input
  has 2f fractional bits).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from . import circuit, fss
from .fixed import FRAC_BITS
from .prg import Prg

_ZERO = np.uint64(0)
_LOW63 = np.uint64((1 << 63) - 1)
_SHIFT63 = np.uint64(63)

#: l, the ring bits of the circuit comparisons of ReLU, sign (DReLU) and max pooling: a
#: comparison input must satisfy |x| < 2^(l-1) in ring units (|x| < 2^(l-1-f) = 2^19
#: real at f = 20: 20 fractional bits, 19 integer bits and the sign); outside, the sign
#: is that of x mod 2^l (wrong whenever bit l-1 of x differs from the sign). The zoo
#: models' largest comparison input is below 2^8 real (``bench/mpc_zoo.py`` records it),
#: so 40 leaves a margin of 2^11. Max pooling's padding constant needs |x| < 2^(l-2).
CMP_BITS = 40


class Channel(Protocol):
    """One round with the other party: send ``data``, receive theirs (same shape)."""

    def exchange(self, data: np.ndarray) -> np.ndarray: ...


def share(x: np.ndarray, prg: Prg) -> tuple[np.ndarray, np.ndarray]:
    """Additive shares of ring elements: (x - r, r) with r from a CSPRNG."""
    r = prg.share_uint64(np.shape(x))
    return np.asarray(x, dtype=np.uint64) - r, r


def reconstruct(s0: np.ndarray, s1: np.ndarray) -> np.ndarray:
    return np.asarray(s0, dtype=np.uint64) + np.asarray(s1, dtype=np.uint64)


def open_value(ch: Channel, x: np.ndarray) -> np.ndarray:
    return x + ch.exchange(x)


# -- dealer material ----------------------------------------------------------------------
@dataclass(frozen=True)
class Triple:
    """One party's share of a Beaver triple c = a * b (elementwise or matrix)."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray


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
    """Truncation (and sign) with comparison circuits: shares of r and r >> f, XOR
    shares of r's low 63 bits, a 63-bit tree weighted by q = msb(r) and an f-bit tree;
    with a Beaver triple when the ReLU is fused."""

    r: np.ndarray
    r_high: np.ndarray
    r_rows: np.ndarray
    top: circuit.TreeMaterial
    low: circuit.TreeMaterial
    triple: Triple | None


@dataclass(frozen=True)
class CircuitReluMaterial:
    """A comparison tree for the sign of x on l = top.width + 1 ring bits (the sign is
    exact for |x| < 2^(l-1), see :data:`CMP_BITS`), XOR shares of the mask's low l - 1
    bits, and a Beaver triple for ReLU (None when only the sign is wanted)."""

    r: np.ndarray
    r_rows: np.ndarray
    top: circuit.TreeMaterial
    triple: Triple | None


def triples(shape, prg: Prg) -> tuple[Triple, Triple]:
    """Elementwise Beaver triples of ``shape`` for the two parties."""
    a, b = prg.uint64(shape), prg.uint64(shape)
    c = a * b
    (a0, a1), (b0, b1), (c0, c1) = share(a, prg), share(b, prg), share(c, prg)
    return Triple(a0, b0, c0), Triple(a1, b1, c1)


def matrix_triples(m: int, k: int, n: int, prg: Prg) -> tuple[Triple, Triple]:
    """Shares of A (m x k), B (k x n) and C = A @ B, for a product with secret weights."""
    a, b = prg.uint64((m, k)), prg.uint64((k, n))
    c = a @ b
    (a0, a1), (b0, b1), (c0, c1) = share(a, prg), share(b, prg), share(c, prg)
    return Triple(a0, b0, c0), Triple(a1, b1, c1)


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


def _mask_rows(r: np.ndarray, prg: Prg, width: int = 63) -> tuple[np.ndarray, np.ndarray]:
    rows = circuit.bit_rows(r, width)
    rows0 = prg.share_uint8(rows.shape)
    return rows0, rows ^ rows0


def circuit_trunc_material(n: int, frac_bits: int, prg: Prg, relu: bool
                           ) -> tuple[CircuitTruncMaterial, CircuitTruncMaterial]:
    r = prg.uint64(n)
    rows = _mask_rows(r, prg)
    top = circuit.tree_material(63, n, prg, r >> _SHIFT63)
    low = circuit.tree_material(frac_bits, n, prg)
    (r0, r1), (h0, h1) = share(r, prg), share(r >> np.uint64(frac_bits), prg)
    t = triples(n, prg) if relu else (None, None)
    return tuple(CircuitTruncMaterial((r0, r1)[b], (h0, h1)[b], rows[b], top[b], low[b], t[b])
                 for b in (0, 1))


def _check_bits(bits: int) -> None:
    if not 3 <= bits <= 64:
        raise ValueError(f"comparison ring bits must be in 3..64, not {bits}")


def _sign_tree(r: np.ndarray, n: int, prg: Prg, bits: int):
    """XOR shares of r's low l - 1 bits and an (l-1)-bit tree weighted by bit l - 1 of
    r: the sign of x mod 2^l from the opening x + r."""
    _check_bits(bits)
    rows = _mask_rows(r, prg, bits - 1)
    q = (r >> np.uint64(bits - 1)) & np.uint64(1)
    return rows, circuit.tree_material(bits - 1, n, prg, q)


def circuit_drelu_material(n: int, prg: Prg, bits: int = CMP_BITS
                           ) -> tuple[CircuitReluMaterial, CircuitReluMaterial]:
    """Material for the sign [x >= 0] alone (no Beaver triple): a comparison tree on
    ``bits`` ring bits, exact for |x| < 2^(bits-1) (:data:`CMP_BITS`)."""
    r = prg.uint64(n)
    rows, top = _sign_tree(r, n, prg, bits)
    r0, r1 = share(r, prg)
    return (CircuitReluMaterial(r0, rows[0], top[0], None),
            CircuitReluMaterial(r1, rows[1], top[1], None))


def circuit_relu_material(n: int, prg: Prg, bits: int = CMP_BITS
                          ) -> tuple[CircuitReluMaterial, CircuitReluMaterial]:
    """ReLU material: a sign tree on ``bits`` ring bits (exact for |x| < 2^(bits-1),
    :data:`CMP_BITS`) and a Beaver triple."""
    r = prg.uint64(n)
    rows, top = _sign_tree(r, n, prg, bits)
    (r0, r1), t = share(r, prg), triples(n, prg)
    return tuple(CircuitReluMaterial((r0, r1)[b], rows[b], top[b], t[b]) for b in (0, 1))


# -- protocols (party side) ---------------------------------------------------------------
def mul(ch: Channel, party: int, x: np.ndarray, y: np.ndarray, t: Triple) -> np.ndarray:
    """Shares of x * y (elementwise, no truncation): one round."""
    opened = open_value(ch, np.concatenate([x - t.a, y - t.b]))
    d, e = opened[: x.size], opened[x.size:]
    z = t.c + d * t.b + e * t.a
    return z + d * e if party == 0 else z


def matmul(ch: Channel, party: int, x: np.ndarray, y: np.ndarray, t: Triple) -> np.ndarray:
    """Shares of X @ Y for shared X (m x k) and Y (k x n): one round."""
    opened = open_value(ch, np.concatenate([(x - t.a).ravel(), (y - t.b).ravel()]))
    d = opened[: x.size].reshape(x.shape)
    e = opened[x.size:].reshape(y.shape)
    z = t.c + d @ t.b + t.a @ e
    return z + d @ e if party == 0 else z


def truncate(party: int, x: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Local probabilistic truncation by ``frac_bits`` (SecureML): no communication."""
    f = np.uint64(frac_bits)
    if party == 0:
        return x >> f
    return _ZERO - ((_ZERO - x) >> f)


def truncate_exact(ch: Channel, party: int, x: np.ndarray, m: TruncMaterial,
                   frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Shares of floor(x / 2^f) for two's-complement x, exactly: one round (DCFs) or
    seven (circuits)."""
    if isinstance(m, CircuitTruncMaterial):
        return _circuit_trunc_sign(ch, party, x, m, frac_bits)[0]
    uhat = open_value(ch, _offset(party, x) + m.r)
    low = fss.evaluate(party, m.low, _low_bits(uhat, frac_bits))
    return _shift(party, uhat, fss.evaluate(party, m.wrap, uhat), low, m.r_high, frac_bits)


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


def trunc_relu(ch: Channel, party: int, y: np.ndarray, m: TruncReluMaterial,
               frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Shares of ReLU(floor(y / 2^f)): truncation and sign share one opening of
    u^ = y + 2^63 + r (their DCFs run on it together), then one Beaver product. Two
    rounds where truncate_exact followed by relu takes three.

    With w = [u^ < r] (unsigned) = rho + (1 - rho) c' if msb(u^) = 0 and rho c' if 1,
    c' = [u^ mod 2^63 < r mod 2^63] and rho = msb(r), the 63-bit DCF returns c' times
    (1 - 2 rho, (1 - rho) 2^(64-f), rho 2^(64-f)); u >> f then follows as in
    :func:`truncate_exact`, and [y >= 0] = msb(u) = msb(u^) xor rho xor c'. With
    circuit material the same bits come from comparison trees: eight rounds.
    """
    if isinstance(m, CircuitTruncMaterial):
        trunc, sign = _circuit_trunc_sign(ch, party, y, m, frac_bits)
        return mul(ch, party, trunc, sign, m.triple)
    uhat = open_value(ch, _offset(party, y) + m.r)
    top = uhat >> _SHIFT63
    low = fss.evaluate(party, m.low, _low_bits(uhat, frac_bits))
    words = fss.evaluate(party, m.top, uhat & _LOW63)
    wrap = np.where(top == 0, m.rho_wrap + words[:, 1], words[:, 2])
    trunc = _shift(party, uhat, wrap, low, m.r_high, frac_bits)
    sign = _xor_public(party, top, m.rho + words[:, 0])      # msb(u^) xor rho xor c'
    return mul(ch, party, trunc, sign, m.triple)


def _circuit_trunc_sign(ch: Channel, party: int, y: np.ndarray, m: CircuitTruncMaterial,
                        frac_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Shares of floor(y / 2^f) and of [y >= 0] from one opening of u^ = y + 2^63 + r
    and two comparison trees run side by side: S = [u^ mod 2^63 < r mod 2^63] (with
    q S, q = msb(r)) and the low carry [u^ mod 2^f < r mod 2^f]. The wrap [u^ < r] is
    q + S - q S when msb(u^) = 0 and q S when it is 1; the sign is msb(u^) xor q xor S."""
    uhat = open_value(ch, _offset(party, y) + m.r)
    rows = circuit.bit_rows(uhat, 63)
    (s, qs), (low, _) = circuit.compare(ch, party, [
        circuit.tree(party, rows, m.r_rows, m.top, y.size),
        circuit.tree(party, rows, m.r_rows, m.low, y.size)])
    top, q = uhat >> _SHIFT63, m.top.arith[4]
    wrap = np.where(top == 1, qs, q + s - qs) * (np.uint64(1) << np.uint64(64 - frac_bits))
    trunc = _shift(party, uhat, wrap, low, m.r_high, frac_bits)
    return trunc, _xor_public(party, top, q + s - np.uint64(2) * qs)


def drelu(ch: Channel, party: int, x: np.ndarray, m: SignMaterial | CircuitReluMaterial
          ) -> np.ndarray:
    """Shares of 1 - msb(x), i.e. [x >= 0] for two's-complement x: one round (DCF) or
    seven (circuit; six with a tree of at most 32 bits). Circuit material compares on
    l = m.top.width + 1 ring bits: exact for |x| < 2^(l-1) only (:data:`CMP_BITS`)."""
    if isinstance(m, CircuitReluMaterial):
        # on l = width + 1 ring bits: x mod 2^l = (x^ - r) mod 2^l, so bit l-1 of x is
        # bit l-1 of x^ xor bit l-1 of r xor [x^ mod 2^(l-1) < r mod 2^(l-1)]; it is the
        # sign of x when |x| < 2^(l-1) (CMP_BITS)
        w = m.top.width
        xhat = open_value(ch, x + m.r)
        ((s, qs),) = circuit.compare(ch, party, [
            circuit.tree(party, circuit.bit_rows(xhat, w), m.r_rows, m.top, x.size)])
        z = m.top.arith[4] + s - np.uint64(2) * qs            # bit l-1 of r xor S
        top = (xhat >> np.uint64(w)) & np.uint64(1)
        return (np.uint64(1) if party == 0 else _ZERO) - _xor_public(party, top, z)
    xhat = open_value(ch, x + m.r)
    top = xhat >> _SHIFT63                                   # public msb(x^)
    z = fss.evaluate(party, m.key, xhat & _LOW63) + m.rho    # msb(r) xor [x^' < r']
    return (np.uint64(1) if party == 0 else _ZERO) - _xor_public(party, top, z)


def select(ch: Channel, party: int, d: np.ndarray, v: np.ndarray,
           sign: SignMaterial | CircuitReluMaterial, t: Triple) -> np.ndarray:
    """Shares of v * [d >= 0], elementwise: one comparison and one Beaver product of a
    0/1 share with v (no truncation: the bit has no fractional bits)."""
    return mul(ch, party, v, drelu(ch, party, d, sign), t)


def relu(ch: Channel, party: int, x: np.ndarray, m: ReluMaterial | CircuitReluMaterial
         ) -> np.ndarray:
    """Shares of max(x, 0) (exact, no approximation): two rounds with DCFs, eight with
    circuits."""
    sign = drelu(ch, party, x, m if isinstance(m, CircuitReluMaterial) else m.sign)
    return mul(ch, party, x, sign, m.triple)


# -- material on the wire -----------------------------------------------------------------
def material_arrays(items: list) -> dict[str, np.ndarray]:
    """One party's material list as named arrays (for ``transport.pack_arrays``)."""
    out: dict[str, np.ndarray] = {}

    def key(prefix: str, k: fss.DcfKey) -> None:
        out[f"{prefix}.seed"], out[f"{prefix}.cw_seed"] = k.seed, k.cw_seed
        out[f"{prefix}.cw_value"], out[f"{prefix}.cw_last"] = k.cw_value, k.cw_last
        out[f"{prefix}.cw_t"] = k.cw_t.astype(np.uint8)

    def tree(prefix: str, t: circuit.TreeMaterial) -> None:
        out[f"{prefix}.width"] = np.array([t.width], np.uint64)
        for j, (a, b, c) in enumerate(t.triples):
            out[f"{prefix}.{j}.a"], out[f"{prefix}.{j}.b"], out[f"{prefix}.{j}.c"] = a, b, c
        out[f"{prefix}.last"], out[f"{prefix}.arith"] = t.last, t.arith

    def triple(prefix: str, t: Triple) -> None:
        out[f"{prefix}.a"], out[f"{prefix}.b"], out[f"{prefix}.c"] = t.a, t.b, t.c

    for i, m in enumerate(items):
        p = f"{i}"
        if isinstance(m, CircuitTruncMaterial):
            out[f"{p}.kind"] = np.array([4 if m.triple is None else 5], np.uint8)
            out[f"{p}.r"], out[f"{p}.r_high"], out[f"{p}.r_rows"] = m.r, m.r_high, m.r_rows
            tree(f"{p}.top", m.top)
            tree(f"{p}.low", m.low)
            if m.triple is not None:
                triple(p, m.triple)
        elif isinstance(m, CircuitReluMaterial):
            out[f"{p}.kind"] = np.array([6 if m.triple is not None else 7], np.uint8)
            out[f"{p}.r"], out[f"{p}.r_rows"] = m.r, m.r_rows
            tree(f"{p}.top", m.top)
            if m.triple is not None:
                triple(p, m.triple)
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


_PUBLIC = (".kind", ".width")


def _draw(prg: Prg, a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint64:
        return prg.uint64(a.shape)
    return prg.uint8(a.shape)


def seed_circuit_arrays(arrays0: dict[str, np.ndarray], arrays1: dict[str, np.ndarray],
                        seed: bytes) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Circuit material with party 0's half replaced by a 32-byte seed: every array of
    it is a share (additive for uint64, XOR for packed uint8 rows), so the dealer draws
    party 0's arrays from ChaCha20(seed), in sorted key order, and moves the difference
    into party 1's (s1' = s0 + s1 - t, or s0 ^ s1 ^ t). Both halves stay uniformly
    random, the sums unchanged; party 0 receives the seed and the arrays' shapes only
    (:func:`expand_seeded`), halving the dealer's traffic. Circuit material only: DCF
    keys are not shares."""
    prg = Prg(seed)
    out1, skeleton = dict(arrays1), {}
    for key in sorted(arrays0):
        a0 = arrays0[key]
        if key.endswith(_PUBLIC):
            continue
        if a0.dtype not in (np.uint64, np.uint8):
            raise TypeError(f"{key} is not a share")
        t = _draw(prg, a0)
        out1[key] = arrays1[key] + (a0 - t) if a0.dtype == np.uint64 else \
            arrays1[key] ^ a0 ^ t
        skeleton[key] = [list(a0.shape), a0.dtype.str]
    small = {k: v for k, v in arrays0.items() if k.endswith(_PUBLIC)}
    small["seed"] = np.frombuffer(seed, np.uint8).copy()
    small["skeleton"] = np.frombuffer(json.dumps(skeleton).encode(), np.uint8).copy()
    return small, out1


def expand_seeded(small: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Party 0's arrays from :func:`seed_circuit_arrays`' seed and shapes."""
    out = {k: v for k, v in small.items() if k not in ("seed", "skeleton")}
    prg = Prg(bytes(small["seed"]))
    skeleton = json.loads(bytes(small["skeleton"]).decode())
    for key in sorted(skeleton):
        shape, dtype = skeleton[key]
        if dtype not in ("<u8", "|u1"):
            raise ValueError("bad dtype in seeded material")
        out[key] = _draw(prg, np.empty(tuple(int(n) for n in shape), np.dtype(dtype)))
    return out


def concat_circuit_arrays(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Circuit material for consecutive chunks of values (every chunk but the last a
    multiple of 8 values) as one: every array keeps its values, or its packed bit rows,
    on the last axis, so the chunks join there (kinds and widths are shared)."""
    if len(parts) == 1:
        return parts[0]
    return {k: (v if k.endswith((".kind", ".width")) else
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
        return circuit.TreeMaterial(width, levels, arrays[f"{prefix}.last"],
                                    arrays[f"{prefix}.arith"])

    def triple(prefix: str) -> Triple:
        return Triple(arrays[f"{prefix}.a"], arrays[f"{prefix}.b"], arrays[f"{prefix}.c"])

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
        elif kind in (4, 5):
            items.append(CircuitTruncMaterial(
                arrays[f"{p}.r"], arrays[f"{p}.r_high"], arrays[f"{p}.r_rows"],
                tree(f"{p}.top"), tree(f"{p}.low"), triple(p) if kind == 5 else None))
        elif kind in (6, 7):
            items.append(CircuitReluMaterial(arrays[f"{p}.r"], arrays[f"{p}.r_rows"],
                                             tree(f"{p}.top"), triple(p) if kind == 6 else None))
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
