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

Transformers (graphs with ops that only the share-based modes run: EMBED, SLICE,
TRANSPOSE, AFFINE, MATMUL, SOFTMAX, LAYERNORM, REDUCESUM, RECIPROCAL) are priced, not
run, on published HE-transformer constructions (:data:`TRANSFORMER_ASSUMPTIONS`, cited
where each is costed): token embeddings looked up by the client; linear layers over
(T, d) tokens as plaintext-ciphertext products on a token-fastest packing; Q K^T and
P V as Jiang-Kim-Lauter-Song ciphertext products (2-3 levels); softmax max-free, exp
by (1 + x / 2^r)^(2^r) and its row sum's reciprocal by Goldschmidt; LayerNorm's inverse
square root by Newton (3 levels an iteration); GELU as the polynomial the approximate
pass fitted. The iteration counts and r follow the calibrated ranges that
:func:`transformer_stats` measures (the pipeline passes them; without them, the
defaults below).
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.polynomial import chebyshev

from ..errors import CompileError
from ..ir import AFFINE_OPS, Graph, Node, Op, ops_for, run
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

# -- transformer constructions (priced only: HE does not run these ops) -----------------

# The ops only the share-based modes run (``plain`` runs everything, ``simulate`` what
# HE runs): a graph with one of them is priced by the transformer model below.
TRANSFORMER_OPS = ops_for("plain") - ops_for("simulate")
# Relative precision every Newton / Goldschmidt iteration runs to: 12 bits, below the
# ~15-23 bits CKKS keeps at veil's scales (params.PRECISION_LOSS_BITS) and about the
# accuracy of the fitted activations.
TARGET_BITS = 12
# exp(x) ~ (1 + x / 2^r)^(2^r) needs |x| <= 2^(r+1) to stay bounded; r is at least
# CrypTen's 8 (Knott et al., NeurIPS 2021; veil's MPC softmax uses the same limit):
# absolute error <= 0.27 / 2^r on x <= 0.
EXP_MIN_SQUARINGS = 8
# Max-free softmax: a row whose sum of exp(x - c) (c the calibrated maximum) is below
# this keeps under ~10 bits of relative precision once CKKS adds its ~2^-20 absolute
# error (after bootstrapping); the reciprocal is priced down to it, and the estimate's
# row says how small the calibrated sums were.
MAXFREE_MIN_SUM = 2.0 ** -10
# Without calibrated statistics: LayerNorm variances in veil's MPC range (MiniLM-L6 on
# the benchmark's texts: 0.004 to 128), softmax inputs within +-2^EXP_MIN_SQUARINGS.
DEFAULT_VAR_RANGE = (2.0 ** -10, 2.0 ** 12)
# Initial guesses tried for the reciprocal and inverse square root: a constant, or a
# Chebyshev fit of these degrees on the calibrated range (the cheapest in levels wins).
INIT_DEGREES = (1, 2, 5, 13, 27, 59)

TRANSFORMER_ASSUMPTIONS = (
    "transformer: priced, not run: HE has no kernel for its ops; the figures follow the "
    "constructions below at the bootstrapping ring, with the calibrated ranges, every "
    "op under HE with no client round trip (as NEXUS, Zhang et al., NDSS 2025)",
    "EMBED: the client looks its token ids up and encrypts the rows (the embedding table "
    "of a public encoder ships to it); the server's input is T x D values, no level, no "
    "rotation (the plaintext one-hot product that MPC uses would cost a "
    "vocabulary-wide plaintext-ciphertext product instead)",
    "packing: a (T, d) value holds feature j of token t at slot j * next_pow2(T) + t; "
    "attention values hold d x d row-major blocks, d = next_pow2(max(T, head dim)), "
    "one head each",
    "linear layers over tokens: plaintext-ciphertext products by the diagonal method "
    "with baby-step giant-step rotations on token blocks (Halevi-Shoup, CRYPTO 2014 and "
    "2018; as in BOLT, Pang et al., S&P 2024): 1 level; reshapes, transposes and slices "
    "next to one fold into its diagonals; a lone transpose is a block transpose (2d - 1 "
    "diagonals, 1 level), a lone slice a rotation and a mask (1 level)",
    "MATMUL of two ciphertexts (Q K^T, P V): Jiang, Kim, Lauter and Song's product "
    "(CCS 2018) per d x d block: sigma/tau transforms (1 level, folded into the linear "
    "layer that makes an operand), d - 1 shifts of each operand (masks: 1 level), d "
    "products with relinearization (1 level), about 3d + 5 sqrt(d) rotations; a constant "
    "scale after it (1 / sqrt(head dim)) folds into its masks",
    "SOFTMAX: max-free (this estimate's assumption: an encrypted row max by a tree of "
    "comparisons costs a composite sign, ~15 levels, per halving of the row; THE-X, "
    "Chen et al., ACL Findings 2022, and Powerformer change the softmax and fine-tune "
    "instead): exp(x - c) with c the calibrated "
    "maximum, by (1 + d / 2^r)^(2^r) (r squarings, r >= 8 and 2^(r+1) >= the calibrated "
    "width, which an additive -10^4 padding mask sets to 13), the row sum by rotations "
    "(1 level for its mask), its reciprocal by Goldschmidt (Cheon et al., ASIACRYPT "
    "2019: 1 level an iteration after a fitted initial guess) on the calibrated "
    "row-sum range, floored at 2^-10, and one product",
    "LAYERNORM: mean and variance by rotations over the features (1 level each for "
    "the centering and its square, 1 for the sum's mask), the inverse square root by "
    "Newton y (3 - v y^2) / 2 (3 levels an iteration) after a fitted initial guess, "
    "on the calibrated variance range; the weight folds into the centered branch, the "
    "bias is a plaintext addition",
    f"iterations run to {TARGET_BITS} bits of relative precision; GELU and TANH cost "
    "the polynomial the approximate pass fitted on their calibrated range; AFFINE with a "
    "unit scale is a plaintext addition (no level); a broadcast operand is replicated "
    "by log2 rotations",
    "the figures are not calibrated on a measured transformer (calibrated() is empty)",
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
    method: str = ""      # transformer ops: the construction priced, with its counts


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
    transformer: bool = False     # priced by the transformer constructions

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
        only: {} for the others, whose estimates stand as they are, and for
        transformers, which no measured model of their kind calibrates)."""
        if self.fits or self.transformer:
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

def _is_transformer(graph: Graph) -> bool:
    return any(n.op in TRANSFORMER_OPS for n in graph.nodes)


def _client_side(graph: Graph) -> frozenset[str]:
    """What the client computes under the transformer model: every EMBED (it looks its
    token ids up and encrypts the rows) and what only feeds them (the ids' slices)."""
    client: set[str] = set()
    for node in reversed(graph.nodes):
        if node.op is Op.EMBED:
            client.add(node.name)
        elif node.name != graph.output:
            readers = graph.consumers(node.name)
            if readers and all(r.name in client for r in readers):
                client.add(node.name)
    return frozenset(client)


def _levels(graph: Graph, stats: dict | None = None
            ) -> tuple[dict[str, int], dict[str, tuple[bool, ...]]]:
    """Levels each node consumes, mirroring linearize / fold_poly_domain / fold_quadratic;
    and, for each transformer construction, which of its inputs' first steps fold into
    the op before (see :func:`_construct`)."""
    by_name = {n.name: n for n in graph.nodes}
    readers = {n.name: graph.consumers(n.name) for n in graph.nodes}
    transformer = _is_transformer(graph)
    client = _client_side(graph) if transformer else frozenset()

    def merges(src: Node) -> bool:   # src is the affine op a reader may fold into
        return (src.op in AFFINE_OPS and len(readers[src.name]) == 1
                and src.name != graph.output)

    def into_matrix(src: Node | None) -> bool:   # a plaintext matrix product src ends
        return src is not None and merges(src) and chain_real[src.name]

    cost: dict[str, int] = {}
    chain_real: dict[str, bool] = {}  # affine chain so far holds a non-reshape op
    folds: dict[str, tuple[bool, ...]] = {}
    for node in graph.nodes:
        src = by_name.get(node.inputs[0]) if node.inputs else None
        if node.name in client or node.op in (Op.INPUT, Op.GATHER, Op.BOOTSTRAP, Op.ADD,
                                              Op.SUB, Op.CONCAT):
            cost[node.name] = 0
            chain_real[node.name] = False
        elif node.op in AFFINE_OPS:
            real = node.op is not Op.RESHAPE
            if transformer and _free_constant(node, src, readers, graph.output):
                # a plaintext addition, or a scale the MATMUL before folds into its masks
                cost[node.name] = 0
                chain_real[node.name] = bool(src is not None and merges(src)
                                             and chain_real[src.name])
            elif src is not None and merges(src):
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
        elif node.op in _CONSTRUCTED:
            if node.op is Op.MATMUL:
                fold = tuple(into_matrix(by_name[s]) for s in node.inputs)
            elif node.op is Op.LAYERNORM:
                fold = (into_matrix(src),)
            else:
                fold = (src is not None and merges(src),)
            folds[node.name] = fold
            shapes = [by_name[s].shape for s in node.inputs]
            cost[node.name] = _construct(node, shapes, BOOTSTRAP_RING // 2, stats or {},
                                         fold).levels
        else:
            raise CompileError(f"{node.op.value} node {node.name!r} has no HE cost; "
                               "approximate the activations first")
    return cost, folds


def _free_constant(node: Node, src: Node | None, readers, output: str) -> bool:
    """An AFFINE with a unit scale (a plaintext addition), or a constant AFFINE /
    BATCHNORM right after a MATMUL that nothing else reads (1 / sqrt(head dim): it
    folds into the product's masks)."""
    if node.op is Op.AFFINE and np.all(node.params["scale"] == 1.0):
        return True
    return (node.op in (Op.AFFINE, Op.BATCHNORM) and src is not None
            and src.op is Op.MATMUL and len(readers[src.name]) == 1 and src.name != output)


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


def _token_stride(shape: tuple[int, ...]) -> int:
    """Slots between a (T, d) value's features (tokens fastest); 1 for other ranks."""
    return next_pow2(int(np.prod(shape[:-1]))) if len(shape) >= 2 else 1


def _rotations(node: Node, in_shape, slots: int, transformer: bool = False,
               levels: int = 0) -> tuple[set[int], set[int]]:
    if node.op in (Op.CONV2D, Op.AVGPOOL2D) and len(in_shape) == 3:
        return _conv_like(node, in_shape, slots)
    if node.op is Op.GLOBALAVGPOOL:
        block = next_pow2(in_shape[1] * in_shape[2])
        return set(), {1 << t for t in range(int(math.log2(block)))}
    if node.op in (Op.LINEAR, Op.DENSE):
        if transformer and node.op is Op.LINEAR and len(in_shape) >= 2:
            # tokens fastest: the diagonal method on feature blocks of next_pow2(T) slots
            tp = _token_stride(in_shape)
            per = max(1, slots // tp)
            babies, giants = _matvec(min(in_shape[-1], per), min(node.shape[-1], per))
            return {r * tp for r in babies}, {r * tp for r in giants}
        n_out = int(np.prod(node.shape))
        return _matvec(int(np.prod(in_shape)), n_out)
    if transformer and node.op is Op.TRANSPOSE and levels:
        # a lone transpose (no product before it to fold into): of d x d blocks, 2d - 1
        # diagonals (d - 1) i apart, by baby-step giant-step (as JKLS, CCS 2018)
        d = next_pow2(max(in_shape[-2:]))
        b, g = _bsgs(2 * d - 1)
        return ({(d - 1) * i for i in range(1, b)},
                {(d - 1) * (j * b - (d - 1)) for j in range(g)} - {0})
    if transformer and node.op is Op.SLICE and levels:
        # a lone slice: its values rotated to the front, then masked
        axis = int(node.attrs["axis"]) % len(in_shape)
        stride = int(np.prod([next_pow2(d) for d in in_shape[axis + 1:]]))
        return set(), {int(node.attrs["start"]) * stride} - {0}
    if node.op is Op.REDUCESUM:
        axes = sorted(int(a) % len(in_shape) for a in node.attrs["axes"])
        count = next_pow2(int(np.prod([in_shape[a] for a in axes])))
        if len(in_shape) == 2:      # tokens fastest: tokens 1 slot apart, features tp
            stride = _token_stride(in_shape) if axes == [1] else 1
        else:                       # row-major on padded axes
            stride = int(np.prod([next_pow2(d) for d in in_shape[axes[-1] + 1:]]))
        return set(), {stride << t for t in range(int(math.log2(count)))}
    return set(), set()


def _broadcast(node: Node, in_shapes, slots: int) -> set[int]:
    """Rotations that replicate a smaller operand of an elementwise op (log2 doublings)."""
    out = next_pow2(int(np.prod(node.shape)))
    keys: set[int] = set()
    for shape in in_shapes:
        n = next_pow2(int(np.prod(shape)))
        keys |= {n << t for t in range(int(math.log2(out // n)))} if n < out else set()
    return {k for k in keys if k < slots}


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


# -- transformer constructions ----------------------------------------------------------

_CONSTRUCTED = frozenset({Op.MATMUL, Op.SOFTMAX, Op.LAYERNORM, Op.RECIPROCAL})


@dataclass(frozen=True)
class _Construction:
    """One transformer op as HE would evaluate it."""

    levels: int
    keys: frozenset[int]   # rotation offsets (before reduction modulo the slots)
    rotations: float       # one evaluation, all its ciphertexts (hoisted count half)
    units: float           # its other work in rotation units, all its ciphertexts
    ciphertexts: int       # of its input
    method: str


def _construct(node: Node, in_shapes, slots: int, stats: dict,
               fold: tuple[bool, ...]) -> _Construction:
    """The construction :data:`TRANSFORMER_ASSUMPTIONS` states for ``node``; ``fold``
    says which inputs come from a plaintext product (or affine op) that its first step
    folds into."""
    st = stats.get(node.name, {})
    sq, pt = COST["square"], COST["pt_mult"]
    shape = node.shape
    if node.op is Op.MATMUL:
        return _matmul(node, in_shapes, slots, fold)
    cts = _ciphertexts(shape, slots)
    if node.op is Op.SOFTMAX:
        n = shape[-1]
        lg = int(math.log2(next_pow2(n)))
        lo, hi = st.get("input", (-2.0 ** (EXP_MIN_SQUARINGS + 1), 0.0))
        r = max(EXP_MIN_SQUARINGS, math.ceil(math.log2(max(hi - lo, 2.0) / 2)))
        s_lo, s_hi = st.get("sum", (MAXFREE_MIN_SUM, float(n)))
        inv_levels, inv_units, inv = _inverse("reciprocal", max(s_lo, MAXFREE_MIN_SUM),
                                              max(s_hi, 2 * MAXFREE_MIN_SUM))
        # the exp's map (x - c) / 2^r + 1 (unless an affine op before takes it), r
        # squarings, the row sum's mask (it carries the reciprocal's domain map), the
        # reciprocal, one product
        levels = int(not fold[0]) + r + 1 + inv_levels + 1
        keys = frozenset({1 << j for j in range(lg)} | {-(1 << j) for j in range(lg)})
        method = (f"max-free softmax: exp by {r} squarings; row sums by {2 * lg} "
                  f"rotations; reciprocal by {inv}")
        if s_lo < MAXFREE_MIN_SUM:
            method += (f"; calibrated row sums reach {s_lo:.2g}, below 2^-10: those "
                       "rows lose precision without a row max")
        return _Construction(levels, keys, cts * 2 * lg,
                             cts * ((r + 1) * sq + inv_units + 2 * pt), cts, method)
    if node.op is Op.LAYERNORM:
        d = shape[-1]
        lg = int(math.log2(next_pow2(d)))
        stride = _token_stride(shape)
        lo, hi = st.get("var", (DEFAULT_VAR_RANGE[0] + float(node.attrs["eps"]),
                                DEFAULT_VAR_RANGE[1]))
        inv_levels, inv_units, inv = _inverse("rsqrt", lo, hi)
        # centering (unless the product before takes it), the square, the sum's mask
        # (with 1 / d and the guess's domain map), the inverse square root, one product
        levels = int(not fold[0]) + 1 + 1 + inv_levels + 1
        sums = 2 if not fold[0] else 1
        keys = frozenset({stride << j for j in range(lg)}
                         | {-(stride << j) for j in range(lg)})
        method = (f"layernorm: mean and variance by {2 * lg * sums} rotations; inverse "
                  f"square root by {inv}")
        return _Construction(levels, keys, cts * 2 * lg * sums,
                             cts * (2 * sq + inv_units + 3 * pt), cts, method)
    if node.op is Op.RECIPROCAL:
        lo, hi = st.get("input", (float(node.attrs["lo"]), float(node.attrs["hi"])))
        inv_levels, inv_units, inv = _inverse("reciprocal", lo, hi)
        return _Construction(int(not fold[0]) + inv_levels, frozenset(), 0.0,
                             cts * inv_units, cts, f"reciprocal by {inv}")
    raise CompileError(f"{node.op.value} node {node.name!r} has no HE construction")


def _matmul(node: Node, in_shapes, slots: int, fold: tuple[bool, ...]) -> _Construction:
    """Jiang, Kim, Lauter and Song (CCS 2018), A B = sum_k phi^k(sigma(A)) *
    psi^k(tau(B)) on d x d blocks (d = next_pow2 of the largest side), one block per
    head: sigma (2d - 1 diagonals) and tau (d) by baby-step giant-step, phi^k by two
    rotations and masks, psi^k by one (two with masks when several blocks share a
    ciphertext), d products with relinearization."""
    a, b = in_shapes
    m, k, n = a[-2], a[-1], b[-1]
    heads = int(np.prod(node.shape[:-2], dtype=np.int64))
    d = next_pow2(max(m, k, n))
    block = d * d
    per_ct = max(1, slots // block)
    cts = -(-heads // per_ct) * max(1, block // slots)
    keys: set[int] = set()
    rots = masks = 0.0
    if not fold[0]:              # sigma(A): offsets -(d-1) .. d-1
        bs, gs = _bsgs(2 * d - 1)
        keys |= set(range(1, bs)) | {j * bs - (d - 1) for j in range(gs)}
        rots += 0.5 * (bs - 1) + gs
        masks += 2 * d - 1
    if not fold[1]:              # tau(B): offsets d * i, i < d
        bs, gs = _bsgs(d)
        keys |= {d * i for i in range(1, bs)} | {d * bs * j for j in range(1, gs)}
        rots += 0.5 * (bs - 1) + gs - 1
        masks += d
    keys |= {i for i in range(1, d)} | {i - d for i in range(1, d)}          # phi
    keys |= {d * i for i in range(1, d)}                                     # psi
    shifts = 3 if per_ct == 1 else 4
    if per_ct > 1:
        keys |= {d * i - block for i in range(1, d)}
    rots += 0.5 * shifts * (d - 1)          # all of one ciphertext: hoisted
    masks += (shifts - 1) * (d - 1)
    levels = (0 if all(fold) else 1) + 2
    folded = ("sigma and tau folded into the products before" if all(fold)
              else "sigma folded" if fold[0] else "tau folded" if fold[1] else "")
    method = (f"JKLS product: {d}x{d} blocks, {min(per_ct, heads)} per ciphertext, "
              f"{d} products" + (f"; {folded}" if folded else ""))
    return _Construction(levels, frozenset(keys - {0}), cts * rots,
                         cts * (d * COST["square"] + masks * COST["pt_mult"]), cts, method)


@functools.lru_cache(maxsize=512)
def _inverse(kind: str, lo: float, hi: float) -> tuple[int, float, str]:
    """(levels after the input's domain map, work in rotation units per ciphertext, what
    was chosen) of 1 / x (Goldschmidt, Cheon et al., ASIACRYPT 2019: e <- e^2, 1 level
    an iteration) or 1 / sqrt(x) (Newton y (3 - x y^2) / 2: 3 levels an iteration) for x
    in [lo, hi], to TARGET_BITS bits; the initial guess (a constant, or a Chebyshev fit
    of one of INIT_DEGREES) is the one that needs the fewest levels in all."""
    recip = kind == "reciprocal"
    lo = max(float(lo), 1e-12)
    hi = max(float(hi), lo * 1.001)
    x = np.unique(np.concatenate([np.geomspace(lo, hi, 2001), np.linspace(lo, hi, 2001)]))
    scale = x if recip else np.sqrt(x)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    best = None
    for deg in (0,) + INIT_DEGREES:
        if deg == 0:
            consts = ([2.0 / (lo + hi)] if recip
                      else [s / math.sqrt(hi) for s in np.linspace(1.0, 1.7, 15)])
            guesses = [c * scale for c in consts]
        else:
            coeffs = chebyshev.chebinterpolate(
                lambda t: (1.0 / (mid + half * t)) if recip
                else 1.0 / np.sqrt(mid + half * t), deg)
            guesses = [chebyshev.chebval((x - mid) / half, coeffs) * scale]
        for u in guesses:
            n = _iterations(u, recip)
            if n is None:
                continue
            sq = COST["square"]
            if recip:
                # e0 = 1 - x y0 (1 level after a fit; after a constant it is the domain
                # map itself), then y <- y (1 + e) and e <- e^2, 1 level an iteration
                levels = (chebyshev_depth(deg) + 1 if deg else 0) + n
                units = (_poly_units(deg) + sq if deg else 0) + 2 * n * sq
            else:
                # 3 levels an iteration; after a constant y0 the first, y0 (3 - x y0^2)
                # / 2, is an affine map of x and its constant product: 1 level
                levels = (chebyshev_depth(deg) + 3 * n if deg
                          else (1 + 3 * (n - 1) if n else 0))
                units = (_poly_units(deg) if deg else 0) + 3 * n * sq
            if best is None or (levels, units) < best[:2]:
                best = (levels, units, deg, n)
    if best is None:
        raise CompileError(f"no initial guess makes the {kind} of [{lo:.3g}, {hi:.3g}] "
                           f"converge")
    levels, units, deg, n = best
    guess = f"a degree-{deg} fit" if deg else "a constant"
    name = "Goldschmidt" if recip else "Newton"
    return levels, units, (f"{name} from {guess}, {n} iterations, on [{lo:.3g}, {hi:.3g}] "
                           f"({levels} levels)")


def _iterations(u: np.ndarray, recip: bool) -> int | None:
    """Iterations until u = x y (or y sqrt(x)) is within 2^-TARGET_BITS of 1 everywhere;
    None when the initial guess does not converge."""
    limit = 2.0 if recip else math.sqrt(3.0)
    if not (np.all(u > 0) and np.all(u < limit)):
        return None
    for n in range(200):
        if np.max(np.abs(1.0 - u)) <= 2.0 ** -TARGET_BITS:
            return n
        u = u * (2.0 - u) if recip else u * (3.0 - u * u) / 2.0
    return None


def transformer_stats(graph: Graph, calibration: np.ndarray, *, margin: float = 0.1
                      ) -> dict[str, dict[str, tuple[float, float]]]:
    """The calibrated ranges the transformer constructions need, from one forward run
    of ``graph`` (the polynomial graph) on ``calibration``: each SOFTMAX's input
    (``input``, its bottom widened by ``margin`` of its width) and its row sums of
    exp(x - c), c that range's top (``sum``); each LAYERNORM's row variances plus eps
    (``var``); each RECIPROCAL's input (``input``); the multiplicative ranges widened
    by a factor 1 + margin. {} for a graph without these ops."""
    want: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if node.op in (Op.SOFTMAX, Op.LAYERNORM, Op.RECIPROCAL):
            want.setdefault(node.inputs[0], []).append(node)
    if not want:
        return {}
    stats: dict[str, dict[str, tuple[float, float]]] = {}
    grow = 1.0 + margin

    def observe(name: str, value: np.ndarray) -> None:
        for node in want.get(name, ()):
            lo, hi = float(value.min()), float(value.max())
            if node.op is Op.SOFTMAX:
                # c is the calibrated top itself: a larger score only gives exp(d) > 1,
                # which the squarings follow; the margin widens the bottom, by the spread
                # of the scores exp resolves (not an additive padding mask's -10^4)
                live = value[value >= hi - 2.0 ** (EXP_MIN_SQUARINGS + 1)]
                lo -= margin * max(float(live.max() - live.min()), 1e-3)
                sums = np.exp(value - hi).sum(axis=-1)
                stats[node.name] = {"input": (lo, hi), "sum": (float(sums.min()) / grow,
                                                               float(sums.max()) * grow)}
            elif node.op is Op.LAYERNORM:
                var = value.var(axis=-1) + float(node.attrs["eps"])
                stats[node.name] = {"var": (float(var.min()) / grow,
                                            float(var.max()) * grow)}
            elif lo > 0:
                stats[node.name] = {"input": (lo / grow, hi * grow)}

    run(graph, np.asarray(calibration, dtype=np.float64), observe=observe)
    return stats


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


def rotation_seconds(ring: int, towers: int) -> float:
    """One rotation's seconds at ``ring`` with keys of ``towers`` towers: the measured
    :data:`ROTATION_S_REF` scaled linearly in the ring and the towers."""
    p, _ = select_params(ROTATION_REF_DEPTH, ROTATION_REF_RING // 2)
    ref = keyswitch_cost(ROTATION_REF_DEPTH, p.scaling_bits, p.first_mod_bits,
                         p.num_large_digits)
    return ROTATION_S_REF * (ring / ROTATION_REF_RING) * (towers / ref)


def estimate_he(graph: Graph, *, precision_bits: int | None = None,
                stats: dict | None = None) -> HEEstimate:
    """Estimate HE cost of a polynomial graph (activations replaced by POLY nodes).

    Args:
        graph: the graph after fold_batchnorm, replace_maxpool and
            approximate_activations (any size; nothing is lowered to matrices).
            A transformer (ops in :data:`TRANSFORMER_OPS`) is priced by the
            constructions of :data:`TRANSFORMER_ASSUMPTIONS`.
        precision_bits: as for :func:`veil.compiler.plan.select_params`.
        stats: a transformer's calibrated ranges (:func:`transformer_stats`); without
            them, softmax inputs within +-2^9, row sums in [2^-10, row length], and
            :data:`DEFAULT_VAR_RANGE`.

    Returns:
        An :class:`HEEstimate`; ``fits`` is False when bootstrapping is needed.

    Raises:
        CompileError: an op without an HE cost (an activation left unapproximated).
    """
    transformer = _is_transformer(graph)
    client = _client_side(graph) if transformer else frozenset()
    cost, folds = _levels(graph, stats)
    depth_at: dict[str, int] = {}
    for node in graph.nodes:
        base = 0 if node.name in client else max((depth_at[s] for s in node.inputs),
                                                 default=0)
        depth_at[node.name] = base + cost[node.name]
    depth = depth_at[graph.output]
    max_depth = max_depth_without_bootstrapping(precision_bits)
    widest = max(int(np.prod(n.shape)) for n in graph.nodes)
    ring, scale, digits, towers = _ring(depth, max_depth, next_pow2(widest), precision_bits)
    fits = depth <= max_depth
    rot_s = rotation_seconds(ring, towers)
    layers, keys, on_path, total = _layer_rows(
        graph, cost, depth_at, fits, max_depth, ring, rot_s,
        _Transformer(client, folds, stats or {}) if transformer else None)
    return HEEstimate(depth, max_depth, on_path, total, ring, scale, digits, towers,
                      len(keys), 2 * ring * 8 * towers,
                      sum(layer.latency_s for layer in layers), tuple(layers),
                      ASSUMPTIONS + TRANSFORMER_ASSUMPTIONS if transformer else ASSUMPTIONS,
                      transformer)


@dataclass(frozen=True)
class _Transformer:
    client: frozenset[str]
    folds: dict
    stats: dict


def _layer_rows(graph: Graph, cost: dict[str, int], depth_at: dict[str, int], fits: bool,
                max_depth: int, ring: int, rot_s: float, tf: _Transformer | None = None):
    """Per-node rows, the rotation-key set, sequential bootstraps on the longest path and
    ciphertext bootstraps in all. Bootstraps are placed greedily: a value is refreshed
    when the next op needs more levels than it has left."""
    slots = ring // 2
    fresh = max_depth if fits else FRESH_LEVELS
    shapes = {n.name: n.shape for n in graph.nodes}
    left: dict[str, int] = {}            # levels left on each value
    on_path: dict[str, int] = {}
    keys: set[int] = set()
    layers, total = [], 0
    for node in graph.nodes:
        if tf is not None and node.name in tf.client:   # the client's: a fresh input
            left[node.name], on_path[node.name] = fresh, 0
            layers.append(LayerEstimate(
                node.name, node.op.value, 0, 0, int(np.prod(node.shape)),
                _ciphertexts(node.shape, slots), 0.0, 0, 0, 0.0,
                "client-side lookup" if node.op is Op.EMBED else "client-side"))
            continue
        need = cost[node.name]
        have = min((left[s] for s in node.inputs), default=fresh)
        boots = 0
        if not fits and need > have:
            boots = -(-(need - have) // LEVELS_AFTER_BOOTSTRAP)
            have += boots * LEVELS_AFTER_BOOTSTRAP
        left[node.name] = have - need
        on_path[node.name] = max((on_path[s] for s in node.inputs), default=0) + boots
        in_shape = shapes[node.inputs[0]] if node.inputs else node.shape
        n_in, n_out = _ciphertexts(in_shape, slots), _ciphertexts(node.shape, slots)
        method = ""
        if tf is not None and node.op in _CONSTRUCTED:
            c = _construct(node, [shapes[s] for s in node.inputs], slots, tf.stats,
                           tf.folds[node.name])
            layer_keys = {r % slots for r in c.keys} - {0}
            rots, other, n_in, method = c.rotations, c.units, c.ciphertexts, c.method
        else:
            babies, giants = _rotations(node, in_shape, slots, tf is not None, need)
            layer_keys = {r % slots for r in babies | giants} - {0}
            rots, other = _work(node, babies, giants, n_in, n_out)
            if tf is not None and node.op in (Op.ADD, Op.SUB, Op.MUL):
                spread = _broadcast(node, [shapes[s] for s in node.inputs], slots)
                layer_keys |= spread
                rots += n_out * len(spread)
        keys |= layer_keys
        total += boots * n_in
        latency = (rots + other) * rot_s + boots * n_in * BOOTSTRAP_S * (ring / BOOTSTRAP_RING)
        op = node.attrs.get("source", "poly") if node.op is Op.POLY else node.op.value
        layers.append(LayerEstimate(node.name, op, need, depth_at[node.name],
                                    int(np.prod(node.shape)), n_out, rots, len(layer_keys),
                                    boots, latency, method))
    return layers, keys, on_path[graph.output], total
