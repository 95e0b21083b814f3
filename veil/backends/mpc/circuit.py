"""Comparisons as binary circuits on XOR shares, with dealer bit triples.

The comparison [c < r] of a *public* value c with a secret r that the dealer knows and
XOR-shares bit by bit is a prefix circuit, as in ABY's and CrypTen's arithmetic-to-binary
conversions (Demmler, Schneider and Zohner, "ABY", NDSS 2015; Knott et al., "CrypTen",
NeurIPS 2021) but cheaper, since one input is public: per bit, g_i = !c_i & r_i ("r is
larger here") and p_i = !(c_i ^ r_i) ("equal here") are local, and blocks combine
pairwise, high block H over low block L, as

    G = G_H ^ (P_H & G_L),        P = P_H & P_L,

a log-depth tree (the carry-lookahead of Brent and Kung, IEEE Trans. Computers, 1982).
The first two levels cost no round: a block's (G, P) over ``LUT_BITS`` = 4 bits is a
function of the public block of c and the dealer's r, so the dealer shares it for
every one of the 16 values c's block may take (a one-time truth table, Ishai et al.,
"On the Power of Correlated Randomness in Secure Computation", TCC 2013, here with
one public input) and each party keeps the entry its public block selects. From the
blocks on, each AND of two shared bits is one Beaver multiplication over GF(2) with a
dealer bit triple (c = a & b): open d = x ^ a and e = y ^ b, then x & y = c ^ (d & b)
^ (e & a) ^ (d & e). The result stays XOR-shared; ``protocols`` turns it into
arithmetic shares, or multiplies a value by it, in one more round (a daBit-style
multiplexer).

A comparison of w-bit values costs ceil(log2 ceil(w / 4)) rounds and about w / 2 bits
sent per party and value (w = 32: three rounds, 11 ANDs, 22 bits, where a tree from
single bits took five rounds, 57 ANDs and 114 bits); the dealer's tables are 32 bits
a block. The
arithmetic is bitwise on bit rows packed eight values to a byte. Bit rows have shape
(bits, ceil(n / 8)): row i holds bit i of the n values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .prg import Prg


_TRANSPOSE8 = tuple((np.uint64(s), np.uint64(m)) for s, m in (
    (7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0)))


def bit_rows(values: np.ndarray, width: int) -> np.ndarray:
    """(width, ceil(n/8)) packed rows: row i holds bit i of each uint64 value.

    Byte k of eight consecutive values is an 8x8 bit matrix; transposing it (the
    three-step swap of Warren, "Hacker's Delight", Sec. 7-3, on one uint64 per matrix,
    vectorised) gives bits 8k..8k+7 of those values, packed eight to a byte: ~14x
    faster than unpacking every bit."""
    v = np.ascontiguousarray(values, dtype="<u8").ravel()
    n = v.size
    nb = (n + 7) // 8
    if n % 8:
        v = np.concatenate([v, np.zeros(8 * nb - n, "<u8")])
    # (groups, 8 values, 8 bytes) -> (8 bytes, groups, 8 values): one matrix per uint64
    x = np.ascontiguousarray(v.view(np.uint8).reshape(nb, 8, 8).transpose(2, 0, 1))
    x = x.view("<u8")[..., 0].copy()
    for shift, mask in _TRANSPOSE8:
        t = (x ^ (x >> shift)) & mask
        x ^= t ^ (t << shift)
    # x[k, j], byte b: bit 8k + b of values 8j .. 8j + 7
    rows = x.view(np.uint8).reshape(8, nb, 8).transpose(0, 2, 1).reshape(64, nb)
    return np.ascontiguousarray(rows[:width])


def row_values(row: np.ndarray, n: int) -> np.ndarray:
    """One packed row as n 0/1 uint64 values."""
    return np.unpackbits(row, count=n, bitorder="little").astype(np.uint64)


#: the bits of a block whose (G, P) the dealer's table gives (16 entries a block)
LUT_BITS = 4


def blocks(width: int) -> int:
    """The table blocks of a width-bit tree (the top one may be short)."""
    return (width + LUT_BITS - 1) // LUT_BITS


def level_sizes(width: int) -> list[int]:
    """Blocks at each binary level of AND gates of a width-bit tree (from the table
    blocks), down to the final pair."""
    sizes, m = [], blocks(width)
    while m > 1:
        sizes.append(m)
        m = (m + 1) // 2
    return sizes


def _ands(m: int) -> int:
    """ANDs on a level of m blocks: P_H & G_L for each pair, P_H & P_L for all pairs but
    the lowest (the block holding bit 0 is never a high block, its P is never read)."""
    return 2 * (m // 2) - 1


@dataclass(frozen=True)
class TreeMaterial:
    """One party's share of what a ``width``-bit comparison tree consumes: the blocks'
    tables (``tables``: packed rows (blocks, 16, 2, ceil(n / 8)), entry v of a block
    its (G, P) when c's block is v) and a bit triple (a, b, c packed rows) per binary
    level of ANDs above them."""

    width: int
    tables: np.ndarray
    triples: tuple            # per level: (a, b, c) packed rows


def _block_tables(width: int, r_rows: np.ndarray) -> np.ndarray:
    """(G, P) of every block for every value of c's block, from r's bit rows (packed,
    at least ``width`` of them): g = !c & r and p = !(c ^ r) per bit, combined from
    the low bit up (G = g ^ (p & G), P = p & P); bits above ``width`` count as equal
    (g = 0, p = 1), so they change nothing."""
    k, nb = blocks(width), r_rows.shape[-1]
    ones = np.full(nb, 0xFF, np.uint8)
    out = np.empty((k, 16, 2, nb), np.uint8)
    for b in range(k):
        for v in range(16):
            g, p = np.zeros(nb, np.uint8), ones.copy()
            for i in range(LUT_BITS):
                bit = LUT_BITS * b + i
                if bit >= width:
                    break
                r = r_rows[bit]
                if (v >> i) & 1:                      # c_i = 1: g = 0, p = r
                    gi, pi = np.zeros(nb, np.uint8), r
                else:                                 # c_i = 0: g = r, p = !r
                    gi, pi = r, ~r
                g = gi ^ (pi & g)
                p = pi & p
            out[b, v, 0], out[b, v, 1] = g, p
    return out


def tree_material(width: int, n: int, prg: Prg, r_rows: np.ndarray
                  ) -> tuple[TreeMaterial, TreeMaterial]:
    """Both parties' material for n comparisons of ``width`` bits against the dealer's
    r (``r_rows``: its packed bit rows, the low ``width`` of them read)."""
    if width < 2:
        raise ValueError("a comparison tree needs at least two bits")
    nb = (n + 7) // 8
    t0, t1 = prg.split_bits(_block_tables(width, r_rows[:width, :nb]))
    trip0, trip1 = [], []
    for m in level_sizes(width):
        (a, (a0, a1)), (b, (b0, b1)) = (prg.root_bits((_ands(m), nb)) for _ in range(2))
        c0, c1 = prg.split_bits(a & b)
        trip0.append((a0, b0, c0))
        trip1.append((a1, b1, c1))
    return TreeMaterial(width, t0, tuple(trip0)), TreeMaterial(width, t1, tuple(trip1))


class _Tree:
    """One party's running comparison: advanced one round at a time by :func:`compare`."""

    def __init__(self, party: int, c_rows: np.ndarray, m: TreeMaterial) -> None:
        self.party, self.m = party, m
        # each block's entry of the table at c's block value: the indicator of that value
        # (an AND of c's bits or their complements, public) selects it, XOR over entries
        k, nb = m.tables.shape[0], c_rows.shape[-1]
        c = np.zeros((LUT_BITS, k, nb), np.uint8)
        for i in range(LUT_BITS):                  # bit i of every block
            rows = c_rows[i:m.width:LUT_BITS]
            c[i, :rows.shape[0]] = rows
        nc = ~c
        # the indicator of v = v_lo + 4 v_hi as (bits 0, 1 match v_lo) & (bits 2, 3 v_hi)
        pairs = [[b1 & b0 for b1 in (nc[2 * h + 1], c[2 * h + 1])
                  for b0 in (nc[2 * h], c[2 * h])] for h in (0, 1)]     # [h][v] (k, nb)
        g, p = np.zeros((k, nb), np.uint8), np.zeros((k, nb), np.uint8)
        for v in range(16):
            ind = pairs[1][v >> 2] & pairs[0][v & 3]
            g ^= ind & m.tables[:, v, 0]
            p ^= ind & m.tables[:, v, 1]
        self.g, self.p = g, p
        self.level = 0

    @property
    def done(self) -> bool:
        return self.level == len(self.m.triples)

    def outgoing(self) -> np.ndarray:
        """The packed rows this party opens this round."""
        a, b, _ = self.m.triples[self.level]
        k = self.g.shape[0] // 2
        g_lo, p_lo, p_hi = self.g[0:2 * k:2], self.p[0:2 * k:2], self.p[1:2 * k:2]
        return np.concatenate([np.concatenate([p_hi, p_hi[1:]]) ^ a,
                               np.concatenate([g_lo, p_lo[1:]]) ^ b])

    def incoming(self, opened: np.ndarray) -> None:
        """Finish this round with the opened rows (both shares XORed)."""
        a, b, c = self.m.triples[self.level]
        rows = a.shape[0]
        d, e = opened[:rows], opened[rows:]
        z = c ^ (d & b) ^ (e & a)
        if self.party == 0:
            z ^= d & e
        k = self.g.shape[0] // 2
        g = self.g[1:2 * k:2] ^ z[:k]
        p = np.concatenate([np.zeros_like(z[:1]), z[k:]])
        if self.g.shape[0] % 2:                  # the top block passes through
            g = np.concatenate([g, self.g[-1:]])
            p = np.concatenate([p, self.p[-1:]])
        self.g, self.p = g, p
        self.level += 1


def compare(ch, party: int, trees: list[_Tree]) -> list[np.ndarray]:
    """Run comparison trees side by side (one exchange per round for all of them);
    returns each tree's XOR share of its result, one packed row (shape (1, nb))."""
    while not all(t.done for t in trees):
        active = [t for t in trees if not t.done]
        out = [t.outgoing() for t in active]
        flat = np.concatenate([o.ravel() for o in out])
        opened = flat ^ ch.exchange(flat)
        at = 0
        for t, o in zip(active, out):
            t.incoming(opened[at:at + o.size].reshape(o.shape))
            at += o.size
    return [t.g for t in trees]


def tree(party: int, c_rows: np.ndarray, m: TreeMaterial) -> _Tree:
    """A comparison [c mod 2^w < r mod 2^w] for public ``c`` given as bit rows
    (:func:`bit_rows`, at least w = m.width of them) against the r the dealer's tables
    in ``m`` were made for."""
    return _Tree(party, c_rows, m)
