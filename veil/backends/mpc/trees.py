"""Tree ensembles on shares: the MPC kernel of TREE_ENSEMBLE, registered in
:data:`veil.backends.mpc.evaluator.KERNELS` like every other op.

The servers know the model (thresholds, features, leaf weights); the features stay
shared. The construction is the path-product form of oblivious decision-tree
evaluation (the leaf indicator as the product of its path's comparison bits, as in
Wu et al., "Privately evaluating decision trees and random forests", PETS 2016, and
Kiss et al., "SoK: Modular and efficient private decision tree evaluation", PETS 2019,
Sec. 3), with every comparison of every tree batched:

1. Comparisons, one batch for all N branch nodes of all trees: with X the input's
   fixed-point encoding round(x 2^f) and T = round(t 2^f), node n's bit is [D >= 0] for
   D = T - X (x <= t), T - X - 1 (x < t), X - T (x >= t) or X - T - 1 (x > t): integer
   tests, so LEQ and LT differ exactly. The parties compare d = 2^k D (local) with the
   circuit comparison on l = ``TREE_CMP_BITS`` = 48 ring bits leaving out the lowest
   k = ``TREE_CMP_DROP`` = 1 (``protocols.drelu``): that comparison errs only when the
   low k bits carry, and d's are zero, so the bit is exact whenever |D| < 2^(l-2):
   |x - t| < 2^26 real at f = 20 (thresholds are clamped to +-2^24, beyond the inputs'
   2^23 bound, which leaves every test unchanged). One opening of ceil(l / 8) = 6 bytes,
   a four-round tree on l - 1 - k = 46 bits (12 blocks from the dealer's tables, then
   18 ANDs: 4.5 bytes), one round for the arithmetic bit: 6 rounds and 10.625 bytes a
   node per party. With DCF comparisons
   (``cmp="fss"``): exact on all 64 bits, one round of 8 bytes.
2. Leaf indicators: leaf j's literals are b_n (true branch) or 1 - b_n (false branch,
   local); their product by Beaver products of 0/1 integers (no truncation), paired
   level by level: ceil(log2 depth) rounds, depth - 1 products a leaf, 16 bytes each.
3. Output: sum_j [leaf j] w_j + base with the weights public, in fixed point at 2f bits
   (local); then as any affine layer (``evaluator._finish``): left at 2f bits when it
   is the output (the client decodes), else one faithful truncation to f bits.

Exactness: every node test equals the reference's on the fixed-point inputs, and the
reference's own test on the reals whenever x = t (equal reals encode alike) or
|x - t| > 2^-f (X = round(x 2^f) and T = round(t 2^f) are then ordered as x and t,
each within half a unit). Within 2^-f of a threshold the encoding may merge x with t:
at exactly one unit only when t 2^f is a half-integer (round half to even puts both
t 2^f and t 2^f + 1 or - 1 in one cell); for an input computed on shares (after a
scaler), within that input's own rounding. The scores are exact up to
the weights' encoding at 2f bits: |error| <= (n_trees + 1) 2^-(2f+1) (one rounding per
reached leaf and the base), about 4.5e-13 n_trees at f = 20.
"""
from __future__ import annotations

import numpy as np

from ...ir import Op
from .circuit import level_sizes
from .evaluator import Kernel, Run, Step, _affine_steps, _finish, _scaled, ring_matmul

#: l, the ring bits of the node comparisons (|D| < 2^(l - 2) ring units)
TREE_CMP_BITS = 48
#: k, the low bits the comparison tree leaves out (d = 2^k D has them zero: exact)
TREE_CMP_DROP = 1
#: thresholds are clamped to +-2^24 real: beyond the 2^23 every MPC input stays below
#: (``fixed.MAX_ABS``), so no test changes and |X - T| stays below 2^45 ring units
THRESHOLD_CLAMP = float(2 ** 24)


def _literals(paths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each leaf's path compacted to the front: node indices (L, D), signs (+1 true
    branch, -1 false branch, 0 past the path) and lengths (L,)."""
    paths = np.asarray(paths, dtype=np.int64)
    order = np.argsort(paths == 0, axis=1, kind="stable")
    compact = np.take_along_axis(paths, order, axis=1)
    return np.abs(compact) - 1, np.sign(compact), (compact != 0).sum(axis=1)


def product_rounds(paths: np.ndarray) -> list[int]:
    """Products per round (per input) that reduce every leaf's literals pairwise."""
    lengths = _literals(paths)[2]
    out = []
    while lengths.size and lengths.max() > 1:
        out.append(int((lengths // 2).sum()))
        lengths = (lengths + 1) // 2
    return out


def _tree_steps(prog, node) -> list[Step]:
    n = node.params["feature"].size
    cmp = [Step("drelu", n, width=TREE_CMP_BITS, drop=TREE_CMP_DROP)] if n else []
    return cmp + [Step("mul", c) for c in product_rounds(node.params["paths"])] \
        + _affine_steps(prog, node)


def _node_bits(run: Run, node, x: np.ndarray) -> np.ndarray:
    """Shares of every branch node's test bit (B, N), 0/1 integers."""
    p, f = node.params, run.f
    mode = p["mode"].astype(np.int64)
    t = _scaled(np.clip(p["threshold"], -THRESHOLD_CLAMP, THRESHOLD_CLAMP), f)
    diff = x.reshape(x.shape[0], -1)[:, p["feature"].astype(np.int64)] - run.public(t)
    # D = sign (X - T) - c: minus for x <= t and x < t, c = 1 for the strict tests
    sign = np.where(mode >= 2, 1, -1).astype(np.int64).view(np.uint64)
    strict = run.public((mode % 2).astype(np.uint64))
    d = (sign * diff - strict) << np.uint64(TREE_CMP_DROP)
    return run.drelu(np.ascontiguousarray(d))


def _reached(run: Run, bits: np.ndarray, paths: np.ndarray) -> np.ndarray:
    """Shares of each leaf's indicator (B, L): its literals multiplied pairwise, one
    "mul" step per level."""
    index, sign, lengths = _literals(paths)
    one = run.public(np.uint64(1))
    b = bits[:, np.maximum(index, 0)]                       # (B, L, D)
    lits = np.where(sign > 0, b, one - b)
    base = lengths.copy()
    while lengths.size and lengths.max() > 1:
        d = lits.shape[2]
        need = (2 * np.arange(d // 2) + 1)[None, :] < lengths[:, None]
        leaf, pair = np.nonzero(need)
        left = lits[:, :, 0::2].copy()
        prod = run.mul(np.ascontiguousarray(lits[:, leaf, 2 * pair]),
                       np.ascontiguousarray(lits[:, leaf, 2 * pair + 1]))
        left[:, leaf, pair] = prod
        lits, lengths = left, (lengths + 1) // 2
    first = lits[:, :, 0] if lits.shape[2] else np.zeros(lits.shape[:2], np.uint64)
    return np.where(base[None, :] == 0, one, first)        # a one-leaf tree: always 1


def _tree_ensemble(run: Run, node, args):
    x = args[0]
    bits = _node_bits(run, node, x) if node.params["feature"].size else \
        np.zeros((x.shape[0], 0), np.uint64)
    reached = _reached(run, bits, node.params["paths"])
    w = run.prog.param(node, "weights", 2 * run.f).view(np.int64)
    y = ring_matmul(np.ascontiguousarray(reached), np.ascontiguousarray(w.T))
    if run.party == 0:
        y = y + run.prog.param(node, "base", 2 * run.f)
    return _finish(run, node, y)


def tree_cost(node, batch: int = 1) -> tuple[int, int]:
    """(rounds, bytes one party sends) of a TREE_ENSEMBLE node that is the graph's
    output, with circuit comparisons, for ``batch`` inputs: what the parties' channels
    count (``tests/test_trees.py``)."""
    n = node.params["feature"].size * batch
    rounds, sent = 0, 0
    if n:
        nb = (n + 7) // 8
        levels = level_sizes(TREE_CMP_BITS - 1 - TREE_CMP_DROP)
        rounds += 1 + len(levels) + 1
        sent += n * ((TREE_CMP_BITS + 7) // 8) + nb \
            + sum(2 * (2 * (m // 2) - 1) * nb for m in levels)
    products = product_rounds(node.params["paths"])
    return rounds + len(products), sent + sum(16 * c * batch for c in products)


# affine: like a dense layer, its 2f-bit result is truncated by ``_finish`` (or left at
# 2f bits as the output, or for the ADD/SUB reading it)
KERNELS = {Op.TREE_ENSEMBLE: Kernel(_tree_steps, _tree_ensemble, affine=True)}
