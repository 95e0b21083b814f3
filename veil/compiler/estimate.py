"""What HE would cost for any graph, from its structure alone: depth, bootstraps,
ciphertexts, rotation keys and their memory, and latency.

The slot planner (:mod:`.plan`) needs every affine chain as a matrix (sparse, built
from its kernels, up to ``MAX_NONZEROS`` weights) and plans every layer's diagonals,
which takes minutes at ResNet scale and stops short of ResNets at 224x224. This
estimate needs neither: it walks the polynomial graph (activations already fitted) with
a packing model for multi-channel convolutions, so it answers for any of them in
milliseconds.

Levels follow the lowering the planner uses, so the two agree where both apply (a
test checks it): a maximal chain of affine ops is one plaintext-weight product and
rescale (1 level); a POLY costs OpenFHE's Chebyshev depth, plus 1 for its domain map
unless an affine op feeds it alone (``fold_poly_domain``), and a degree-2 POLY between
affine ops costs 1 (``fold_quadratic``); SQUARE and MUL cost 1; ADD, SUB and CONCAT
meet their inputs at the lower level (free).

Bootstraps are placed greedily along the walk (a value is refreshed when the next op
needs more levels than it has left) under the assumptions in :data:`ASSUMPTIONS`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import CompileError
from ..ir import AFFINE_OPS, Graph, Node, Op
from .dense import COST
from .params import (bootstrap_params, chebyshev_depth, keyswitch_cost, next_pow2,
                     select_params)

# Bootstrapping as veil runs it (params.BOOT_SECURE, chosen and measured by
# bench/he_deep.py): ring 2^16, a fresh ciphertext may spend fresh_budget levels, a
# bootstrapped one boot_budget_levels; one bootstrap took 18.1 s for 2^12 slots and
# ~19 s for 16 (bench/results/he_deep.md: its time hardly depends on the slots), and its
# keys were 7.0 GiB for 2^12 slots.
_BOOT = bootstrap_params()
BOOTSTRAP_RING = _BOOT.ring_dim
FRESH_LEVELS = _BOOT.fresh_budget
LEVELS_AFTER_BOOTSTRAP = _BOOT.boot_budget_levels
BOOTSTRAP_S = 19.0
# One rotation (key switch) at N = 2^14 with the parameters select_params picks for
# depth 7: 15-27 ms measured here; it scales about linearly in N and in key towers.
ROTATION_S_REF = 0.020
ROTATION_REF_RING, ROTATION_REF_DEPTH = 1 << 14, 7

# Calibration on a measured model (bench/he_deep.py --resnet20, 2 cores): the shipped
# Fashion-MNIST ResNet-20 (degree-2 activations) ran under HE in a median 321.7 s of
# server time per image where this model says 383 s, and its slot plan shares 70
# rotation keys across layers where this model counts 181 (it prices each layer's keys
# alone). Bootstrapped estimates are scaled by these ratios in ``calibrated``.
CALIBRATION = {"model": "ResNet-20 (Fashion-MNIST, degree 2)", "measured_s": 321.7,
               "estimated_s": 383.2, "plan_keys": 70, "estimated_keys": 181}

ASSUMPTIONS = (
    "packing: channel c of a (C, H, W) value fills block c of next_pow2(H*W) slots, "
    "slots / block channels per ciphertext; flat values are packed compactly",
    "a convolution is one diagonal-method product per ciphertext pair: baby steps are the "
    "kernel offsets times the channel baby steps (hoisted, half a rotation each), giant "
    "steps the channel giant steps; a stride gathers the output with one more giant "
    "level per output row and column (masks folded into the diagonals, no extra level)",
    "levels: an affine chain costs 1, a POLY its Chebyshev depth, SQUARE/MUL 1, a residual "
    "ADD meets its inputs at the lower level",
    f"bootstrapping: veil's measured set (OpenFHE at N = 2^16, sparse-encapsulated "
    f"secret, SlotsToCoeffs first), {LEVELS_AFTER_BOOTSTRAP} usable levels after each "
    f"bootstrap, {BOOTSTRAP_S:g} s per ciphertext (18-19 s measured on 2 cores); a fresh "
    f"ciphertext may spend {FRESH_LEVELS}; an op deeper than the levels left is split "
    "across bootstraps (e.g. a Chebyshev series between its baby and giant steps); "
    "bootstrapping keys (7.0 GiB measured for 2^12 slots) are not in the rotation-key "
    "count",
    f"latency: a rotation costs {ROTATION_S_REF * 1e3:g} ms at N = 2^14 (15-27 ms measured), "
    "scaled linearly in N and in key towers (keyswitch_cost); products, squarings and "
    "polynomials use the planner's measured ratios (COST); one input, one thread",
    "key memory: one rotation key holds 2 x N x 8 bytes per tower over all digits",
)


@dataclass(frozen=True)
class LayerEstimate:
    """One node's share of the estimate."""

    name: str
    op: str
    levels: int           # levels this node consumes
    depth: int            # levels used on the longest path up to and including it
    values: int
    ciphertexts: int
    rotations: float      # rotations one evaluation performs (hoisted count half)
    rotation_keys: int    # distinct rotations this layer needs
    bootstraps: int       # bootstraps before this node, per ciphertext of its input
    latency_s: float


@dataclass(frozen=True)
class HEEstimate:
    """HE cost of a whole graph; ``fits`` says whether it runs without bootstrapping."""

    depth: int
    max_depth: int                # the largest depth a 128-bit ring (<= 2^16) holds
    bootstraps: int               # sequential bootstraps on the longest path
    bootstrap_ciphertexts: int    # ciphertext bootstraps in total
    ring_dim: int
    scaling_bits: int
    num_large_digits: int
    towers_per_key: int
    rotation_keys: int
    key_bytes: int                # one rotation key
    latency_s: float
    layers: tuple[LayerEstimate, ...] = ()
    assumptions: tuple[str, ...] = field(default=ASSUMPTIONS)

    @property
    def fits(self) -> bool:
        return self.bootstraps == 0

    @property
    def slots(self) -> int:
        return self.ring_dim // 2

    @property
    def keys_bytes(self) -> int:
        return self.rotation_keys * self.key_bytes

    def calibrated(self) -> dict:
        """Latency and rotation-key memory scaled by what a measured model of the same
        kind (bootstrapped or not) ran at (:data:`CALIBRATION`; bootstrapped models
        only: {} for the others, whose estimates stand as they are)."""
        if self.fits:
            return {}
        c = CALIBRATION
        keys = c["plan_keys"] / c["estimated_keys"]
        return {"latency_s": self.latency_s * c["measured_s"] / c["estimated_s"],
                "rotation_keys": max(1, round(self.rotation_keys * keys)),
                "keys_bytes": int(self.keys_bytes * keys), "on": c["model"]}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(layer) for layer in self.layers]
        d["assumptions"] = list(self.assumptions)
        d.update(fits=self.fits, slots=self.slots, keys_bytes=self.keys_bytes,
                 calibrated=self.calibrated())
        return d


def max_depth_without_bootstrapping(precision_bits: int | None = None) -> int:
    """The largest depth :func:`select_params` fits in a 128-bit ring of at most 2^16.

    2^17 rings hold deeper circuits only with a hundred or more key-switching digits
    (tens of GiB per rotation key); past 2^16, bootstrapping at 2^16 is the way on.
    """
    select_params(1, 1, precision_bits=precision_bits)   # raises on a bad precision
    lo, hi = 1, 256
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            fits = select_params(mid, 1, precision_bits=precision_bits)[0].ring_dim \
                <= BOOTSTRAP_RING
        except CompileError:
            fits = False
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    return lo


# -- levels -----------------------------------------------------------------------------

def _levels(graph: Graph) -> dict[str, int]:
    """Levels each node consumes, mirroring linearize / fold_poly_domain / fold_quadratic."""
    by_name = {n.name: n for n in graph.nodes}
    readers = {n.name: graph.consumers(n.name) for n in graph.nodes}

    def merges(src: Node) -> bool:   # src is the affine op a reader may fold into
        return (src.op in AFFINE_OPS and len(readers[src.name]) == 1
                and src.name != graph.output)

    cost: dict[str, int] = {}
    chain_real: dict[str, bool] = {}  # affine chain so far holds a non-reshape op
    for node in graph.nodes:
        src = by_name.get(node.inputs[0]) if node.inputs else None
        if node.op in (Op.INPUT, Op.GATHER, Op.BOOTSTRAP, Op.ADD, Op.SUB, Op.CONCAT):
            cost[node.name] = 0
        elif node.op in AFFINE_OPS:
            real = node.op is not Op.RESHAPE
            if src is not None and merges(src):
                cost[node.name] = int(real and not chain_real[src.name])
                chain_real[node.name] = real or chain_real[src.name]
            else:
                # A lone reshape is a DENSE after linearize: it still costs its level.
                cost[node.name] = 1
                chain_real[node.name] = True
        elif node.op is Op.POLY:
            deg = len(node.attrs["coeffs"]) - 1
            folded = src is not None and merges(src)
            lo, hi = (-1.0, 1.0) if folded else (node.attrs["lo"], node.attrs["hi"])
            quadratic = (deg == 2 and folded and node.name != graph.output
                         and readers[node.name]
                         and all(r.op in AFFINE_OPS for r in readers[node.name]))
            cost[node.name] = 1 if quadratic else chebyshev_depth(deg, lo, hi)
        elif node.op in (Op.SQUARE, Op.MUL):
            cost[node.name] = 1
        else:
            raise CompileError(f"{node.op.value} node {node.name!r} has no HE cost; "
                               "approximate the activations first")
    return cost


# -- packing and rotations --------------------------------------------------------------

def _ciphertexts(shape: tuple[int, ...], slots: int) -> int:
    if len(shape) == 3:
        c, h, w = shape
        block = next_pow2(h * w)
        return c * -(-block // slots) if block > slots else -(-c * block // slots)
    return -(-next_pow2(int(np.prod(shape))) // slots)


def _bsgs(n: int) -> tuple[int, int]:
    b = max(1, math.isqrt(max(n, 1) - 1) + 1)
    return b, -(-n // b)


def _conv_like(node: Node, in_shape, slots: int) -> tuple[set[int], set[int]]:
    """(baby rotations, giant rotations) of a convolution or pool on the input grid."""
    c, h, w = in_shape
    if node.op is Op.CONV2D:
        kh, kw = node.params["weight"].shape[2:]
        dh, dw = node.attrs["dilation"]
        mixing = node.params["weight"].shape[1] > 1   # input channels per group
    else:
        kh, kw = node.attrs["kernel"]
        dh = dw = 1
        mixing = False
    (sh, sw), (ph, pw) = node.attrs["stride"], node.attrs["padding"]
    offsets = {(i * dh - ph) * w + (j * dw - pw) for i in range(kh) for j in range(kw)}
    block = next_pow2(h * w)
    per_ct = max(1, slots // block)
    b, g = _bsgs(min(c, per_ct)) if mixing else (1, 1)
    babies = {o + k * block for o in offsets for k in range(b)}
    giants = {j * b * block for j in range(g)}
    if (sh, sw) != (1, 1):
        _, ho, wo = node.shape
        giants |= {x * (sw - 1) for x in range(wo)} | {y * (sh * w - wo) for y in range(ho)}
    return babies - {0}, giants - {0}


def _matvec(n_in: int, n_out: int) -> tuple[set[int], set[int]]:
    """Diagonal method on compact vectors, baby-step giant-step, wide maps folded."""
    pi, po = next_pow2(n_in), next_pow2(n_out)
    b, g = _bsgs(min(pi, po))
    folds = {po << t for t in range(int(math.log2(pi // po)))} if pi > po else set()
    return set(range(1, b)), {j * b for j in range(1, g)} | folds


def _rotations(node: Node, in_shape, slots: int) -> tuple[set[int], set[int]]:
    if node.op in (Op.CONV2D, Op.AVGPOOL2D) and len(in_shape) == 3:
        return _conv_like(node, in_shape, slots)
    if node.op is Op.GLOBALAVGPOOL:
        block = next_pow2(in_shape[1] * in_shape[2])
        return set(), {1 << t for t in range(int(math.log2(block)))}
    if node.op in (Op.LINEAR, Op.DENSE):
        n_out = int(np.prod(node.shape))
        return _matvec(int(np.prod(in_shape)), n_out)
    return set(), set()


def _poly_units(degree: int) -> float:
    return COST["square"] * (2 * math.sqrt(degree) + math.log2(max(degree, 2)))


def _work(node: Node, babies, giants, n_in: int, n_out: int) -> tuple[float, float]:
    """(rotations, other work in rotation units) of one evaluation."""
    if node.op in AFFINE_OPS:
        rots = 0.5 * n_in * len(babies) + n_out * len(giants)
        products = n_in * n_out * max(1, len(babies)) * max(1, len(giants))
        return rots, products * COST["pt_mult"]
    if node.op is Op.POLY:
        return 0.0, n_out * _poly_units(len(node.attrs["coeffs"]) - 1)
    if node.op in (Op.SQUARE, Op.MUL):
        return 0.0, n_out * COST["square"]
    return 0.0, 0.0


# -- the estimate -----------------------------------------------------------------------

def _ring(depth: int, max_depth: int, widest: int, precision_bits: int | None):
    """(ring, scale, digits, towers per key) of the parameters HE would use."""
    if depth <= max_depth:
        try:
            p, _ = select_params(depth, min(widest, BOOTSTRAP_RING // 2),
                                 precision_bits=precision_bits)
        except CompileError:
            p, _ = select_params(depth, 1, precision_bits=precision_bits)
        return (p.ring_dim, p.scaling_bits, p.num_large_digits,
                keyswitch_cost(depth, p.scaling_bits, p.first_mod_bits, p.num_large_digits))
    b = _BOOT
    return (b.ring_dim, b.scaling_bits, b.num_large_digits,
            keyswitch_cost(b.mult_depth, b.scaling_bits, b.first_mod_bits,
                           b.num_large_digits))


def _rotation_s(ring: int, towers: int) -> float:
    p, _ = select_params(ROTATION_REF_DEPTH, ROTATION_REF_RING // 2)
    ref = keyswitch_cost(ROTATION_REF_DEPTH, p.scaling_bits, p.first_mod_bits,
                         p.num_large_digits)
    return ROTATION_S_REF * (ring / ROTATION_REF_RING) * (towers / ref)


def estimate_he(graph: Graph, *, precision_bits: int | None = None) -> HEEstimate:
    """Estimate HE cost of a polynomial graph (activations replaced by POLY nodes).

    Args:
        graph: the graph after fold_batchnorm, replace_maxpool and
            approximate_activations (any size; nothing is lowered to matrices).
        precision_bits: as for :func:`veil.compiler.plan.select_params`.

    Returns:
        An :class:`HEEstimate`; ``fits`` is False when bootstrapping is needed.

    Raises:
        CompileError: an op without an HE cost (an activation left unapproximated).
    """
    cost = _levels(graph)
    depth_at: dict[str, int] = {}
    for node in graph.nodes:
        base = max((depth_at[s] for s in node.inputs), default=0)
        depth_at[node.name] = base + cost[node.name]
    depth = depth_at[graph.output]
    max_depth = max_depth_without_bootstrapping(precision_bits)
    widest = max(int(np.prod(n.shape)) for n in graph.nodes)
    ring, scale, digits, towers = _ring(depth, max_depth, next_pow2(widest), precision_bits)
    fits = depth <= max_depth
    rot_s = _rotation_s(ring, towers)
    layers, keys, on_path, total = _layer_rows(graph, cost, depth_at, fits, max_depth,
                                               ring, rot_s)
    return HEEstimate(depth, max_depth, on_path, total, ring, scale, digits, towers,
                      len(keys), 2 * ring * 8 * towers,
                      sum(layer.latency_s for layer in layers), tuple(layers))


def _layer_rows(graph: Graph, cost: dict[str, int], depth_at: dict[str, int], fits: bool,
                max_depth: int, ring: int, rot_s: float):
    """Per-node rows, the rotation-key set, sequential bootstraps on the longest path and
    ciphertext bootstraps in all. Bootstraps are placed greedily: a value is refreshed
    when the next op needs more levels than it has left."""
    slots = ring // 2
    shapes = {n.name: n.shape for n in graph.nodes}
    left: dict[str, int] = {}            # levels left on each value
    on_path: dict[str, int] = {}
    keys: set[int] = set()
    layers, total = [], 0
    for node in graph.nodes:
        need = cost[node.name]
        have = min((left[s] for s in node.inputs), default=(
            max_depth if fits else FRESH_LEVELS))
        boots = 0
        if not fits and need > have:
            boots = -(-(need - have) // LEVELS_AFTER_BOOTSTRAP)
            have += boots * LEVELS_AFTER_BOOTSTRAP
        left[node.name] = have - need
        on_path[node.name] = max((on_path[s] for s in node.inputs), default=0) + boots
        in_shape = shapes[node.inputs[0]] if node.inputs else node.shape
        n_in, n_out = _ciphertexts(in_shape, slots), _ciphertexts(node.shape, slots)
        babies, giants = _rotations(node, in_shape, slots)
        layer_keys = {r % slots for r in babies | giants} - {0}
        keys |= layer_keys
        rots, other = _work(node, babies, giants, n_in, n_out)
        total += boots * n_in
        latency = (rots + other) * rot_s + boots * n_in * BOOTSTRAP_S * (ring / BOOTSTRAP_RING)
        op = node.attrs.get("source", "poly") if node.op is Op.POLY else node.op.value
        layers.append(LayerEstimate(node.name, op, need, depth_at[node.name],
                                    int(np.prod(node.shape)), n_out, rots, len(layer_keys),
                                    boots, latency))
    return layers, keys, on_path[graph.output], total
