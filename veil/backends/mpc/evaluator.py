"""Run a model on additive shares: the original network, exactly (no approximation).

``lower_for_mpc`` folds batch norms and collapses each chain of affine ops into one DENSE
matrix (the compiler's own passes), leaving ReLU, max pooling, squares and polynomials.
The two servers know the weights in this mode; a dense layer is then local on each
share (multiply by the fixed-point weights, party 0 adds the bias) followed by an exact
truncation, and the non-linear layers use the dealer's material (``protocols``; rounds
below for circuit comparisons, the default, and in parentheses for DCFs):

- the output DENSE: not truncated; the client decodes 2f fractional bits;
- DENSE then RELU: truncation and sign from one opening, then one Beaver product, 8
  rounds for both (2) (``protocols.trunc_relu``); DENSE alone: 7 (1);
- RELU elsewhere: one comparison and one Beaver product, 8 rounds (2);
- MAXPOOL2D (no padding): a tree of max(a, b) = b + ReLU(a - b) over each window;
- SQUARE and POLY (fine-tuned polynomial activations, evaluated in the power basis by
  Horner's rule): one Beaver product and a truncation per degree.

:func:`material_plan` lists what the dealer must produce per inference, in order;
:func:`dealer_material` produces it; :func:`evaluate` is one party's whole run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.polynomial import chebyshev, polynomial

from ...compiler.passes import fold_batchnorm, linearize
from ...errors import InputError, UnsupportedOperation
from ...ir import Graph, Op
from . import protocols as pr
from .fixed import FRAC_BITS
from .prg import Prg

MPC_OPS = frozenset({Op.INPUT, Op.DENSE, Op.RELU, Op.MAXPOOL2D, Op.SQUARE, Op.POLY, Op.ADD})


def lower_for_mpc(graph: Graph) -> Graph:
    """Batch norms folded, affine chains as DENSE; anything without an exact two-party
    protocol here (GELU, SiLU, sigmoid, tanh, padded max pooling) is refused."""
    g, _ = fold_batchnorm(graph)
    g, _ = linearize(g)
    for node in g.nodes:
        if node.op not in MPC_OPS:
            raise UnsupportedOperation(
                f"{node.op.value} node {node.name!r} has no exact MPC protocol; fine-tune it "
                "to a polynomial (veil.finetune) or use ReLU")
        if node.op is Op.MAXPOOL2D and any(node.attrs["padding"]):
            raise UnsupportedOperation(f"max pooling {node.name!r} with padding is not "
                                       "supported in MPC")
    return g


def _scaled(x: np.ndarray, frac_bits: int) -> np.ndarray:
    return np.round(np.asarray(x, dtype=np.float64) * float(2 ** frac_bits)).astype(
        np.int64).view(np.uint64)


_LIMB = 16


def ring_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T in Z_(2^64) for uint64 shares x (b, k) and signed integer weights w (n, k).
    numpy has no BLAS for integers, so x is cut into four 16-bit limbs and each limb's
    product runs in float64, exact while k * 2^16 * max|w| < 2^53; otherwise (huge
    weights) the integer product."""
    if w.size == 0 or float(np.abs(w).max()) * w.shape[1] * 2.0 ** _LIMB >= 2.0 ** 53:
        return x @ w.view(np.uint64).T
    wf = w.astype(np.float64).T
    out = np.zeros((x.shape[0], w.shape[0]), np.uint64)
    mask = np.uint64((1 << _LIMB) - 1)
    for i in range(64 // _LIMB):
        limb = ((x >> np.uint64(_LIMB * i)) & mask).astype(np.float64)
        part = (limb @ wf).astype(np.int64).view(np.uint64)
        out += part << np.uint64(_LIMB * i)
    return out


def _half(frac_bits: int) -> np.uint64:
    """2^(f-1): added before a floor truncation by f bits, it rounds to nearest, so the
    errors of a layer's many truncations cancel instead of adding up (unbiased)."""
    return np.uint64(1) << np.uint64(frac_bits - 1)


def _window_indices(node, in_shape) -> np.ndarray:
    """(outputs, window) flat input indices of a max-pooling node."""
    c, h, w = in_shape
    (kh, kw), (sh, sw) = node.attrs["kernel"], node.attrs["stride"]
    _, ho, wo = node.shape
    ch, oy, ox, dy, dx = np.meshgrid(np.arange(c), np.arange(ho), np.arange(wo),
                                     np.arange(kh), np.arange(kw), indexing="ij")
    idx = (ch * h + oy * sh + dy) * w + ox * sw + dx
    return idx.reshape(c * ho * wo, kh * kw)


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


def _fused(graph: Graph) -> dict[str, str]:
    """DENSE nodes whose only reader is a RELU: truncation and ReLU share one opening
    (``protocols.trunc_relu``). Maps the dense node to the ReLU it absorbs."""
    out = {}
    for node in graph.nodes:
        readers = graph.consumers(node.name)
        if (node.op is Op.DENSE and node.name != graph.output and len(readers) == 1
                and readers[0].op is Op.RELU):
            out[node.name] = readers[0].name
    return out


STEP_KINDS = ("trunc", "trunc_relu", "relu", "mul")


@dataclass(frozen=True)
class Step:
    """One interactive step: ``kind`` ("trunc", "trunc_relu", "relu" or "mul") on
    ``size`` values per input."""

    kind: str
    size: int

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise InputError(f"unknown material kind {self.kind!r}")


def material_plan(graph: Graph) -> list[Step]:
    """The dealer material one inference consumes, in the order the parties use it."""
    shapes = {n.name: n.shape for n in graph.nodes}
    fused = _fused(graph)
    absorbed = set(fused.values())
    steps = []
    for node in graph.nodes:
        size = int(np.prod(node.shape))
        if node.op is Op.DENSE and node.name != graph.output:
            steps.append(Step("trunc_relu" if node.name in fused else "trunc", size))
        elif node.op is Op.RELU and node.name not in absorbed:
            steps.append(Step("relu", size))
        elif node.op is Op.MAXPOOL2D:
            width = _window_indices(node, shapes[node.inputs[0]]).shape[1]
            while width > 1:
                steps.append(Step("relu", size * (width // 2)))
                width = width // 2 + width % 2
        elif node.op is Op.SQUARE:
            steps += [Step("mul", size), Step("trunc", size)]
        elif node.op is Op.POLY:
            steps += [Step("mul", size), Step("trunc", size)] * (len(_power_coeffs(node)) - 1)
    return steps


COMPARISONS = ("circuit", "fss")


def dealer_material(steps: list[Step], batch: int, prg: Prg, frac_bits: int = FRAC_BITS,
                    cmp: str = "circuit") -> tuple[list, list]:
    """Both parties' material for ``batch`` inferences (one list per party). ``cmp``
    picks the comparisons: "circuit" (binary circuits, cheap to compute and to deal,
    eight rounds per ReLU layer) or "fss" (DCF keys, two rounds, ~15x the material)."""
    if cmp not in COMPARISONS:
        raise InputError(f"unknown comparison protocol {cmp!r}; use one of {COMPARISONS}")
    out: tuple[list, list] = ([], [])
    for step in steps:
        n = step.size * batch
        if cmp == "circuit" and step.kind in ("trunc", "trunc_relu"):
            pair = pr.circuit_trunc_material(n, frac_bits, prg, step.kind == "trunc_relu")
        elif cmp == "circuit" and step.kind == "relu":
            pair = pr.circuit_relu_material(n, prg)
        elif step.kind == "relu":
            pair = pr.relu_material(n, prg)
        elif step.kind == "trunc":
            pair = pr.trunc_material(n, frac_bits, prg)
        elif step.kind == "trunc_relu":
            pair = pr.trunc_relu_material(n, frac_bits, prg)
        else:
            pair = pr.triples(n, prg)
        out[0].append(pair[0])
        out[1].append(pair[1])
    return out


def output_frac_bits(graph: Graph, frac_bits: int = FRAC_BITS) -> int:
    """Fractional bits of the output shares: a final dense layer is not truncated (the
    client divides by 2^2f instead, which saves the round and its DCFs)."""
    return 2 * frac_bits if graph.node(graph.output).op is Op.DENSE else frac_bits


def evaluate(party: int, ch: pr.Channel, graph: Graph, x: np.ndarray, material: list,
             frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Party ``party``'s share of the output for its share ``x`` (batch, *input shape)."""
    batch = x.shape[0]
    values = {graph.input.name: np.asarray(x, dtype=np.uint64).reshape(batch, -1)}
    shapes = {n.name: n.shape for n in graph.nodes}
    supply = iter(material)
    fused = _fused(graph)
    for node in graph.nodes[1:]:
        if node.name in values:          # a ReLU computed with its dense layer
            continue
        args = [values[s] for s in node.inputs]
        if node.op is Op.DENSE:
            w = _scaled(node.params["matrix"], frac_bits).view(np.int64)
            y = ring_matmul(args[0], w)
            if party == 0:
                y = y + _scaled(node.params["bias"], 2 * frac_bits)
                if node.name != graph.output:
                    y = y + _half(frac_bits)    # truncation rounds to nearest
            if node.name in fused:
                out = pr.trunc_relu(ch, party, y.ravel(), next(supply),
                                    frac_bits).reshape(batch, -1)
                values[fused[node.name]] = out
                values[node.name] = out    # nothing else reads the pre-ReLU value
                continue
            if node.name == graph.output:
                out = y                    # left at 2f bits: the client decodes it
            else:
                out = pr.truncate_exact(ch, party, y.ravel(), next(supply),
                                        frac_bits).reshape(batch, -1)
        elif node.op is Op.ADD:
            out = args[0] + args[1]
        elif node.op is Op.RELU:
            out = pr.relu(ch, party, args[0].ravel(), next(supply)).reshape(batch, -1)
        elif node.op is Op.MAXPOOL2D:
            vals = args[0][:, _window_indices(node, shapes[node.inputs[0]])]
            while vals.shape[-1] > 1:
                pairs = vals.shape[-1] // 2
                a, b = vals[..., 0:2 * pairs:2], vals[..., 1:2 * pairs:2]
                m = b + pr.relu(ch, party, (a - b).ravel(), next(supply)).reshape(b.shape)
                vals = np.concatenate([m, vals[..., 2 * pairs:]], axis=-1)
            out = vals[..., 0]
        elif node.op is Op.SQUARE:
            sq = pr.mul(ch, party, args[0].ravel(), args[0].ravel(), next(supply))
            sq = sq + _half(frac_bits) * np.uint64(party == 0)
            out = pr.truncate_exact(ch, party, sq, next(supply), frac_bits).reshape(batch, -1)
        elif node.op is Op.POLY:
            coeffs = _power_coeffs(node)
            xv = args[0].ravel()
            acc = np.full(xv.shape, _scaled(coeffs[-1], frac_bits)) * np.uint64(party == 0)
            for c in coeffs[-2::-1]:          # Horner: acc = acc * x + c
                prod = pr.mul(ch, party, acc, xv, next(supply))
                prod = prod + _half(frac_bits) * np.uint64(party == 0)
                acc = pr.truncate_exact(ch, party, prod, next(supply), frac_bits)
                if party == 0:
                    acc = acc + _scaled(c, frac_bits)
            out = acc.reshape(batch, -1)
        else:  # lower_for_mpc admits nothing else
            raise UnsupportedOperation(f"{node.op.value} cannot run on shares")
        values[node.name] = out
    return values[graph.output]
