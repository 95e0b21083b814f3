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


def select_params(depth: int, min_slots: int, *, insecure_test_params: bool = False,
                  precision_bits: int | None = None) -> tuple[CKKSParams, str]:
    """Smallest secure ring, then the largest scale that fits; returns params and why.

    ``precision_bits`` asks for at least that many bits of output precision, which
    rules out scales below ``precision_bits + PRECISION_LOSS_BITS``.
    """
    min_scale = 0 if precision_bits is None else precision_bits + PRECISION_LOSS_BITS
    depth = max(depth, 1)
    if insecure_test_params:
        ring = max(INSECURE_RING_DIM, 2 * next_pow2(min_slots))
        dnum = next(d for d in (3, 2, 1) if _digits_ok(depth, d))
        return (CKKSParams(ring, depth, 40, 60, dnum, "HEStd_NotSet", True),
                f"INSECURE test parameters: ring {ring}, no security level enforced")
    for ring, bound in HE_STD_128_LOGQP.items():
        if ring // 2 < min_slots:
            continue
        for scaling in (c for c in SCALING_BITS_CHOICES if c >= min_scale):
            first = min(60, scaling + 20)
            for dnum in range(2, depth + 2):
                if (_digits_ok(depth, dnum)
                        and _estimated_log_qp(depth, scaling, first, dnum) <= bound):
                    why = (f"depth {depth} with {scaling}-bit scaling fits ring {ring} "
                           f"(log2 QP <= {bound} for 128-bit security, {dnum} key-switch "
                           f"digits); {ring // 2} slots >= {min_slots} needed")
                    return CKKSParams(ring, depth, scaling, first, dnum), why
    raise CompileError(f"depth {depth} does not fit a ring of at most 2^17 at 128-bit "
                       "security; lower the polynomial degrees")


@dataclass(frozen=True)
class DensePlan:
    """How one DENSE node runs: diagonals to use, baby-step size and fold rotations."""

    in_period: int
    out_period: int
    diagonals: tuple[int, ...]   # signed representatives of the non-zero diagonals
    baby_step: int
    fold_steps: tuple[int, ...]
    centered: bool = False        # baby steps in [-b/2, b/2) instead of [0, b)
    input_blocks: int = 0         # > 0: the client lays out rot(x, d) per diagonal d

    def expanded_fold_steps(self) -> tuple[int, ...]:
        """Folds of a client-expanded layer: sum the blocks, then the wide-map folds."""
        block = max(self.in_period, self.out_period)
        return tuple(block << t for t in range(int(math.log2(self.input_blocks)))) \
            + self.fold_steps

    def split(self, d: int) -> tuple[int, int]:
        """Giant index g and baby step r with d == g * baby_step + r."""
        return _split(d, self.baby_step, self.centered)

    def rotations(self) -> set[int]:
        if self.input_blocks:
            return set(self.expanded_fold_steps())
        rots = set(self.fold_steps)
        for d in self.diagonals:
            g, r = self.split(d)
            rots.update(x for x in (r, g * self.baby_step) if x)
        return rots

    def to_dict(self) -> dict:
        return {"in_period": self.in_period, "out_period": self.out_period,
                "diagonals": list(self.diagonals), "baby_step": self.baby_step,
                "fold_steps": list(self.fold_steps), "centered": self.centered,
                "input_blocks": self.input_blocks}

    @classmethod
    def from_dict(cls, d: dict) -> "DensePlan":
        return cls(int(d["in_period"]), int(d["out_period"]), tuple(d["diagonals"]),
                   int(d["baby_step"]), tuple(d["fold_steps"]),
                   bool(d.get("centered", False)), int(d.get("input_blocks", 0)))


def diagonal_vectors(matrix: np.ndarray, in_period: int, out_period: int) -> np.ndarray:
    """Generalised diagonals: row i, slot j holds W[j mod Po, (j + i) mod Pi].

    Returns an array (min(Pi, Po), max(Pi, Po)); entries outside W are zero.
    """
    m, n = matrix.shape
    count, length = min(in_period, out_period), max(in_period, out_period)
    padded = np.zeros((out_period, in_period))
    padded[:m, :n] = matrix
    j = np.arange(length)
    i = np.arange(count)[:, None]
    return padded[j % out_period, (j + i) % in_period]


def _signed(i: int, period: int) -> int:
    return i - period if i > period // 2 else i


def normalize_rotation(r: int, slots: int) -> int:
    """The representative in (-slots/2, slots/2] that keys and evaluation both use."""
    return _signed(r % slots, slots)


def _split(d: int, b: int, centered: bool) -> tuple[int, int]:
    r = ((d + b // 2) % b) - b // 2 if centered else d % b
    return (d - r) // b, r


def _best_baby_step(diags: list[int]) -> tuple[int, bool]:
    """Baby-step size (and split) minimising rotations; hoisted babies count half."""
    best, best_cost = (1, False), math.inf
    span = max((abs(d) for d in diags), default=1)
    for b in range(1, 2 * span + 2):
        for centered in (False, True):
            parts = [_split(d, b, centered) for d in diags]
            babies = {r for _, r in parts} - {0}
            giants = {g for g, _ in parts} - {0}
            cost = 0.5 * len(babies) + len(giants)
            if cost < best_cost:
                best, best_cost = (b, centered), cost
    return best


def plan_dense(matrix: np.ndarray) -> DensePlan:
    """Pick non-zero diagonals, the baby step, and the fold rotations of one dense map."""
    m, n = matrix.shape
    pi, po = next_pow2(n), next_pow2(m)
    diag = diagonal_vectors(matrix, pi, po)
    nonzero = [_signed(i, pi) for i in range(diag.shape[0]) if np.any(diag[i] != 0.0)]
    nonzero = sorted(nonzero) or [0]
    folds = tuple(po << t for t in range(int(math.log2(pi // po)))) if pi > po else ()
    baby, centered = _best_baby_step(nonzero)
    return DensePlan(pi, po, tuple(nonzero), baby, folds, centered)


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

    ``layout="latency"`` lets the first layer spend free slots on a client-expanded
    input when that saves rotations; ``"throughput"`` keeps them for more inputs per
    ciphertext. Either way, the slots left over carry that many inputs side by side
    (interleaved lanes: slot j holds position j // lanes of input j % lanes, so a
    rotation by r * lanes moves every input by r positions at once).
    """
    if layout not in LAYOUTS:
        raise CompileError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    entry = _client_entry(graph)
    levels, periods, dense = _walk(graph, entry)
    depth = levels[graph.output]
    min_slots = max(max(periods.values()), *(p.in_period for p in dense.values()), 1)
    params, why = select_params(depth, min_slots, insecure_test_params=insecure_test_params,
                                precision_bits=precision_bits)
    slots = params.slots
    input_layout = (_expand_first_layer(graph, entry, dense, slots) if layout == "latency"
                    else {"layout": "replicated"})
    if entry.op is Op.GATHER:
        input_layout["gather"] = list(entry.attrs["indices"])
    used = max(min_slots, input_layout.get("blocks", 0) * input_layout.get("block", 0))
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
            p = plan.dense[node.name]
            mults = 1 if p.input_blocks else len(p.diagonals)
            lanes_cost += len(p.rotations()) * COST["rotation"] + mults * COST["pt_mult"]
            features_cost += np.count_nonzero(node.params["matrix"]) * COST["scalar_term"]
        elif node.op in (Op.POLY, Op.SQUARE):
            one = (COST["square"] if node.op is Op.SQUARE
                   else _poly_cost(len(node.attrs["coeffs"]) - 1))
            lanes_cost += one
            features_cost += width * one
    return {"lanes_per_ciphertext": round(lanes_cost, 2),
            "features_per_batch": (round(features_cost, 2) if widest <= MAX_FEATURES
                                   else None)}


def _walk(graph: Graph, entry) -> tuple[dict[str, int], dict[str, int], dict[str, DensePlan]]:
    """Level after each node, its slot period, and each dense layer's diagonal plan."""
    levels: dict[str, int] = {}
    dense: dict[str, DensePlan] = {}
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
        if node.op is Op.DENSE:
            dense[node.name] = plan_dense(node.params["matrix"])
    return levels, periods, dense


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
    hoisted = {plan.split(d)[1] for d in plan.diagonals} - {0}
    bsgs_cost = len(plan.rotations()) - 0.5 * len(hoisted)
    if blocks * block > slots or math.log2(blocks) >= bsgs_cost:
        return {"layout": "replicated"}
    dense[name] = replace(plan, input_blocks=blocks)
    return {"layout": "expanded", "block": block, "blocks": blocks,
            "shifts": list(plan.diagonals)}
