"""HE planning: slot layouts, rotation sets, depth, CKKS parameters and the key manifest.

Layout invariant. A value of ``n`` numbers lives in one ciphertext as a vector of
period ``P = next_pow2(n)``: slot ``j`` holds ``x[j mod P]`` (zero when
``j mod P >= n``). Because P divides the slot count, a cyclic rotation of the whole
ciphertext by ``i`` equals a cyclic rotation of every period block, which is what
the diagonal method needs.

Dense layers use the diagonal method of Halevi and Shoup (CRYPTO 2014, "Algorithms
in HElib", Sec. 4.3) generalised to rectangular matrices, with the baby-step /
giant-step split of Halevi and Shoup (CRYPTO 2018, "Faster homomorphic linear
transformations in HElib", Sec. 4); all-zero diagonals are skipped, so a convolution
costs about one rotation per distinct kernel offset rather than one per input.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..errors import CompileError
from ..ir import Graph, Op

# Smallest ring dimensions with their 128-bit classical bound on log2(Q*P)
# (HomomorphicEncryption.org standard, Table for uniform ternary secrets).
HE_STD_128_LOGQP = {1 << 13: 218, 1 << 14: 438, 1 << 15: 881, 1 << 16: 1761, 1 << 17: 3523}
# Ring dimension used when the caller opts into insecure test parameters.
INSECURE_RING_DIM = 1 << 12
SCALING_BITS_CHOICES = (40, 38, 36, 34, 32, 30)
# Output bits measured per scaling size for veil's models (bench/he_models.py): a
# 32-bit scale leaves ~15-16 bits of output precision, 36 bits ~19, 40 bits 21-23.
PRECISION_LOSS_BITS = 17
# The first modulus holds the decrypted output: ``scale + 16`` bits leaves room for
# outputs up to 2^15 in magnitude, which logits never approach.
FIRST_MOD_HEADROOM = 16
# Degree thresholds of OpenFHE's Chebyshev evaluation on [-1, 1]: degree <= t costs
# `depth` levels. Any other interval costs one more level for the affine map onto
# [-1, 1] (which ``fold_poly_domain`` moves into the preceding dense layer). Checked
# against OpenFHE by a backend test.
_CHEB_DEPTH = ((1, 1), (2, 2), (5, 3), (13, 4), (27, 5), (59, 6), (119, 7), (247, 8),
               (495, 9), (1007, 10), (2031, 11))


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def chebyshev_depth(degree: int, lo: float = -1.0, hi: float = 1.0) -> int:
    """Multiplicative levels OpenFHE's EvalChebyshevSeries consumes for ``degree``."""
    extra = 0 if (lo, hi) == (-1.0, 1.0) else 1
    for limit, depth in _CHEB_DEPTH:
        if degree <= limit:
            return depth + extra
    raise CompileError(f"polynomial degree {degree} is above the supported 2031")


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters; ``security`` is the OpenFHE security level name."""

    ring_dim: int
    mult_depth: int
    scaling_bits: int
    first_mod_bits: int
    num_large_digits: int
    security: str = "HEStd_128_classic"
    insecure_test_params: bool = False

    @property
    def slots(self) -> int:
        return self.ring_dim // 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CKKSParams":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def _estimated_log_qp(depth: int, scaling: int, first: int, dnum: int) -> int:
    """log2(Q*P) as OpenFHE builds it for HYBRID key switching (validated by a test)."""
    towers = depth + 1
    alpha = math.ceil(towers / dnum)
    digit_bits = first + (alpha - 1) * scaling
    log_p = math.ceil((digit_bits + 8) / 60) * 60  # +8: headroom OpenFHE keeps
    return first + depth * scaling + log_p


def _digits_ok(depth: int, dnum: int) -> bool:
    """OpenFHE needs every key-switching digit non-empty: (dnum - 1) * alpha < towers."""
    towers = depth + 1
    return 1 <= dnum and (dnum - 1) * math.ceil(towers / dnum) < towers


def keyswitch_cost(depth: int, scaling: int, first: int, dnum: int) -> int:
    """Towers one rotation key holds, over all digits: ``dnum * (towers + P towers)``.

    Both the evaluation-key memory and the NTTs of a key switch scale with it, so it
    is what parameter selection minimises once security and precision are met.
    """
    log_p = _estimated_log_qp(depth, scaling, first, dnum) - first - depth * scaling
    return dnum * (depth + 1 + log_p // 60)


def select_params(depth: int, min_slots: int, *, insecure_test_params: bool = False,
                  precision_bits: int | None = None) -> tuple[CKKSParams, str]:
    """Smallest secure ring; then the scale and key-switching digits.

    By default the largest scale that fits wins (the most output precision the ring
    allows), then the fewest digits. With ``precision_bits``, scales below
    ``precision_bits + PRECISION_LOSS_BITS`` are ruled out and the (scale, first
    modulus, digits) with the smallest :func:`keyswitch_cost` wins, ties going to the
    larger scale: a caller who needs 12 bits gets keys half the size on deep models.
    """
    depth = max(depth, 1)
    if insecure_test_params:
        ring = max(INSECURE_RING_DIM, 2 * next_pow2(min_slots))
        dnum = next(d for d in (3, 2, 1) if _digits_ok(depth, d))
        return (CKKSParams(ring, depth, 40, 60, dnum, "HEStd_NotSet", True),
                f"INSECURE test parameters: ring {ring}, no security level enforced")
    min_scale = 0 if precision_bits is None else precision_bits + PRECISION_LOSS_BITS
    scales = [c for c in SCALING_BITS_CHOICES if c >= min_scale]
    if not scales:
        raise CompileError(f"precision_bits={precision_bits} needs a scale above "
                           f"{max(SCALING_BITS_CHOICES)} bits; ask for at most "
                           f"{max(SCALING_BITS_CHOICES) - PRECISION_LOSS_BITS}")
    for ring, bound in HE_STD_128_LOGQP.items():
        if ring // 2 < min_slots:
            continue
        firsts = (lambda s: {min(60, s + 20)}) if precision_bits is None else \
            (lambda s: {min(60, s + 20), s + FIRST_MOD_HEADROOM})
        fits = [(s, first, dnum) for s in scales for first in sorted(firsts(s))
                for dnum in range(2, depth + 2)
                if _digits_ok(depth, dnum)
                # Strictly below: OpenFHE's primes sit a fraction of a bit above their
                # nominal size, so an estimate equal to the bound can fail its check.
                and _estimated_log_qp(depth, s, first, dnum) < bound]
        if not fits:
            continue
        if precision_bits is None:
            s, first, dnum = min(fits, key=lambda f: (-f[0], f[2]))
            goal = "the largest scale that fits, then the fewest key-switch digits"
        else:
            s, first, dnum = min(fits, key=lambda f: (keyswitch_cost(depth, *f), -f[0]))
            goal = (f"the cheapest key switching that keeps >= {precision_bits} output "
                    "bits")
        why = (f"depth {depth} with {s}-bit scaling fits ring {ring} (log2 QP < {bound} "
               f"for 128-bit security); {dnum} key-switch digits "
               f"({keyswitch_cost(depth, s, first, dnum)} towers per key): {goal}; "
               f"{ring // 2} slots >= {min_slots} needed")
        return CKKSParams(ring, depth, s, first, dnum), why
    raise CompileError(f"depth {depth} does not fit a ring of at most 2^17 at 128-bit "
                       "security; lower the polynomial degrees")


@dataclass(frozen=True)
class DensePlan:
    """How one DENSE node runs: its slot layouts, diagonals, baby/giant steps and folds.

    ``in_positions`` / ``out_positions`` place element ``k`` of the input / output at
    slot ``positions[k]`` of its period (None: slot ``k``). A diagonal ``d`` splits as
    ``d = (g2 * giant2 + g) * baby_step + r``: baby rotations by ``r`` (hoisted), giant
    rotations by ``g * baby_step`` and, when ``giant2`` > 0, outer rotations by
    ``g2 * giant2 * baby_step`` (a three-level split that needs fewer keys).
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
        return 0.5 * len(babies) + len(giants) + len(outers) + len(self.fold_steps)

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
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DensePlan":
        pos = {k: (tuple(int(v) for v in d[k]) if d.get(k) is not None else None)
               for k in ("in_positions", "out_positions")}
        return cls(int(d["in_period"]), int(d["out_period"]), tuple(d["diagonals"]),
                   int(d["baby_step"]), tuple(d["fold_steps"]),
                   bool(d.get("centered", False)), int(d.get("input_blocks", 0)),
                   int(d.get("giant2", 0)), bool(d.get("centered2", False)), **pos)


def _diagonal_entries(matrix: np.ndarray, in_period: int, out_period: int,
                      in_pos: np.ndarray | None, out_pos: np.ndarray | None):
    """For every non-zero W[r, c]: its diagonal i, its slot j, and its value."""
    m, n = matrix.shape
    in_pos = np.arange(n) if in_pos is None else np.asarray(in_pos, dtype=np.int64)
    out_pos = np.arange(m) if out_pos is None else np.asarray(out_pos, dtype=np.int64)
    rows, cols = np.nonzero(matrix)
    a, b = out_pos[rows], in_pos[cols]
    if in_period >= out_period:
        i = (b - a) % out_period
        j = a + (b - a - i) % in_period
    else:
        i = (b - a) % in_period
        j = a
    return i, j, matrix[rows, cols]


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
    ids, slot_of = np.unique(i, return_inverse=True)
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
    """Per row of a 2-D int array: how many distinct non-zero entries it holds."""
    v = np.sort(values, axis=1)
    distinct = 1 + np.count_nonzero(np.diff(v, axis=1), axis=1)
    return distinct - np.any(v == 0, axis=1)


# Rotation keys weigh on memory, key generation and upload: one key counts this many
# rotations when a split is chosen (a second giant level trades rotations for keys).
KEY_WEIGHT = 0.25
_MAX_STEP_CANDIDATES = 4096


def _step_candidates(span: int) -> np.ndarray:
    top = 2 * span + 2
    small = np.arange(1, min(top, _MAX_STEP_CANDIDATES))
    pow2 = 1 << np.arange(int(math.log2(max(_MAX_STEP_CANDIDATES, 2))), max(top, 2).bit_length())
    return np.unique(np.concatenate([small, pow2[pow2 < top]]))


def _best_baby_step(diags: list[int]) -> tuple[int, bool]:
    """Baby-step size (and split) minimising rotations (hoisted babies count half) plus
    ``KEY_WEIGHT`` per distinct rotation key, over every step up to 4096 and the powers
    of two beyond, in one vectorised pass."""
    d = np.asarray(diags, dtype=np.int64)[None, :]
    span = int(np.abs(d).max(initial=1))
    best, best_cost = (1, False), math.inf
    b = _step_candidates(span)[:, None]
    for centered in (False, True):
        r = ((d + b // 2) % b) - b // 2 if centered else d % b
        g = (d - r) // b
        cost = (0.5 + KEY_WEIGHT) * _distinct_nonzero(r) + (1 + KEY_WEIGHT) * _distinct_nonzero(g)
        k = int(np.argmin(cost))
        if cost[k] < best_cost - 1e-9:
            best, best_cost = (int(b[k, 0]), centered), float(cost[k])
    return best


def _best_outer_step(diags: list[int], baby: int, centered: bool) -> tuple[int, bool]:
    """Second giant level (multiplier, centered) for a split, or (0, False) when two
    levels are cheaper once keys are weighed in."""
    parts = [_split(d, baby, centered) for d in diags]
    giants = np.asarray(sorted({g for g, _ in parts} - {0}), dtype=np.int64)
    if giants.size < 4:
        return 0, False
    base = (1 + KEY_WEIGHT) * giants.size
    gvec = np.unique(np.asarray([g for g, _ in parts], dtype=np.int64))
    best, best_cost = (0, False), base
    m_all = _step_candidates(int(np.abs(giants).max()))
    m_all = m_all[m_all >= 2][:, None]
    for c2 in (False, True):
        g1 = ((gvec + m_all // 2) % m_all) - m_all // 2 if c2 else gvec % m_all
        g2 = (gvec - g1) // m_all
        # rotations: one per distinct (g2, g1) with g1 != 0, one per distinct g2 != 0
        pair = np.where(g1 != 0, g2 * (4 * int(np.abs(gvec).max()) + 8) + g1, 0)
        cost = (_distinct_nonzero(pair) + (1 + KEY_WEIGHT) * _distinct_nonzero(g2)
                + KEY_WEIGHT * _distinct_nonzero(g1))
        k = int(np.argmin(cost))
        if cost[k] < best_cost - 1e-9:
            best, best_cost = (int(m_all[k, 0]), c2), float(cost[k])
    return best


def plan_dense(matrix: np.ndarray, in_positions=None, out_positions=None,
               in_period: int | None = None, out_period: int | None = None) -> DensePlan:
    """Pick non-zero diagonals, the baby/giant steps and the fold rotations of one dense
    map whose input and output sit at the given slot positions (default: compact)."""
    m, n = matrix.shape
    pi = in_period or next_pow2(n if in_positions is None else max(in_positions) + 1)
    po = out_period or next_pow2(m if out_positions is None else max(out_positions) + 1)
    # only the indices: the layout search plans many candidates, the evaluator alone
    # needs the vectors
    ids = np.unique(_diagonal_entries(matrix, pi, po, in_positions, out_positions)[0])
    nonzero = sorted(_signed(int(i), pi) for i in ids) or [0]
    folds = tuple(po << t for t in range(int(math.log2(pi // po)))) if pi > po else ()
    baby, centered = _best_baby_step(nonzero)
    giant2, centered2 = _best_outer_step(nonzero, baby, centered)
    freeze = (lambda p: None if p is None else tuple(int(v) for v in p))
    return DensePlan(pi, po, tuple(nonzero), baby, folds, centered, 0, giant2, centered2,
                     freeze(in_positions), freeze(out_positions))


def _layer_work(plan: DensePlan) -> float:
    """One evaluation of a dense layer in rotation units: rotations and products."""
    mults = 1 if plan.input_blocks else len(plan.diagonals)
    return plan.rotation_count() * COST["rotation"] + mults * COST["pt_mult"]


def dense_cost(plan: DensePlan) -> float:
    """Estimated cost of one layer in rotations: its work, and its keys."""
    return _layer_work(plan) + KEY_WEIGHT * len(plan.rotations())


@dataclass
class HEPlan:
    """Everything the HE backend and the key owner need; emitted by the compiler."""

    params: CKKSParams
    rotations: tuple[int, ...]
    depth: int
    levels: dict[str, int]
    dense: dict[str, DensePlan]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_period: int
    output_period: int
    param_reason: str = ""
    input_layout: dict = field(default_factory=lambda: {"layout": "replicated"})
    lanes: int = 1                # inputs per ciphertext (interleaved SIMD batching)
    costs: dict = field(default_factory=dict)   # see estimate_costs

    def manifest(self) -> dict:
        """The key manifest: exactly what the client must generate and the server needs."""
        return {"params": self.params.to_dict(), "rotations": list(self.rotations),
                "relinearization_key": True, "bootstrapping": False, "depth": self.depth,
                "lanes": self.lanes, "costs": self.costs,
                "input": {"shape": list(self.input_shape), "period": self.input_period,
                          **self.input_layout},
                "output": {"shape": list(self.output_shape), "period": self.output_period},
                "layers": {k: v.to_dict() for k, v in self.dense.items()}}

    @classmethod
    def from_manifest(cls, params: CKKSParams, m: dict) -> "HEPlan":
        """The plan a server needs, read back from :meth:`manifest` (levels omitted)."""
        fixed = {"shape", "period"}
        return cls(params, tuple(m["rotations"]), int(m["depth"]), {},
                   {k: DensePlan.from_dict(v) for k, v in m["layers"].items()},
                   tuple(m["input"]["shape"]), tuple(m["output"]["shape"]),
                   int(m["input"]["period"]), int(m["output"]["period"]),
                   input_layout={k: v for k, v in m["input"].items()
                                 if k not in fixed | {"range"}},
                   lanes=int(m.get("lanes", 1)), costs=dict(m.get("costs", {})))


LAYOUTS = ("latency", "throughput")


def plan_he(graph: Graph, *, insecure_test_params: bool = False,
            layout: str = "latency", precision_bits: int | None = None) -> HEPlan:
    """Plan a linearized graph (INPUT, DENSE, POLY, ADD only) for CKKS.

    ``layout="latency"`` places convolution outputs on strided, channel-blocked slot
    grids (see :func:`_assign_layouts`) and lets the first layer spend free slots on a
    client-expanded input when that saves rotations; ``"throughput"`` keeps every value
    compact, leaving the slots for more inputs per ciphertext. Either way, the slots
    left over carry that many inputs side by side (interleaved lanes: slot j holds
    position j // lanes of input j % lanes, so a rotation by r * lanes moves every input
    by r positions at once).
    """
    if layout not in LAYOUTS:
        raise CompileError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    entry = _client_entry(graph)
    levels, periods = _walk(graph, entry)
    depth = levels[graph.output]
    min_slots = max(max(periods.values()), 1)
    params, why = select_params(depth, min_slots, insecure_test_params=insecure_test_params,
                                precision_bits=precision_bits)
    slots = params.slots
    layouts, dense = _assign_layouts(graph, entry, slots, search=layout == "latency")
    periods = {name: lay[0] for name, lay in layouts.items()}
    input_layout = (_expand_first_layer(graph, entry, dense, slots) if layout == "latency"
                    else {"layout": "replicated"})
    if entry.op is Op.GATHER:
        input_layout["gather"] = list(entry.attrs["indices"])
    if layouts[entry.name][1] is not None:
        input_layout["positions"] = [int(v) for v in layouts[entry.name][1]]
    used = max(max(periods.values()), *(p.in_period for p in dense.values()),
               input_layout.get("blocks", 0) * input_layout.get("block", 0))
    lanes = slots // next_pow2(used)
    rotations = set()
    for p in dense.values():
        rotations |= p.rotations()
    # Physical rotation = positions * lanes, normalised to (-slots/2, slots/2]: both
    # signs name the same automorphism key.
    rotations = {normalize_rotation(r * lanes, slots) for r in rotations} - {0}
    plan = HEPlan(params, tuple(sorted(rotations)), depth, levels, dense,
                  graph.input_shape, graph.output_shape, periods[entry.name],
                  periods[graph.output], why, input_layout, lanes)
    plan.costs = estimate_costs(graph, plan)
    return plan


# Relative costs, one rotation = 1 (measured at rings 2^13-2^14, bench notes in
# docs/ARCHITECTURE.md): a ciphertext x plaintext product, one term of a scalar-weighted
# sum, one squaring with relinearization.
COST = {"rotation": 1.0, "pt_mult": 0.05, "scalar_term": 0.03, "square": 0.7}
MAX_FEATURES = 2048   # widest layer the feature layout accepts (one ciphertext each)


def _poly_cost(degree: int) -> float:
    return COST["square"] * (2 * math.sqrt(degree) + math.log2(max(degree, 2)))


def estimate_costs(graph: Graph, plan: HEPlan) -> dict:
    """Estimated cost of one ciphertext in the slot layout (``lanes`` inputs) and of one
    batch in the feature layout (``slots`` inputs), in rotations; None when a layer is
    too wide for one ciphertext per feature."""
    lanes_cost = features_cost = 0.0
    widest = 0
    for node in graph.nodes:
        width = int(np.prod(node.shape))
        widest = max(widest, width)
        if node.op is Op.DENSE:
            lanes_cost += _layer_work(plan.dense[node.name])
            features_cost += np.count_nonzero(node.params["matrix"]) * COST["scalar_term"]
        elif node.op in (Op.POLY, Op.SQUARE):
            one = (COST["square"] if node.op is Op.SQUARE
                   else _poly_cost(len(node.attrs["coeffs"]) - 1))
            lanes_cost += one
            features_cost += width * one
    return {"lanes_per_ciphertext": round(lanes_cost, 2),
            "features_per_batch": (round(features_cost, 2) if widest <= MAX_FEATURES
                                   else None)}


def _walk(graph: Graph, entry) -> tuple[dict[str, int], dict[str, int]]:
    """Level after each node and its compact slot period."""
    levels: dict[str, int] = {}
    periods = {graph.input.name: next_pow2(int(np.prod(graph.input_shape)))}
    cost = {Op.DENSE: 1, Op.SQUARE: 1, Op.ADD: 0}
    for node in graph.nodes:
        periods[node.name] = next_pow2(int(np.prod(node.shape)))
        if node.op is Op.INPUT or node is entry:
            levels[node.name] = 0
            continue
        base = max(levels[s] for s in node.inputs)
        if node.op is Op.POLY:
            levels[node.name] = base + chebyshev_depth(len(node.attrs["coeffs"]) - 1,
                                                       node.attrs["lo"], node.attrs["hi"])
        elif node.op in cost:
            levels[node.name] = base + cost[node.op]
        else:
            raise CompileError(f"{node.op.value} node {node.name!r} was not lowered; "
                               "run the linearize pass before planning")
    return levels, periods


# A value's slot layout: (period, positions or None for compact, grid or None). A grid
# (offsets, sy, sx) says element (c, y, x) of a (C, H, W) value sits at slot
# offsets[c] + y * sy + x * sx, which is what makes a convolution's diagonals
# independent of the output pixel.
_ELEMENTWISE = (Op.POLY, Op.SQUARE)


def _compact(shape: tuple[int, ...]):
    n = int(np.prod(shape))
    grid = None
    if len(shape) == 3:
        c, h, w = shape
        grid = (tuple(range(0, c * h * w, h * w)), w, 1)
    return next_pow2(n), None, grid


def _grid_positions(shape, grid) -> np.ndarray:
    c, h, w = shape
    offs, sy, sx = grid
    return (np.asarray(offs)[:, None, None] + np.arange(h)[None, :, None] * sy
            + np.arange(w)[None, None, :] * sx).reshape(-1)


def _grid_candidates(node, in_grid, slots: int):
    """Output layouts for a convolution-like DENSE whose input sits on ``in_grid``.

    The output grid is the input grid strided like the layer (so every output pixel
    sees its receptive field at the same slot offsets), with channels in power-of-two
    blocks and, for strided layers, several channels interleaved in the gaps the stride
    leaves (the multiplexed packing of Lee et al., ICML 2022).
    """
    (sy_s, sx_s), shape = node.attrs["grid_stride"], node.shape
    _, sy, sx = in_grid
    c, h, w = shape
    sy2, sx2 = sy * sy_s, sx * sx_s
    footprint = (h - 1) * sy2 + (w - 1) * sx2 + 1
    phases = sorted({py * sy + px * sx for py in range(sy_s) for px in range(sx_s)})
    out = []
    for nph in sorted({1, len(phases)}):
        block = next_pow2(footprint + phases[nph - 1])
        blocks = -(-c // nph)
        while next_pow2(blocks * block) <= slots:
            offs = tuple((k // nph) * block + phases[k % nph] for k in range(c))
            grid = (offs, sy2, sx2)
            pos = _grid_positions(shape, grid)
            period = next_pow2(blocks * block)
            if np.unique(pos).size == pos.size and pos.max() < period:
                out.append((period, pos, grid))
            block *= 2
    return out


def _cell_layouts(entry, first, slots: int):
    """Input layouts for client-side im2col patches: K groups of P positions.

    The first convolution's output (compact, period Po) folds ``slots / Po`` blocks
    together, so a patch group may sit in any block at no cost; only its offset inside
    the block sets the diagonal, (offset - channel * P). Filling the blocks column-wise
    (group k in block k mod nb at offset (k div nb) * P) leaves ceil(K / nb) offsets and
    so about ceil(K / nb) + C diagonals instead of K + C.
    """
    groups, width = (int(v) for v in entry.attrs["patch_groups"])
    po = next_pow2(int(np.prod(first.shape)))
    nb = slots // po
    if nb < 2 or -(-groups // nb) * width > po:
        return []
    k, p = np.divmod(np.arange(groups * width), width)
    pos = (k % nb) * po + (k // nb) * width + p
    return [(slots, pos, None)]


def _assign_layouts(graph: Graph, entry, slots: int, *, search: bool):
    """Slot layout of every value and the diagonal plan of every DENSE node.

    With ``search``: the client's input takes the candidate layout (compact; a grid with
    power-of-two rows before a convolution; :func:`_cell_layouts` for im2col patches)
    under which the first dense layer is cheapest, and each convolution-like DENSE
    (``grid_stride`` attribute from linearize) picks, among compact and
    :func:`_grid_candidates`, the output layout with the lowest :func:`dense_cost` for
    itself plus the next dense layer. Values that reach an ADD or the output stay
    compact.
    """
    consumers = {n.name: graph.consumers(n.name) for n in graph.nodes}

    def reaches(name: str, pred) -> bool:
        for c in consumers[name]:
            if pred(c) or (c.op in _ELEMENTWISE and reaches(c.name, pred)):
                return True
        return False

    def next_dense(name: str):
        for c in consumers[name]:
            if c.op is Op.DENSE:
                return c
            if c.op in _ELEMENTWISE:
                found = next_dense(c.name)
                if found is not None:
                    return found
        return None

    def is_output(name: str) -> bool:   # the value itself, maybe through activations
        return name == graph.output or any(c.op in _ELEMENTWISE and is_output(c.name)
                                           for c in consumers[name])

    fixed = {n.name for n in graph.nodes
             if is_output(n.name) or reaches(n.name, lambda c: c.op is Op.ADD)}

    def best_dense(node, in_layout):
        in_period, in_pos, in_grid = in_layout
        matrix = node.params["matrix"]
        options = [_compact(node.shape)]
        if (search and in_grid is not None and "grid_stride" in node.attrs
                and len(node.shape) == 3 and node.name not in fixed):
            options += _grid_candidates(node, in_grid, slots)
        after = next_dense(node.name)
        best = None
        for period, pos, grid in options:
            plan = plan_dense(matrix, in_pos, pos, in_period, period)
            cost = dense_cost(plan)
            if after is not None and len(options) > 1:
                cost += dense_cost(plan_dense(after.params["matrix"], pos, None, period,
                                              None))
            if best is None or cost < best[0]:
                best = (cost, plan, (period, pos, grid))
        return best

    def assign(entry_layout):
        layouts: dict[str, tuple] = {n.name: _compact(n.shape) for n in graph.nodes
                                     if n.op is Op.INPUT or n is entry}
        layouts[entry.name] = entry_layout
        dense: dict[str, DensePlan] = {}
        total = 0.0
        for node in graph.nodes:
            if node.name in layouts:
                continue
            if node.op is not Op.DENSE:
                if node.op in _ELEMENTWISE + (Op.ADD,):
                    layouts[node.name] = layouts[node.inputs[0]]
                continue
            _, dense[node.name], layouts[node.name] = best_dense(node,
                                                                 layouts[node.inputs[0]])
            total += dense_cost(dense[node.name])
        return total, layouts, dense

    options = [_compact(entry.shape)]
    first = next_dense(entry.name)
    if search and first is not None and len(consumers[entry.name]) == 1:
        if entry.op is Op.INPUT and len(entry.shape) == 3 and "grid_stride" in first.attrs:
            c, h, w = entry.shape
            sy = next_pow2(w)
            block = next_pow2(h * sy)
            grid = (tuple(k * block for k in range(c)), sy, 1)
            if next_pow2(c * block) <= slots:
                options.append((next_pow2(c * block), _grid_positions(entry.shape, grid),
                                grid))
        if entry.op is Op.GATHER and "patch_groups" in entry.attrs:
            options += _cell_layouts(entry, first, slots)
    # The whole model's cost decides: power-of-two rows rarely help the first layer but
    # let later layers split their rotations on a common stride.
    best = min((assign(o) for o in options), key=lambda r: r[0])
    return best[1], best[2]


def _client_entry(graph: Graph):
    """The node whose value the client encrypts: the input, or a GATHER right after it
    (the client applies the gather to its own input); a GATHER anywhere else cannot run."""
    readers = graph.consumers(graph.input.name)
    entry = readers[0] if len(readers) == 1 and readers[0].op is Op.GATHER else graph.input
    for node in graph.nodes:
        if node.op is Op.GATHER and node is not entry:
            raise CompileError(f"gather {node.name!r} is not on the input; only the client "
                               "can rearrange values")
    return entry


def _expand_first_layer(graph: Graph, entry, dense: dict[str, DensePlan], slots: int
                        ) -> dict:
    """Let the client pre-rotate its input for the first dense layer when that is cheaper.

    With block t of the input holding rot(x, d_t) for each non-zero diagonal d_t, the
    layer costs one product and log2(blocks) fold rotations instead of its baby and giant
    steps. Only when the input feeds that layer alone and the blocks fit in the slots.
    """
    readers = graph.consumers(entry.name)
    if len(readers) != 1 or readers[0].op is not Op.DENSE:
        return {"layout": "replicated"}
    name, plan = readers[0].name, dense[readers[0].name]
    block = max(plan.in_period, plan.out_period)
    blocks = next_pow2(len(plan.diagonals))
    if blocks * block > slots or math.log2(blocks) >= plan.rotation_count():
        return {"layout": "replicated"}
    dense[name] = replace(plan, input_blocks=blocks)
    return {"layout": "expanded", "block": block, "blocks": blocks,
            "shifts": list(plan.diagonals)}
