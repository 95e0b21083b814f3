"""Run a model on additive shares, op by op, with the model's structure kept.

The two servers know the weights in this mode. Every op has one MPC kernel in
:data:`KERNELS` (keyed by :class:`~veil.ir.Op`); a kernel declares the dealer material
it consumes (``steps``) and runs on the parties' shares (``run``). The material plan
(:func:`material_plan`) is derived by walking the graph through the same table, so the
dealer's list and the parties' consumption cannot drift apart; the registry's ``mpc``
target (``veil/ir/ops.py``) lists exactly the ops of this table (a test checks it).

Affine ops are local on each share: weights in fixed point (``f`` fractional bits),
party 0 adds the bias, and the result (2f bits) is truncated (``protocols``: faithful,
one round, with circuits; exact floor with DCFs), fused with a following ReLU or CLIP
when it is the only reader; the output, if affine, is left at 2f bits for the client to
decode. Rounds below are for circuit comparisons (the default), with DCFs in
parentheses; the circuit comparisons are exact but for the band [-2^-17, 0) real and
within |x| < 2^15 (``protocols.CMP_BITS`` and ``CMP_DROP``):

- CONV2D (stride, padding, dilation, groups): im2col windows and an exact Z_(2^64)
  product with the fixed-point weights (:func:`ring_matmul`: uint64 shares cut into
  limbs whose products run exactly in float64 BLAS); a depthwise convolution is direct
  instead (one exact uint64 multiply-add per kernel offset). ``bench/mpc_zoo.py``
  measures the variants. LINEAR, DENSE and BATCHNORM are the same on their shapes.
- AVGPOOL2D / GLOBALAVGPOOL: window sums are local; the division multiplies by the
  fixed-point reciprocal of each window's count, then truncates.
- RELU: one opening, a comparison and a multiplexer, 5 rounds (2); fused with the
  truncation before it when it is that layer's only reader, still 5 (2).
- CLIP (ReLU6, Hardtanh): both thresholds' comparisons from one opening, then the band
  and the upper bit in one round: 5 rounds (DCFs: lo + ReLU(x - lo) - ReLU(x - hi),
  2), fused with the truncation before it the same way.
- MAXPOOL2D (padding and ceil mode included): padding cells hold a public constant
  below any representable value; a tree of max(a, b) = b + ReLU(a - b) per window.
- MUL of two shared tensors (broadcasting): a Beaver product and a truncation; SQUARE
  the same; POLY (fine-tuned polynomial activations) by Horner's rule.
- SIGMOID, SILU: exact pieces plus one clamped correction (:class:`Tail`): SiLU(x) =
  ReLU(x) - p(z) and sigmoid(x) = s + (1 - 2s) p(z), s = [x >= 0], z = 2 min(|x|, e) /
  bound - 1 (bound 11 and 10, e = bound - 2^-4), p a degree-12 polynomial fitted near
  minimax to t sigma(-t)
  or sigma(-t) (t = |x|), which decay off zero (the piecewise idea of SecureML,
  Mohassel and Zhang, S&P 2017, Sec. 4.3, with the exact ReLU as the main piece). Two
  comparisons a value instead of a comparison per breakpoint; p by Paterson and
  Stockmeyer in five products. Maximum error, fixed point at f = 20 included, over the
  whole range: sigmoid 7e-5, SiLU 2.5e-4 (``tests/test_mpc_ops.py`` measures it; the
  float forms are within 4.5e-5 and 1.9e-4).
- GELU, TANH: the same :class:`Tail` form, GELU(x) = ReLU(x) - q(z) (bound 5) with q
  ~ |x| Phi(-|x|) (2e-5), tanh(x) = 2 sigmoid(2x) - 1 (1.2e-4).
- MATMUL, SOFTMAX, LAYERNORM, RECIPROCAL and the local SLICE, TRANSPOSE, AFFINE,
  REDUCESUM: ``nonlinear.py`` (matrix triples, a polynomial exp, Newton).
- HARDSIGMOID: comparison-selected exact linear pieces (0, x/6 + 1/2, 1); HARDSWISH =
  x * hardsigmoid(x) with one more Beaver product.
- LEAKYRELU, PRELU (a x + (1 - a) ReLU(x), public slopes) and ELU (ReLU plus the
  exponential chain of softmax on min(x, 0)): ``rectifiers.py``, with their bounds.
- TREE_ENSEMBLE: ``trees.py`` (every node's comparison in one batch, exact on the
  fixed-point inputs; leaf indicators as products of their paths' bits).
- ADD, SUB, RESHAPE, CONCAT, GATHER: local. An affine layer read only by an ADD/SUB
  (a residual branch) is not truncated; the sum is, once, with the other operand
  lifted to 2f bits (times 2^f, local), fused with the ReLU after it: a ResNet block
  ends in one 7-round trunc+ReLU instead of a truncation and a ReLU.

Material is consumed one layer (node) at a time: ``evaluate`` asks its ``material``
source for layer ``i`` only when it reaches it, so a process streaming from the dealer
holds one layer's material at a time. :func:`estimate_memory` bounds each process's
peak from the graph; :func:`check_memory` refuses a model over the budget before
anything is allocated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
from numpy.polynomial import chebyshev, polynomial
from scipy.special import erfc

from ...compiler.targets import lower
from ...errors import InputError, ModelTooLargeError, UnsupportedOperation
from ...ir import Graph, Op
from ...ir import eval_node as ref_node
from ...ir import kernels as ref
from . import chains, protocols as pr
from .fixed import FRAC_BITS
from .prg import Prg


def lower_for_mpc(graph: Graph) -> Graph:
    """The MPC target's lowering (``compiler.targets``: batch norms folded into the
    layer before them, attention scales into the query projection, token embeddings as
    products with the client's one-hot encoding), then :func:`merge_pooled_heads`;
    anything without a kernel here (a compiler-only op such as BOOTSTRAP) is refused."""
    g, _ = lower(graph, "mpc")
    for node in g.nodes:
        if node.op not in KERNELS:
            raise UnsupportedOperation(
                f"{node.op.value} node {node.name!r} has no MPC protocol; fine-tune it "
                "to a polynomial (veil.finetune) or use ReLU")
    return merge_pooled_heads(g)


MAX_MERGED_ENTRIES = 1 << 22


def merge_pooled_heads(graph: Graph) -> Graph:
    """An average pool read only (through reshapes) by a linear layer becomes one DENSE
    with the pool folded in, when its matrix has at most ``MAX_MERGED_ENTRIES`` entries:
    the pool's own truncation (5 rounds) goes. Exact by construction (the chain run on
    the unit vectors by the reference kernels); a classifier head over a large feature
    map (ResNet-18's 25088 -> 1000) stays as it is."""
    nodes, drop = list(graph.nodes), set()
    for node in graph.nodes:
        if node.op not in (Op.AVGPOOL2D, Op.GLOBALAVGPOOL) or node.name in drop:
            continue
        chain, cur = [node], node
        while cur.name != graph.output and len(graph.consumers(cur.name)) == 1:
            cur = graph.consumers(cur.name)[0]
            chain.append(cur)
            if cur.op is not Op.RESHAPE:
                break
        tail = chain[-1]
        in_shape = graph.node(node.inputs[0]).shape
        in_size, out_size = int(np.prod(in_shape)), int(np.prod(tail.shape))
        if tail.op not in (Op.LINEAR, Op.DENSE) or in_size * out_size > MAX_MERGED_ENTRIES:
            continue
        probe = np.vstack([np.zeros((1, in_size)), np.eye(in_size)]).reshape(
            (in_size + 1,) + in_shape)
        for n in chain:
            probe = ref_node(n, [probe])
        flat = probe.reshape(in_size + 1, -1)
        dense = tail.replace(op=Op.DENSE, inputs=node.inputs,
                             attrs={"shape": tail.shape,
                                    "source": tuple(n.name for n in chain)},
                             params={"matrix": (flat[1:] - flat[0]).T, "bias": flat[0]})
        drop.update(n.name for n in chain[:-1])
        nodes = [dense if n.name == tail.name else n for n in nodes]
    return graph.with_nodes([n for n in nodes if n.name not in drop])


def _scaled(x, frac_bits: int) -> np.ndarray:
    return np.round(np.asarray(x, dtype=np.float64) * float(2 ** frac_bits)).astype(
        np.int64).view(np.uint64)


def ring_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T in Z_(2^64) for uint64 shares x (m, k) and signed integer weights w (n, k).

    numpy has no BLAS for integers (its uint64 matmul is a plain loop, ~50x slower than
    float64 BLAS here), so x is cut into limbs of L bits and each limb's product runs
    in float64, exact while k * 2^L * max|w| <= 2^53: L is the largest such width (16
    to 21 bits for 20-bit weights, so three or four products). With huge weights (L < 8)
    the integer product."""
    if w.size == 0 or x.size == 0:
        return np.zeros((x.shape[0], w.shape[0]), np.uint64)
    wmax = float(np.abs(w).max())
    if wmax == 0.0:
        return np.zeros((x.shape[0], w.shape[0]), np.uint64)
    bits = min(32, int(np.floor(53 - np.log2(wmax * w.shape[1]))))
    if bits < 8:
        return x @ w.view(np.uint64).T
    wf = w.astype(np.float64).T
    out = np.zeros((x.shape[0], w.shape[0]), np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for shift in range(0, 64, bits):
        limb = x >> np.uint64(shift)
        if shift + bits < 64:
            limb = limb & mask
        part = (limb.astype(np.float64) @ wf).astype(np.int64).view(np.uint64)
        out += part << np.uint64(shift)
    return out


def conv_ring(x: np.ndarray, w: np.ndarray, stride, padding, dilation, groups: int
              ) -> np.ndarray:
    """Cross-correlation (torch.nn.Conv2d) of uint64 shares x (B, C, H, W) with signed
    integer weights w (O, C / groups, kh, kw), exactly in Z_(2^64)."""
    b, c = x.shape[:2]
    o, cg, kh, kw = w.shape
    og = o // groups
    ph, pw = padding
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = ref.windows(x, (kh, kw), stride, dilation)        # (B, C, Ho, Wo, kh, kw)
    ho, wo = win.shape[2:4]
    if cg == 1 and og == 1:       # depthwise: per offset, an exact uint64 multiply-add
        out = np.zeros((b, c, ho, wo), np.uint64)
        wu = w.view(np.uint64)
        for i in range(kh):
            for j in range(kw):
                out += win[..., i, j] * wu[:, 0, i, j][None, :, None, None]
        return out
    out = np.empty((b, o, ho, wo), np.uint64)
    # im2col a band of output rows at a time: at most COLS_ENTRIES column entries exist
    # at once (VGG-16's 224x224 layers would need 29 M, x3 with their limbs)
    band = max(1, COLS_ENTRIES // max(1, b * wo * cg * kh * kw))
    for g in range(groups):
        wg = w[g * og:(g + 1) * og].reshape(og, -1)
        for r in range(0, ho, band):
            part = win[:, g * cg:(g + 1) * cg, r:r + band]
            rows = part.shape[2]
            cols = part.transpose(0, 2, 3, 1, 4, 5).reshape(b * rows * wo, cg * kh * kw)
            res = ring_matmul(cols, wg)
            out[:, g * og:(g + 1) * og, r:r + rows] = res.reshape(
                b, rows, wo, og).transpose(0, 3, 1, 2)
    return out


def _half(frac_bits: int) -> np.uint64:
    """2^(f-1): added before a floor truncation by f bits, it rounds to nearest, so the
    errors of a layer's many truncations cancel instead of adding up (unbiased)."""
    return np.uint64(1) << np.uint64(frac_bits - 1)


def _power_coeffs(node) -> np.ndarray:
    """A POLY's Chebyshev series on [lo, hi] as power-basis coefficients in x."""
    lo, hi = node.attrs["lo"], node.attrs["hi"]
    in_t = chebyshev.cheb2poly(np.asarray(node.attrs["coeffs"], dtype=np.float64))
    # t = (2x - lo - hi) / (hi - lo); substitute and expand
    scale, shift = 2.0 / (hi - lo), -(hi + lo) / (hi - lo)
    out = np.zeros(1)
    for k, c in enumerate(in_t):
        out = polynomial.polyadd(out, c * polynomial.polypow([shift, scale], k))
    return out


# -- piecewise polynomials ------------------------------------------------------------------
@dataclass(frozen=True)
class Piecewise:
    """f(x) = pieces[i](x) on [breaks[i-1], breaks[i]) (pieces[0] below breaks[0], the
    last piece from breaks[-1] on); each piece a power-basis polynomial in x (ascending
    coefficients) of degree at most 1 (the evaluator's ``_piecewise`` multiplies x by
    the linear coefficient only)."""

    breaks: tuple[float, ...]
    pieces: tuple[tuple[float, ...], ...]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The approximation in floats (what the parties compute, up to fixed point)."""
        idx = np.searchsorted(np.asarray(self.breaks), x, side="right")
        return np.choose(idx, [polynomial.polyval(x, p) for p in self.pieces])


@dataclass(frozen=True)
class Tail:
    """SiLU or sigmoid as exact pieces plus a correction that decays off zero: with
    t = |x| clamped to the edge e = bound - 2^-4 and z = 2 min(t, e) / bound - 1 in
    [-1, 1),

        SiLU(x)    = ReLU(x) - p(z),       p ~ t sigma(-t)
        sigmoid(x) = s + (1 - 2 s) p(z),   p ~ sigma(-t), s = [x >= 0],

    p a power-basis polynomial in z (``coeffs`` ascending; on [-1, 1] they stay below
    ~1, so rounding them to 2^-f and the powers' truncations cost ~1e-5). Beyond the
    edge the correction is the fit's value there, where the true one is smaller: the
    error is at most t sigma(-t) <= 11 e^-11 = 1.8e-4 (SiLU, bound 11), sigma(-t) <=
    e^-10 = 4.5e-5 (sigmoid, bound 10), as if it were left out."""

    op: Op
    bound: float
    coeffs: tuple[float, ...]

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    @property
    def edge(self) -> float:
        """Where the parties clamp t: 2^-p inside the bound (``TAIL_BAND_PRECISION``), so
        their coarse comparison never takes p beyond the fit."""
        return self.bound - 2.0 ** -TAIL_BAND_PRECISION

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The approximation in floats (what the parties compute, up to fixed point and
        the comparison's 2^-p band below the edge, where p is taken at t or at the
        edge): the correction at min(t, edge), which beyond the edge is the fit's value
        there, as small as the tail it stands for."""
        t = np.abs(x)
        corr = polynomial.polyval(2 * np.minimum(t, self.edge) / self.bound - 1,
                                  self.coeffs)
        if self.op in RELU_TAILS:
            return np.maximum(x, 0.0) - corr
        s = (x >= 0).astype(np.float64)
        y = s + (1 - 2 * s) * corr
        return 2.0 * y - 1.0 if self.op is Op.TANH else y


#: The correction's range and degree per op: max error (float form) 1.9e-4 for SiLU
#: (mostly the tail beyond 11), 4.5e-5 for sigmoid (``tests/test_mpc_ops.py`` measures
#: both, with fixed point). Degree 12 costs the same products as 10 (its top
#: coefficient multiplies z^4 locally) and, on EfficientNet-B0's zoo crops, brings the
#: float model's logit error from 1.9e-2 to 5.9e-3 of the smallest logit range.
TAILS = {Op.SILU: (11.0, 12), Op.SIGMOID: (10.0, 12), Op.GELU: (5.0, 12),
         Op.TANH: (5.0, 12)}
#: ops of the form ReLU(x) - p(z) (the others: s + (1 - 2 s) p(z))
RELU_TAILS = (Op.SILU, Op.GELU)
#: k: z + 1 = 2 t / bound is t times an integer c over 2^k, the bound rounded up to
#: 2^(k+1) / c (GELU and tanh 5.02, SiLU 11.13, sigmoid 10.04), so the parties form
#: z + 1 at f + k bits from t with no rounding and open it on a (f + k + 3)-bit ring
#: (4 bytes; at 2f bits it took 6)
TAIL_SCALE_BITS = 8


def tail_scale(nominal: float) -> tuple[int, float]:
    """(c, bound): the integer c = floor(2^(k+1) / nominal) and the bound 2^(k+1) / c
    >= nominal it stands for (``TAIL_SCALE_BITS``)."""
    c = int(2.0 ** (TAIL_SCALE_BITS + 1) // nominal)
    return c, 2.0 ** (TAIL_SCALE_BITS + 1) / c


def _fit_tail(op: Op, fn: Callable) -> Tail:
    """A near-minimax fit: least squares on 2000 Chebyshev nodes of [0, bound] (the
    nominal bound rounded up by :func:`tail_scale`), reweighted by the error (Lawson's
    algorithm, 200 passes)."""
    nominal, degree = TAILS[op]
    bound = tail_scale(nominal)[1]
    k = np.arange(2000)
    z = np.cos(np.pi * (k + 0.5) / 2000)
    y = fn((z + 1) * bound / 2)
    basis = chebyshev.chebvander(z, degree)
    w = np.full(z.size, 1.0 / z.size)
    for _ in range(200):
        root = np.sqrt(w)
        cheb = np.linalg.lstsq(basis * root[:, None], y * root, rcond=None)[0]
        w = w * np.abs(basis @ cheb - y)
        w /= w.sum()
        # weights that shrink into subnormal floats change nothing in the fit but make
        # every pass ~50x slower (5 s per op): keep them at a floor that is still zero
        # for the sums
        np.maximum(w, 1e-200, out=w)
    return Tail(op, bound, tuple(float(c) for c in chebyshev.cheb2poly(cheb)))


@lru_cache(maxsize=None)
def approximation(op: Op) -> Piecewise | Tail:
    """What the parties compute for a SIGMOID, SILU (:class:`Tail`) or HARDSIGMOID /
    HARDSWISH (:class:`Piecewise`, exact), as a float function."""
    if op is Op.SIGMOID:
        return _fit_tail(op, lambda t: ref.sigmoid_fn(-t))
    if op is Op.SILU:
        return _fit_tail(op, lambda t: t * ref.sigmoid_fn(-t))
    if op is Op.GELU:        # GELU(x) = ReLU(x) - |x| Phi(-|x|)
        return _fit_tail(op, lambda t: t * 0.5 * erfc(t / np.sqrt(2.0)))
    if op is Op.TANH:        # tanh(x) = 2 sigmoid(2x) - 1
        return _fit_tail(op, lambda t: ref.sigmoid_fn(-2.0 * t))
    if op in (Op.HARDSIGMOID, Op.HARDSWISH):
        return Piecewise((-3.0, 3.0), ((0.0,), (0.5, 1.0 / 6.0), (1.0,)))
    raise UnsupportedOperation(f"no MPC approximation of {op.value}")


# -- material steps -------------------------------------------------------------------------
STEP_KINDS = ("trunc", "trunc_relu", "relu", "mul", "drelu", "select", "clip",
              "trunc_clip", "square", "mulsq", "matmul", "tpoly", "texp", "tsq")
#: a matrix product step's largest dimension (g, m, k, n each), so a request cannot
#: make the dealer build an absurd triple
MAX_MATMUL_DIM = 1 << 16


@dataclass(frozen=True)
class Step:
    """One interactive step: ``kind`` on ``size`` values per input; a "trunc" or "tsq"
    by ``shift`` bits when not 0 (the default: f), a "tpoly" or "texp" chain at
    ``shift`` fractional bits (``chains.chain_bits``); a "matmul" (``g`` products of (m, k) by
    (k, n) shared matrices, ``dims`` = (g, m, k, n), ``size`` = g m n) with matrix
    triples.

    ``width`` (0: the full 64 bits) narrows a comparison ("relu", "drelu", "select",
    for values whose range the kernel knows) to l = ``width`` ring bits, opened in
    ceil(l / 8) bytes, with the lowest ``drop`` (0: ``CMP_DROP``) left out of the tree;
    a "relu" needs |x| < 2^(l-2) to lift x back."""

    kind: str
    size: int
    shift: int = 0
    dims: tuple[int, ...] = ()
    width: int = 0
    drop: int = 0

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise InputError(f"unknown material kind {self.kind!r}")
        if self.shift and (self.kind not in ("trunc", "tsq", "tpoly", "texp")
                           or not 2 <= self.shift <= 60):
            raise InputError(f"a {self.kind} step cannot shift by {self.shift} bits")
        narrow = ("relu", "drelu", "select")
        if self.width and (self.kind not in narrow or not 16 <= self.width <= 63):
            raise InputError(f"a {self.kind} step cannot open {self.width} bits")
        if self.drop and (self.kind not in narrow or not self.width
                          or not 1 <= self.drop <= self.width - 3):
            raise InputError(f"a {self.kind} step cannot leave out {self.drop} bits")
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if self.kind == "matmul":
            g, m, _, n = self.dims if len(self.dims) == 4 else (0, 0, 0, 0)
            if len(self.dims) != 4 or not all(1 <= d <= MAX_MATMUL_DIM for d in self.dims) \
                    or self.size != g * m * n:
                raise InputError("a matmul step has dims (g, m, k, n) and size g m n")
        elif self.dims:
            raise InputError(f"a {self.kind} step has no dims")

    def wire(self) -> list:
        """[kind, size], [kind, size, shift], [kind, size, shift, width, drop] or
        [kind, size, 0, g, m, k, n]: how a party asks the dealer for it."""
        if self.dims:
            return [self.kind, self.size, self.shift, *self.dims]
        if self.width or self.drop:
            return [self.kind, self.size, self.shift, self.width, self.drop]
        return [self.kind, self.size] + ([self.shift] if self.shift else [])

    @classmethod
    def from_wire(cls, item) -> "Step":
        kind, size, *rest = item
        if len(rest) not in (0, 1, 3, 5):
            raise InputError("a step is [kind, size], [kind, size, shift], [kind, size, "
                             "shift, width, drop] or [kind, size, 0, g, m, k, n]")
        if len(rest) == 3:
            return cls(str(kind), int(size), int(rest[0]), (), int(rest[1]), int(rest[2]))
        return cls(str(kind), int(size), int(rest[0]) if rest else 0,
                   tuple(int(d) for d in rest[1:]))


@dataclass(frozen=True)
class Layer:
    """The material of one node (a layer): its position in the graph and its steps."""

    node: str
    steps: tuple[Step, ...]


class Program:
    """A lowered graph prepared for the parties: shapes, which affine layers absorb
    their ReLU, each node's material steps (from :data:`KERNELS`), and the fixed-point
    weights (scaled once, on first use)."""

    def __init__(self, graph: Graph, frac_bits: int = FRAC_BITS) -> None:
        self.graph, self.frac_bits = graph, int(frac_bits)
        self.shapes = {n.name: tuple(n.shape) for n in graph.nodes}
        self.output = graph.output
        # an affine layer read only by an ADD/SUB stays at 2f bits: the sum is
        # truncated once (the other operand lifted to 2f locally), fused with its ReLU;
        # one read only by a GELU or SiLU too: the tail truncates it with its ReLU
        self.deferred = {n.name for n in graph.nodes if KERNELS[n.op].affine
                         and n.name != graph.output and len(graph.consumers(n.name)) == 1
                         and graph.consumers(n.name)[0].op in (Op.ADD, Op.SUB) + RELU_TAILS}
        self.lifting = {n.name for n in graph.nodes if n.op in (Op.ADD, Op.SUB)
                        and any(s in self.deferred for s in n.inputs)}
        # such a sum read only by a LAYERNORM stays at 2f bits too: the layer norm's
        # centering truncates it (``nonlinear._layernorm``)
        self.deferred |= {n.name for n in graph.nodes if n.name in self.lifting
                          and n.name != graph.output and len(graph.consumers(n.name)) == 1
                          and graph.consumers(n.name)[0].op is Op.LAYERNORM}
        self.truncating = {n.name for n in graph.nodes if n.name not in self.deferred and
                           (KERNELS[n.op].affine or n.name in self.lifting)}
        self.fused: dict[str, str] = {}
        for node in graph.nodes:
            readers = graph.consumers(node.name)
            if (node.name in self.truncating and node.name != graph.output
                    and len(readers) == 1 and readers[0].op in (Op.RELU, Op.CLIP)):
                self.fused[node.name] = readers[0].name
        self.absorbed = set(self.fused.values())
        # a softmax read only by a matrix product, as its left operand, is left
        # unnormalized: the product scales its rows by the reciprocals instead
        # (``nonlinear``: n values a row after the product, where the softmax's rows
        # have as many values as the product contracts over)
        self.normalizes = {r.name: n.name for n in graph.nodes if n.op is Op.SOFTMAX
                           and n.name != graph.output
                           for r in graph.consumers(n.name)
                           if len(graph.consumers(n.name)) == 1 and r.op is Op.MATMUL
                           and r.inputs[0] == n.name and r.inputs[1] != n.name}
        # a matrix product of two affine layers' results (attention's Q K^T), each
        # reaching it only through reshapes and transposes: the layers truncate to
        # f - f // 2 and f // 2 bits instead of f, so the product comes out at f bits
        # with no truncation of its own (``nonlinear._matmul``; the operands' rounding,
        # 2^-(f // 2), is the price)
        self.half_bits: dict[str, int] = {}
        self.exact_products: set[str] = set()
        for n in graph.nodes:
            if n.op is Op.MATMUL and n.name not in self.normalizes:
                src = [self._affine_source(s) for s in n.inputs]
                if src[0] and src[1] and src[0] != src[1]:
                    f = self.frac_bits
                    self.half_bits.update({src[0]: f - f // 2, src[1]: f // 2})
                    self.exact_products.add(n.name)
        self.steps = {n.name: tuple(KERNELS[n.op].steps(self, n)) for n in graph.nodes}
        self.layers = [Layer(n.name, self.steps[n.name]) for n in graph.nodes
                       if self.steps[n.name]]
        self.layer_of = {layer.node: i for i, layer in enumerate(self.layers)}
        last: dict[str, int] = {}
        for i, node in enumerate(graph.nodes):
            for s in node.inputs:
                last[s] = i
        self.last_use = last
        self._weights: dict[tuple[str, str, int], np.ndarray] = {}

    def param(self, node, name: str, bits: int) -> np.ndarray:
        """A parameter in fixed point, kept for the next run unless it is one of the
        huge ones (over ``CACHED_ENTRIES``: VGG-16's classifier), which the kernels
        scale a block of rows at a time instead (:func:`_rows_product`)."""
        key = (node.name, name, bits)
        if key in self._weights:
            return self._weights[key]
        out = _scaled(node.params[name], bits)
        if out.size <= CACHED_ENTRIES:
            self._weights[key] = out
        return out

    def _affine_source(self, name: str) -> str | None:
        """The affine layer whose truncated result reaches ``name`` only through
        single-reader reshapes and transposes, if any (:attr:`half_bits`)."""
        graph = self.graph
        node = graph.node(name)
        while node.op in (Op.RESHAPE, Op.TRANSPOSE):
            if len(graph.consumers(node.name)) != 1:
                return None
            node = graph.node(node.inputs[0])
        if (node.name in self.truncating and node.name not in self.fused
                and node.name != self.output and len(graph.consumers(node.name)) == 1
                and _divisor_bits(self, node) == 0):
            return node.name
        return None

    def size(self, node) -> int:
        return int(np.prod(node.shape))


def material_plan(graph: Graph) -> list[Layer]:
    """The dealer material one inference consumes, layer by layer, in the order the
    parties use it (derived from :data:`KERNELS`)."""
    return Program(graph).layers


COMPARISONS = ("circuit", "fss")


def dealer_material(steps: list[Step], batch: int, prg: Prg, frac_bits: int = FRAC_BITS,
                    cmp: str = "circuit") -> tuple[list, list]:
    """Both parties' material for ``steps`` (one layer, or any list) on ``batch``
    inferences (one list per party). ``cmp`` picks the comparisons: "circuit" (binary
    circuits, cheap to compute and to deal, five rounds per ReLU layer) or "fss" (DCF
    keys, two rounds, ~40x the material)."""
    if cmp not in COMPARISONS:
        raise InputError(f"unknown comparison protocol {cmp!r}; use one of {COMPARISONS}")
    out: tuple[list, list] = ([], [])
    for step in steps:
        n = step.size * batch
        if step.kind == "matmul":
            g, m, k, n_ = step.dims
            pair = pr.batched_matrix_triples(g * batch, m, k, n_, prg)
        elif step.kind in chains.CHAINS:    # (no comparison: the same for DCFs)
            pair = chains.chain_material(step.kind, n, frac_bits, prg, step.shift)
        elif cmp == "circuit" and step.kind == "trunc":
            pair = pr.circuit_trunc_material(n, step.shift or frac_bits, prg)
        elif step.kind in ("square", "mulsq"):
            pair = pr.squares(n, prg, with_product=step.kind == "mulsq")
        elif cmp == "circuit" and step.kind != "mul":
            kind = {"drelu": "sign"}.get(step.kind, step.kind)
            pair = pr.circuit_cmp_material(kind, n, prg, frac_bits, step.width, step.drop)
        elif step.kind == "clip":               # both differences through one ReLU
            pair = pr.relu_material(2 * n, prg)
        elif step.kind == "trunc_clip":
            pair = pr.trunc_relu_material(2 * n, frac_bits, prg)
        elif step.kind in ("relu", "select"):
            pair = pr.relu_material(n, prg)
        elif step.kind == "drelu":
            pair = pr.sign_material(n, prg)
        elif step.kind == "trunc":
            pair = pr.trunc_material(n, step.shift or frac_bits, prg)
        elif step.kind == "trunc_relu":
            pair = pr.trunc_relu_material(n, frac_bits, prg)
        else:
            pair = pr.triples(n, prg)
        out[0].append(pair[0])
        out[1].append(pair[1])
    return out


def layer_material(layers: list[Layer], batch: int, prg: Prg, frac_bits: int = FRAC_BITS,
                   cmp: str = "circuit") -> tuple[list[list], list[list]]:
    """Both parties' material for every layer at once (in-process runs and tests; the
    processes stream it layer by layer)."""
    out: tuple[list, list] = ([], [])
    for layer in layers:
        m0, m1 = dealer_material(list(layer.steps), batch, prg, frac_bits, cmp)
        out[0].append(m0)
        out[1].append(m1)
    return out


def output_frac_bits(graph: Graph, frac_bits: int = FRAC_BITS) -> int:
    """Fractional bits of the output shares: a final affine layer (or a sum with one)
    is not truncated (the client divides by 2^2f instead, which saves the rounds and
    their material)."""
    return 2 * frac_bits if graph.output in Program(graph).truncating else frac_bits


# -- the parties' run -----------------------------------------------------------------------
@dataclass
class Run:
    """One party's state while it evaluates: its channel, the program, and the current
    layer's material (consumed in the order its kernel declared)."""

    party: int
    ch: pr.Channel
    prog: Program
    items: list = field(default_factory=list)
    #: an unnormalized softmax's reciprocals of its row sums, by node, until the matrix
    #: product reading it scales its rows (``Program.normalizes``)
    row_scales: dict = field(default_factory=dict)

    @property
    def f(self) -> int:
        return self.prog.frac_bits

    def take(self):
        if not self.items:
            raise InputError("the layer's material ran out: dealer and parties disagree "
                             "on the plan")
        return self.items.pop(0)

    def public(self, raw) -> np.uint64 | np.ndarray:
        """A public ring constant as this party's share (party 0 holds it)."""
        return raw if self.party == 0 else np.zeros_like(raw)

    def _apply(self, fn: Callable, *flat: np.ndarray) -> np.ndarray:
        """``fn(*flat, material)`` with the next step's material: at once, or chunk by
        chunk (each chunk's values with that chunk's material, fetched only then) when
        the step streams in :class:`Chunked` pieces. Every protocol here is elementwise
        in its flat values, so the pieces' results join into the whole."""
        m = self.take()
        if not isinstance(m, Chunked):
            return fn(*flat, m)
        out, at = [], 0
        for k, size in enumerate(m.sizes):
            out.append(fn(*(a[at:at + size] for a in flat), m.load(k)))
            at += size
        if at != flat[0].size:
            raise InputError("a streamed step's chunks do not cover its values")
        return np.concatenate(out, axis=-1)

    def trunc(self, y: np.ndarray, relu: bool = False, shift: int = 0) -> np.ndarray:
        """y / 2^shift (default f), ReLU'd if ``relu``: rounded to nearest with DCF
        material (which floors, so 2^(shift-1) is added first), stochastically with
        circuit material. The step must declare the same shift."""
        shift = shift or self.f
        if self.party == 0 and self.items and pr.rounds_to_floor(self.items[0]):
            y = y + _half(shift)
        fn = pr.trunc_relu if relu else pr.truncate_shares
        return self._apply(lambda v, m: fn(self.ch, self.party, v, m, shift),
                           y.ravel()).reshape(y.shape)

    def tail_poly(self, y: np.ndarray, coeffs, bits: int = 0) -> np.ndarray:
        """p(z) at f bits for z + 1 = y at f + ``TAIL_SCALE_BITS`` bits and the degree-12
        ``coeffs`` (a "tpoly" step of shift ``bits``: the chain's own fractional bits,
        ``chains.chain_bits``)."""
        bits = chains.chain_bits(self.f, bits)
        c_f = np.array([_scaled(c, bits) for c in coeffs], np.uint64)
        c_2f = np.array([_scaled(c, 2 * bits) for c in coeffs], np.uint64)
        return self._apply(lambda v, m: chains.tail_poly(self.ch, self.party, v, m, c_f,
                                                         c_2f, self.f, bits),
                           y.ravel()).reshape(y.shape)

    def exp(self, d: np.ndarray, bits: int = 0) -> np.ndarray:
        """exp(d) at f bits for d in [-17, 1] (a "texp" step of shift ``bits``,
        ``chains.exp_chain``)."""
        return self._apply(lambda v, m: chains.exp_chain(self.ch, self.party, v, m, self.f,
                                                         bits),
                           d.ravel()).reshape(d.shape)

    def trunc_square(self, y: np.ndarray, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(y / 2^shift (default f), its square) from one opening (a "tsq" step of the
        same shift)."""
        both = self._apply(lambda v, m: np.stack(chains.trunc_square(self.ch, self.party, v,
                                                                     m, self.f, shift)),
                           y.ravel())
        return both[0].reshape(y.shape), both[1].reshape(y.shape)

    def mul(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self._apply(lambda a, b, m: pr.mul(self.ch, self.party, a, b, m),
                           x.ravel(), y.ravel()).reshape(x.shape)

    def matmul(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """x @ y for shared (g, m, k) and (g, k, n) (a "matmul" step, never split: in a
        layer that streams, its one piece is fetched when the run reaches it)."""
        m = self.take()
        if isinstance(m, Chunked):
            if len(m.sizes) != 1:
                raise InputError("a matrix product's material cannot stream in chunks")
            m = m.load(0)
        return pr.matmul(self.ch, self.party, x, y, m)

    def square(self, x: np.ndarray) -> np.ndarray:
        return self._apply(lambda a, m: pr.square(self.ch, self.party, a, m),
                           x.ravel()).reshape(x.shape)

    def mul_square(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """x y and x^2, stacked (2, *x.shape), in one round (a "mulsq" step)."""
        return self._apply(lambda a, b, m: np.stack(pr.mul_square(self.ch, self.party, a, b,
                                                                    m)),
                           x.ravel(), y.ravel()).reshape((2,) + x.shape)

    def trunc_and_relu(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(y / 2^f, ReLU of it) from one opening (a "trunc_relu" step)."""
        if self.party == 0 and self.items and pr.rounds_to_floor(self.items[0]):
            y = y + _half(self.f)
        both = self._apply(lambda v, m: np.stack(pr.trunc_and_relu(self.ch, self.party, v, m,
                                                                   self.f)),
                           np.ascontiguousarray(y).ravel())
        return both[0].reshape(y.shape), both[1].reshape(y.shape)

    def relu(self, x: np.ndarray) -> np.ndarray:
        return self._apply(lambda v, m: pr.relu(self.ch, self.party, v, m),
                           x.ravel()).reshape(x.shape)

    def drelu(self, x: np.ndarray) -> np.ndarray:
        return self._apply(lambda v, m: pr.drelu(self.ch, self.party, v, m),
                           x.ravel()).reshape(x.shape)

    def clip(self, x: np.ndarray, lo, hi, truncate: bool = False) -> np.ndarray:
        """min(max(x, lo), hi) for f-bit constants; with ``truncate``, of x / 2^f."""
        if truncate and self.party == 0 and pr.rounds_to_floor(self.items[0]):
            x = x + _half(self.f)
        return self._apply(lambda v, m: pr.clip(self.ch, self.party, v, lo, hi, m, self.f),
                           np.ascontiguousarray(x).ravel()).reshape(x.shape)

    def select(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        """v * [d >= 0] (v at any scale, unchanged)."""
        return self._apply(lambda a, b, m: pr.select(self.ch, self.party, a, b, m),
                           np.ascontiguousarray(v).ravel(),
                           np.ascontiguousarray(d).ravel()).reshape(v.shape)


@dataclass(frozen=True)
class Chunked:
    """One step's material consumed ``sizes[k]`` values at a time, ``load(k)`` giving
    chunk k's material when the run reaches it (the processes fetch it from the dealer
    then): a layer whose material would not fit the memory budget at once streams this
    way (:func:`streams_in_chunks`), at one set of rounds per chunk."""

    sizes: tuple[int, ...]
    load: Callable[[int], object]


MaterialSource = Callable[[int], list]


def evaluate(party: int, ch: pr.Channel, graph: Graph | Program, x: np.ndarray,
             material: list | MaterialSource, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Party ``party``'s share of the output for its share ``x`` (batch, *input shape).

    ``material`` is either every layer's material (a list, one list per layer of
    :func:`material_plan`) or a function ``i -> layer i's material``, called once per
    layer when the run reaches it (the processes fetch from the dealer there)."""
    prog = graph if isinstance(graph, Program) else Program(graph, frac_bits)
    g = prog.graph
    batch = x.shape[0]
    fetch = material.__getitem__ if isinstance(material, list) else material
    values = {g.input.name: np.asarray(x, dtype=np.uint64).reshape((batch,) + g.input.shape)}
    run = Run(party, ch, prog)
    for i, node in enumerate(g.nodes[1:], start=1):
        args = [values[s] for s in node.inputs]
        if prog.steps[node.name]:
            run.items = list(fetch(prog.layer_of[node.name]))
        out = KERNELS[node.op].run(run, node, args)
        if run.items:
            raise InputError(f"layer {node.name!r} left material unused: dealer and "
                             "parties disagree on the plan")
        values[node.name] = out.reshape((batch,) + tuple(node.shape))
        for s in node.inputs:            # free what nothing later reads
            if prog.last_use.get(s) == i and s != g.output:
                values.pop(s, None)
    return values[g.output].reshape(batch, -1)


# -- kernels --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    """One op on shares: the material it consumes (``steps(program, node)``, per input)
    and its party-side run (``run(run, node, args) -> share``). ``affine`` kernels
    leave 2f fractional bits when they are the output."""

    steps: Callable
    run: Callable
    affine: bool = False


def _no_steps(prog, node):
    return []


def _affine_steps(prog: Program, node) -> list[Step]:
    if node.name == prog.output or node.name not in prog.truncating:
        return []
    reader = prog.fused.get(node.name)
    kind = "trunc" if reader is None else (
        "trunc_clip" if prog.graph.node(reader).op is Op.CLIP else "trunc_relu")
    return [Step(kind, prog.size(node), _trunc_shift(prog, node))]


#: Average pools over more values than this get extra bits in their reciprocal.
POOL_EXACT_COUNT = 64


def _divisor_bits(prog: Program, node) -> int:
    """k, extra fractional bits of an average pool's reciprocal: 1/n rounded to f bits
    is off by up to n 2^-(f+1) relative (0.6% for the 112x112 pools of EfficientNet's
    squeeze-excite blocks, which the following layers amplify), so a pool over more
    than ``POOL_EXACT_COUNT`` values takes 1/n at f + k bits, k = min(ceil(log2 n), 10)
    (relative error below n 2^-(f+k+1) <= 6e-6 for n <= 2^14), and its truncation
    shifts by f + k; the pooled values must stay below 2^(22-k) (2^12 real at k = 10).
    Only for a plain truncation (not fused with a ReLU, not deferred, not the output)."""
    if node.op not in (Op.AVGPOOL2D, Op.GLOBALAVGPOOL) or node.name in prog.fused \
            or node.name in prog.deferred or node.name == prog.output:
        return 0
    in_shape = prog.shapes[node.inputs[0]]
    if node.op is Op.GLOBALAVGPOOL:
        count = in_shape[1] * in_shape[2]
    else:
        count = int(_pool_counts(node, in_shape)[0].max())
    return min(int(np.ceil(np.log2(count))), 10) if count > POOL_EXACT_COUNT else 0


def _trunc_shift(prog: Program, node) -> int:
    """An affine layer's truncation shift as its step declares it: 0 (f) unless an
    average pool's reciprocal has extra bits (:func:`_divisor_bits`)."""
    if node.name in prog.half_bits:          # a Q K^T operand (``Program.half_bits``)
        return 2 * prog.frac_bits - prog.half_bits[node.name]
    extra = _divisor_bits(prog, node)
    return prog.frac_bits + extra if extra else 0


def _finish(run: Run, node, y: np.ndarray) -> np.ndarray:
    """An affine layer's 2f-bit result: truncated (with its ReLU when fused), or left
    at 2f bits as the output or for the ADD/SUB that reads it."""
    if node.name == run.prog.output or node.name in run.prog.deferred:
        return y
    reader = run.prog.fused.get(node.name)
    if reader is not None and run.prog.graph.node(reader).op is Op.CLIP:
        attrs = run.prog.graph.node(reader).attrs
        return run.clip(y, _scaled(attrs["lo"], run.f), _scaled(attrs["hi"], run.f),
                        truncate=True)
    return run.trunc(y, relu=reader is not None, shift=_trunc_shift(run.prog, node))


def _bias2f(run: Run, node, name: str = "bias") -> np.ndarray:
    return run.prog.param(node, name, 2 * run.f)


def _conv(run: Run, node, args):
    w = run.prog.param(node, "weight", run.f).view(np.int64)
    a = node.attrs
    y = conv_ring(args[0], w, a["stride"], a["padding"], a["dilation"], int(a["groups"]))
    if run.party == 0:
        y += _bias2f(run, node)[None, :, None, None]
    return _finish(run, node, y)


def _rows_product(run: Run, node, name: str, x: np.ndarray) -> np.ndarray:
    """x @ W.T for the node's weight matrix ``name`` (n, k) in fixed point; a matrix over
    ``CACHED_ENTRIES`` is scaled and multiplied a block of rows at a time, so it never
    exists whole in fixed point or float64 limbs beside its float parameters."""
    w = node.params[name]
    if w.size <= CACHED_ENTRIES:
        return ring_matmul(x, run.prog.param(node, name, run.f).view(np.int64))
    rows = max(1, CACHED_ENTRIES // w.shape[1])
    out = np.empty((x.shape[0], w.shape[0]), np.uint64)
    for at in range(0, w.shape[0], rows):
        out[:, at:at + rows] = ring_matmul(x, _scaled(w[at:at + rows], run.f).view(np.int64))
    return out


def _linear(run: Run, node, args):
    x = args[0]
    y = _rows_product(run, node, "weight", x.reshape(-1, x.shape[-1]))
    y = y.reshape(x.shape[:-1] + (y.shape[-1],))
    if run.party == 0:
        y += _bias2f(run, node)
    return _finish(run, node, y)


def _dense(run: Run, node, args):
    x = args[0]
    y = _rows_product(run, node, "matrix", x.reshape(x.shape[0], -1))
    if run.party == 0:
        y += _bias2f(run, node)
    return _finish(run, node, y)


def _batchnorm(run: Run, node, args):
    x = args[0]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = x * run.prog.param(node, "scale", run.f).reshape(shape)
    if run.party == 0:
        y += _bias2f(run, node, "shift").reshape(shape)
    return _finish(run, node, y)


def _pool_counts(node, in_shape) -> tuple[np.ndarray, tuple]:
    """Per output cell, the count an average pool divides by (torch's rules), and the
    (top/left, bottom/right) zero padding of the window sums."""
    (kh, kw), (sh, sw), (ph, pw) = node.attrs["kernel"], node.attrs["stride"], \
        node.attrs["padding"]
    _, h, w = in_shape
    _, ho, wo = node.shape
    eh = max(0, (ho - 1) * sh + kh - (h + 2 * ph))
    ew = max(0, (wo - 1) * sw + kw - (w + 2 * pw))
    if node.attrs.get("count_include_pad", True):
        ones = np.pad(np.ones((1, 1, h + 2 * ph, w + 2 * pw)), ((0, 0), (0, 0), (0, eh),
                                                                 (0, ew)))
    else:
        ones = np.pad(np.ones((1, 1, h, w)), ((0, 0), (0, 0), (ph, ph + eh), (pw, pw + ew)))
    counts = ref.windows(ones, (kh, kw), (sh, sw)).sum(axis=(-1, -2))[0, 0, :ho, :wo]
    return counts, ((ph, ph + eh), (pw, pw + ew))


def _window_values(x: np.ndarray, node, fill) -> np.ndarray:
    """(B, C, Ho, Wo, kh * kw) windows of x padded with ``fill`` (a ring element)."""
    _, pad = _pool_counts(node, x.shape[1:])
    _, ho, wo = node.shape
    if any(pad[0]) or any(pad[1]):
        x = np.pad(x, ((0, 0), (0, 0)) + pad, constant_values=fill)
    win = ref.windows(x, node.attrs["kernel"], node.attrs["stride"])[:, :, :ho, :wo]
    return win.reshape(win.shape[:4] + (-1,))


def _avgpool(run: Run, node, args):
    counts, _ = _pool_counts(node, args[0].shape[1:])
    total = _window_values(args[0], node, np.uint64(0)).sum(axis=-1, dtype=np.uint64)
    bits = run.f + _divisor_bits(run.prog, node)
    return _finish(run, node, total * _scaled(1.0 / counts, bits))


def _global_avgpool(run: Run, node, args):
    x = args[0]
    total = x.sum(axis=(2, 3), keepdims=True, dtype=np.uint64)
    bits = run.f + _divisor_bits(run.prog, node)
    return _finish(run, node, total * _scaled(1.0 / (x.shape[2] * x.shape[3]), bits))


def tree_widths(width: int) -> list[int]:
    """The comparisons per window at each level of a max tree over ``width`` values."""
    out = []
    while width > 1:
        out.append(width // 2)
        width = width // 2 + width % 2
    return out


def max_tree(run: Run, vals: np.ndarray) -> np.ndarray:
    """The max over the last axis, max(a, b) = b + ReLU(a - b) in a tree (one "relu"
    step per level of :func:`tree_widths`); the last axis is kept, of length 1."""
    while vals.shape[-1] > 1:
        pairs = vals.shape[-1] // 2
        a, b = vals[..., 0:2 * pairs:2], vals[..., 1:2 * pairs:2]
        m = b + run.relu(np.ascontiguousarray(a - b))
        vals = np.concatenate([m, vals[..., 2 * pairs:]], axis=-1)
    return vals


def _maxpool_steps(prog, node):
    return [Step("relu", prog.size(node) * k)
            for k in tree_widths(int(np.prod(node.attrs["kernel"])))]


def _maxpool(run: Run, node, args):
    # padding: a public value, -2^(l-2) in ring units, below every activation in the
    # comparisons' range (|v| < 2^(l-2), l = pr.CMP_BITS), so it never wins and a - b
    # stays within the reduced ring's bound |a - b| < 2^(l-1)
    low = np.uint64((1 << 64) - (1 << (pr.CMP_BITS - 2)) if run.party == 0 else 0)
    return max_tree(run, _window_values(args[0], node, low))[..., 0]


def _relu_steps(prog, node):
    return [] if node.name in prog.absorbed else [Step("relu", prog.size(node))]


def _relu(run: Run, node, args):
    if node.name in run.prog.absorbed:      # computed with the affine layer before it
        return args[0]
    return run.relu(args[0])


def _clip_steps(prog, node):
    return [] if node.name in prog.absorbed else [Step("clip", prog.size(node))]


def _clip(run: Run, node, args):
    """min(max(x, lo), hi), exact (``protocols.clip``); computed by the affine layer
    before it, with its truncation, when it is that layer's only reader."""
    if node.name in run.prog.absorbed:
        return args[0]
    return run.clip(args[0], *(_scaled(node.attrs[k], run.f) for k in ("lo", "hi")))


def _piece_steps(prog, node):
    pw, n = approximation(node.op), prog.size(node)
    steps = [Step("drelu", n * len(pw.breaks)), Step("mul", n * len(pw.pieces)),
             Step("trunc", n)]
    if node.op is Op.HARDSWISH:
        steps += [Step("mul", n), Step("trunc", n)]
    return steps


def _piecewise(run: Run, x: np.ndarray, pw: Piecewise) -> np.ndarray:
    """sum_i [t_(i-1) <= x < t_i] p_i(x) for linear pieces, f bits: the signs of every
    breakpoint in one batch of comparisons, one Beaver product per piece."""
    f = run.f
    signs = run.drelu(np.concatenate(
        [x.ravel() - run.public(_scaled(t, f)) for t in pw.breaks]))
    signs = signs.reshape((len(pw.breaks),) + x.shape)
    one = run.public(np.uint64(1))
    ind = [one - signs[0]] + [signs[i] - signs[i + 1] for i in range(len(pw.breaks) - 1)] \
        + [signs[-1]]
    vals = []
    for coeffs in pw.pieces:                # each piece at 2f bits, locally
        v = np.broadcast_to(run.public(_scaled(coeffs[0], 2 * f)), x.shape).copy()
        if len(coeffs) > 1:
            v += x * _scaled(coeffs[1], f)
        vals.append(v)
    prod = run.mul(np.stack(ind), np.stack(vals))
    return run.trunc(prod.sum(axis=0, dtype=np.uint64))


#: a tail's comparisons: on l = 36 ring bits (|x| < 2^14 real at f = 20) opened
#: narrow (5 bytes, not 8); the sign's tree leaves out the bits below 2^-14 real (the
#: function is continuous there: an error below 2^-15), the clamp's below 2^-4 (the
#: edge is 2^-4 inside the fit, and within 2^-4 below it t may be taken at the edge)
TAIL_CMP_BITS = 36
#: the fractional bits of the transformer's tail's chain (``chains.chain_bits``; the
#: other tails run at f): at c = f/2 = 10 the powers open on 23-bit rings (3 bytes), h
#: on 33 (5), and p comes out at 2c = f bits with no truncation, 18 bytes a value where
#: f bits took 36; the chain's rounding, under 7.6e-3 for GELU (``tail_chain_error``;
#: 1.9e-3 measured), joins the fit's
TAIL_CHAIN_BITS = {Op.GELU: 10}


def tail_chain_error(op: Op, frac_bits: int = FRAC_BITS) -> float:
    """What a :class:`Tail`'s chain at ``TAIL_CHAIN_BITS`` adds to the op's error bound
    (``chains.tail_error`` over z in [-1, 1]; 0 for the tails whose chain runs at f,
    whose few ulps their bounds already hold)."""
    bits = TAIL_CHAIN_BITS.get(op, 0)
    if not bits:
        return 0.0
    z = np.linspace(-1.0, 1.0, 4001)
    return float(chains.tail_error(approximation(op).coeffs, z, frac_bits, bits).max())
TAIL_SIGN_PRECISION = 14
TAIL_BAND_PRECISION = 4


def _tail_steps(prog, node):
    approximation(node.op)      # fitted now, with the plan, not during the online run
    n = prog.size(node)
    f = prog.frac_bits
    sign = dict(width=TAIL_CMP_BITS, drop=max(1, f - TAIL_SIGN_PRECISION))
    band = dict(width=TAIL_CMP_BITS, drop=max(1, f - TAIL_BAND_PRECISION))
    if node.inputs[0] in prog.deferred:          # a 2f-bit input: truncated with its ReLU
        steps = [Step("trunc_relu", n)]
    elif node.op in RELU_TAILS:
        steps = [Step("relu", n, **sign)]
    else:
        steps = [Step("drelu", n, **sign), Step("mul", n)]
    steps += [Step("relu", n, **band),                              # min(t, edge)
              Step("tpoly", n, TAIL_CHAIN_BITS.get(node.op, 0))]       # p(z), f bits
    if node.op not in RELU_TAILS:
        steps.append(Step("mul", n))
    return steps


def _tail(run: Run, node, args):
    """:class:`Tail`: the comparison that gives ReLU(x) (SiLU) or s = [x >= 0] and
    t = x (2 s - 1) (sigmoid); t clamped to the edge, bound - 2^-4, by one coarse ReLU
    (t - ReLU(t - edge)); z = 2 t / bound - 1; p(z) by Paterson and Stockmeyer
    (SIAM J. Comput. 1973) for degree 12: z, z^2, then z^3 and z^4 = (z^2)^2 together,
    the cubics q_0, q_1, q_2 locally at 2f bits with the top coefficient's c_12 z^4
    added to q_2, and Horner's rule in z^4, h = q_1 + z^4 q_2 (3f bits, truncated to f)
    and p = q_0 + z^4 h (2f bits, truncated to f): five truncations, every product
    between them local
    (``chains.tail_poly``: each truncated value is a public part plus a mask the
    dealer knows, so a product of two needs only dealt cross products), where Beaver
    products would open eight values more. With |z| <= 1 every one of these is below 1
    (``tests/test_mpc_ops.py``), so the powers' truncations run on a 48-bit ring (six
    bytes an opening), h's 3f = 60 bits stay inside its ring's 2^62 and p's 2f bits
    inside a 43-bit ring's 2^41 (six bytes, where p at 3f took eight). Beyond the edge
    the correction is the fit's value at the edge, where the one it stands for is
    smaller still: the same error as leaving it out (1.8e-4 for SiLU, 4.5e-5 sigmoid,
    2e-6 GELU), for a ReLU (6.4 bytes) where selecting p by a comparison took 14.4.
    For sigmoid, s + (1 - 2 s) q with one more product."""
    x, f = args[0], run.f
    tail = approximation(node.op)
    if tail.degree != 12:
        raise UnsupportedOperation("the MPC correction is evaluated for degree 12")
    lift = np.uint64(1) << np.uint64(f)
    if node.inputs[0] in run.prog.deferred:
        # the affine layer before left x at 2f bits: x and ReLU(x) from one opening
        x, relu = run.trunc_and_relu(x)
        t = np.uint64(2) * relu - x
    elif node.op in RELU_TAILS:
        relu = run.relu(x)
        t = np.uint64(2) * relu - x
    else:
        s = run.drelu(x)
        t = run.mul(x, np.uint64(2) * s - run.public(np.uint64(1)))
    # t' = min(t, edge) = t - ReLU(t - edge): the coarse comparison errs only within
    # 2^-p below the edge (t' = edge there), so t' <= edge < bound and p(z) is never
    # taken beyond the fit
    edge = run.public(_scaled(tail.edge, f))
    t = t - run.relu(np.ascontiguousarray(t - edge))
    # z + 1 = 2 t' / bound at 2f bits; p(z) at f (``chains.tail_poly``: five
    # openings, the products local from the dealer's cross products)
    # z + 1 = t c / 2^k (``tail_scale``): t c read at f + k bits
    corr = run.tail_poly(t * np.uint64(tail_scale(TAILS[node.op][0])[0]), tail.coeffs,
                         TAIL_CHAIN_BITS.get(node.op, 0))
    if node.op in RELU_TAILS:
        return relu - corr
    y = s * lift + corr - np.uint64(2) * run.mul(s, corr)
    return np.uint64(2) * y - run.public(lift) if node.op is Op.TANH else y


def _piece_op(run: Run, node, args):
    x = args[0]
    y = _piecewise(run, x, approximation(node.op))
    if node.op is Op.HARDSWISH:
        y = run.trunc(run.mul(x, y))
    return y


def _square(run: Run, node, args):
    return run.trunc(run.mul(args[0], args[0]))


def _poly_steps(prog, node):
    return [Step("mul", prog.size(node)), Step("trunc", prog.size(node))] * (
        len(_power_coeffs(node)) - 1)


def _poly(run: Run, node, args):
    coeffs, x, f = _power_coeffs(node), args[0], run.f
    acc = np.broadcast_to(run.public(_scaled(coeffs[-1], f)), x.shape).copy()
    for c in coeffs[-2::-1]:          # Horner: acc = acc * x + c
        acc = run.trunc(run.mul(acc, x)) + run.public(_scaled(c, f))
    return acc


def _aligned(run: Run, node, args) -> list[np.ndarray]:
    """Both operands broadcast to the node's batched shape."""
    b = args[0].shape[0]
    rank = len(node.shape)
    out = []
    for a in args:
        a = a.reshape((b,) + (1,) * (rank + 1 - a.ndim) + a.shape[1:])
        out.append(np.broadcast_to(a, (b,) + tuple(node.shape)))
    return out


def _lifted(run: Run, node, args) -> list[np.ndarray]:
    """The operands of an ADD/SUB; when one is an untruncated affine layer (2f bits),
    the others are lifted to 2f bits too (times 2^f, local and exact)."""
    if node.name not in run.prog.lifting:
        return args
    lift = np.uint64(1) << np.uint64(run.f)
    return [a if s in run.prog.deferred else a * lift for a, s in zip(args, node.inputs)]


def _add(run, node, args):
    x, y = _aligned(run, node, _lifted(run, node, args))
    return _finish(run, node, x + y) if node.name in run.prog.lifting else x + y


def _sub(run, node, args):
    x, y = _aligned(run, node, _lifted(run, node, args))
    return _finish(run, node, x - y) if node.name in run.prog.lifting else x - y


def _mul_steps(prog, node):
    return [Step("mul", prog.size(node)), Step("trunc", prog.size(node))]


def _mul(run, node, args):
    x, y = _aligned(run, node, args)
    return run.trunc(run.mul(np.ascontiguousarray(x), np.ascontiguousarray(y)))


def _reshape(run, node, args):
    return args[0].reshape((args[0].shape[0],) + tuple(node.shape))


def _concat(run, node, args):
    return np.concatenate(args, axis=int(node.attrs["axis"]) + 1)


def _gather(run, node, args):
    x = args[0]
    flat = np.concatenate([x.reshape(x.shape[0], -1), np.zeros((x.shape[0], 1), np.uint64)],
                          axis=1)
    idx = np.asarray(node.attrs["indices"], dtype=np.int64)
    return flat[:, np.where(idx < 0, flat.shape[1] - 1, idx)]


def _identity(run, node, args):
    return args[0]


KERNELS: dict[Op, Kernel] = {
    Op.INPUT: Kernel(_no_steps, _identity),
    Op.CONV2D: Kernel(_affine_steps, _conv, affine=True),
    Op.LINEAR: Kernel(_affine_steps, _linear, affine=True),
    Op.DENSE: Kernel(_affine_steps, _dense, affine=True),
    Op.BATCHNORM: Kernel(_affine_steps, _batchnorm, affine=True),
    Op.AVGPOOL2D: Kernel(_affine_steps, _avgpool, affine=True),
    Op.GLOBALAVGPOOL: Kernel(_affine_steps, _global_avgpool, affine=True),
    Op.MAXPOOL2D: Kernel(_maxpool_steps, _maxpool),
    Op.RELU: Kernel(_relu_steps, _relu),
    Op.CLIP: Kernel(_clip_steps, _clip),
    Op.SIGMOID: Kernel(_tail_steps, _tail),
    Op.SILU: Kernel(_tail_steps, _tail),
    Op.GELU: Kernel(_tail_steps, _tail),
    Op.TANH: Kernel(_tail_steps, _tail),
    Op.HARDSIGMOID: Kernel(_piece_steps, _piece_op),
    Op.HARDSWISH: Kernel(_piece_steps, _piece_op),
    Op.SQUARE: Kernel(_mul_steps, _square),
    Op.POLY: Kernel(_poly_steps, _poly),
    Op.MUL: Kernel(_mul_steps, _mul),
    Op.ADD: Kernel(_affine_steps, _add),
    Op.SUB: Kernel(_affine_steps, _sub),
    Op.RESHAPE: Kernel(_no_steps, _reshape),
    Op.CONCAT: Kernel(_no_steps, _concat),
    Op.GATHER: Kernel(_no_steps, _gather),
}
from .nonlinear import KERNELS as _TRANSFORMER_KERNELS  # noqa: E402  (they use Run, Step)
KERNELS.update(_TRANSFORMER_KERNELS)
from .rectifiers import KERNELS as _RECTIFIER_KERNELS  # noqa: E402  (the same)
KERNELS.update(_RECTIFIER_KERNELS)
from .trees import KERNELS as _TREE_KERNELS  # noqa: E402  (TREE_ENSEMBLE: trees.py)
KERNELS.update(_TREE_KERNELS)
MPC_OPS = frozenset(KERNELS)


# -- memory ---------------------------------------------------------------------------------
# Values per dealer request when the processes stream circuit material (a multiple of
# 8: chunks of packed bit rows join on whole bytes).
CHUNK = 1 << 18
#: parameters with more entries are not kept in fixed point between runs
CACHED_ENTRIES = 1 << 22
#: a convolution's im2col columns are built at most this many entries at a time
COLS_ENTRIES = 1 << 22
#: a layer whose material for the batch exceeds this (one party's bytes) streams chunk
#: by chunk as the run consumes it (:class:`Chunked`) instead of being held whole
LAZY_BYTES = 256 << 20
BASE_BYTES = 160 << 20        # an idle party or dealer process (Python, numpy, links)
DEFAULT_BUDGET = 2 << 30      # bytes per process


@lru_cache(maxsize=None)
def _bytes_per_value(kind: str, frac_bits: int, cmp: str, width: int = 0, drop: int = 0
                     ) -> float:
    """One party's material bytes per value of a step, measured on 4096 values (so it
    follows the material): what a party holds once its seeded halves are expanded
    (circuits: a truncation 24, a ReLU ~60, a fused truncation+ReLU ~84, a Beaver
    product 24), more than the dealer sends (``prg.Deal``)."""
    n = 4096
    (m0,), _ = dealer_material([Step(kind, 1, width=width, drop=drop)], n, Prg(),
                               frac_bits, cmp)
    return sum(a.nbytes for a in pr.material_arrays([m0]).values()) / n


def material_bytes(steps, batch: int, frac_bits: int = FRAC_BITS, cmp: str = "circuit"
                   ) -> int:
    """One party's material bytes for ``steps`` on ``batch`` inputs."""
    return int(sum(_matmul_bytes(s) * batch if s.kind == "matmul" else
                   _bytes_per_value(s.kind, frac_bits, cmp, s.width, s.drop) * s.size * batch
                   for s in steps))


def _matmul_bytes(step: Step) -> int:
    """A matrix triple's shares (A, B and C) for one input."""
    g, m, k, n = step.dims
    return 8 * g * (m * k + k * n + m * n)


def streams_in_chunks(steps, batch: int, frac_bits: int = FRAC_BITS, cmp: str = "circuit",
                      above: int = LAZY_BYTES) -> bool:
    """Whether a layer with ``steps`` streams its material in :class:`Chunked` pieces of
    ``CHUNK`` values (circuit material over ``above`` bytes; DCF keys are not split,
    and a matrix triple is one piece of its own: a MATMUL layer, whose triple is all
    its material but a truncation's, never streams)."""
    return cmp == "circuit" and not (steps and steps[0].kind == "matmul") and \
        material_bytes(steps, batch, frac_bits, cmp) > above


def chunk_sizes(total: int) -> tuple[int, ...]:
    """The values of each ``CHUNK``-sized request of a step of ``total`` values."""
    return tuple(min(CHUNK, total - at) for at in range(0, total, CHUNK))


def _work_bytes(prog: Program, node, batch: int, cmp: str = "circuit",
                above: int = LAZY_BYTES) -> int:
    """Temporaries of one node's kernel: im2col columns and their float64 limbs for a
    convolution, bit rows and comparison state (~150 bytes a value) for comparisons."""
    out = prog.size(node) * batch
    if node.op is Op.CONV2D:
        w = node.params["weight"]
        k = int(np.prod(w.shape[1:]))
        groups = node.attrs["groups"]
        cols = 0 if w.shape[1] == 1 and w.shape[0] == groups else min(
            out // w.shape[0] * k, COLS_ENTRIES + node.shape[-1] * k)
        return 8 * (3 * cols + 4 * out)
    if node.op in (Op.MAXPOOL2D, Op.AVGPOOL2D):
        return 8 * 3 * out * int(np.prod(node.attrs["kernel"]))
    steps = prog.steps[node.name]
    cmp_values = sum(s.size for s in steps) * batch
    if streams_in_chunks(steps, batch, prog.frac_bits, cmp, above):
        # the kernel's own arrays (up to ~3 copies of its widest step) and one chunk's
        # comparison state
        widest = max(s.size for s in steps) * batch
        return 8 * (4 * out + 3 * widest) + 150 * min(CHUNK, cmp_values)
    return 8 * 4 * out + 150 * cmp_values


def estimate_memory(graph: Graph, batch: int = 1, frac_bits: int = FRAC_BITS,
                    cmp: str = "circuit", layers_held: int = 1, above: int = LAZY_BYTES
                    ) -> dict[str, int]:
    """Estimated peak bytes of each process for ``batch`` inputs: a party holds the
    weights (float64 and fixed point), the live activations, the current node's
    temporaries and ``layers_held`` layers of material (received chunks, the joined
    arrays and the parsed material: 3 copies; measured peaks in ``bench/mpc_zoo.py``
    stay below the estimate); the dealer one chunk (``CHUNK`` values, circuits) or
    step (DCFs) for both parties (generated, packed one half at a time, then encrypted
    and framed: ~6 copies of one half, measured)."""
    prog = Program(graph, frac_bits)
    # float parameters, their fixed-point copies (all but the huge ones, which are
    # scaled a block at a time: float64 block, fixed point and limbs)
    sizes = [int(a.size) for n in graph.nodes for a in n.params.values()]
    weights = 8 * sum(sizes) + 8 * sum(z for z in sizes if z <= CACHED_ENTRIES) \
        + (24 * CACHED_ENTRIES if any(z > CACHED_ENTRIES for z in sizes) else 0)
    live: dict[str, int] = {graph.input.name: 8 * prog.size(graph.input) * batch}
    party = dealer = 0
    for i, node in enumerate(graph.nodes[1:], start=1):
        live[node.name] = 8 * prog.size(node) * batch
        steps = prog.steps[node.name]
        if streams_in_chunks(steps, batch, frac_bits, cmp, above):
            # one chunk held, and with lookahead the next one arriving meanwhile
            held = 3 * min(layers_held, 2) * max(
                material_bytes([s], batch, frac_bits, cmp) if s.kind == "matmul" else
                material_bytes([Step(s.kind, c, s.shift)], 1, frac_bits, cmp)
                for s in steps for c in chunk_sizes(s.size * batch)[:1])
        else:
            held = 3 * layers_held * material_bytes(steps, batch, frac_bits, cmp)
        party = max(party, sum(live.values()) + held
                    + _work_bytes(prog, node, batch, cmp, above))
        dealer = max([dealer] + [6 * material_bytes(
            [s if s.kind == "matmul" else
             Step(s.kind, min(s.size * batch, CHUNK) if cmp == "circuit" else s.size * batch,
                  s.shift)],
            batch if s.kind == "matmul" else 1, frac_bits, cmp) for s in prog.steps[node.name]])
        for s in node.inputs:
            if prog.last_use.get(s) == i and s != graph.output:
                live.pop(s, None)
    return {"party": BASE_BYTES + weights + party, "dealer": BASE_BYTES + dealer}


def check_memory(graph: Graph, batch: int = 1, budget: int = DEFAULT_BUDGET,
                 frac_bits: int = FRAC_BITS, cmp: str = "circuit", name: str = "the model",
                 layers_held: int = 1, above: int = LAZY_BYTES) -> dict[str, int]:
    """:func:`estimate_memory`, raising ModelTooLargeError when a process would exceed
    ``budget`` bytes; call it before allocating anything for the model."""
    est = estimate_memory(graph, batch, frac_bits, cmp, layers_held, above)
    for role, need in est.items():
        if need > budget:
            raise ModelTooLargeError(
                f"{name} needs an estimated {need / 2**20:.0f} MiB in the MPC {role} "
                f"process for a batch of {batch}, over the memory budget of "
                f"{budget / 2**20:.0f} MiB; raise the budget (--memory-budget) or send "
                "smaller batches")
    return est


def stream_threshold(graph: Graph, batch: int = 1, budget: int = DEFAULT_BUDGET,
                     frac_bits: int = FRAC_BITS, cmp: str = "circuit", layers_held: int = 1,
                     above: int = LAZY_BYTES) -> int:
    """The largest material size (at most ``above``) such that streaming every layer
    with more material chunk by chunk keeps :func:`estimate_memory` within ``budget``:
    only the layers that must stream do (held whole, a layer needs no extra rounds and
    overlaps its fetch with the run). 0 when even streaming every layer does not fit
    (``check_memory`` then refuses)."""
    if cmp != "circuit":
        return above
    prog = Program(graph, frac_bits)
    sizes = sorted({material_bytes(layer.steps, batch, frac_bits, cmp)
                    for layer in prog.layers}, reverse=True)
    for t in [above] + [z - 1 for z in sizes if z - 1 < above]:
        if max(estimate_memory(graph, batch, frac_bits, cmp, layers_held, t).values()) \
                <= budget:
            return t
    return 0


def max_batch(graph: Graph, budget: int = DEFAULT_BUDGET, limit: int = 4096,
              frac_bits: int = FRAC_BITS, cmp: str = "circuit", layers_held: int = 2) -> int:
    """The largest power-of-two batch (at most ``limit``, at least 1) whose
    :func:`estimate_memory` fits ``budget`` in every process (``layers_held``: a party's
    current layer and its one-layer lookahead, as ``Party`` checks): clients split
    larger batches into requests of this size instead of having the parties refuse
    them."""
    best, b = 1, 2
    while b <= limit:
        t = stream_threshold(graph, b, budget, frac_bits, cmp, layers_held)
        if max(estimate_memory(graph, b, frac_bits, cmp, layers_held, t).values()) > budget:
            break
        best, b = b, 2 * b
    return best

