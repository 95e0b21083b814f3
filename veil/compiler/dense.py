"""Dense-layer planning: generalised diagonals of a matrix placed in slots, and the
baby-step / giant-step split that evaluates them with the fewest rotations and keys.

Dense layers use the diagonal method of Halevi and Shoup (CRYPTO 2014, "Algorithms
in HElib", Sec. 4.3) generalised to rectangular matrices, with the baby-step /
giant-step split of Halevi and Shoup (CRYPTO 2018, "Faster homomorphic linear
transformations in HElib", Sec. 4); all-zero diagonals are skipped, so a convolution
costs about one rotation per distinct kernel offset rather than one per input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .params import next_pow2

@dataclass(frozen=True)
class DensePlan:
    """How one DENSE node runs: its slot layouts, diagonals, baby/giant steps and folds.

    ``in_positions`` / ``out_positions`` place element ``k`` of the input / output at
    slot ``positions[k]`` of its period (None: slot ``k``). A diagonal ``d`` splits as
    ``d = (g2 * giant2 + g) * baby_step + r``: baby rotations by ``r`` (hoisted), giant
    rotations by ``g * baby_step`` and, when ``giant2`` > 0, outer rotations by
    ``g2 * giant2 * baby_step`` (a three-level split that needs fewer keys).

    A layer between values wider than one ciphertext (:mod:`.tiles`) runs the plan on
    every non-zero block (j, i) in ``blocks``: input part i (``in_chunk`` elements of
    ``in_parts``) into output part j (``out_chunk`` of ``out_parts``); the positions
    and diagonals are those of one part, shared by all blocks.
    """

    in_period: int
    out_period: int
    diagonals: tuple[int, ...]   # signed representatives of the non-zero diagonals
    baby_step: int
    fold_steps: tuple[int, ...]
    centered: bool = False        # baby steps in [-b/2, b/2) instead of [0, b)
    input_blocks: int = 0         # > 0: the client lays out rot(x, d) per diagonal d
    giant2: int = 0
    centered2: bool = False
    in_positions: tuple[int, ...] | None = None
    out_positions: tuple[int, ...] | None = None
    blocks: tuple[tuple[int, int], ...] | None = None    # None: one ciphertext each side
    in_chunk: int = 0
    out_chunk: int = 0
    in_parts: int = 1
    out_parts: int = 1

    def expanded_fold_steps(self) -> tuple[int, ...]:
        """Folds of a client-expanded layer: sum the blocks, then the wide-map folds."""
        block = max(self.in_period, self.out_period)
        return tuple(block << t for t in range(int(math.log2(self.input_blocks)))) \
            + self.fold_steps

    def split(self, d: int) -> tuple[int, int]:
        """Giant index g and baby step r with d == g * baby_step + r."""
        return _split(d, self.baby_step, self.centered)

    def split3(self, d: int) -> tuple[int, int, int]:
        """(g2, g, r) with d == (g2 * giant2 + g) * baby_step + r."""
        g, r = self.split(d)
        if not self.giant2:
            return 0, g, r
        g2, g1 = _split(g, self.giant2, self.centered2)
        return g2, g1, r

    def rotations(self) -> set[int]:
        if self.input_blocks:
            return set(self.expanded_fold_steps())
        rots = set(self.fold_steps)
        outer = self.giant2 * self.baby_step
        for d in self.diagonals:
            g2, g, r = self.split3(d)
            rots.update(x for x in (r, g * self.baby_step, g2 * outer) if x)
        return rots

    def rotation_count(self) -> float:
        """Rotations one evaluation performs; hoisted baby steps count half."""
        if self.input_blocks:
            return float(len(self.expanded_fold_steps()))
        parts = [self.split3(d) for d in self.diagonals]
        babies = {r for _, _, r in parts} - {0}
        giants = {(g2, g) for g2, g, _ in parts if g}
        outers = {g2 for g2, _, _ in parts} - {0}
        # a tiled layer: baby steps once per input part, the rest once per output part
        return (0.5 * len(babies) * self.in_parts
                + (len(giants) + len(outers) + len(self.fold_steps)) * self.out_parts)

    def products(self) -> int:
        """Ciphertext-plaintext products one evaluation performs (at most)."""
        if self.input_blocks:
            return 1
        return len(self.diagonals) * (len(self.blocks) if self.blocks else 1)

    def positions(self, side: str, size: int) -> np.ndarray:
        pos = self.in_positions if side == "in" else self.out_positions
        return np.arange(size) if pos is None else np.asarray(pos, dtype=np.int64)

    def to_dict(self) -> dict:
        d = {"in_period": self.in_period, "out_period": self.out_period,
             "diagonals": list(self.diagonals), "baby_step": self.baby_step,
             "fold_steps": list(self.fold_steps), "centered": self.centered,
             "input_blocks": self.input_blocks, "giant2": self.giant2,
             "centered2": self.centered2}
        for key in ("in_positions", "out_positions"):
            if getattr(self, key) is not None:
                d[key] = list(getattr(self, key))
        if self.blocks is not None:
            d.update(blocks=[list(b) for b in self.blocks], in_chunk=self.in_chunk,
                     out_chunk=self.out_chunk, in_parts=self.in_parts,
                     out_parts=self.out_parts)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DensePlan":
        pos = {k: (tuple(int(v) for v in d[k]) if d.get(k) is not None else None)
               for k in ("in_positions", "out_positions")}
        tiled = {}
        if d.get("blocks") is not None:
            tiled = {"blocks": tuple((int(j), int(i)) for j, i in d["blocks"]),
                     **{k: int(d[k]) for k in ("in_chunk", "out_chunk", "in_parts",
                                               "out_parts")}}
        return cls(int(d["in_period"]), int(d["out_period"]), tuple(d["diagonals"]),
                   int(d["baby_step"]), tuple(d["fold_steps"]),
                   bool(d.get("centered", False)), int(d.get("input_blocks", 0)),
                   int(d.get("giant2", 0)), bool(d.get("centered2", False)), **pos,
                   **tiled)


def nonzeros(matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, columns, values) of the non-zero entries of a dense array or of a sparse
    matrix (what :func:`veil.compiler.sparse.chain_matrix` builds for large layers)."""
    if sp.issparse(matrix):
        coo = matrix.tocoo()
        keep = coo.data != 0
        return (coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64),
                coo.data[keep])
    rows, cols = np.nonzero(matrix)
    return rows, cols, matrix[rows, cols]


def _diagonal_entries(matrix, in_period: int, out_period: int,
                      in_pos: np.ndarray | None, out_pos: np.ndarray | None):
    """For every non-zero W[r, c]: its diagonal i, its slot j, and its value."""
    m, n = matrix.shape
    in_pos = np.arange(n) if in_pos is None else np.asarray(in_pos, dtype=np.int64)
    out_pos = np.arange(m) if out_pos is None else np.asarray(out_pos, dtype=np.int64)
    rows, cols, vals = nonzeros(matrix)
    a, b = out_pos[rows], in_pos[cols]
    if in_period >= out_period:
        i = (b - a) % out_period
        j = a + (b - a - i) % in_period
    else:
        i = (b - a) % in_period
        j = a
    return i, j, vals


def slot_diagonals(matrix: np.ndarray, in_period: int, out_period: int,
                   in_pos: np.ndarray | None = None, out_pos: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Non-zero generalised diagonals of ``matrix`` placed in slots.

    The slot-level matrix W' has W[r, c] at row ``out_pos[r]``, column ``in_pos[c]``.
    Diagonal ``i`` (``0 <= i < min(Pi, Po)``) is the vector whose slot ``j`` (``0 <= j
    < max(Pi, Po)``) holds W'[j mod Po, (j + i) mod Pi]. Every entry of W lands on
    exactly one (i, j): for Pi >= Po, i = (b - a) mod Po and j = a + ((b - a - i) mod
    Pi); for Pi < Po, i = (b - a) mod Pi and j = a. Built from the non-zeros only, so a
    layer costs memory in its diagonals, never in a dense slot-level matrix.

    Returns (sorted diagonal indices, vectors of shape (count, max(Pi, Po))); an
    all-zero matrix gives the single zero diagonal 0.
    """
    i, j, vals = _diagonal_entries(matrix, in_period, out_period, in_pos, out_pos)
    seen = np.bincount(i, minlength=1) > 0          # i in [0, min(Pi, Po)): no sort
    ids = np.flatnonzero(seen)
    slot_of = (np.cumsum(seen) - 1)[i]
    if ids.size == 0:
        return np.zeros(1, dtype=np.int64), np.zeros((1, max(in_period, out_period)))
    vectors = np.zeros((ids.size, max(in_period, out_period)))
    np.add.at(vectors, (slot_of, j), vals)
    return ids, vectors


def _signed(i: int, period: int) -> int:
    return i - period if i > period // 2 else i


def normalize_rotation(r: int, slots: int) -> int:
    """The representative in (-slots/2, slots/2] that keys and evaluation both use."""
    return _signed(r % slots, slots)


def _split(d: int, b: int, centered: bool) -> tuple[int, int]:
    r = ((d + b // 2) % b) - b // 2 if centered else d % b
    return (d - r) // b, r


def _distinct_nonzero(values: np.ndarray) -> np.ndarray:
    """Per row of a 2-D int array: how many distinct non-zero entries it holds.

    Rows whose values span a modest range (the baby and giant indices of a split) are
    counted by marking each value in a per-row bitmap, linear in the entries; the rest
    by sorting."""
    lo, hi = values.min(axis=1), values.max(axis=1)
    width = hi - lo + 1
    if int(width.sum()) <= 4 * values.size + (1 << 16):
        offsets = np.concatenate([[0], np.cumsum(width)[:-1]])
        flags = np.zeros(int(width.sum()), dtype=bool)
        flags[(values + (offsets - lo)[:, None]).ravel()] = True
        distinct = np.add.reduceat(flags, offsets, dtype=np.int64)
        has_zero = (lo <= 0) & (hi >= 0)
        has_zero[has_zero] = flags[(offsets - lo)[has_zero]]
        return distinct - has_zero
    v = np.sort(values, axis=1)
    distinct = 1 + np.count_nonzero(np.diff(v, axis=1), axis=1)
    return distinct - np.any(v == 0, axis=1)


# Rotation keys weigh on memory, key generation and upload: one key counts this many
# rotations when a split is chosen (a second giant level trades rotations for keys).
KEY_WEIGHT = 0.25
_MAX_STEP_CANDIDATES = 4096


def _step_candidates(span: int, thin: bool = False) -> np.ndarray:
    """Every step up to 4096, then the powers of two; ``thin`` (layers with thousands
    of diagonals, where each candidate costs a pass over all of them): every step up
    to 64, then multiples of 32 (grid layouts put rows and channel blocks there)."""
    top = 2 * span + 2
    small = np.arange(1, min(top, _MAX_STEP_CANDIDATES))
    if thin:
        small = small[(small <= 64) | (small % 32 == 0)]
    pow2 = 1 << np.arange(int(math.log2(max(_MAX_STEP_CANDIDATES, 2))), max(top, 2).bit_length())
    return np.unique(np.concatenate([small, pow2[pow2 < top]]))


def _unkeyed(values: np.ndarray, free: np.ndarray) -> np.ndarray:
    """``values`` with the rotations a key already exists for set to 0, so
    :func:`_distinct_nonzero` counts only the keys a split would add. ``free`` is a
    lookup table (see :func:`_free_array`): entry ``v + len // 2`` is True for a key."""
    if free.size == 0:
        return values
    half = free.size // 2
    inside = np.abs(values) < half
    hit = np.zeros(values.shape, dtype=bool)
    hit[inside] = free[values[inside] + half]
    return np.where(hit, 0, values)


def _free_array(free, slots: int | None) -> np.ndarray:
    """A lookup table of every existing key, both representatives mod ``slots``: entry
    ``v + 2 * slots`` is True when rotation ``v`` (|v| < 2 * slots) has a key."""
    if not free or not slots:
        return np.zeros(0, dtype=bool)
    table = np.zeros(4 * slots, dtype=bool)
    f = np.asarray(sorted(free), dtype=np.int64) % slots
    for shift in (-2 * slots, -slots, 0, slots):
        v = f + shift
        ok = np.abs(v) < 2 * slots
        table[v[ok] + 2 * slots] = True
    return table


def _best_baby_step(diags: list[int], key_weight: float = KEY_WEIGHT,
                    free: np.ndarray | None = None) -> tuple[int, bool]:
    """Baby-step size (and split) minimising rotations (hoisted babies count half) plus
    ``key_weight`` per rotation key not in ``free``, over every step up to 4096 and the
    powers of two beyond, in one vectorised pass."""
    free = np.zeros(0, dtype=bool) if free is None else free
    d = np.asarray(diags, dtype=np.int64)[None, :]
    span = int(np.abs(d).max(initial=1))
    best, best_cost = (1, False), math.inf
    b = _step_candidates(span, thin=d.size > 256 and span > 2048)[:, None]
    for centered in (False, True):
        r = ((d + b // 2) % b) - b // 2 if centered else d % b
        g = (d - r) // b
        babies, giants = _distinct_nonzero(r), _distinct_nonzero(g)
        if free.size:        # only the keys no earlier layer made count
            new_keys = (_distinct_nonzero(_unkeyed(r, free))
                        + _distinct_nonzero(_unkeyed(g * b, free)))
        else:
            new_keys = babies + giants
        cost = 0.5 * babies + giants + key_weight * new_keys
        k = int(np.argmin(cost))
        if cost[k] < best_cost - 1e-9:
            best, best_cost = (int(b[k, 0]), centered), float(cost[k])
    return best


def _best_outer_step(diags: list[int], baby: int, centered: bool,
                     key_weight: float = KEY_WEIGHT, free: np.ndarray | None = None
                     ) -> tuple[int, bool]:
    """Second giant level (multiplier, centered) for a split, or (0, False) when two
    levels are cheaper once keys (those not in ``free``) are weighed in."""
    free = np.zeros(0, dtype=bool) if free is None else free
    parts = [_split(d, baby, centered) for d in diags]
    giants = np.asarray(sorted({g for g, _ in parts} - {0}), dtype=np.int64)
    if giants.size < 4:
        return 0, False
    base = giants.size + key_weight * int(np.count_nonzero(
        _unkeyed(giants[None, :] * baby, free)))
    gvec = np.unique(np.asarray([g for g, _ in parts], dtype=np.int64))
    best, best_cost = (0, False), base
    m_all = _step_candidates(int(np.abs(giants).max()))
    m_all = m_all[m_all >= 2][:, None]
    for c2 in (False, True):
        g1 = ((gvec + m_all // 2) % m_all) - m_all // 2 if c2 else gvec % m_all
        g2 = (gvec - g1) // m_all
        # rotations: one per distinct (g2, g1) with g1 != 0, one per distinct g2 != 0
        pair = np.where(g1 != 0, g2 * (4 * int(np.abs(gvec).max()) + 8) + g1, 0)
        cost = (_distinct_nonzero(pair) + _distinct_nonzero(g2)
                + key_weight * (_distinct_nonzero(_unkeyed(g2 * m_all * baby, free))
                                + _distinct_nonzero(_unkeyed(g1 * baby, free))))
        k = int(np.argmin(cost))
        if cost[k] < best_cost - 1e-9:
            best, best_cost = (int(m_all[k, 0]), c2), float(cost[k])
    return best


def plan_dense(matrix, in_positions=None, out_positions=None,
               in_period: int | None = None, out_period: int | None = None, *,
               key_weight: float = KEY_WEIGHT, free_keys=frozenset(),
               slots: int | None = None) -> DensePlan:
    """Pick non-zero diagonals, the baby/giant steps and the fold rotations of one dense
    map whose input and output sit at the given slot positions (default: compact).

    ``key_weight`` is what one new rotation key counts, in rotations, when a split is
    chosen; keys in ``free_keys`` (rotations mod ``slots`` that earlier layers already
    use) count nothing, so layers come to share their keys."""
    m, n = matrix.shape
    pi = in_period or next_pow2(n if in_positions is None else max(in_positions) + 1)
    po = out_period or next_pow2(m if out_positions is None else max(out_positions) + 1)
    # only the indices: the layout search plans many candidates, the evaluator alone
    # needs the vectors
    i = _diagonal_entries(matrix, pi, po, in_positions, out_positions)[0]
    ids = np.flatnonzero(np.bincount(i, minlength=1))    # i in [0, min(pi, po))
    nonzero = sorted(_signed(int(i), pi) for i in ids) or [0]
    folds = tuple(po << t for t in range(int(math.log2(pi // po)))) if pi > po else ()
    free = _free_array(free_keys, slots)
    baby, centered = _best_baby_step(nonzero, key_weight, free)
    giant2, centered2 = _best_outer_step(nonzero, baby, centered, key_weight, free)
    freeze = (lambda p: None if p is None else tuple(int(v) for v in p))
    return DensePlan(pi, po, tuple(nonzero), baby, folds, centered, 0, giant2, centered2,
                     freeze(in_positions), freeze(out_positions))


# Relative costs, one rotation = 1 (measured at rings 2^13-2^14, bench notes in
# docs/ARCHITECTURE.md): a ciphertext x plaintext product, one term of a scalar-weighted
# sum, one squaring with relinearization.
COST = {"rotation": 1.0, "pt_mult": 0.05, "scalar_term": 0.03, "square": 0.7}


def _layer_work(plan: DensePlan) -> float:
    """One evaluation of a dense layer in rotation units: rotations and products."""
    return plan.rotation_count() * COST["rotation"] + plan.products() * COST["pt_mult"]


def dense_cost(plan: DensePlan, key_weight: float = KEY_WEIGHT, free_keys=frozenset(),
               slots: int | None = None) -> float:
    """Estimated cost of one layer in rotations: its work, and its new keys."""
    keys = plan.rotations()
    if free_keys:
        keys = {r for r in keys if normalize_rotation(r, slots) not in free_keys}
    return _layer_work(plan) + key_weight * len(keys)
